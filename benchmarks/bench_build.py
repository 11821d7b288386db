"""Per-layer multiquantizer build cost: the digits-dit build, and single layers of SD1.5's sizes.

* ``digits-dit``: the whole build (46 layers x 6 options, shipped weights), ``--runs`` times after a
  warm-up build (numba compiled), wall and process CPU seconds;
* layers: ``_quantize_layer`` of one layer, all 6 options, on one thread (torch and numba), CPU
  seconds (best of 2): SD1.5's largest conv (1280x1280x3x3, 14.7M weights), its feed-forward
  Linear (5120x1280) and a small 320x320 one;
* ``--profile``: the cProfile of one digits-dit build (CPU timer), top functions by own time.

On a shared machine the CPU seconds are the comparable figure (about the idle wall time of the
one-thread work). ``--root`` times another checkout (e.g. a ``git worktree`` of an older commit).

    python benchmarks/bench_build.py
    python benchmarks/bench_build.py --root /tmp/old --runs 3 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to time")
    ap.add_argument("--runs", type=int, default=2, help="timed digits-dit builds after the warm-up build")
    ap.add_argument("--no-layers", action="store_true", help="skip the SD1.5-size layers")
    ap.add_argument("--profile", action="store_true", help="print the cProfile of one digits-dit build")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    root = str(Path(args.root).resolve())
    sys.path.insert(0, root)
    import torch
    from torch import nn

    import sensitivity
    from sensitivity.layers import find_layers
    from sensitivity.multiquantizer import _quantize_layer, build_multiquantizer
    from sensitivity.options import OPTION_NAMES
    from sensitivity.zoo import get_family

    if not sensitivity.__file__.startswith(root):
        raise SystemExit(f"imported {sensitivity.__file__}, not the checkout {root}")
    t = time.time()
    sum(range(10**7))
    print(f"checkout {root}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"sum(range(10**7)) {time.time() - t:.3f} s")
    res: dict = {"root": root, "digits_dit": [], "layers": []}

    fam = get_family("digits-dit")
    den = fam.load_denoiser(None)
    layers = fam.find_layers(den)
    with tempfile.TemporaryDirectory() as tmp:
        def build(i: int):
            return build_multiquantizer(den, os.path.join(tmp, f"b{i}.safetensors"), layers,
                                        model_id="digits-dit:shipped", progress=False, resume=False)

        build(0)  # warm-up: numba kernels compiled or loaded
        for i in range(1, args.runs + 1):
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            build(i)
            r = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2),
                 "load": round((load + os.getloadavg()[0]) / 2, 1)}
            res["digits_dit"].append(r)
            print(f"digits-dit build {i}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU (load {r['load']})")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile(time.process_time)
            prof.enable()
            build(args.runs + 1)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)

    if not args.no_layers:
        import numba

        torch.set_num_threads(1)
        numba.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1280, 1280, 3), nn.Linear(1280, 5120), nn.Linear(320, 320))
        for spec in find_layers(model):
            times = []
            for _ in range(2):
                c = time.process_time()
                _quantize_layer(model, spec, OPTION_NAMES, None)
                times.append(time.process_time() - c)
            r = {"shape": list(spec.shape), "cpu_s": round(min(times), 3)}
            res["layers"].append(r)
            print(f"layer {'x'.join(map(str, spec.shape))}: {r['cpu_s']:.2f} s CPU for 6 options, 1 thread")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
