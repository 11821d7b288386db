"""Held-out Kendall tau of a trained predictor's members on another cache (issue 14).

    python benchmarks/heldout_tau.py --predictor predictors/digits-dit --cache caches/digits-dit-seed1.sqlite

Every member (gnn, lightgbm, additive, bits, error) scores the other cache's configs; also the
rank-average of the GNN and LightGBM (an ensemble tried for issue 14). Also the cache-restricted
regret at each ``--targets`` budget (:func:`sensitivity.predictors.metrics.cache_regret`: FID of the
member's top-ranked config among the cache's configs at or under the budget minus the best FID
there). Prints a markdown table and writes ``heldout_tau.json`` beside the predictor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, rankdata


def main(argv=None) -> int:
    from sensitivity.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--targets", default="3.4,3.6,3.8,4.0")
    args = ap.parse_args(argv)
    from sensitivity.predictors import Target
    from sensitivity.predictors.metrics import cache_regret
    from sensitivity.predictors.pipeline import evaluate_on_cache

    targets = [float(t) for t in args.targets.split(",")]

    rep = evaluate_on_cache(args.predictor, args.cache)
    y = np.asarray(rep["y"])
    preds = {k: np.asarray(v) for k, v in rep["predictions"].items()}
    taus = {k: float(kendalltau(y, p)[0]) for k, p in preds.items()}
    if "gnn" in preds and "lightgbm" in preds:
        preds["gnn+lightgbm rank average"] = rankdata(preds["gnn"]) + rankdata(preds["lightgbm"])
        taus["gnn+lightgbm rank average"] = float(kendalltau(y, preds["gnn+lightgbm rank average"])[0])
    lower = Target.from_dict(rep["target"]).sign < 0
    regret = {k: cache_regret(rep["metric"], rep["avg_bits"], p, targets, lower_is_better=lower) for k, p in preds.items()}
    print(f"held-out Kendall tau on {args.cache} ({rep['n_configs']} configs), predictor {args.predictor};"
          f" regret = {rep['target']['metric']} of the top-ranked config at or under the target minus the best there:\n")
    print("| predictor | Kendall tau | " + " | ".join(f"regret @{t:g}" for t in targets) + " |\n|---|---:|"
          + "---:|" * len(targets))
    for k, t in sorted(taus.items(), key=lambda x: -x[1]):
        print(f"| {k} | {t:.3f} | " + " | ".join(f"{g['regret']:.3f}" for g in regret[k]) + " |")
    r0 = next(iter(regret.values()))
    print("\nbest in the cache at or under each target: "
          + ", ".join(f"{g['target']:g}: {g['best']:.3f} ({g['n']} configs)" for g in r0))
    out = Path(args.predictor) / "heldout_tau.json"
    atomic_write_json(out, {"cache": args.cache, "n_configs": rep["n_configs"], "kendall": taus, "regret": regret})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
