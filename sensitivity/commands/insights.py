"""``sensitivity insights``: tables (CSV) and figures (PNG) of predictor scores, configs and the Pareto view.

    sensitivity insights --predictor predictors/NAME [--multiquantizer FILE] \\
        [--config quant_configs/a.json ...] [--cache evals/x.sqlite --metric fid] --out insights/NAME
    sensitivity insights --scores scores.csv --multiquantizer FILE --config X.json --out DIR
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_multiquantizer_argument

    p = sub.add_parser(
        "insights",
        help="write score box plots per block / op type, option-mix bars of configs and a Pareto plot",
        description="Tables (CSV) and figures (PNG) of where the predictor sees sensitivity and what configs spend "
        "their bits on. Everything is optional except --out: each input adds its tables and figures.",
    )
    p.add_argument("--predictor", help="trained predictor folder (scores per layer and option, module scores)")
    p.add_argument("--scores", help="CSV with columns layer, option, score instead of a predictor")
    add_multiquantizer_argument(p, required=False, help="multiquantizer .safetensors (default: the predictor's)")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="a config to describe (repeatable): option mix per op type / block")
    p.add_argument("--cache", help="evaluation cache (.sqlite or export) for the Pareto plot")
    p.add_argument("--metric", default="fid", help="cache metric of the Pareto plot (default fid)")
    p.add_argument("--no-modules", action="store_true", help="skip the predictor's module scores (can be slow)")
    p.add_argument("--out", required=True, help="folder to write CSV and PNG files into")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.insights import insights_files

    written = insights_files(args.out, predictor=args.predictor, scores=args.scores,
                             multiquantizer=args.multiquantizer, configs=args.config, cache=args.cache,
                             metric=args.metric, modules=not args.no_modules)
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0
