"""Search vs the allocators people use (issue 14), every config measured on held-out images.

    python benchmarks/compare_allocators.py --predictor predictors/digits-dit --out runs/compare

At 3.4 / 3.6 / 3.8 / 4.0 bits: the searched config, the best random config of the cache, the best
uniform config, the error ILP, SDNQ's rule, HAWQ (Hessian trace and empirical Fisher, computed
here on ``--hawq-samples`` calibration items), MixDQ (the single-layer records of ``--single``) and
the reference's top-1 rule (the same predictor, λ swept), each measured on ``--images-per-class``
x 10 held-out images (seeds from 1,000,000; not the cache's), with the labelling cost each needed.
The searched configs (``--repeat all``: every config) are measured again on a second held-out seed
set (from 2,000,000): the two columns show the images' noise.

A thin wrapper of :func:`sensitivity.comparison.compare_at_targets` and
:func:`sensitivity.allocators.allocate_at_targets`. Resumable: each measurement is appended to
``OUT/heldout-<seed>.jsonl`` and the HAWQ tables are kept as ``OUT/hawq-<mode>.csv``, so a rerun
(e.g. with another ``--predictor``) measures only the configs it has not seen. Writes
``OUT/comparison.csv``, ``comparison.md``, ``comparison.json`` and ``pareto_fid.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

CHECK_SEED = 1_000_000
REPEAT_SEED = 2_000_000


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hawq_table(mq, fam, weights, mode, samples, seed, path: Path):
    """The HAWQ sensitivity table of ``mode``, read from ``path`` when it was made with the same settings."""
    import pandas as pd

    from sensitivity.allocators.hawq import sensitivity_table

    meta = path.with_suffix(".json")
    want = {"mode": mode, "num_samples": samples, "seed": seed, "multiquantizer_hash": mq.hash}
    if path.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        if {k: m.get(k) for k in want} == want:
            df = pd.read_csv(path)
            df.attrs.update(m)
            print(f"hawq {mode}: reusing {path} ({m['cpu_seconds']:.1f} CPU s when made)", flush=True)
            return df
    den = fam.load_denoiser(weights or None)
    df = sensitivity_table(mq, den, mode=mode, num_samples=samples, seed=seed, progress=True)
    df.to_csv(path.with_name(path.name + ".tmp"), index=False)
    os.replace(path.with_name(path.name + ".tmp"), path)
    _write_text(meta, json.dumps({**want, **{k: v for k, v in df.attrs.items() if k not in want}}, default=str))
    print(f"hawq {mode}: {samples} calibration items, {df.attrs['cpu_seconds']:.1f} CPU s -> {path}", flush=True)
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", required=True, help="predictor folder (sensitivity train ... --out DIR)")
    ap.add_argument("--cache", default="caches/digits-dit.sqlite", help="the predictor's training cache (random configs)")
    ap.add_argument("--single", default="caches/digits-dit-single20.sqlite",
                    help="cache with the single-layer records (MixDQ); '' to leave MixDQ out")
    ap.add_argument("--multiquantizer", default="multiquantizers/digits-dit.safetensors")
    ap.add_argument("--targets", default="3.4,3.6,3.8,4.0")
    ap.add_argument("--images-per-class", type=int, default=50, help="held-out images per class (default 50: 500)")
    ap.add_argument("--repeat", choices=("search", "all", "none"), default="search",
                    help="measure the searched configs (default) or every config on a second held-out seed set")
    ap.add_argument("--hawq-samples", type=int, default=64, help="HAWQ calibration items / Hutchinson probes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the HAWQ calibration items and probes")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="the predictor's training cost in CPU seconds (default: report.json's train_seconds, wall)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args(argv)

    import torch

    from sensitivity.allocators import AllocatorSpec, allocate_at_targets
    from sensitivity.allocators.mixdq import single_layer_table
    from sensitivity.evaluation.cache import read_records
    from sensitivity.comparison import (METRIC_KEYS, StoredEvaluator, cache_cost, compare_at_targets,
                                        comparison_frame, markdown_table, plot_comparison)
    from sensitivity.errors import SensitivityError
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.predictors import load_predictor
    from sensitivity.sizes import SizeTable
    from sensitivity.zoo import get_family

    t_start, c_start = time.time(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise SensitivityError(f"--targets {args.targets!r}: expected a comma list of numbers") from None
    torch.set_num_threads(max(1, args.threads))
    mq = load_multiquantizer(args.multiquantizer)
    sizes = SizeTable.from_multiquantizer(mq)
    predictor = load_predictor(args.predictor)
    if predictor.multiquantizer_hash and predictor.multiquantizer_hash != mq.hash:
        raise SensitivityError(f"{args.predictor}: trained for multiquantizer {predictor.multiquantizer_hash[:12]}, "
                               f"not {args.multiquantizer} ({mq.hash[:12]})")
    records = read_records(args.cache)
    n_job, job_s = cache_cost(records)
    report_path = Path(args.predictor) / "report.json"
    train_s = 0.0
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        train_s = float(sum(v.get("train_seconds", 0.0) for k, v in rep.get("predictors", {}).items()
                            if k == predictor.kind))
    if args.train_seconds is not None:
        train_s = float(args.train_seconds)
    fam_name, _, weights = str(mq.model_id).partition(":")
    fam = get_family(fam_name)

    specs = [AllocatorSpec("SDNQ rule (threshold {threshold:.3g})", "sdnq", source="SDNQ rule")]
    for mode in ("trace", "fisher"):
        tbl = _hawq_table(mq, fam, weights, mode, args.hawq_samples, args.seed, out / f"hawq-{mode}.csv")
        specs.append(AllocatorSpec(f"HAWQ ({mode})", "hawq", {"sensitivity": tbl}, configs_labelled=0,
                                   label_cpu_s=float(tbl.attrs.get("cpu_seconds", 0.0))))
    if args.single:
        table = single_layer_table(read_records(args.single), "mse")
        specs.append(AllocatorSpec("MixDQ (single-layer MSE)", "mixdq", {"table": table}))
    specs.append(AllocatorSpec("reference top-1 (λ {lam:.3g})", "reference",
                               {"layer_scores": predictor.layer_scores(mq)}, configs_labelled=n_job,
                               label_cpu_s=job_s + train_s, source="reference top-1"))
    allocated = allocate_at_targets(specs, sizes, targets, what=f"multiquantizer {args.multiquantizer}")

    pipe = fam.load_pipeline(weights or None)

    def evaluator(seed):
        proto = EvalProtocol.for_family(fam, weights or None, n_per_class=args.images_per_class, seed=seed,
                                        multiquantizer_hash=mq.hash, dtype="float32")
        return StoredEvaluator(Evaluator(fam, pipe, mq, proto), out / f"heldout-{seed}.jsonl", proto.to_dict()), proto

    ev, check = evaluator(CHECK_SEED)
    ev2 = evaluator(REPEAT_SEED)[0] if args.repeat != "none" else None
    print(f"{len(allocated)} allocator configs; every config measured on {check.num_images} held-out images "
          f"(seeds {CHECK_SEED}..), {'the searched ones' if args.repeat == 'search' else args.repeat} "
          f"also on seeds {REPEAT_SEED}..", flush=True)
    comp = compare_at_targets(predictor, mq, ev, targets, records, metric="fid", sizes=sizes, allocated=allocated,
                              costs={"search": (n_job, job_s + train_s), "best random": (n_job, job_s)},
                              repeat_evaluator=ev2, repeat=args.repeat if args.repeat != "none" else "search",
                              log=lambda text: print(text, flush=True))
    df = comparison_frame(comp)
    df.insert(2, "predictor", [predictor.kind if s in ("search", "reference top-1") else "" for s in df["source"]])
    cols = ["target", "method", "avg_bits", "fid"] + (["fid_2"] if "fid_2" in df else []) + \
        [k for k in METRIC_KEYS if k != "fid"] + ["predicted_fid", "configs_labelled", "label_cpu_s"]
    tmp = out / "comparison.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "comparison.csv")
    md = markdown_table(comp.rows, cols)
    _write_text(out / "comparison.md", md + "\n")
    fig = plot_comparison(comp, "fid", title=f"{mq.model_id}: held-out FID ({check.num_images} images) vs average bits",
                          y_label=f"FID, {check.num_images} held-out images")
    fig.savefig(out / "pareto_fid.png", dpi=100)
    wins = {}
    for t in targets:
        rows = [r for r in comp.rows if r["target"] == t and r.get("fid") is not None]
        s = next((r for r in rows if r["source"] == "search"), None)
        others = [r for r in rows if r["source"] != "search"]
        if s and others:
            searched = json.dumps(sorted(comp.results[t].options.items()))
            same = {a["method"] for a in allocated if a["target"] == t and a.get("options") is not None
                    and json.dumps(sorted(a["options"].items())) == searched}
            rivals = [r for r in others if r["method"] not in same]
            best = min(rivals, key=lambda r: r["fid"]) if rivals else None
            wins[t] = {"search_fid": s["fid"], "search_fid_2": s.get("fid_2"), "same_config_as": sorted(same),
                       "best_other": best and best["method"], "best_other_fid": best and best["fid"],
                       "search_wins": best is None or s["fid"] < best["fid"]}
    summary = {"predictor": str(args.predictor), "predictor_kind": predictor.kind, "cache": args.cache,
               "single": args.single, "multiquantizer": args.multiquantizer, "multiquantizer_hash": mq.hash,
               "targets": targets, "check_seed": CHECK_SEED, "repeat_seed": REPEAT_SEED if ev2 else None,
               "repeat": args.repeat, "heldout_images": check.num_images, "hawq_samples": args.hawq_samples,
               "seed": args.seed, "full_precision": comp.full_precision, "wins": wins,
               "cache_job": {"configs": n_job, "seconds": round(job_s, 1)}, "train_seconds": train_s,
               "measured_now": ev.measured + (ev2.measured if ev2 else 0),
               "reused": ev.reused + (ev2.reused if ev2 else 0),
               "seconds": round(time.time() - t_start, 1), "cpu_seconds": round(time.process_time() - c_start, 1),
               "rows": comp.rows}
    _write_text(out / "comparison.json", json.dumps(summary, indent=1, default=float))
    print("\n" + md)
    for t, w in wins.items():
        tie = f" (the same config as {', '.join(w['same_config_as'])})" if w["same_config_as"] else ""
        print(f"{t:g} bits: search FID {w['search_fid']:.3f}{tie} vs the best other config, {w['best_other']} "
              f"{w['best_other_fid']:.3f} -> {'search wins' if w['search_wins'] else 'search LOSES'}")
    print(f"wrote {out}/comparison.csv, comparison.md, comparison.json, pareto_fid.png in {time.time() - t_start:.0f} s "
          f"({summary['measured_now']} configs measured now, {summary['reused']} reused; held-out full precision "
          f"FID {comp.full_precision['fid']:.3f})")
    return 0


if __name__ == "__main__":
    from sensitivity.errors import SensitivityError as _E

    try:
        raise SystemExit(main())
    except _E as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
