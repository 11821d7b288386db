"""The demo: the whole pipeline on an embedded digits model, offline, as named steps.

```python
from sensitivity.workflows.demo import DemoRun, demo_settings
run = DemoRun(demo_settings("demo_out", quick=True))
run.build_multiquantizer(); run.evaluate_few(); run.label(); run.train(); run.compare(); run.insights()
run.write_summary()                      # or: run_demo(demo_settings(...)) runs them all
```
Steps (each prints what it does and the command a user would run for it):

1. :meth:`DemoRun.build_multiquantizer`: the multiquantizer of the model (six options per layer);
2. :meth:`DemoRun.evaluate_few`: full precision, all ``uaq-4``, all ``kmeans_a-3``, one random mixed
   config evaluated for real (``results.json``, a PNG grid per config in ``images/``);
3. :meth:`DemoRun.label`: the evaluation job, random configs into a crash-safe cache (resumable);
4. :meth:`DemoRun.train`: a predictor trained with k-fold cross-validation next to its baselines;
5. :meth:`DemoRun.compare`: search at each target, each searched config evaluated on held-out images
   next to the best random cache config at the same or fewer bits, the best uniform config, the
   per-layer-error ILP, SDNQ's rule and the reference's top-1 rule (:mod:`sensitivity.allocators`);
6. :meth:`DemoRun.insights` and :meth:`DemoRun.write_summary`: insight tables and figures
   (``insights/``) and the summary (``summary.md``, ``summary.json``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import SensitivityError
from ..options import OPTION_NAMES
from ..provenance import run_provenance

DIGITS_MODELS = ("digits-dit", "digits-unet", "digits-sd")
FULL = dict(num_configs=240, images_per_class=20, folds=5, check_images_per_class=50)
QUICK = dict(num_configs=40, images_per_class=10, folds=3, check_images_per_class=20)
# Seeds of the held-out check images: disjoint from the job's (seed + image index, a few thousand at most).
CHECK_SEED = 1_000_000
# paired bootstrap replicates over the held-out images behind every "± se" and tie of the comparison
BOOTSTRAP = 200
STEPS = 6


@dataclass(frozen=True)
class DemoSettings:
    """A demo run's settings, resolved and checked by :func:`demo_settings`."""

    out: Path
    model: str
    quick: bool
    num_configs: int
    images_per_class: int
    targets: Tuple[float, ...]
    predictor: str
    check_images_per_class: int
    metric: str
    folds: int
    workers: int
    seed: int
    weights: str = "shipped"
    components: Optional[str] = None  # multiquantize --components (None: the denoiser alone)
    options: Optional[Tuple[str, ...]] = None  # the multiquantizer's options (None: the reference's six)
    threads: Optional[int] = None  # torch threads here and per worker (None: the cores here, sample's default)


def parse_targets(text: str) -> Tuple[float, ...]:
    """``'3.4,3.8'`` -> ``(3.4, 3.8)``; one-line error naming ``--targets``."""
    try:
        targets = tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise SensitivityError(f"--targets {text!r}: expected a comma list of numbers, e.g. 3.4,3.8") from None
    if not targets:
        raise SensitivityError("--targets: give at least one target")
    return targets


