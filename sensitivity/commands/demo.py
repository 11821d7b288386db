"""``sensitivity demo``: the whole pipeline on the embedded digits model, offline, on a laptop.

Steps (each prints what it does and the command a user would run for it):

1. multiquantizer of ``digits-dit`` (six options per layer);
2. a few configs evaluated for real: full precision, all ``uaq-4``, all ``kmeans_a-3``, one random
   mixed config (``results.json``, a PNG grid per config in ``images/``);
3. the evaluation job: random configs into a crash-safe cache (resumable: rerun the same command);
4. a predictor trained with k-fold cross-validation next to its baselines (``predictor/report.md``);
5. search at each target (3.4 / 3.6 / 3.8 / 4.0 bits), each searched config evaluated for real next to
   the best random cache config at the same or fewer bits, the best uniform config, the
   per-layer-error ILP (MixDQ / HAWQ style), SDNQ's rule and the reference's top-1 rule at the same
   target (the allocators that need no labels beyond the job's: ``sensitivity.allocators``);
6. insight tables and figures (``insights/``) and the summary table (``summary.md``, ``summary.json``).

``--quick`` runs a smaller job (fewer configs and images) to see every step in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

DIGITS_MODELS = ("digits-dit", "digits-unet", "digits-sd")
FULL = dict(num_configs=240, images_per_class=20, folds=5, check_images_per_class=50)
QUICK = dict(num_configs=40, images_per_class=10, folds=3, check_images_per_class=20)
# Seeds of the held-out check images: disjoint from the job's (seed + image index, a few thousand at most).
CHECK_SEED = 1_000_000
# paired bootstrap replicates over the held-out images behind every "± se" and tie of the comparison
BOOTSTRAP = 200


def _fmt(v: Any, digits: int = 3) -> str:
    """The comparison's number format (imported on use: `sensitivity --help` stays light)."""
    from ..comparison import _fmt as fmt

    return fmt(v, digits)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on the embedded digits model (offline)",
        description=__doc__.split("\n\n")[0] + " Writes everything under --out; rerunning resumes.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--model", default="digits-dit", choices=DIGITS_MODELS, help="embedded model (default digits-dit)")
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK['num_configs']} configs x {10 * QUICK['images_per_class']} images "
                        f"(default {FULL['num_configs']} x {10 * FULL['images_per_class']})")
    p.add_argument("--num-configs", type=int, default=None, help="random configs of the evaluation job")
    p.add_argument("--images-per-class", type=int, default=None, help="images per digit class in every evaluation")
    p.add_argument("--targets", default="3.4,3.6,3.8,4.0", help="average-bit targets of the search (comma list)")
    p.add_argument("--predictor", default=None,
                   help="predictor kind to train and search with (default ensemble: gnn + lightgbm + additive)")
    p.add_argument("--check-images-per-class", type=int, default=None,
                   help="images per class of the held-out check that measures searched and baseline configs on "
                        f"other seeds (default {FULL['check_images_per_class']}, --quick "
                        f"{QUICK['check_images_per_class']})")
    p.add_argument("--metric", default="fid",
                   help="quality metric the predictor learns and the search optimises (default fid; psnr, kid, "
                        "accuracy work too)")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds of the predictor")
    p.add_argument("--workers", type=int, default=None, help="evaluation worker processes (default: min(2, cores))")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process and of each evaluation worker (default: the cores here, and "
                        "`sample`'s default per worker); the results do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random configs and of training (default 0)")
    p.set_defaults(func=run)


