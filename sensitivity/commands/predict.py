"""``sensitivity predict --predictor predictors/NAME --cache OTHER``: score another cache's configs.

Reports the same held-out correlations as ``sensitivity train`` (Spearman, Kendall tau, NDCG@10) for
every member of the predictor folder (the primary predictor and its baselines) on OTHER's configs.
"""

from __future__ import annotations

import argparse
import json
import math


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_device_argument

    p = sub.add_parser("predict", help="score another cache's configs with a trained predictor",
                       description="Predict the target of every config in CACHE with the predictor folder and "
                       "report Spearman, Kendall tau and NDCG@10 against CACHE's measured values.")
    p.add_argument("--predictor", required=True, help="predictor folder written by `sensitivity train`")
    p.add_argument("--cache", required=True, help="evaluation cache (.sqlite, or an export .parquet/.csv)")
    p.add_argument("--kinds", help="comma list of members to score (default: all in the folder)")
    add_device_argument(p, help="torch device of the GNN (default cpu)")
    p.add_argument("--out", help="write the predictions as CSV (config hash, target, one column per member)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with the predictions)")
    p.set_defaults(func=run)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def run(args: argparse.Namespace) -> int:
    from ..predictors import evaluate_on_cache, json_clean

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    res = evaluate_on_cache(args.predictor, args.cache, kinds=kinds, device=args.device, out=args.out)
    if args.json:
        print(json.dumps(json_clean(res), indent=1))
        return 0
    print(f"{res['n_configs']} configs of {res['cache']}, target {res['target']['formula']}:")
    print(f"  {'predictor':<10} {'Spearman':>9} {'Kendall':>9} {'NDCG@10':>9}")
    for kind, m in res["predictors"].items():
        print(f"  {kind:<10} {_fmt(m['spearman']):>9} {_fmt(m['kendall']):>9} {_fmt(m['ndcg@10']):>9}")
    if args.out:
        print(f"wrote {args.out}")
    return 0
