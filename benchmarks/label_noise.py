"""The noise of each label metric and how well it ranks configs, per labelling CPU-second (digits models).

Every number is against a **ground truth**: configs of a cache scored on many images of seeds no job uses
(``caches/<model>-truth.sqlite``: 2,000 images per config, seeds 2,000,000..; digits-dit and digits-unet).
For ``--configs`` of its configs (default all) and ``--seed-sets`` fresh sets of image seeds (set ``s``:
seeds ``4,000,000 + 100,000 s ..``, used by no other job), each config is generated once per set at the
largest ``--sizes`` (class-balanced), and every metric is computed on the first ``n / 10`` images of every
class for each ``n`` of ``--sizes``:

* ``fid`` / ``kid`` against the digits data, ``accuracy``: what a job labels with today;
* ``psnr`` / ``mse``: pixels, paired with the full-precision images of the same seeds;
* ``feature_mse`` / ``fd_fp`` / ``kid_fp``: the paired feature metrics (``sample --paired-features``).

For each metric and ``n``: **noise** = the root-mean-square over configs of a config's standard deviation
across the seed sets, divided by the standard deviation across configs of their mean over the seed sets
(noise-to-signal: below 1, one label separates configs better than a coin); **tau** = Kendall tau between
the metric (sign-corrected: higher tau is better) and the ground truth's FID over the configs, mean and
standard deviation over the seed sets; **CPU-s** = measured process CPU seconds to label one config at
``n`` images (``Evaluator.evaluate`` with ``n`` images, the median of ``--cost-configs`` configs, after one
warm-up), all metrics included. ``tau per CPU-s`` is what a fixed labelling budget buys.

    PYTHONPATH=. python benchmarks/label_noise.py --out runs/label_noise.json --workers 2 --cost-configs 9
    python scripts/results_tables.py label-noise runs/label_noise.json   # docs/results/label-noise.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "shipped"
MODELS = ("digits-dit", "digits-unet")  # the embedded models with a ground-truth cache (caches/<model>-truth.sqlite)
METRICS = ("fid", "kid", "accuracy", "psnr", "mse", "feature_mse", "fd_fp", "kid_fp")
SEED_BASE, SEED_STRIDE = 4_000_000, 100_000


def _subset(n: int, per_class_max: int, classes: int = 10) -> List[int]:
    """Indices of the first ``n / classes`` images of every class in a class-major protocol."""
    k = n // classes
    return [c * per_class_max + j for c in range(classes) for j in range(k)]


def _metrics_of(feats, pred, labels, fp_feats, images, fp_images, idx, features_net) -> Dict[str, float]:
    """Every metric of :data:`METRICS` on the images ``idx`` (the evaluator's formulas)."""
    import numpy as np

    from sensitivity.evaluation import metrics as M

    f, fp_f = feats[idx], fp_feats[idx]
    out = {"fid": M.frechet_distance(*M.feature_statistics(f), *features_net.reference_statistics()),
           "kid": M.kid_from_features(f, features_net.reference_features(), num_subsets=100, seed=0),
           "accuracy": M.class_accuracy(np.asarray(pred)[idx], np.asarray(labels)[idx]),
           "psnr": M.psnr(images[idx], fp_images[idx]), "mse": M.mse(images[idx], fp_images[idx])}
    out.update(M.paired_feature_metrics(f, fp_f))
    return out


def _evaluator(model: str, mq_path: str, steps: int, per_class: int, seed: int, threads: int):
    import torch

    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.zoo import get_family

    torch.set_num_threads(threads)
    fam = get_family(model)
    pipe = fam.load_pipeline(WEIGHTS)
    mq = load_multiquantizer(mq_path)
    protocol = EvalProtocol.for_family(fam, WEIGHTS, n_per_class=per_class, seed=seed, steps=steps,
                                       paired_features=True)
    return Evaluator(fam, pipe, mq, protocol)


def seed_set(job: Mapping[str, Any]) -> Dict[str, Any]:
    """One seed set: every config generated once at the largest size, every metric at every size."""
    import numpy as np

    from sensitivity.evaluation.evaluator import condition_labels

    sizes, per_class_max = job["sizes"], max(job["sizes"]) // 10
    ev = _evaluator(job["model"], job["multiquantizer"], job["steps"], per_class_max, job["seed"], job["threads"])
    labels = condition_labels(ev.family, ev.protocol.conditions)
    fp_images = ev.reference_images()
    fp_feats = ev._features.features(np.array(fp_images))
    values: Dict[str, Dict[str, List[float]]] = {str(n): {m: [] for m in METRICS} for n in sizes}
    for options in job["configs"]:
        images = ev.evaluate(options, return_images=True)["images"]
        feats, pred = ev._features.features_and_predictions(images)
        for n in sizes:
            got = _metrics_of(feats, pred, labels, fp_feats, images, fp_images, _subset(n, per_class_max),
                              ev._features)
            for m in METRICS:
                values[str(n)][m].append(float(got[m]))
    return {"seed": job["seed"], "values": values}


def labelling_cost(model: str, mq_path: str, steps: int, sizes: Sequence[int],
                   configs: Sequence[Mapping[str, str]], threads: int) -> Dict[str, float]:
    """Median process CPU seconds of ``Evaluator.evaluate`` at each size (full precision made first)."""
    out = {}
    for n in sizes:
        ev = _evaluator(model, mq_path, steps, n // 10, SEED_BASE - SEED_STRIDE, threads)
        ev.reference_images()
        ev.evaluate(configs[0])  # warm-up
        spent = []
        for options in configs:
            t0 = time.process_time()
            ev.evaluate(options)
            spent.append(time.process_time() - t0)
        out[str(n)] = statistics.median(spent)
    return out


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def summarize(sets: Sequence[Mapping[str, Any]], truth_fid: Sequence[float], sizes: Sequence[int],
              cost: Mapping[str, float]) -> List[Dict[str, Any]]:
    """One row per (metric, size): noise-to-signal, tau against the truth's FID (mean, std over sets), CPU-s."""
    import numpy as np

    from sensitivity.evaluation.metric_specs import metric_spec

    rows = []
    for m in METRICS:
        sign = metric_spec(m).sign()
        for n in sizes:
            v = np.array([s["values"][str(n)][m] for s in sets], dtype=np.float64)  # [sets, configs]
            noise = float(np.sqrt((v.std(axis=0, ddof=1) ** 2).mean()))
            signal = float(v.mean(axis=0).std(ddof=1))
            taus = [kendall_tau(sign * row, -np.asarray(truth_fid)) for row in v]
            rows.append({"metric": m, "images": int(n), "noise": noise, "signal": signal,
                         "noise_to_signal": noise / signal if signal > 0 else float("inf"),
                         "tau": float(np.mean(taus)), "tau_std": float(np.std(taus, ddof=1)),
                         "cpu_seconds": float(cost[str(n)])})
    return rows


def run_model(model: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Every seed set of ``model``, its labelling cost and its summary rows."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from sensitivity.evaluation.cache import read_records
    from sensitivity.evaluation.metric_specs import record_metric

    truth, mq = ROOT / "caches" / f"{model}-truth.sqlite", ROOT / "multiquantizers" / f"{model}.safetensors"
    if not mq.is_file():
        raise SystemExit(f"error: {mq}: no such file (sensitivity multiquantize {model} --weights {WEIGHTS} --out {mq})")
    records = sorted(read_records(truth), key=lambda r: r["index"])
    records = records[: args.configs] if args.configs else records
    if len(records) < max(2, args.configs):
        raise SystemExit(f"error: {truth} holds {len(records)} configs, --configs asks for {args.configs}")
    truth_fid = [record_metric(r, "fid") for r in records]
    configs = [r["config"] for r in records]
    jobs = [{"model": model, "seed": SEED_BASE + SEED_STRIDE * s, "sizes": args.size_list, "configs": configs,
             "steps": args.steps, "multiquantizer": str(mq), "threads": args.threads} for s in range(args.seed_sets)]
    sets: List[Dict[str, Any]] = []
    # spawn: the parent ran torch (OpenMP) for the previous model's cost, and forking it then is unsafe
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for got in tqdm(pool.map(seed_set, jobs), total=len(jobs), desc=f"{model} seed sets", unit="set"):
            sets.append(got)
    cost = labelling_cost(model, str(mq), args.steps, args.size_list, configs[: args.cost_configs], args.threads)
    return {"model": model, "weights": WEIGHTS, "truth": str(truth.relative_to(ROOT)), "configs": len(configs),
            "seed_sets": [s["seed"] for s in sets], "sizes": args.size_list, "steps": args.steps,
            "threads": args.threads, "truth_fid": truth_fid, "sets": sets, "cost": cost,
            "rows": summarize(sets, truth_fid, args.size_list, cost)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from sensitivity.provenance import run_provenance

    started = run_provenance()
    args.size_list = sorted(int(s) for s in args.sizes.split(","))
    if any(n % 10 or n < 10 for n in args.size_list):
        raise SystemExit(f"error: --sizes {args.sizes}: each size must be a multiple of 10 (class-balanced)")
    models = [run_model(m, args) for m in args.models.split(",")]
    return {"models": models, "command": "python benchmarks/label_noise.py " + " ".join(sys.argv[1:]),
            "provenance": run_provenance(started)}


def markdown(d: Mapping[str, Any]) -> str:
    """The tables of a run, one section per model (stdlib only: the results-page script renders it)."""
    first = d["models"][0]
    lines = [f"Every model: the configs of its ground-truth cache (FID on 2,000 images each), "
             f"{len(first['seed_sets'])} fresh image-seed sets, {first['steps']} steps, one thread per process. "
             "**noise/signal**: a config's spread over the seed sets relative to the spread between configs "
             "(lower is better); **tau**: Kendall tau against the ground truth's FID, mean ± std over the seed "
             "sets; **CPU-s**: labelling one config (generation and all metrics); **tau/CPU-s** at that size."]

    def num(v: float, digits: int = 3) -> str:
        return "–" if v != v else f"{v:.{digits}f}"  # NaN: tau of a metric constant over the configs

    for m in d["models"]:
        lines += ["", f"## {m['model']}: {m['configs']} configs of `{m['truth']}`", "",
                  "| metric | images | CPU-s | noise/signal | tau vs truth FID | tau / CPU-s |", "|---|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['metric']} | {r['images']} | {r['cpu_seconds']:.2f} | {num(r['noise_to_signal'])} | "
                         f"{num(r['tau'])} ± {num(r['tau_std'])} | {num(r['tau'] / r['cpu_seconds'])} |")
        best: Dict[int, Mapping[str, Any]] = {}
        for r in m["rows"]:
            if r["tau"] == r["tau"] and (r["images"] not in best or r["tau"] > best[r["images"]]["tau"]):
                best[r["images"]] = r
        lines += ["", "Best metric at each size: " + "; ".join(
            f"{n} images: `{r['metric']}` (tau {r['tau']:.3f}, noise/signal {r['noise_to_signal']:.3f})"
            for n, r in sorted(best.items())) + "."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated; each reads caches/MODEL-truth.sqlite and multiquantizers/MODEL.safetensors")
    ap.add_argument("--configs", type=int, default=0, help="ground-truth configs scored per model (default 0: all)")
    ap.add_argument("--seed-sets", type=int, default=5, help="image-seed sets (default 5)")
    ap.add_argument("--sizes", default="10,20,50,200", help="images per config, multiples of 10 (class-balanced)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps (the truth's: 10)")
    ap.add_argument("--cost-configs", type=int, default=3, help="configs timed per size (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--workers", type=int, default=1, help="processes (one seed set each at a time)")
    ap.add_argument("--out", required=True, help="JSON written here (atomically)")
    args = ap.parse_args(argv)
    for flag in ("seed_sets", "cost_configs", "threads", "workers"):
        if getattr(args, flag) < (2 if flag == "seed_sets" else 1):
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is too small")
    if args.configs == 1 or args.configs < 0:
        ap.error(f"--configs {args.configs}: 0 (all) or at least 2")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"--models {','.join(unknown)}: no ground truth (use {', '.join(MODELS)})")
    report = run(args)
    from sensitivity.io import atomic_write_text

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
