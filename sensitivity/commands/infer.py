"""``sensitivity infer MODEL``: generate images with a quantization config applied to the denoiser.

```
sensitivity infer pixart-sigma --multiquantizer multiquantizers/sigma.safetensors \
    --config quant_configs/sigma_w39.json --prompt "a red bus" --n-images 4 --out out/w39 --act-bits 6
```
Writes ``OUT/00000.png``... and ``OUT/run.json`` (model, weights, multiquantizer and config hashes,
average bits, activation bits, generation settings, one entry per image with its prompt / class id
and seed, timings, library versions). Without ``--config`` the model runs in full precision.
Image ``i`` uses condition ``i mod len(conditions)`` and seed ``--seed-base + i``.

``--quantized DIR`` runs a ``sensitivity export`` folder (packed or sdnq) instead of applying a config:
MODEL and ``--weights`` default to the ones recorded in it (the other pipeline components come from
them); ``--materialize`` dequantizes its weights once at load instead of on every forward.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_generation_arguments, add_model_arguments, add_multiquantizer_argument, add_progress_argument

    p = sub.add_parser("infer", help="generate images with a quantization config applied",
                       description="Load MODEL, apply a quantization config from a multiquantizer (weights), "
                       "optionally quantize activations online (--act-bits), generate images, write PNGs and "
                       "a JSON record of what was run.")
    add_model_arguments(p, model_optional=True)
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="a `sensitivity export` folder (packed or sdnq) to run instead of --multiquantizer/--config")
    p.add_argument("--materialize", action="store_true",
                   help="with --quantized: dequantize the weights once at load (default: on the fly, low memory)")
    add_multiquantizer_argument(p, required=False)
    p.add_argument("--config", default=None, help="quantization config (.json; a reference .pkl needs --trust-pickle; a calibrated folder of `sensitivity calibrate`)")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading a reference .pkl config (runs pickle)")
    p.add_argument("--finetuned", default=None, metavar="DIR",
                   help="a fine-tuned artifact (`sensitivity finetune --out DIR`): its weights and config "
                        "(instead of --multiquantizer / --config)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable)")
    cond.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    cond.add_argument("--class-id", type=int, action="append", default=None, help="class id (repeatable)")
    p.add_argument("--n-images", type=int, default=None, help="number of images (default: one per condition)")
    p.add_argument("--seed-base", type=int, default=0, help="image i uses seed SEED_BASE + i")
    p.add_argument("--act-bits", type=int, choices=(8, 6), default=None,
                   help="quantize activations online to 8 or 6 bits (default: off)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and run.json")
    add_progress_argument(p)
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.infer import infer
    from .arguments import generation_overrides

    res = infer(args.model, args.out, weights=args.weights, pipeline_class=args.pipeline_class, device=args.device,
                dtype=args.dtype, seed=args.seed, quantized=args.quantized, materialize=args.materialize,
                multiquantizer=args.multiquantizer, config=args.config, trust_pickle=args.trust_pickle,
                finetuned=args.finetuned, prompts=args.prompt, prompts_file=args.prompts_file,
                class_ids=args.class_id, n_images=args.n_images, seed_base=args.seed_base, act_bits=args.act_bits,
                progress=not args.no_progress, **generation_overrides(args))
    rec = res.record
    bits = f"{rec['config']['avg_bits']:.3f}-bit weights" if rec["config"] is not None else "full-precision weights"
    if rec["quantized"] is not None:
        bits = f"{rec['quantized']['avg_bits']:.3f}-bit {rec['quantized']['format']} weights"
    acts = f", A{rec['act_bits']}" if rec["act_bits"] else ""
    if rec["calibration"] is not None:
        acts += ", calibrated"
    print(f"wrote {len(rec['images'])} images ({bits}{acts}) and run.json to {res.out} in {res.generate_seconds:.1f} s")
    return 0
