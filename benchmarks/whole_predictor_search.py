"""Whole-predictor search vs the additive search and the reference's top-1 rule, on the ground truth.

At each target the script finds the configs of

* ``additive``: the knapsack on the predictor's additive layer scores (:func:`sensitivity.search.search`);
* ``reranked``: the knapsack's configs at a few sub-targets and both levels, re-rated by the whole
  predictor (:func:`sensitivity.search.refined_search` with ``local=False``);
* ``refined``: the same, then local moves under the same exact byte budget (``refined_search``);
* ``reference top-1``: the reference's rule (top-scored option per layer, λ swept to the target);

and measures each on the ground-truth protocol (digits: 200 images per class, image seeds 2,000,000..,
which no labelling job uses) with 200 paired bootstrap replicates over the images. Every config and
its measurement go to ``--out`` (JSON, with the command); measurements are kept in ``--store`` (JSON
lines) so a killed run resumes. ``--report`` writes the Markdown table from the JSON only.

    python benchmarks/whole_predictor_search.py --predictor predictors/dit-lgb-add \
        --multiquantizer multiquantizers/digits-dit.safetensors --out labels.json
    python scripts/results_tables.py labels labels.json     # docs/results/labels.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TRUTH_SEED = 2_000_000
METHODS = ("additive", "reranked", "refined", "reference top-1")


def measure(args) -> dict:
    import torch

    from sensitivity.allocators import AllocatorSpec, allocate_at_targets
    from sensitivity.comparison import StoredEvaluator
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.predictors import load_predictor
    from sensitivity.search import rate, refined_search, search
    from sensitivity.sizes import SizeTable
    from sensitivity.zoo import get_family

    torch.set_num_threads(args.threads)
    mq = load_multiquantizer(args.multiquantizer)
    pred = load_predictor(args.predictor)
    sizes = SizeTable.from_multiquantizer(mq)
    targets = [float(t) for t in args.targets.split(",")]
    configs = []
    t0 = time.process_time()
    for t in targets:
        found = {"additive": search(pred, mq, t, sizes=sizes),
                 "reranked": refined_search(pred, mq, t, sizes=sizes, local=False, kappa=args.kappa),
                 "refined": refined_search(pred, mq, t, sizes=sizes, kappa=args.kappa)}
        for name, res in found.items():
            configs.append({"target": t, "method": name, "options": res.options, "avg_bits": res.avg_bits,
                            "rating": float(rate(pred, [res.options], args.kappa)[0]),
                            **({"moves": res.details["moves"]} if name == "refined" else {})})
    for a in allocate_at_targets([AllocatorSpec("reference top-1", "reference", {"layer_scores": pred.layer_scores(mq)})],
                                 sizes, targets):
        if a["options"] is not None:
            configs.append({"target": a["target"], "method": "reference top-1", "options": a["options"],
                            "avg_bits": sizes.avg_bits(a["options"]),
                            "rating": float(rate(pred, [a["options"]], args.kappa)[0])})
    search_cpu_s = time.process_time() - t0
    fam = get_family(pred.meta.get("family") or "digits-dit")
    protocol = EvalProtocol.for_family(fam, "shipped", n_per_class=args.images_per_class, seed=TRUTH_SEED,
                                       multiquantizer_hash=mq.hash, dtype="float32")
    ev = Evaluator(fam, fam.load_pipeline("shipped"), mq, protocol, bootstrap=args.bootstrap, bootstrap_seed=0)
    store = StoredEvaluator(ev, Path(args.store), {**protocol.to_dict(), "bootstrap": args.bootstrap})
    distinct = {json.dumps(sorted(c["options"].items())) for c in configs}
    print(f"{len(configs)} configs ({len(distinct)} distinct) at {targets}; measuring on {protocol.num_images} images "
          f"(seeds {TRUTH_SEED}..) with {args.bootstrap} bootstrap replicates", flush=True)
    fp = store.evaluate({})
    for i, c in enumerate(configs):
        c["measured"] = store.evaluate(c["options"])
        print(f"  [{i + 1}/{len(configs)}] {c['target']:g} {c['method']}: FID {c['measured']['fid']:.4f}", flush=True)
    meta = getattr(pred, "meta", {}) or {}
    trained = {k: meta.get(k) for k in ("primary", "kinds", "cache", "n_configs", "target") if meta.get(k) is not None}
    return {"command": "python " + " ".join(sys.argv), "predictor": args.predictor, "predictor_trained": trained,
            "kappa": args.kappa,
            "images": protocol.num_images, "image_seed": TRUTH_SEED, "bootstrap": args.bootstrap,
            "search_cpu_s": round(search_cpu_s, 2), "full_precision": fp, "configs": configs}


def report(data: dict) -> str:
    from sensitivity.comparison import markdown_table, paired_marks

    predicted = "predicted " + ((data.get("predictor_trained") or {}).get("target") or {}).get("formula", "-fid")
    rows = []
    for t in sorted({c["target"] for c in data["configs"]}):
        here = [c for c in data["configs"] if c["target"] == t]
        vals = [c["measured"]["fid"] for c in here]
        reps = [c["measured"].get("bootstrap", {}).get("fid") for c in here]
        ref = {c["method"]: i for i, c in enumerate(here)}
        vs_add = paired_marks(vals, reps, -1.0, ref["additive"])
        vs_top = paired_marks(vals, reps, -1.0, ref["reference top-1"]) if "reference top-1" in ref else [None] * len(here)
        for i, c in enumerate(here):
            d_top = (np.asarray(reps[i]) - np.asarray(reps[ref["reference top-1"]])) if "reference top-1" in ref else None
            rows.append({"target": t, "method": c["method"], "avg_bits": c["avg_bits"], predicted: c["rating"],
                         "FID": vals[i], "FID_se": float(np.std(reps[i], ddof=1)) if reps[i] else None,
                         "vs additive": vs_add[i] or "–", "vs top-1": vs_top[i] or "–",
                         "FID − top-1": None if d_top is None or c["method"] == "reference top-1" else vals[i] - vals[ref["reference top-1"]],
                         "FID − top-1_se": None if d_top is None or c["method"] == "reference top-1" else float(np.std(d_top, ddof=1))})
    fp = data["full_precision"]
    cols = ["target", "method", "avg_bits", predicted, "FID", "FID − top-1", "vs additive", "vs top-1"]
    verdicts = []
    for m in ("reranked", "refined", "additive"):
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        vs_add = ", ".join(f"{r['target']:g} {r['vs additive']}" for r in mine) if m != "additive" else None
        beats = [f"{r['target']:g}" for r in mine if r["vs top-1"] == "better"]
        verdicts.append(f"`{m}`: " + (f"against the additive search {vs_add}; " if vs_add else "")
                        + f"better than the reference's top-1 rule beyond the bootstrap's noise at "
                        + (", ".join(beats) + " bits" if beats else "no target"))
    return (f"Ground truth: {data['images']} images (image seeds {data['image_seed']}..), FID ± its bootstrap standard "
            f"error ({data['bootstrap']} paired replicates over the images); full precision FID {fp['fid']:.4f}. "
            f"`vs additive` / `vs top-1`: paired bootstrap, 95 % interval of the FID difference (tie: it holds 0). "
            f"Predictor `{data['predictor']}`{_trained_text(data)}, kappa {data['kappa']}; search CPU "
            f"{data['search_cpu_s']} s for all targets. `reranked` is `sensitivity search --whole-predictor rerank`, "
            f"`refined` `--whole-predictor refine`.\n\n"
            + markdown_table(rows, cols, digits=4) + "\n\n" + "".join(f"- {v}.\n" for v in verdicts)
            + f"\n    {data['command']}\n" + _tau_text(data))


def _trained_text(data: dict) -> str:
    t = data.get("predictor_trained") or {}
    if not t:
        return ""
    kinds = t.get("kinds")
    kinds = "+".join(kinds) if isinstance(kinds, (list, tuple)) else kinds
    return f" ({t.get('primary')}: {kinds}; trained on {t.get('n_configs')} configs of `{t.get('cache')}`)"


def _tau_text(data: dict) -> str:
    t = data.get("truth_tau")
    if not t:
        return ""
    taus = ", ".join(f"{k} {v:.3f}" for k, v in t["kendall"].items())
    return (f"\nHeld-out Kendall τ of the predictor's members against the ground truth ({t['configs']} configs of "
            f"`{t['cache']}`, FID {t['fid_range'][0]:.3f}–{t['fid_range'][1]:.3f}): {taus}.\n\n    {t['command']}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictor")
    ap.add_argument("--multiquantizer")
    ap.add_argument("--targets", default="3.4,3.6,3.8")
    ap.add_argument("--images-per-class", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--kappa", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="labels.json")
    ap.add_argument("--store", default=None, help="measurements kept here (default: OUT with .jsonl)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only write the table of this JSON")
    ap.add_argument("--tau", default=None, metavar="CACHE",
                    help="add to --out the predictor's held-out Kendall tau on the ground-truth cache CACHE")
    ap.add_argument("--md", default=None, help="Markdown file for the table (default: print it)")
    args = ap.parse_args()
    from sensitivity.io import atomic_write_text

    if args.report:
        data = json.loads(Path(args.report).read_text())
    elif args.tau:
        from sensitivity.predictors.pipeline import evaluate_on_cache

        data = json.loads(Path(args.out).read_text())
        r = evaluate_on_cache(data["predictor"], args.tau)
        data["truth_tau"] = {"cache": args.tau, "configs": r["n_configs"], "command": "python " + " ".join(sys.argv),
                             "kendall": {k: v["kendall"] for k, v in r["predictors"].items()},
                             "fid_range": [min(r["metric"]), max(r["metric"])]}
        atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    else:
        from sensitivity.provenance import run_provenance

        started = run_provenance()
        args.store = args.store or str(Path(args.out).with_suffix(".jsonl"))
        data = measure(args)
        data["provenance"] = run_provenance(started)
        atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    md = report(data)
    if args.md:
        atomic_write_text(args.md, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
