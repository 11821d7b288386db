"""Framework overhead of an evaluation job on ``digits-dit``: everything except the networks.

Runs ``sensitivity sample``'s job (:func:`~sensitivity.evaluation.runners.run_job` with the real
:class:`~sensitivity.evaluation.evaluator.EvaluatorFactory`) on N random configs into a fresh cache,
with forward hooks timing the denoiser, the decoder (none for digits) and the feature network
(the digits classifier). The overhead is what is left of the job's wall time (model loading
excluded): sampling, claiming and writing records, applying configs (dequantize + copy), the
scheduler / guidance / noise of the sampling loop, metric math (Fréchet distance, KID, PSNR).

    python benchmarks/bench_eval_overhead.py                      # shipped weights, 10 configs
    python benchmarks/bench_eval_overhead.py --weights random --configs 5 --out overhead.json

Prints one line per component (seconds per config, share of the wall time) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Timer:
    """Seconds spent inside ``forward`` of some modules (CUDA-synchronized)."""

    def __init__(self, modules, cuda: bool):
        import torch

        self.total = 0.0
        self._t0: List[float] = []
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, *_):
        self._sync()
        self._t0.append(time.perf_counter())

    def _post(self, *_):
        self._sync()
        t0 = self._t0.pop()
        if not self._t0:  # outermost call only
            self.total += time.perf_counter() - t0

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


@dataclass
class TimedFactory:
    """Wraps an ``EvaluatorFactory``: same evaluation, plus network timings in each record."""

    base: Any

    def __call__(self):
        ev = self.base.build()
        cuda = ev.device.type == "cuda"
        den = _Timer([ev.denoiser], cuda)
        vae = getattr(ev.pipe, "vae", None)
        dec = _Timer([vae] if vae is not None else [], cuda)
        feat_modules = []
        if ev._features is not None:  # digits classifier: body + head are called directly
            feat_modules = list(ev._features.model.children())
        elif ev._extractor is not None:
            feat_modules = [ev._extractor.model]
        feat = _Timer(feat_modules, cuda)
        ev.reference_images()  # the full-precision images are made once per worker, at startup
        den.take(), dec.take(), feat.take()

        def evaluate(index, options):
            out = ev.evaluate(options)
            out["timings"] = dict(out.get("timings") or {}, denoiser=den.take(), decoder=dec.take(),
                                  features=feat.take())
            return out

        return evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="digits-dit weights (default: shipped)")
    ap.add_argument("--multiquantizer", default=None, help="multiquantizer file (built if missing)")
    ap.add_argument("--configs", type=int, default=10, help="configs to evaluate")
    ap.add_argument("--images-per-class", type=int, default=50, help="images per digit class (default 50 = 500)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the measurements as JSON")
    args = ap.parse_args(argv)

    import torch

    from sensitivity.evaluation.cache import ConfigCache
    from sensitivity.evaluation.protocol import protocol_for
    from sensitivity.evaluation.runners import JobPlan, LocalRunner, run_job
    from sensitivity.evaluation.sampler import SamplerSpec
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    weights = fam.resolve_weights(args.weights)
    mq_path = Path(args.multiquantizer or ROOT / "multiquantizers" / f"digits-dit-{weights}.safetensors")
    if not mq_path.exists():
        den = fam.load_denoiser(weights, device="cpu", dtype=torch.float32)
        build_multiquantizer(den, mq_path, fam.find_layers(den), model_id=fam.model_id(weights), progress=True)
    _, _, factory, protocol, mq = protocol_for("digits-dit", str(mq_path), weights=weights, device=args.device,
                                                images_per_class=args.images_per_class, steps=args.steps,
                                                batch_size=args.batch_size)
    plan = JobPlan.from_multiquantizer(mq, SamplerSpec(seed=args.seed, options=mq.options), args.configs)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "bench.sqlite"
        summary = run_job(cache, plan, LocalRunner(TimedFactory(factory), workers=args.workers),
                          signature=protocol.signature(), evaluation=protocol.to_dict(), desc="bench")
        with ConfigCache(cache) as c:
            recs = c.records()
    n = len(recs)
    wall = summary.elapsed_s * args.workers  # worker-seconds
    sums: Dict[str, float] = {}
    for r in recs:
        for k, v in r["timings"].items():
            sums[k] = sums.get(k, 0.0) + float(v)
    nets = sums["denoiser"] + sums["decoder"] + sums["features"]
    parts = {
        "denoiser forward": sums["denoiser"],
        "decoder forward": sums["decoder"],
        "feature network forward": sums["features"],
        "apply config (dequantize + copy) + restore": sums["apply"],
        "sampling loop besides the denoiser (scheduler, guidance, noise)": sums["generate"] - sums["denoiser"] - sums["decoder"],
        "metric math (FID, KID, accuracy, PSNR)": sums["score"] - sums["features"],
        "job (sampler, cache, queues) and evaluator bookkeeping": wall - sums["apply"] - sums["generate"] - sums["score"],
    }
    overhead = 1.0 - nets / wall
    print(f"\n{n} configs of digits-dit ({protocol.num_images} images x {protocol.steps} steps, guidance "
          f"{protocol.guidance}, batch {args.batch_size or fam.defaults.batch_size}), {args.workers} worker(s), "
          f"device {factory.device}, torch threads {torch.get_num_threads()}")
    for k, v in parts.items():
        print(f"  {k:<66} {v / n:8.3f} s/config  {100 * v / wall:5.1f} %")
    print(f"  {'total (job wall time x workers, model loading excluded)':<66} {wall / n:8.3f} s/config  100.0 %")
    line = (f"framework overhead {100 * overhead:.1f} % of a config's time (target <= 10 %); "
            f"{summary.configs_per_hour:.0f} configs/hour; startup {summary.startup_s:.1f} s")
    print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "configs": n, "images": protocol.num_images, "steps": protocol.steps, "workers": args.workers,
            "device": factory.device, "seconds_per_config": {k: v / n for k, v in parts.items()},
            "wall_seconds_per_config": wall / n, "overhead_share": overhead,
            "configs_per_hour": summary.configs_per_hour, "startup_s": summary.startup_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
