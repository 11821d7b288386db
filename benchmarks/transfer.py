"""Transfer (issue 25, item 4): a GNN trained on one model's labels as the prior for another model.

    python benchmarks/transfer.py --source-cache caches/digits-dit.sqlite \
        --target-cache runs/unet-200.sqlite --target-truth caches/digits-unet-truth.sqlite \
        --labels 0,20,40,80 --out runs/transfer/transfer.json

1. The prior: ``sensitivity.predictors.train`` fits the GNN (``--predictor gnn``, 5 folds) on every label of
   ``--source-cache`` (kept in ``OUT_DIR/prior``; reused when it exists).
2. For each N of ``--labels`` (configs 0..N-1 of the target cache's random run, ``--seed``):
   *scratch* trains the GNN and LightGBM on the N target labels alone; *transfer* trains the GNN on
   them starting from the prior's fold models (``gnn.init_from``: vocabularies, architecture, weights,
   then ``--finetune-epochs`` epochs at ``--finetune-lr``), and LightGBM on them with the prior's per-layer
   scores on the target's graph as a feature table (``OUT_DIR/prior_layer_damage.csv``); N = 0 is the
   prior itself on the target's graph (:func:`sensitivity.predictors.predictor.transfer`). Every predictor's Kendall τ is measured
   against the target's ground truth (``--target-truth``: FID of each config on 2,000 images).

The GNN's node features are what transfers (op type, role, block position, shape, bits, method,
measured error), never a layer's name; LightGBM and the additive model have per-layer parameters
and cannot transfer (they are the from-scratch peers). Several targets are comma-separated lists, e.g.
``--target-cache runs/unet-200.sqlite,runs/sd-200.sqlite --target-truth
caches/digits-unet-truth.sqlite,caches/digits-sd-truth.sqlite --target-multiquantizer
multiquantizers/digits-unet.safetensors,multiquantizers/digits-sd.safetensors``. The target caches are made by
``sensitivity sample MODEL --multiquantizer multiquantizers/MODEL.safetensors --cache runs/CACHE
--num-configs 80 --images-per-class 20 --seed 0`` (only configs 0..max(N)-1 are read; configs max(N).. , when
there, are the background of the prior's layer scores), the ground truths as ``caches/README.md`` says. Writes ``--out`` (JSON with the table, the command and the run's provenance); ``python
scripts/results_tables.py transfer OUT`` renders the page.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_efficiency import random_order, target_line, write_prefix  # noqa: E402 - a sibling benchmark (stdlib at import)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if v != v else f"{v:.3f}"
    return "–" if v is None else str(v)


def markdown(d: Mapping[str, Any]) -> str:
    """The run's table from its JSON (stdlib only: the results page renders it)."""
    cols = d["columns"]
    lines = [d["caption"], "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in d["table"]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n\n" + target_line(d) + "\n"


def _tau(pred: Sequence[float], truth: Sequence[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(pred, truth).statistic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-cache", default="caches/digits-dit.sqlite", help="the prior's labels (another model)")
    ap.add_argument("--target-cache", default="runs/unet-200.sqlite",
                    help="the target models' random runs (comma-separated, one per target)")
    ap.add_argument("--target-truth", default="caches/digits-unet-truth.sqlite", help="their ground truths (same order)")
    ap.add_argument("--target-multiquantizer", default="multiquantizers/digits-unet.safetensors",
                    help="their multiquantizers (same order)")
    ap.add_argument("--labels", default="0,20,40,80", help="target labels per point (0: the prior alone)")
    ap.add_argument("--seed", type=int, default=0, help="the target run's sampler seed and the folds' seed")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=60)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    from sensitivity.evaluation.metric_specs import TRAIN_TRANSFORMS

    ap.add_argument("--target-transform", choices=TRAIN_TRANSFORMS, default="auto",
                    help="the predictors' target, prior and target runs alike (sensitivity train --target-transform)")
    ap.add_argument("--out", default="runs/transfer/transfer.json")
    args = ap.parse_args(argv)
    labels = [int(x) for x in args.labels.split(",") if x.strip()]

    import torch

    from sensitivity.evaluation.cache import ConfigCache, read_records
    from sensitivity.evaluation.metric_specs import record_metric
    from sensitivity.io import atomic_path, atomic_write_json
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.predictors import LayerTable, load_cache, load_predictor, train
    from sensitivity.predictors.pipeline import model_graph
    from sensitivity.predictors.predictor import transfer
    from sensitivity.provenance import run_provenance

    started = run_provenance()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    source = load_cache(args.source_cache)
    prior = work / "prior"
    t0 = time.perf_counter()
    from sensitivity.evaluation.metric_specs import resolve_transform

    transform = resolve_transform(args.target_transform, "fid")
    done = prior / "report.json"
    if not done.is_file() or json.loads(done.read_text())["target"].get("transform", "none") != transform:
        train(args.source_cache, prior, model=source.family, predictor="gnn", baselines=(), folds=args.folds,
              seed=args.seed, metric="fid", scores=False, progress=True, target_transform=args.target_transform)
    prior_s = time.perf_counter() - t0
    prior_report = json.loads((prior / "report.json").read_text())

    targets = list(zip(*(x.split(",") for x in (args.target_cache, args.target_truth, args.target_multiquantizer))))
    if len({len(x.split(",")) for x in (args.target_cache, args.target_truth, args.target_multiquantizer)}) != 1:
        raise SystemExit("--target-cache, --target-truth and --target-multiquantizer need as many entries each")
    rows: List[Dict[str, Any]] = []
    described = []
    src_name = f"prior ({source.family} labels)"
    for target_cache, target_truth, target_mq in targets:
        mq = load_multiquantizer(target_mq)
        family = mq.model_id.split(":", 1)[0]
        graph = model_graph(family, "meta", list(mq.layer_names), mq.model_id)
        table = LayerTable.from_multiquantizer(mq, graph.weight_nodes)
        truth = read_records(target_truth)
        truth_y = [-record_metric(r, "fid") for r in truth]  # higher = better, as the predictors
        order = random_order(target_cache, args.seed)
        if len(order) < max(labels):
            raise SystemExit(f"{target_cache}: {len(order)} labelled configs, fewer than {max(labels)}")
        with ConfigCache(target_truth) as c:
            n_images = len((c.evaluation or {}).get("seeds") or [])
        described.append(f"{family}: truth {target_truth} ({len(truth)} configs x {n_images:,} images), "
                         f"labels {target_cache}")
        zero = transfer(prior, graph, table, kind="gnn")
        rows.append({"target": family, "target labels": 0, "predictor": "gnn", "start": src_name,
                     "truth τ": _tau(zero.predict([r["config"] for r in truth]), truth_y), "train s": 0.0})
        print(f"{family}, 0 labels: prior tau {rows[-1]['truth τ']:.3f}", flush=True)
        # the prior's per-layer scores on the target (background: target configs no prefix uses) as a measured
        # sensitivity table: damage = the layer's best option score minus the option's, >= 0
        from sensitivity.predictors import scores as S

        bg_recs = order[max(labels):max(labels) + 64] if len(order) > max(labels) else order[:64]
        ls = S.layer_scores(zero.predict_codes, table, zero.target, table.encode([r["config"] for r in bg_recs]),
                            progress=False)
        ls["value"] = ls.groupby("layer")["score"].transform("max") - ls["score"]
        prior_table = work / f"prior_layer_damage-{family}.csv"
        with atomic_path(prior_table) as tmp:
            ls[["layer", "option", "value"]].to_csv(tmp, index=False)
        for n in [x for x in labels if x > 0]:
            with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
                cache = Path(tmp) / "prefix.sqlite"
                write_prefix(target_cache, order[:n], cache, f"transfer:{target_cache}")
                runs = [("gnn", "scratch", {}), ("lightgbm", "scratch", {}), ("additive", "scratch", {}),
                        ("gnn", src_name, {"gnn": {"init_from": str(prior), "epochs": args.finetune_epochs,
                                                   "lr": args.finetune_lr}}),
                        ("lightgbm", "prior's layer damage as a feature",
                         {"lightgbm": {"feature_tables": [str(prior_table)]}})]
                for kind, start, params in runs:
                    t1 = time.perf_counter()
                    folder = Path(tmp) / f"{kind}-{start.split()[0]}"
                    train(cache, folder, model=family, predictor=kind, baselines=(), folds=args.folds, seed=args.seed,
                          metric="fid", params=params, scores=False, progress=False, min_configs=args.folds,
                          multiquantizer=target_mq, target_transform=args.target_transform)
                    p = load_predictor(folder)
                    rows.append({"target": family, "target labels": n, "predictor": kind, "start": start,
                                 "truth τ": _tau(p.predict([r["config"] for r in truth]), truth_y),
                                 "train s": round(time.perf_counter() - t1, 1)})
                    print(f"{family}, {n} labels, {kind} from {start}: tau {rows[-1]['truth τ']:.3f} "
                          f"({rows[-1]['train s']:.0f} s)", flush=True)
    caption = (f"Kendall τ against each target's ground truth (FID of each config on images of seeds no job uses; "
               f"{'; '.join(described)}) of predictors trained on N target labels (configs 0..N-1 of the random "
               f"run of seed {args.seed}), from scratch or starting from a GNN trained on {len(source.records)} "
               f"labels of {source.family} ({args.source_cache}; its own 5-fold CV τ "
               f"{prior_report['predictors']['gnn']['mean']['kendall']:.3f}); fine-tuning: {args.finetune_epochs} "
               f"epochs at learning rate {args.finetune_lr:g}. `prior's layer damage as a feature`: the prior's "
               f"per-layer scores on the target's graph (zero target labels) as a LightGBM feature table (their sum "
               f"over the config's layers is one more column). One draw of the N configs per row; `–`: the predictor "
               f"is constant on so few configs (a LightGBM split needs min_child_samples = 10 configs on each side; "
               f"5 folds of 20 train on 16).")
    report = {"caption": caption, "source": source.family, "targets": [r["target"] for r in rows if not r["target labels"]],
              "columns": ["target", "target labels", "predictor", "start", "truth τ", "train s"],
              "table": rows, "prior_seconds": round(prior_s, 1), "target": prior_report["target"]["formula"],
              "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "provenance": run_provenance(started)}
    atomic_write_json(out, report)
    print(markdown(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