def _step(i: int, n: int, text: str, command: Optional[str] = None) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)
    if command:
        print(f"      $ {command}", flush=True)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def save_grid(images, path: Path, columns: int) -> Path:
    """Write uint8 images ``[N, H, W, C]`` as one PNG grid (``columns`` per row, 4x upscaled)."""
    import numpy as np
    from PIL import Image

    n, h, w, c = images.shape
    rows = -(-n // columns)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    """A Markdown table of ``rows`` (``cols`` in order)."""
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" if c in ("config", "method") else "---:" for c in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)) if not isinstance(r.get(c), str) else r[c] for c in cols) + " |"
            for r in rows]
    return "\n".join([head, sep] + body)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import cli
    from ..errors import SensitivityError
    from ..predictors.ensemble import DEFAULT_PREDICTOR

    args.predictor = args.predictor or DEFAULT_PREDICTOR
    t_start = time.perf_counter()
    preset = QUICK if args.quick else FULL
    n_cfg = args.num_configs if args.num_configs is not None else preset["num_configs"]
    per_class = args.images_per_class if args.images_per_class is not None else preset["images_per_class"]
    folds = args.folds if args.folds is not None else preset["folds"]
    check_per_class = (args.check_images_per_class if args.check_images_per_class is not None
                       else preset["check_images_per_class"])
    workers = args.workers if args.workers is not None else max(1, min(2, os.cpu_count() or 1))
    if workers < 1:
        raise SensitivityError(f"--workers {workers}: needs at least 1")
    if args.threads is not None and args.threads < 1:
        raise SensitivityError(f"--threads {args.threads}: needs at least 1")
    threads = args.threads if args.threads is not None else max(1, os.cpu_count() or 1)
    try:
        targets = [float(t) for t in str(args.targets).split(",") if t.strip()]
    except ValueError:
        raise SensitivityError(f"--targets {args.targets!r}: expected a comma list of numbers, e.g. 3.4,3.8") from None
    if not targets:
        raise SensitivityError("--targets: give at least one target")
    if n_cfg < max(10, folds):
        raise SensitivityError(f"--num-configs {n_cfg}: the predictor needs at least {max(10, folds)} configs")
    if per_class < 2:
        raise SensitivityError(f"--images-per-class {per_class}: needs at least 2")
    if check_per_class < 2:
        raise SensitivityError(f"--check-images-per-class {check_per_class}: needs at least 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    mq_path = out / "multiquantizer.safetensors"
    cache_path = out / "cache.sqlite"
    pred_dir = out / "predictor"
    N = 6
    model, weights = args.model, "shipped"

    # 1. multiquantizer ------------------------------------------------------------------------
    cmd = ["multiquantize", model, "--weights", weights, "--out", str(mq_path)]
    _step(1, N, f"multiquantizer of {model}: 6 options per layer", "sensitivity " + " ".join(cmd))
    if cli.main(cmd) != 0:
        raise SensitivityError("demo: the multiquantizer build failed (see above)")

    from ..evaluation.evaluator import EvalProtocol, Evaluator
    from ..evaluation.sampler import sample_config
    from ..multiquantizer import load_multiquantizer
    from ..sizes import SizeTable
    from ..zoo import get_family

    fam = get_family(model)
    mq = load_multiquantizer(mq_path)
    torch.set_num_threads(threads)
    pipe = fam.load_pipeline(weights)
    protocol = EvalProtocol.for_family(fam, weights, n_per_class=per_class, multiquantizer_hash=mq.hash,
                                       dtype="float32")
    ev = Evaluator(fam, pipe, mq, protocol)
    layers = mq.layer_names
    sizes = SizeTable.from_multiquantizer(mq)

    def measure(config: Optional[Dict[str, str]], name: str, grid: bool = False) -> Dict[str, Any]:
        r = ev.evaluate(config, return_images=grid)
        if grid:
            save_grid(r.pop("images"), out / "images" / f"{name}.png", columns=per_class)
        r.pop("timings", None)
        r["avg_bits"] = sizes.avg_bits(config or {})
        return r

    # 2. a few configs for real ------------------------------------------------------------------
    _step(2, N, f"evaluate a few configs ({protocol.num_images} images each, {protocol.steps} steps, "
                f"guidance {protocol.guidance:g})",
          f"sensitivity evaluate {model} --multiquantizer {mq_path} --config CONFIG.json --images-per-class {per_class}")
    few = {"fp16": None, "uaq-4": {n: "uaq-4" for n in layers}, "kmeans_a-3": {n: "kmeans_a-3" for n in layers},
           f"random-{args.seed}-0": sample_config(layers, args.seed, 0)}
    results = []
    for name, cfg in few.items():
        r = measure(cfg, name, grid=True)
        results.append({"config": name, **{k: r.get(k) for k in ("avg_bits", "fid", "kid", "accuracy", "psnr")}})
    _atomic_json(out / "results.json", results)
    print(_table(results, ["config", "avg_bits", "fid", "kid", "accuracy", "psnr"]))
    print(f"      wrote {out / 'results.json'} and {len(results)} grids in {out / 'images'}")

    # 3. evaluation job ----------------------------------------------------------------------------
    cmd = ["sample", model, "--weights", weights, "--multiquantizer", str(mq_path), "--cache", str(cache_path),
           "--num-configs", str(n_cfg), "--seed", str(args.seed), "--workers", str(workers)]
    cmd += ["--threads", str(args.threads)] if args.threads is not None else []
    # digits-sd takes prompts: the first 10 x per_class of its eval prompts, as EvalProtocol.for_family
    cmd += (["--num-images", str(10 * per_class)] if fam.conditioning == "text"
            else ["--images-per-class", str(per_class)])
    _step(3, N, f"evaluation job: {n_cfg} random configs into a resumable cache", "sensitivity " + " ".join(cmd))
    if cli.main(cmd) != 0:
        raise SensitivityError("demo: the evaluation job failed (see above); rerun to resume")
    torch.set_num_threads(threads)  # the job's in-process worker may have changed it

    # 4. predictor ---------------------------------------------------------------------------------
    from ..evaluation.cache import ConfigCache
    from ..predictors import load_predictor, train

    with ConfigCache(cache_path) as c:
        records = c.records()
    _step(4, N, f"train the {args.predictor} predictor (target {args.metric}) and baselines, {folds}-fold CV",
          f"sensitivity train {cache_path} --model {model} --predictor {args.predictor} --target {args.metric} "
          f"--folds {folds} --seed {args.seed} --out {pred_dir}")
    stamp = {"configs": len(records), "predictor": args.predictor, "metric": args.metric, "folds": folds,
             "seed": args.seed}
    stamp_path = pred_dir / "demo_trained_on.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        print(f"      {pred_dir} is already trained on these {len(records)} configs; reusing it")
        report = json.loads((pred_dir / "report.json").read_text())
    else:
        report = train(cache_path, pred_dir, model=model, predictor=args.predictor, folds=folds, seed=args.seed,
                       metric=args.metric, multiquantizer=str(mq_path))
        _atomic_json(stamp_path, stamp)
    print(f"      report: {pred_dir / 'report.md'}")
    _print_cv(report)
    predictor = load_predictor(pred_dir)

    # 5. search, baselines, real evaluation ----------------------------------------------------------
    from ..comparison import METRIC_KEYS, compare_at_targets

    _step(5, N, f"search at {', '.join(f'{t:g}' for t in targets)} bits; every config evaluated for real",
          f"sensitivity search --predictor {pred_dir} --target-bits B --out {out / 'search'}/search-B.json")
    (out / "search").mkdir(exist_ok=True)

    # The best of N random configs was selected on the job's images: judged on those same images it
    # would win by selection luck. Every compared config is therefore measured on held-out seeds.
    check = EvalProtocol.for_family(fam, weights, n_per_class=check_per_class, seed=CHECK_SEED,
                                    multiquantizer_hash=mq.hash, dtype="float32")
    ev_check = Evaluator(fam, pipe, mq, check, bootstrap=BOOTSTRAP, bootstrap_seed=args.seed)
    print(f"      every compared config is measured on {check.num_images} held-out images "
          f"(seeds {CHECK_SEED}..{CHECK_SEED + check.num_images - 1})", flush=True)
    # the allocators that need no labels beyond the job's: SDNQ's rule and the reference's top-1 rule
    from ..allocators import AllocatorSpec, allocate_at_targets
    from ..comparison import cache_cost

    n_job, job_s = cache_cost(records)
    train_s = float((report.get("predictors", {}).get(args.predictor) or {}).get("train_seconds", 0.0))
    specs = [AllocatorSpec("SDNQ rule (threshold {threshold:.3g})", "sdnq", source="SDNQ rule"),
             AllocatorSpec("reference top-1 (λ {lam:.3g})", "reference", {"layer_scores": predictor.layer_scores(mq)},
                           configs_labelled=n_job, label_cpu_s=job_s + train_s, source="reference top-1")]
    allocated = allocate_at_targets(specs, sizes, [t for t in targets if t >= sizes.min_avg_bits()])
    comp = compare_at_targets(predictor, mq, ev_check, targets, records, metric=args.metric, job_evaluator=ev,
                              sizes=sizes, config_dir=out / "search", config_provenance={"predictor": str(pred_dir)},
                              log=lambda text: print("      " + text, flush=True), allocated=allocated,
                              costs={"search": (n_job, job_s + train_s)})
    rows, pareto_points, fp_check = comp.rows, comp.points, comp.full_precision
    metric_keys = METRIC_KEYS

    # 6. insights and summary -------------------------------------------------------------------------
    from .. import insights as I

    _step(6, N, "insights: scores per block and op type, option mix of the searched configs, Pareto plots",
          f"sensitivity insights --predictor {pred_dir} --config {out / 'search'}/search-B.json --cache {cache_path} "
          f"--out {out / 'insights'}")
    from ..config import QuantConfig

    configs = {p.stem: QuantConfig.load(p) for p in sorted((out / "search").glob("search-*.json"))}
    cache_label = f"job, {protocol.num_images} images"  # the marked configs: held-out images
    written = I.write_insights(out / "insights", layer_scores=predictor.layer_scores(mq), configs=configs,
                               sizes=sizes, records=records, results=pareto_points, metric=args.metric,
                               cache_label=cache_label)
    for extra in [m for m in ("fid", "psnr") if m != args.metric]:
        pt = I.pareto_table(records, pareto_points, metric=extra, sizes=sizes)
        fig = I.pareto_plot(pt, y=extra, title=f"{model}: measured {extra} vs average bits", cache_label=cache_label)
        from .search import _write_fig

        written.append(_write_fig(fig, out / "insights" / f"pareto_{extra}.png"))
    cols = ["target", "method", "avg_bits", f"predicted_{args.metric}", f"job_{args.metric}", args.metric] + \
        [k for k in metric_keys if k != args.metric] + ["verdict", "vs_search", "configs_labelled", "label_cpu_s"]
    from ..comparison import TIE_LEVEL, markdown_table

    noise_note = (f"Noise: each held-out metric is `value ± se`, se its bootstrap standard error over the "
                  f"{check.num_images} images ({BOOTSTRAP} replicates, seed {args.seed}). Every config is measured on the "
                  f"same images, so differences are tested paired: `verdict` is best / tie / worse against the target's "
                  f"best {args.metric}, `vs_search` better / tie / worse against the searched config; a tie means the "
                  f"{100 * TIE_LEVEL:.0f} % bootstrap interval of the difference holds 0: those rows are not ranked.")

    table = markdown_table(rows, cols)
    seconds = time.perf_counter() - t_start
    summary = {"model": model, "weights": weights, "seed": args.seed, "quick": bool(args.quick),
               "num_configs": n_cfg, "images_per_config": protocol.num_images, "steps": protocol.steps,
               "guidance": protocol.guidance, "check_images": check.num_images, "check_seed": CHECK_SEED,
               "check_fp16": {k: fp_check.get(k) for k in metric_keys},
               "predictor": args.predictor, "metric": args.metric, "folds": folds,
               "targets": targets, "few_configs": results, "rows": rows,
               "noise": {"bootstrap_replicates": BOOTSTRAP, "bootstrap_seed": args.seed, "tie_level": TIE_LEVEL,
                         "note": noise_note},
               "seconds": round(seconds, 1),
               "multiquantizer": str(mq_path), "cache": str(cache_path), "predictor_dir": str(pred_dir)}
    _atomic_json(out / "summary.json", summary)
    md = (f"# sensitivity demo on {model}\n\n{n_cfg} random configs x {protocol.num_images} images, "
          f"predictor {args.predictor} on {args.metric} ({folds}-fold CV), seed {args.seed}, "
          f"{seconds / 60:.1f} min.\n\n## A few configs\n\n"
          + _table(results, ["config", "avg_bits", "fid", "kid", "accuracy", "psnr"])
          + f"\n\n## Search vs baselines, measured on {check.num_images} held-out images\n\n"
          + f"Seeds {CHECK_SEED}.. (not the job's). The best random config is the cache's best by {args.metric} "
          + f"at the same or fewer bits; `job_{args.metric}` is each config's {args.metric} on the job's "
          + f"{protocol.num_images} images (the best random config was chosen on them; SDNQ's rule and the reference's "
          + "top-1 rule, λ swept to the target, are measured on the held-out images only). `configs_labelled` / "
          + "`label_cpu_s`: the evaluated configs (and their seconds, plus the predictor's training) each config needed. "
          + "In the Pareto plots the grey cloud "
          + "is the job's measurement, the marked configs are the held-out one. Full precision on the held-out "
          + f"images: FID {_fmt(fp_check.get('fid'))}, KID {_fmt(fp_check.get('kid'))}, accuracy "
          + f"{_fmt(fp_check.get('accuracy'))}.\n\n{noise_note}\n\n" + table + "\n")
    (out / "summary.md").write_text(md)
    print("\n" + table)
    print(f"\ndemo finished in {seconds / 60:.1f} min: {out / 'summary.md'}, {out / 'results.json'}, "
          f"{out / 'images'}/, {cache_path}, {pred_dir}/, {out / 'search'}/, {out / 'insights'}/ ({len(written)} files)")
    return 0


def _print_cv(report: Dict[str, Any]) -> None:
    """One line per predictor: mean held-out Kendall tau / Spearman / NDCG@10 (as in report.md)."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None or v != v else format(float(v), fmt)

    for name, r in (report.get("predictors") or {}).items():
        mean = r.get("mean") if isinstance(r, dict) else None
        if isinstance(mean, dict):
            print(f"      {name:10s} kendall {num(mean.get('kendall'), '+.3f')}  spearman {num(mean.get('spearman'), '+.3f')}"
                  f"  ndcg@10 {num(mean.get('ndcg@10'), '.3f')}")
