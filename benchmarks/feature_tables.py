"""Per-(layer, option) feature tables for the GNN's node features (issue 14).

    python benchmarks/feature_tables.py --single caches/digits-dit-single20.sqlite \
        --multiquantizer multiquantizers/digits-dit.safetensors --out predictors/features

Writes ``mixdq_mse.csv`` (MixDQ single-layer MSE damage of each option, from the single-layer
records) and ``hawq_fisher.csv`` (HAWQ empirical-Fisher-weighted ‖ΔW‖², ``--samples`` calibration
items, seed ``--seed``), each ``layer,option,value``. A predictor takes such a file as an input
(``sensitivity train ... --set gnn.feature_table=predictors/features/mixdq_mse.csv``) and stores
its values in the predictor folder, so the predictor never imports an allocator.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _write(df, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df[["layer", "option", "value"]].to_csv(tmp, index=False)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", required=True)
    ap.add_argument("--multiquantizer", required=True)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from sensitivity.allocators.hawq import sensitivity_table
    from sensitivity.allocators.mixdq import single_layer_table
    from sensitivity.evaluation.cache import read_records
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.zoo import get_family

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = single_layer_table(read_records(args.single), "mse")
    _write(mix.assign(value=mix["damage"]), out / "mixdq_mse.csv")
    mq = load_multiquantizer(args.multiquantizer)
    fam, _, w = mq.model_id.partition(":")
    den = get_family(fam).load_denoiser(w or None)
    fis = sensitivity_table(mq, den, mode="fisher", num_samples=args.samples, seed=args.seed)
    _write(fis.assign(value=fis["sensitivity"]), out / "hawq_fisher.csv")
    print(f"wrote {out / 'mixdq_mse.csv'} ({len(mix)} rows) and {out / 'hawq_fisher.csv'} ({len(fis)} rows; "
          f"{args.samples} calibration items, seed {args.seed}, {fis.attrs['cpu_seconds']:.1f} CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
