"""Held-out Kendall tau of a trained predictor's members on another cache (issue 14).

    python benchmarks/heldout_tau.py --predictor predictors/digits-dit --cache caches/digits-dit-seed1.sqlite

Every member (gnn, lightgbm, additive, bits, error) scores the other cache's configs; also the
rank-average of the GNN and LightGBM (an ensemble tried for issue 14). Prints a markdown table and
writes ``heldout_tau.json`` beside the predictor.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, rankdata


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--cache", required=True)
    args = ap.parse_args(argv)
    from sensitivity.predictors.pipeline import evaluate_on_cache

    rep = evaluate_on_cache(args.predictor, args.cache)
    y = np.asarray(rep["y"])
    preds = {k: np.asarray(v) for k, v in rep["predictions"].items()}
    taus = {k: float(kendalltau(y, p)[0]) for k, p in preds.items()}
    if "gnn" in preds and "lightgbm" in preds:
        taus["gnn+lightgbm rank average"] = float(kendalltau(y, rankdata(preds["gnn"]) + rankdata(preds["lightgbm"]))[0])
    print(f"held-out Kendall tau on {args.cache} ({rep['n_configs']} configs), predictor {args.predictor}:\n")
    print("| predictor | Kendall tau |\n|---|---:|")
    for k, t in sorted(taus.items(), key=lambda x: -x[1]):
        print(f"| {k} | {t:.3f} |")
    out = Path(args.predictor) / "heldout_tau.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"cache": args.cache, "n_configs": rep["n_configs"], "kendall": taus}, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
