"""``sensitivity insights``: tables (CSV) and figures (PNG) of predictor scores, configs and the Pareto view.

    sensitivity insights --predictor predictors/NAME [--multiquantizer FILE] \\
        [--config quant_configs/a.json ...] [--cache evals/x.sqlite --metric fid] --out insights/NAME
    sensitivity insights --scores scores.csv --multiquantizer FILE --config X.json --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from .. import insights
    from ..config import QuantConfig
    from ..errors import SensitivityError
    from ..evaluation.cache import read_records
    from ..predictors import load_predictor
    from ..search import AdditiveScorer, load_scores_csv, multiquantizer_for, predict_results, uniform_configs
    from ..sizes import SizeTable

    if args.predictor and args.scores:
        raise SensitivityError("pass either --predictor or --scores, not both")
    predictor = load_predictor(args.predictor) if args.predictor else None
    mq = sizes = scores = None
    if args.multiquantizer or predictor is not None:
        mq, _ = multiquantizer_for(args.multiquantizer, predictor)
        sizes = SizeTable.from_multiquantizer(mq)
    if args.scores:
        predictor = AdditiveScorer(load_scores_csv(args.scores), name=args.scores)
    if predictor is not None:
        scores = predictor.layer_scores(mq)
    module_scores = None
    if predictor is not None and hasattr(predictor, "module_scores") and not args.no_modules:
        module_scores = predictor.module_scores(mq)

    configs = {}
    for path in args.config:
        cfg = QuantConfig.load(path)
        if mq is not None:
            mq.validate(cfg.options)
        configs[Path(path).stem] = cfg
    records = read_records(args.cache) if args.cache else None
    if scores is None and not configs and not records:
        raise SensitivityError("nothing to describe: pass --predictor/--scores, --config or --cache")

    results = []
    if configs and sizes is not None:
        for name, cfg in configs.items():
            results.append({"label": name, "source": cfg.provenance.get("method", "config"),
                            "avg_bits": sizes.avg_bits(cfg.options)})
    if sizes is not None and (records or results):
        results += uniform_configs(sizes)
    if predictor is not None:
        objs = [r for r in results if not isinstance(r, dict)]
        predict_results(predictor, objs)
        dicts = [r for r in results if isinstance(r, dict)]
        if dicts:
            preds = predictor.predict([dict(configs[r["label"]].options) for r in dicts])
            for r, p in zip(dicts, preds):
                r["predicted"] = float(p)
        if records:
            preds = predictor.predict([r["config"] for r in records])
            records = [dict(r, predicted=float(p)) for r, p in zip(records, preds)]
    written = insights.write_insights(args.out, layer_scores=scores, configs=configs, sizes=sizes,
                                      module_scores=module_scores, records=records, results=results,
                                      metric=args.metric)
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0