def demo_settings(out: Union[str, Path] = "demo_out", *, model: str = "digits-dit", quick: bool = False,
                  num_configs: Optional[int] = None, images_per_class: Optional[int] = None,
                  targets: Union[str, Sequence[float]] = (3.4, 3.6, 3.8, 4.0), predictor: Optional[str] = None,
                  check_images_per_class: Optional[int] = None, metric: str = "fid", folds: Optional[int] = None,
                  workers: Optional[int] = None, seed: int = 0, components: Optional[str] = None,
                  options: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> DemoSettings:
    """The settings of a demo writing under ``out``: unset numbers from the preset (:data:`FULL`, or
    :data:`QUICK` with ``quick``); ``predictor`` default the CLI's ensemble; ``workers`` default min(2, cores).
    ``components``: the pipeline components searched together (``"all"``; default the denoiser);
    ``options``: the multiquantizer's options (default the reference's six);
    ``threads``: torch threads of this process and of each worker (the results do not depend on it)."""
    from ..checks import check_values
    from ..io import check_writable
    from ..predictors.predictor import DEFAULT_PREDICTOR

    check_values(num_configs=num_configs, images_per_class=images_per_class, folds=folds, workers=workers, seed=seed,
                 check_images_per_class=check_images_per_class)
    check_writable(out, "--out", directory=True)  # before any work
    if model not in DIGITS_MODELS:
        raise SensitivityError(f"--model {model!r}: the demo runs an embedded model ({', '.join(DIGITS_MODELS)})")
    preset = QUICK if quick else FULL
    n_cfg = num_configs if num_configs is not None else preset["num_configs"]
    per_class = images_per_class if images_per_class is not None else preset["images_per_class"]
    folds = folds if folds is not None else preset["folds"]
    check_per_class = check_images_per_class if check_images_per_class is not None else preset["check_images_per_class"]
    workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    if workers < 1:
        raise SensitivityError(f"--workers {workers}: needs at least 1")
    if threads is not None and threads < 1:
        raise SensitivityError(f"--threads {threads}: needs at least 1")
    targets = parse_targets(targets) if isinstance(targets, str) else tuple(float(t) for t in targets)
    if not targets:
        raise SensitivityError("--targets: give at least one target")
    if n_cfg < max(10, folds):
        raise SensitivityError(f"--num-configs {n_cfg}: the predictor needs at least {max(10, folds)} configs")
    if per_class < 2:
        raise SensitivityError(f"--images-per-class {per_class}: needs at least 2")
    if check_per_class < 2:
        raise SensitivityError(f"--check-images-per-class {check_per_class}: needs at least 2")
    return DemoSettings(Path(out), model, bool(quick), n_cfg, per_class, targets, predictor or DEFAULT_PREDICTOR,
                        check_per_class, metric, folds, workers, seed, components=components,
                        options=tuple(options) if options else None, threads=threads)


def _fmt(v: Any, digits: int = 3) -> str:
    from ..comparison import _fmt as fmt

    return fmt(v, digits)


def _step(i: int, text: str, command: Optional[str] = None) -> None:
    print(f"\n[{i}/{STEPS}] {text}", flush=True)
    if command:
        print(f"      $ {command}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


def markdown_rows(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    """A Markdown table of ``rows`` (``cols`` in order)."""
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" if c in ("config", "method") else "---:" for c in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)) if not isinstance(r.get(c), str) else r[c] for c in cols) + " |"
            for r in rows]
    return "\n".join([head, sep] + body)


def print_cv(report: Dict[str, Any]) -> None:
    """One line per predictor: mean held-out Kendall tau / Spearman / NDCG@10 (as in report.md)."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None or v != v else format(float(v), fmt)

    for name, r in (report.get("predictors") or {}).items():
        mean = r.get("mean") if isinstance(r, dict) else None
        if isinstance(mean, dict):
            print(f"      {name:10s} kendall {num(mean.get('kendall'), '+.3f')}  spearman {num(mean.get('spearman'), '+.3f')}"
                  f"  ndcg@10 {num(mean.get('ndcg@10'), '.3f')}")


class DemoRun:
    """One demo under ``settings.out``: call the steps in order (each uses what the ones before made);
    every step resumes from what an earlier run wrote."""

    def __init__(self, settings: DemoSettings):
        self.s = settings
        self.out = settings.out
        self.mq_path = self.out / "multiquantizer.safetensors"
        self.cache_path = self.out / "cache.sqlite"
        self.pred_dir = self.out / "predictor"
        self.t_start = time.perf_counter()
        self.started = run_provenance()  # commit, date, calibrator, load: summary.json records start and end
        self.written: List[Any] = []

    def build_multiquantizer(self) -> None:
        """Step 1: the multiquantizer of the model, then the family, pipeline and the job's evaluator."""
        import torch

        from ..evaluation.evaluator import EvalProtocol, Evaluator
        from ..sizes import SizeTable
        from ..zoo import get_family
        from .multiquantize import describe_build, multiquantize

        s = self.s
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        options = s.options or OPTION_NAMES
        extra = (f" --components {s.components}" if s.components else "") + \
            (f" --options {' '.join(s.options)}" if s.options else "")
        _step(1, f"multiquantizer of {s.model}" + (f" ({s.components})" if s.components else "")
              + f": {len(options)} options per layer",
              f"sensitivity multiquantize {s.model} --weights {s.weights} --out {self.mq_path}{extra}")
        self.mq, _ = multiquantize(s.model, weights=s.weights, out=self.mq_path, options=options,
                                   components=s.components)
        print(describe_build(self.mq, self.mq_path))
        self.family = get_family(s.model)
        torch.set_num_threads(self.s.threads or max(1, os.cpu_count() or 1))
        self.pipe = self.family.load_pipeline(s.weights)
        self.protocol = EvalProtocol.for_family(self.family, s.weights, n_per_class=s.images_per_class,
                                                multiquantizer_hash=self.mq.hash, dtype="float32")
        self.evaluator = Evaluator(self.family, self.pipe, self.mq, self.protocol)
        self.sizes = SizeTable.from_multiquantizer(self.mq)

    def _measure(self, config: Optional[Dict[str, str]], name: str) -> Dict[str, Any]:
        from ..components import save_grid

        r = self.evaluator.evaluate(config, return_images=True)
        save_grid(r.pop("images"), self.out / "images" / f"{name}.png", columns=self.s.images_per_class)
        r.pop("timings", None)
        r["avg_bits"] = self.sizes.avg_bits(config or {})
        return r

    def evaluate_few(self) -> List[Dict[str, Any]]:
        """Step 2: full precision, all uaq-4, all kmeans_a-3 and one random config, for real (``results.json``)."""
        from ..evaluation.sampler import sample_config

        s, p = self.s, self.protocol
        _step(2, f"evaluate a few configs ({p.num_images} images each, {p.steps} steps, guidance {p.guidance:g})",
              f"sensitivity evaluate {s.model} --multiquantizer {self.mq_path} --config CONFIG.json "
              f"--images-per-class {s.images_per_class}")
        layers = self.mq.layer_names
        uniform = dict.fromkeys(o if o in self.mq.options else self.mq.options[k]
                                for o, k in (("uaq-4", 0), ("kmeans_a-3", -1)))
        few = {"fp16": None, **{o: {n: o for n in layers} for o in uniform},
               f"random-{s.seed}-0": sample_config(layers, s.seed, 0, options=self.mq.options)}
        self.results = []
        for name, cfg in few.items():
            r = self._measure(cfg, name)
            self.results.append({"config": name, **{k: r.get(k) for k in ("avg_bits", "fid", "kid", "accuracy", "psnr")}})
        _write_json(self.out / "results.json", self.results)
        print(markdown_rows(self.results, ["config", "avg_bits", "fid", "kid", "accuracy", "psnr"]))
        print(f"      wrote {self.out / 'results.json'} and {len(self.results)} grids in {self.out / 'images'}")
        return self.results

    def label(self) -> Any:
        """Step 3: the evaluation job, ``num_configs`` random configs into the resumable cache."""
        import torch

        from .sample import sample

        s = self.s
        # digits-sd takes prompts: the first 10 x per_class of its eval prompts, as EvalProtocol.for_family
        size = ({"num_images": 10 * s.images_per_class} if self.family.conditioning == "text"
                else {"images_per_class": s.images_per_class})
        flag = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in size.items())
        _step(3, f"evaluation job: {s.num_configs} random configs into a resumable cache",
              f"sensitivity sample {s.model} --weights {s.weights} --multiquantizer {self.mq_path} --cache "
              f"{self.cache_path} --num-configs {s.num_configs} --seed {s.seed} --workers {s.workers} {flag}"
              + (f" --threads {s.threads}" if s.threads else ""))
        res = sample(s.model, str(self.mq_path), self.cache_path, num_configs=s.num_configs, seed=s.seed,
                     workers=s.workers, threads=s.threads, weights=s.weights, **size)
        print(f"sample {res.family.name}: {res.summary}")
        if res.summary.failed:
            raise SensitivityError("demo: the evaluation job failed (see above); rerun to resume")
        torch.set_num_threads(self.s.threads or max(1, os.cpu_count() or 1))  # the job's in-process worker may have changed it
        return res.summary

    def train(self) -> Dict[str, Any]:
        """Step 4: the predictor (k-fold CV, with its baselines) on the cache; reused when already trained on it."""
        from ..evaluation.cache import read_records
        from ..evaluation.metric_specs import resolve_transform
        from ..predictors import load_predictor, train

        s = self.s
        self.records = read_records(self.cache_path)
        _step(4, f"train the {s.predictor} predictor (target {s.metric}) and baselines, {s.folds}-fold CV",
              f"sensitivity train {self.cache_path} --model {s.model} --predictor {s.predictor} --target {s.metric} "
              f"--folds {s.folds} --seed {s.seed} --out {self.pred_dir}")
        stamp = {"configs": len(self.records), "predictor": s.predictor, "metric": s.metric, "folds": s.folds,
                 "seed": s.seed, "target_transform": resolve_transform("auto", s.metric)}
        stamp_path = self.pred_dir / "demo_trained_on.json"
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            print(f"      {self.pred_dir} is already trained on these {len(self.records)} configs; reusing it")
            self.report = json.loads((self.pred_dir / "report.json").read_text())
        else:
            train(self.cache_path, self.pred_dir, model=s.model, predictor=s.predictor, folds=s.folds,
                  seed=s.seed, metric=s.metric, multiquantizer=str(self.mq_path))
            _write_json(stamp_path, stamp)
            # as written (undefined scores are null there): a resumed run reads the same and writes the same summary
            self.report = json.loads((self.pred_dir / "report.json").read_text())
        print(f"      report: {self.pred_dir / 'report.md'}")
        print_cv(self.report)
        self.predictor = load_predictor(self.pred_dir)
        return self.report

    def compare(self) -> Any:
        """Step 5: search at every target and the allocators, each config measured on held-out images."""
        from ..allocators import AllocatorSpec, allocate_at_targets
        from ..comparison import StoredEvaluator, cache_cost, compare_at_targets
        from ..evaluation.evaluator import EvalProtocol, Evaluator

        s, out = self.s, self.out
        _step(5, f"search at {', '.join(f'{t:g}' for t in s.targets)} bits; every config evaluated for real",
              f"sensitivity search --predictor {self.pred_dir} --target-bits B --out {out / 'search'}/search-B.json")
        (out / "search").mkdir(exist_ok=True)
        # The best of N random configs was selected on the job's images: judged on those same images it
        # would win by selection luck. Every compared config is therefore measured on held-out seeds.
        self.check = EvalProtocol.for_family(self.family, s.weights, n_per_class=s.check_images_per_class,
                                             seed=CHECK_SEED, multiquantizer_hash=self.mq.hash, dtype="float32")
        # measurements kept beside the outputs, so a rerun (or a resume after a kill) measures nothing twice
        ev_check = StoredEvaluator(
            Evaluator(self.family, self.pipe, self.mq, self.check, bootstrap=BOOTSTRAP, bootstrap_seed=s.seed),
            out / "measured-heldout.jsonl", {**self.check.to_dict(), "bootstrap": BOOTSTRAP, "bootstrap_seed": s.seed})
        ev_job = StoredEvaluator(self.evaluator, out / "measured-job.jsonl", self.protocol.to_dict())
        print(f"      every compared config is measured on {self.check.num_images} held-out images "
              f"(seeds {CHECK_SEED}..{CHECK_SEED + self.check.num_images - 1})", flush=True)
        # the allocators that need no labels beyond the job's: SDNQ's rule and the reference's top-1 rule
        n_job, job_s = cache_cost(self.records)
        train_s = float((self.report.get("predictors", {}).get(s.predictor) or {}).get("train_seconds", 0.0))
        specs = [AllocatorSpec("SDNQ rule (threshold {threshold:.3g})", "sdnq", source="SDNQ rule"),
                 AllocatorSpec("reference top-1 (λ {lam:.3g})", "reference",
                               {"layer_scores": self.predictor.layer_scores(self.mq)},
                               configs_labelled=n_job, label_cpu_s=job_s + train_s, source="reference top-1")]
        if ev_check.store or ev_job.store:
            print(f"      {len(ev_check.store)} held-out and {len(ev_job.store)} job measurements from an earlier run "
                  f"({out / 'measured-heldout.jsonl'}): reusing them", flush=True)
        allocated = allocate_at_targets(specs, self.sizes, [t for t in s.targets if t >= self.sizes.min_avg_bits()])
        self.comparison = compare_at_targets(
            self.predictor, self.mq, ev_check, list(s.targets), self.records, metric=s.metric,
            job_evaluator=ev_job, sizes=self.sizes, config_dir=out / "search",
            config_provenance={"predictor": str(self.pred_dir)}, log=lambda text: print("      " + text, flush=True),
            allocated=allocated, costs={"search": (n_job, job_s + train_s)})
        return self.comparison

    def insights(self) -> List[Any]:
        """Step 6a: insight tables and figures of the predictor, the searched configs and the cache (``insights/``)."""
        from .. import insights as I
        from ..config import QuantConfig

        s, out = self.s, self.out
        _step(6, "insights: scores per block and op type, option mix of the searched configs, Pareto plots",
              f"sensitivity insights --predictor {self.pred_dir} --config {out / 'search'}/search-B.json --cache "
              f"{self.cache_path} --out {out / 'insights'}")
        configs = {p.stem: QuantConfig.load(p) for p in sorted((out / "search").glob("search-*.json"))}
        cache_label = f"job, {self.protocol.num_images} images"  # the marked configs: held-out images
        points = self.comparison.points
        self.written = I.write_insights(out / "insights", layer_scores=self.predictor.layer_scores(self.mq),
                                        configs=configs, sizes=self.sizes, records=self.records, results=points,
                                        metric=s.metric, cache_label=cache_label)
        for extra in [m for m in ("fid", "psnr") if m != s.metric]:
            pt = I.pareto_table(self.records, points, metric=extra, sizes=self.sizes)
            fig = I.pareto_plot(pt, y=extra, title=f"{s.model}: measured {extra} vs average bits",
                                cache_label=cache_label)
            self.written.append(I.save_figure(fig, out / "insights" / f"pareto_{extra}.png"))
        return self.written

    def write_summary(self) -> Dict[str, Any]:
        """Step 6b: ``summary.json`` and ``summary.md`` (the few configs and the comparison table)."""
        from ..comparison import METRIC_KEYS, TIE_LEVEL, markdown_table
        from ..io import atomic_write_text

        s, out, p, check = self.s, self.out, self.protocol, self.check
        rows, fp_check = self.comparison.rows, self.comparison.full_precision
        cols = ["target", "method", "avg_bits", f"predicted_{s.metric}", f"job_{s.metric}", s.metric] + \
            [k for k in METRIC_KEYS if k != s.metric] + ["verdict", "vs_search", "configs_labelled", "label_cpu_s"]
        self.table = markdown_table(rows, cols)
        noise_note = (f"Noise: each held-out metric is `value ± se`, se its bootstrap standard error over the "
                      f"{check.num_images} images ({BOOTSTRAP} replicates, seed {s.seed}). Every config is measured on "
                      f"the same images, so differences are tested paired: `verdict` is best / tie / worse against the "
                      f"target's best {s.metric}, `vs_search` better / tie / worse against the searched config; a tie "
                      f"means the {100 * TIE_LEVEL:.0f} % bootstrap interval of the difference holds 0: those rows are "
                      f"not ranked.")
        seconds = time.perf_counter() - self.t_start
        summary = {"model": s.model, "weights": s.weights, "seed": s.seed, "quick": s.quick,
                   "num_configs": s.num_configs, "images_per_config": p.num_images, "steps": p.steps,
                   "guidance": p.guidance, "check_images": check.num_images, "check_seed": CHECK_SEED,
                   "check_fp16": {k: fp_check.get(k) for k in METRIC_KEYS},
                   "predictor": s.predictor, "metric": s.metric, "folds": s.folds,
                   "target": (self.report.get("target") or {}).get("formula"),
                   "targets": list(s.targets), "few_configs": self.results, "rows": rows,
                   "noise": {"bootstrap_replicates": BOOTSTRAP, "bootstrap_seed": s.seed, "tie_level": TIE_LEVEL,
                             "note": noise_note},
                   "seconds": round(seconds, 1),
                   "multiquantizer": str(self.mq_path), "cache": str(self.cache_path),
                   "predictor_dir": str(self.pred_dir),
                   "predictor_cv": {name: {k: r.get(k) for k in ("mean", "std")}
                                    for name, r in (self.report.get("predictors") or {}).items() if isinstance(r, dict)},
                   "provenance": run_provenance(self.started)}
        _write_json(out / "summary.json", summary)
        md = (f"# sensitivity demo on {s.model}\n\n{s.num_configs} random configs x {p.num_images} images, "
              f"predictor {s.predictor} on {s.metric} ({s.folds}-fold CV), seed {s.seed}, "
              f"{seconds / 60:.1f} min.\n\n## A few configs\n\n"
              + markdown_rows(self.results, ["config", "avg_bits", "fid", "kid", "accuracy", "psnr"])
              + f"\n\n## Search vs baselines, measured on {check.num_images} held-out images\n\n"
              + f"Seeds {CHECK_SEED}.. (not the job's). The best random config is the cache's best by {s.metric} "
              + f"at the same or fewer bits; `job_{s.metric}` is each config's {s.metric} on the job's "
              + f"{p.num_images} images (the best random config was chosen on them; SDNQ's rule and the reference's "
              + "top-1 rule, λ swept to the target, are measured on the held-out images only). `configs_labelled` / "
              + "`label_cpu_s`: the evaluated configs (and their seconds, plus the predictor's training) each config "
              + "needed. In the Pareto plots the grey cloud "
              + "is the job's measurement, the marked configs are the held-out one. Full precision on the held-out "
              + f"images: FID {_fmt(fp_check.get('fid'))}, KID {_fmt(fp_check.get('kid'))}, accuracy "
              + f"{_fmt(fp_check.get('accuracy'))}.\n\n{noise_note}\n\n" + self.table + "\n")
        atomic_write_text(out / "summary.md", md)
        self.seconds = seconds
        return summary

    def describe(self) -> str:
        """The closing line: how long it took and what was written where."""
        out = self.out
        return (f"demo finished in {self.seconds / 60:.1f} min: {out / 'summary.md'}, {out / 'results.json'}, "
                f"{out / 'images'}/, {self.cache_path}, {self.pred_dir}/, {out / 'search'}/, {out / 'insights'}/ "
                f"({len(self.written)} files)")


def run_demo(settings: DemoSettings) -> DemoRun:
    """Every step of the demo in order; returns the run (its ``table`` the comparison, ``describe()`` the summary)."""
    run = DemoRun(settings)
    run.build_multiquantizer()
    run.evaluate_few()
    run.label()
    run.train()
    run.compare()
    run.insights()
    run.write_summary()
    return run
