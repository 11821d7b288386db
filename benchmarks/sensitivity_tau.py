"""Kendall tau of the allocators' additive sensitivities as predictors of FID on a cache (issue 14).

    python benchmarks/sensitivity_tau.py --cache caches/digits-dit-seed1.sqlite \
        --single caches/digits-dit-single20.sqlite --multiquantizer multiquantizers/digits-dit.safetensors

Score of a config = −Σ over its layers of: MixDQ single-layer MSE damage, HAWQ Tr(H)/n·‖ΔW‖²
(16 probes), HAWQ Fisher-weighted ‖ΔW‖² (16 items), relative error (the "error" baseline); with
the cache-restricted regret at each ``--targets`` budget (FID of the best-scored config at or under
it minus the best FID there, :func:`sensitivity.predictors.metrics.cache_regret`).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import kendalltau


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--single", required=True)
    ap.add_argument("--multiquantizer", required=True)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--targets", default="3.4,3.6,3.8,4.0")
    args = ap.parse_args(argv)
    from sensitivity.predictors.metrics import cache_regret
    from sensitivity.sizes import SizeTable
    from sensitivity.allocators.hawq import sensitivity_table
    from sensitivity.allocators.mixdq import single_layer_table
    from sensitivity.evaluation.cache import read_records
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.zoo import get_family

    mq = load_multiquantizer(args.multiquantizer)
    recs = [r for r in read_records(args.cache) if (r.get("metrics") or {}).get("fid") is not None]
    y = -np.array([r["metrics"]["fid"] for r in recs])
    tables = {"MixDQ single-layer MSE": single_layer_table(read_records(args.single), "mse")
              .rename(columns={"damage": "sensitivity"})}
    fam, _, w = mq.model_id.partition(":")
    den = get_family(fam).load_denoiser(w or None)
    for mode in ("trace", "fisher"):
        tables[f"HAWQ {mode}"] = sensitivity_table(mq, den, mode=mode, num_samples=args.samples)
    errs = mq.stats_frame()
    tables["summed relative error"] = errs.assign(sensitivity=errs["error"])
    targets = [float(t) for t in args.targets.split(",")]
    fid = -y
    sizes = SizeTable.from_multiquantizer(mq)
    bits = np.array([sizes.avg_bits(r["config"]) for r in recs])
    print(f"Kendall tau vs -FID over {len(recs)} configs of {args.cache}:\n\n| additive score | Kendall tau | "
          + " | ".join(f"regret @{t:g}" for t in targets) + " |\n|---|---:|" + "---:|" * len(targets))
    for name, t in tables.items():
        lut = {(l, o): float(s) for l, o, s in zip(t["layer"], t["option"], t["sensitivity"])}
        score = -np.array([sum(lut[(l, o)] for l, o in r["config"].items() if o != "fp16") for r in recs])
        reg = cache_regret(fid, bits, score, targets)
        print(f"| {name} | {kendalltau(y, score)[0]:.3f} | " + " | ".join(f"{g['regret']:.3f}" for g in reg) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
