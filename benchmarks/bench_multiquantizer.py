"""Whole-model multiquantizer build: wall time, peak memory, file size, apply time.

Builds the multiquantizer (all six options) of a full-size denoiser with seeded random weights, from
the official diffusers config, and reports, in one run:

* build wall time (quantization of every layer + hashing + writing the file);
* peak resident memory of the process (and the model's own fp32 weight bytes next to it);
* file bytes / fp16 weight bytes;
* time to apply a full random config (cold: codes read and unpacked; warm: codes cached), and
  ``restore``.

    python benchmarks/bench_multiquantizer.py --model sd15              # SD1.5 UNet, 859.5M params
    python benchmarks/bench_multiquantizer.py --model pixart-alpha      # PixArt-α transformer
    python benchmarks/bench_multiquantizer.py --model sd15 --max-layers 40   # a quick partial run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensitivity.multiquantizer import apply, build_multiquantizer, load_multiquantizer, restore  # noqa: E402
from sensitivity.options import OPTION_NAMES  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="zoo family (sd15, sdxl, pixart-alpha, dit-xl-2, ...)")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--max-layers", type=int, default=None, help="only the first N layers (quick check)")
    ap.add_argument("--out", default=None, help="where to write the file (default: a temp dir, deleted)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    from sensitivity.zoo import get_family

    torch.manual_seed(0)
    fam = get_family(args.model)
    t = time.perf_counter()
    model = fam.load_denoiser(args.weights, device="cpu", dtype=torch.float32, seed=0)
    load_s = time.perf_counter() - t
    layers = fam.find_layers(model)
    if args.max_layers:
        layers = layers[: args.max_layers]
    n_params = sum(s.numel for s in layers)
    rss_model = peak_rss_gib()
    print(f"{fam.name}: {len(layers)} layers, {n_params / 1e6:.1f}M quantized weights, "
          f"loaded in {load_s:.1f} s, RSS {rss_model:.1f} GiB", flush=True)

    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out) if args.out else Path(tmp.name) / f"{fam.name}.safetensors"
    t = time.perf_counter()
    mq = build_multiquantizer(model, out, layers, model_id=fam.model_id(args.weights), options=OPTION_NAMES, resume=False)
    build_s = time.perf_counter() - t
    file_bytes = out.stat().st_size
    fp16 = mq.fp16_bytes()

    mq = load_multiquantizer(out)
    rng = random.Random(0)
    cfg = {n: rng.choice(OPTION_NAMES) for n in mq.layer_names}
    t = time.perf_counter()
    apply(model, mq, cfg)
    apply_cold = time.perf_counter() - t
    cfg2 = {n: rng.choice(OPTION_NAMES) for n in mq.layer_names}
    t = time.perf_counter()
    apply(model, mq, cfg2)
    apply_warm_partial = time.perf_counter() - t
    t = time.perf_counter()
    restore(model)
    restore_s = time.perf_counter() - t
    apply(model, mq, cfg2)  # warm: codes of cfg2 are cached
    restore(model)
    t = time.perf_counter()
    apply(model, mq, cfg2)
    apply_warm = time.perf_counter() - t
    restore(model)

    res = {
        "model": fam.name,
        "layers": len(layers),
        "quantized_weights": n_params,
        "build_seconds": round(build_s, 1),
        "quantize_seconds": mq.manifest["quantize_seconds"],
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "model_fp32_gib": round(4 * n_params / 2**30, 2),
        "file_bytes": file_bytes,
        "fp16_bytes": fp16,
        "file_over_fp16": round(file_bytes / fp16, 3),
        "apply_cold_seconds": round(apply_cold, 2),
        "apply_warm_full_seconds": round(apply_warm, 2),
        "apply_change_all_seconds": round(apply_warm_partial, 2),
        "restore_seconds": round(restore_s, 2),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(res, indent=1))
    print(
        f"{fam.name}: built {len(layers)} layers x 6 options in {build_s / 60:.1f} min, "
        f"peak RSS {res['peak_rss_gib']} GiB (model fp32 {res['model_fp32_gib']} GiB), "
        f"file {file_bytes / 2**30:.2f} GiB = {res['file_over_fp16']}x fp16, "
        f"apply full config {apply_cold:.2f} s cold / {apply_warm:.2f} s warm, restore {restore_s:.2f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
