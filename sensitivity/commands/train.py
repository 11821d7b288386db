"""``sensitivity train CACHE --model MODEL --predictor gnn --out predictors/NAME``: k-fold CV of a predictor.

    sensitivity train caches/digits-dit.sqlite --model digits-dit --predictor gnn --out predictors/digits-dit
    sensitivity train caches/x.sqlite --model sdxl --predictor lightgbm --folds 5 --lam 150 --out predictors/x
    sensitivity train caches/x.sqlite --model digits-dit --predictor gnn --set gnn.epochs=60 --out predictors/quick

Every predictor (the chosen one and the baselines bits, error, additive, lightgbm) is trained on the same
folds; the folder gets report.json / report.md (Spearman, Kendall tau, NDCG@10 per fold and mean), the
fold ensembles, the traced graph and the chosen predictor's layer and module scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_device_argument, add_multiquantizer_argument, add_weights_argument

    p = sub.add_parser("train", help="train a predictor (k-fold ensemble) on an evaluation cache, with baselines",
                       description="Train PREDICTOR on CACHE's labelled configs with k-fold cross-validation and "
                       "report held-out Spearman, Kendall tau and NDCG@10 for it and every baseline on the same folds.")
    p.add_argument("cache", help="evaluation cache (.sqlite, or an export .parquet/.csv)")
    p.add_argument("--model", help="model family whose graph the GNN uses (default: the cache's model)")
    add_weights_argument(p, default="meta", help="weights to trace the graph on (default meta: no memory)")
    p.add_argument("--predictor", default=None,
                   help="ensemble (mean of gnn and additive: the best held-out ranking on digits-dit), gnn, "
                        "lightgbm, additive, bits or error (default ensemble)")
    p.add_argument("--baselines", default="bits,error,additive,lightgbm",
                   help="comma list of predictors trained on the same folds for comparison ('' for none)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds = ensemble size (default 5)")
    p.add_argument("--target", default="fid", help="cache metric to predict (default fid; lower-is-better metrics "
                   "are negated so higher predictions are better)")
    p.add_argument("--lam", type=float, default=0.0,
                   help="bit penalty: target = -metric - LAM*avg_bits (the reference uses 150; default 0)")
    from ..evaluation.metric_specs import TRAIN_TRANSFORMS

    p.add_argument("--target-transform", choices=TRAIN_TRANSFORMS, default="auto",
                   help="log: learn -log(metric) (FID ratios weigh the same at every level; on digits-dit every member "
                        "ranks the ground truth better, docs/guide/predictors.md); predictions still read as the metric. "
                        "auto (default): log for FID without --lam, else none")
    p.add_argument("--fidelity", choices=("auto", "full", "mixed"), default="auto",
                   help="a cache with cheap and full labels (sample --full-configs): auto/mixed learn the cheap "
                        "metrics on every config and a stack mapping them to --target on the full labels; full "
                        "uses the full labels alone (default auto)")
    p.add_argument("--cheap-targets", default=None, metavar="M1,M2",
                   help="cheap metrics the members learn (default: feature_mse,fd_fp,psnr where the cheap labels have them)")
    p.add_argument("--prior", default=None, metavar="PREDICTOR_DIR",
                   help="transfer: start every GNN fold (gnn or the ensemble's) from this predictor folder's gnn, "
                        "trained on another model's labels (same as --set gnn.init_from=DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of the models (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KIND.PARAM=VALUE",
                   help="predictor hyper-parameter, e.g. gnn.epochs=60 or lightgbm.num_leaves=31 (value as JSON)")
    add_multiquantizer_argument(p, required=False, help="multiquantizer file for per-layer errors when the cache has no layer stats")
    add_device_argument(p, help="torch device of the GNN (default cpu)")
    p.add_argument("--no-scores", action="store_true", help="skip the layer / module scores")
    p.add_argument("--max-module-configs", type=int, default=10_000,
                   help="predictions per fold model spent on module scores; modules are scored combination by "
                   "combination up to the largest size that fits (default 10000)")
    p.add_argument("--out", required=True, help="predictor folder to write (predictors/NAME)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def parse_params(items) -> Dict[str, Dict[str, Any]]:
    """``["gnn.epochs=60", ...]`` -> ``{"gnn": {"epochs": 60}}`` (values parsed as JSON when possible)."""
    from ..errors import SensitivityError
    from ..predictors import get_kind

    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        kind, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise SensitivityError(f"--set {item!r}: expected KIND.PARAM=VALUE, e.g. gnn.epochs=60")
        cls = get_kind(kind)
        if name not in cls.defaults:
            known = ", ".join(cls.defaults) or "none"
            raise SensitivityError(f"--set {item!r}: {kind} has no parameter {name!r} (known: {known})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(kind, {})[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..predictors import train
    from ..predictors.predictor import DEFAULT_PREDICTOR

    predictor = args.predictor or DEFAULT_PREDICTOR
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    params = parse_params(args.set)
    if args.prior:
        params.setdefault("gnn", {})["init_from"] = args.prior
    report = train(args.cache, args.out, model=args.model, weights=args.weights, predictor=predictor,
                   baselines=[k for k in baselines if k != predictor], folds=args.folds, seed=args.seed,
                   metric=args.target, lam=args.lam, params=params, device=args.device,
                   multiquantizer=args.multiquantizer, scores=not args.no_scores,
                   max_module_configs=args.max_module_configs, fidelity=args.fidelity,
                   cheap_metrics=[m.strip() for m in args.cheap_targets.split(",") if m.strip()] if args.cheap_targets else None,
                   target_transform=args.target_transform)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    fid = report.get("fidelity")
    if fid:
        print(f"{sum(fid['n_cheap'].values()) // len(fid['n_cheap'])} configs with cheap labels learnt as "
              f"{', '.join(fid['n_cheap'])}; stack of the members on the full labels:")
    print(f"{report['n_configs']} configs, {args.folds} folds, target {report['target']['formula']} "
          f"(seed {args.seed}); held-out mean over folds:")
    w = max(10, *(len(k) for k in report["predictors"]))
    print(f"  {'predictor':<{w}} {'Spearman':>9} {'Kendall':>9} {'NDCG@10':>9}")
    for kind, r in report["predictors"].items():
        m = r["mean"]
        print(f"  {kind:<{w}} {m['spearman']:>9.3f} {m['kendall']:>9.3f} {m['ndcg@10']:>9.3f}")
    for kind, why in report.get("skipped", {}).items():
        print(f"  {kind:<10} not trained: {why}")
    print(f"wrote {Path(args.out)}/ (report.md, report.json, predictor.json, weights; {report['seconds']:.0f} s)")
    return 0
