"""``sensitivity calibrate-data MODEL --kind timestep_aware|noise|raw --num N --out calib/NAME.safetensors``.

Captures the full-precision denoiser's inputs (latents, timesteps, conditioning) into a calibration
set (see :mod:`sensitivity.calibration.data`). Seeded (image i uses seed SEED + i), resumable
(rerun the same command), provenance in the file's metadata.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_generation_arguments, add_model_arguments, add_progress_argument

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
    add_progress_argument(p)
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.calibrate import calibration_data
    from .arguments import generation_overrides

    cs = calibration_data(args.model, args.out, kind=args.kind, num=args.num, timesteps=args.timesteps,
                          data_seed=args.data_seed, prompts_file=args.prompts_file, chunk=args.chunk,
                          weights=args.weights, pipeline_class=args.pipeline_class, device=args.device,
                          dtype=args.dtype, seed=args.seed, progress=not args.no_progress, **generation_overrides(args))
    inputs = ", ".join(f"{k} {v}" for k, v in cs.meta["inputs"].items())
    print(f"wrote {len(cs)} samples ({args.kind}, {args.num} images, model {cs.model_id}) to {args.out} "
          f"in {cs.meta['seconds']:.1f} s; inputs per sample: {inputs}")
    return 0
