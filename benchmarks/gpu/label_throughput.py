"""Labelling throughput on one GPU: configs per hour at the reference protocol, projected to 500 configs.

For SD1.5 and PixArt-α (the official configs in ``sensitivity/zoo/configs``, random weights, fp16 on
CUDA, built on the GPU) it runs the evaluation path of ``sensitivity sample``: a multiquantizer built on
the denoiser (``uaq-4`` / ``uaq-3`` by default: the apply cost of every option is one dequantize and copy
per layer), random mixed configs of it (``sample_config``), the :class:`Evaluator` with ``--batch-size
auto``, and times each part of one config's labelling:

* ``apply`` / ``restore``: a random config written into the denoiser and taken out again (warm);
* ``generate``: the protocol's images (1,000 prompts; SD1.5: 50 PLMS steps, CFG 7.5, 512 px; PixArt-α:
  20 DPM-Solver steps, CFG 4.5, 512 px; ``docs/method.md`` §3) in batches of the auto batch size. One batch
  is timed at two step counts; a step's time and the per-batch rest (text encoders, VAE decode) give
  ``ceil(1000 / batch) x (rest + steps x step)``, so a 50-step config is not run in full;
* ``score``: PSNR / MSE of 1,000 images against the full-precision ones (FID / KID need clean-fid's
  Inception file, which a GPU machine without network lacks: not included);

and one end-to-end ``Evaluator.evaluate`` of one batch checks that the path runs. Seconds per config =
the sum of the parts; configs per hour = 3600 / that; hours for 500 configs = 500 x seconds / 3600, on
one GPU (``sample --devices`` splits configs over GPUs; the full-precision images are made once per job).
The P8 goal: 500 PixArt-α configs x 1k images <= 8 h on one H100-class GPU.

    python benchmarks/gpu/label_throughput.py --out label_throughput.json      # a GPU machine (~5 min)
    python benchmarks/gpu/label_throughput.py --tiny                             # CPU, tiny configs (< 1 min)

``--tiny`` runs the same code on CPU with the tiny configs (``--weights tiny``) and fp32; its numbers
say nothing about GPUs. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's package (the GPU machine has it uninstalled)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROTOCOL_IMAGES = 1000  # docs/method.md §3: the first 1000 COCO captions, one image each
TARGET_CONFIGS = 500
P8_HOURS = 8.0
MODELS = ("sd15", "pixart-alpha")


def prompts(n: int) -> List[str]:
    """COCO-caption-like prompts (the text encoders pad to their fixed length: the content does not change the cost)."""
    things = ["a cat", "two dogs", "a red bus", "a bowl of fruit", "a man on a surfboard", "a kitchen", "a train"]
    places = ["on a street", "in a park", "near the sea", "on a table", "in the snow", "at night"]
    return [f"{things[i % len(things)]} {places[(i // len(things)) % len(places)]}, photo number {i}" for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(out: Dict[str, float], key: str, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out[key] = time.perf_counter() - t0


def measure(model: str, args, device: torch.device, dtype: torch.dtype, workdir: Path) -> Dict[str, Any]:
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator, compile_denoiser
    from sensitivity.evaluation.sampler import sample_config
    from sensitivity.multiquantizer import apply, build_multiquantizer, load_multiquantizer, restore
    from sensitivity.zoo import get_family

    weights = "tiny" if args.tiny else "random"
    fam = get_family(model)
    once: Dict[str, float] = {}
    with timed(once, "load_s", device), torch.device(device):  # random init on the device itself (T5-XXL: 4.7 B)
        pipe = fam.load_pipeline(weights, device=device, dtype=dtype)
    den = fam.denoiser(pipe)
    layers = fam.find_layers(den)
    mq_path = workdir / f"{model}.safetensors"
    with timed(once, "multiquantizer_build_s", device):
        build_multiquantizer(den, mq_path, layers, model_id=fam.model_id(weights), options=tuple(args.options),
                             device=device, progress=False)
    mq = load_multiquantizer(mq_path)
    extra = {"clean_caption": False} if model.startswith("pixart") else None  # bs4/ftfy: CPU text work, absent there
    protocol = EvalProtocol.for_family(fam, weights, conditions=prompts(args.images), multiquantizer_hash=mq.hash,
                                       extra=extra)
    if args.compile:
        with timed(once, "compile_call_s", device):
            compile_denoiser(fam, pipe, backend=None if args.compile is True else args.compile)
    ev = Evaluator(fam, pipe, mq, protocol, batch_size=args.batch_size, check_model=False)
    with timed(once, "batch_probe_s", device):
        bs = int(ev.resolved_batch_size())
    configs = [sample_config(mq.layer_names, args.seed, i, options=mq.options) for i in range(3)]
    parts: Dict[str, float] = {}
    with timed(once, "apply_cold_s", device):
        apply(den, mq, configs[0])
    restore(den)
    with timed(parts, "apply", device):
        apply(den, mq, configs[1])
    over = protocol.generation_overrides()
    steps = int(protocol.steps)
    conds, seeds = list(protocol.conditions[:bs]), list(protocol.seeds[:bs])
    s1, s2 = args.probe_steps
    gen: Dict[str, float] = {}
    fam.generate(pipe, conds, seeds, batch_size=bs, **dict(over, steps=s1))  # warm-up (and compile, if any)
    with timed(gen, "t1", device):
        images = fam.generate(pipe, conds, seeds, batch_size=bs, **dict(over, steps=s1))
    with timed(gen, "t2", device):
        fam.generate(pipe, conds, seeds, batch_size=bs, **dict(over, steps=s2))
    with timed(parts, "restore", device):
        restore(den)
    per_step = max(0.0, (gen["t2"] - gen["t1"]) / (s2 - s1))
    fixed = max(0.0, gen["t1"] - s1 * per_step)
    batches = math.ceil(args.images / bs)
    parts["generate"] = batches * (fixed + steps * per_step)
    # scoring: PSNR / MSE of the protocol's image count against full-precision images of the same shape
    many = np.ascontiguousarray(np.resize(images, (args.images,) + images.shape[1:]))
    scorer = Evaluator(fam, pipe, mq, protocol, check_model=False, reference_images=many[::-1].copy())
    with timed(parts, "score", device):
        scorer.score(many)
    # the real path end to end on one batch (apply, generate, restore, score; full precision first)
    small = EvalProtocol.for_family(fam, weights, conditions=list(protocol.conditions[:max(bs, 2)]),
                                    multiquantizer_hash=mq.hash, extra=extra, steps=s1, dtype=protocol.dtype)
    e2e = Evaluator(fam, pipe, mq, small, batch_size=bs, check_model=False).evaluate(configs[2])
    seconds = sum(parts.values())
    rate = 3600.0 / seconds
    size = fam.settings(pipe, **{k: v for k, v in over.items() if k in ("height", "width")})
    row = {
        "model": model, "weights": weights, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "layers": len(mq.layer_names), "options": list(mq.options), "batch_size": bs,
        "images_per_config": int(args.images), "steps": steps, "guidance": float(protocol.guidance),
        "resolution": [size.height, size.width], "compile": args.compile or False,
        "step_s_per_batch": per_step, "rest_s_per_batch": fixed, "batches_per_config": batches,
        "seconds_per_config_parts": parts, "seconds_per_config": seconds, "configs_per_hour": rate,
        "hours_for_500_configs": TARGET_CONFIGS / rate, "one_time": dict(once, fp_reference_s=parts["generate"]),
        "end_to_end_one_batch": {"steps": s1, "images": bs, "timings": {k: v for k, v in e2e["timings"].items()
                                                                         if isinstance(v, (int, float))},
                                  "metrics": {k: v for k, v in e2e.items() if isinstance(v, float)}},
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del pipe, den, ev, scorer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    from sensitivity.evaluation.batching import parse_batch_size
    from sensitivity.evaluation.evaluator import device_description

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny configs, fp32: the code path in < 1 minute")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list (default {','.join(MODELS)})")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--batch-size", default="auto", help="N or auto (default auto)")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                    help="torch.compile the denoiser first (its compile time is reported under one_time)")
    ap.add_argument("--images", type=int, default=PROTOCOL_IMAGES, help="images per config (default 1000)")
    ap.add_argument("--options", nargs="+", default=["uaq-4", "uaq-3"], help="multiquantizer options")
    ap.add_argument("--probe-steps", type=int, nargs=2, default=(2, 6), metavar=("S1", "S2"),
                    help="the two step counts one batch is timed at (default 2 6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random configs (default 0)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    args.batch_size = parse_batch_size(args.batch_size)
    if args.probe_steps[1] <= args.probe_steps[0] or args.probe_steps[0] < 2:
        ap.error("--probe-steps: S2 > S1 >= 2")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --tiny for the CPU code path", file=sys.stderr)
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        torch.set_num_threads(1)  # one thread: OpenMP teams on a shared CPU wait on descheduled members
    import diffusers

    speed = time.time()
    sum(range(10**7))
    speed = time.time() - speed
    result: Dict[str, Any] = {
        "device": device_description(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "tiny": bool(args.tiny), "cpu_speed_s_sum_1e7": speed,
        "target_configs": TARGET_CONFIGS, "p8_goal_hours": P8_HOURS, "models": [], "failed": {},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="label-throughput-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            print(f"{model}: building and timing on {result['device']} ...", flush=True)
            try:
                result["models"].append(measure(model, args, device, dtype, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                import traceback

                traceback.print_exc()
                result["failed"][model] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    result["wall_s"] = time.perf_counter() - t_all
    print(f"\nlabelling throughput on {result['device']} (torch {torch.__version__}, one device"
          f"{', tiny configs: not a GPU figure' if args.tiny else ''})")
    print(f"{'model':<14}{'batch':>6}{'images':>7}{'steps':>6}{'apply s':>9}{'gen s':>9}{'score s':>9}"
          f"{'s/config':>10}{'configs/hour':>14}{'h for 500':>11}")
    for m in result["models"]:
        p = m["seconds_per_config_parts"]
        print(f"{m['model']:<14}{m['batch_size']:>6}{m['images_per_config']:>7}{m['steps']:>6}"
              f"{p['apply'] + p['restore']:>9.2f}{p['generate']:>9.1f}{p['score']:>9.2f}{m['seconds_per_config']:>10.1f}"
              f"{m['configs_per_hour']:>14.1f}{m['hours_for_500_configs']:>11.2f}")
    for m in result["models"]:
        if m["model"] == "pixart-alpha" and not args.tiny:
            ok = m["hours_for_500_configs"] <= P8_HOURS
            print(f"P8 goal (500 PixArt-α configs x 1k images <= {P8_HOURS:g} h on one H100-class GPU): "
                  f"{m['hours_for_500_configs']:.2f} h on {result['device']}: {'met' if ok else 'NOT met'}")
    for model, why in result["failed"].items():
        print(f"{model}: FAILED ({why})")
    print(f"wall {result['wall_s']:.0f} s")
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
