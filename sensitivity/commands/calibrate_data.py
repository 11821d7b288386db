"""``sensitivity calibrate-data MODEL --kind timestep_aware|noise|raw --num N --out calib/NAME.safetensors``.

Captures the full-precision denoiser's inputs (latents, timesteps, conditioning) into a calibration
set (see :mod:`sensitivity.calibration.data`). Seeded (image i uses seed SEED + i), resumable
(rerun the same command), provenance in the file's metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_generation_arguments, add_model_arguments

    p = sub.add_parser("calibrate-data", help="capture a calibration set of the denoiser's inputs",
                       description="Sample images with the full-precision model and store the denoiser's inputs at "
                                   "steps spread over the trajectory (timestep_aware), the same with pure-noise "
                                   "latents (noise), or noised training images (raw, digits models).")
    add_model_arguments(p)
    p.add_argument("--kind", default="timestep_aware", choices=("timestep_aware", "noise", "raw"))
    p.add_argument("--num", type=int, default=64, help="images (samples per kept step; raw: samples), default 64")
    p.add_argument("--timesteps", type=int, default=None,
                   help="steps kept per trajectory, spread evenly (default: all; q-diffusion's --cali_st)")
    p.add_argument("--data-seed", type=int, default=0, help="image i uses seed DATA_SEED + i (default 0)")
    p.add_argument("--prompts-file", default=None, help="text models: one prompt per line")
    p.add_argument("--chunk", type=int, default=32, help="images per resumable chunk (default 32)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true")
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.data import make_calibration_set
    from ..errors import SensitivityError
    from .arguments import generation_overrides, model_from_args

    fam, weights, device, dtype = model_from_args(args)
    if args.num < 1:
        raise SensitivityError(f"--num must be >= 1, got {args.num}")
    if args.timesteps is not None and args.timesteps < 1:
        raise SensitivityError(f"--timesteps must be >= 1, got {args.timesteps}")
    if args.chunk < 1:
        raise SensitivityError(f"--chunk must be >= 1, got {args.chunk}")
    if not args.out.endswith(".safetensors"):
        raise SensitivityError(f"--out {args.out!r}: the calibration set is a .safetensors file")
    if args.kind == "raw" and fam.name not in ("digits-dit", "digits-unet"):
        raise SensitivityError(f"--kind raw needs the training data: only the digits models ship it, not {fam.name!r}")
    prompts = None
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SensitivityError(f"--prompts-file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    overrides = generation_overrides(args)
    overrides.pop("batch_size", None)
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=args.seed)
    fam.settings(pipe, **overrides)  # validate before any work
    cs = make_calibration_set(fam, pipe, args.out, kind=args.kind, num=args.num, timesteps=args.timesteps,
                              seed=args.data_seed, prompts=prompts, chunk=args.chunk, weights=weights,
                              progress=not args.no_progress, **overrides)
    inputs = ", ".join(f"{k} {v}" for k, v in cs.meta["inputs"].items())
    print(f"wrote {len(cs)} samples ({args.kind}, {args.num} images, model {cs.model_id}) to {args.out} "
          f"in {cs.meta['seconds']:.1f} s; inputs per sample: {inputs}")
    return 0
