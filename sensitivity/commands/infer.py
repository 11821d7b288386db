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
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_generation_arguments, add_model_arguments

    p = sub.add_parser("infer", help="generate images with a quantization config applied",
                       description="Load MODEL, apply a quantization config from a multiquantizer (weights), "
                       "optionally quantize activations online (--act-bits), generate images, write PNGs and "
                       "a JSON record of what was run.")
    add_model_arguments(p, model_optional=True)
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="a `sensitivity export` folder (packed or sdnq) to run instead of --multiquantizer/--config")
    p.add_argument("--materialize", action="store_true",
                   help="with --quantized: dequantize the weights once at load (default: on the fly, low memory)")
    p.add_argument("--multiquantizer", default=None, help="multiquantizer .safetensors file of MODEL")
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
    p.add_argument("--no-progress", action="store_true")
    add_generation_arguments(p)
    p.set_defaults(func=run)


def _conditions(args, fam) -> list:
    from ..errors import SensitivityError

    if fam.conditioning == "class":
        if args.prompt or args.prompts_file:
            raise SensitivityError(f"model {fam.name!r} is class-conditional: use --class-id, not prompts")
        conds = list(args.class_id or [])
        if not conds:
            raise SensitivityError(f"model {fam.name!r} needs at least one --class-id")
        return conds
    if args.class_id:
        raise SensitivityError(f"model {fam.name!r} is text-conditional: use --prompt, not --class-id")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SensitivityError(f"--prompts-file {str(path)!r} does not exist")
        conds = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not conds:
            raise SensitivityError(f"--prompts-file {str(path)!r} holds no prompts")
        return conds
    if not args.prompt:
        raise SensitivityError(f"model {fam.name!r} needs at least one --prompt (or --prompts-file)")
    return list(args.prompt)


def _save_png(image, path: Path) -> None:
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(arr).save(path, format="PNG")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__ as sensitivity_version
    from ..checks import check_finite_weights
    from ..config import QuantConfig
    from ..io import atomic_dir, check_writable
    from ..errors import SensitivityError
    from ..quantizers.activation import enable_activation_quant
    from .arguments import generation_overrides, model_from_args

    t0 = time.time()
    record = None
    if args.quantized:
        from ..export.packed import read_record

        if args.multiquantizer or args.config:
            raise SensitivityError("--quantized runs an exported model: drop --multiquantizer and --config")
        record = read_record(Path(args.quantized))
        if record["export_format"] not in ("packed", "sdnq"):
            raise SensitivityError(f"--quantized {args.quantized}: a {record['export_format']} export cannot run "
                                   "in torch (packed and sdnq can)")
        family = record.get("family")
        if args.model is None:
            args.model = family
        elif family and args.model != family:
            raise SensitivityError(f"--quantized {args.quantized} was exported from {record.get('model_id')}, "
                                   f"not from model {args.model!r}")
        if args.weights is None:
            args.weights = record.get("weights")
            args.seed = record.get("seed") if record.get("seed") is not None else args.seed
    elif args.materialize:
        raise SensitivityError("--materialize needs --quantized DIR")
    if args.model is None:
        raise SensitivityError("give MODEL (or --quantized DIR)")
    fam, weights, device, dtype = model_from_args(args)
    conds = _conditions(args, fam)
    fam.check_conditions(conds)
    n = args.n_images if args.n_images is not None else len(conds)
    if n < 1:
        raise SensitivityError(f"--n-images must be >= 1, got {n}")
    conditions = [conds[i % len(conds)] for i in range(n)]
    seeds = [args.seed_base + i for i in range(n)]
    overrides = generation_overrides(args)

    # check files before loading the model (cheap, and the usual mistakes)
    mq = config = calibrated = None
    if args.finetuned:
        from ..finetune import load_finetuned

        if args.multiquantizer:
            raise SensitivityError("--finetuned holds its own weights: drop --multiquantizer")
        mq = load_finetuned(args.finetuned)
        if str(mq.model_id).split(":", 1)[0] != fam.name:
            raise SensitivityError(f"--finetuned {args.finetuned} was made for {mq.model_id}, not for model {fam.name!r}")
        config = QuantConfig.load(args.config, trust_pickle=args.trust_pickle) if args.config else mq.config
        mq.validate(config.options)
    elif args.config and not args.multiquantizer:
        raise SensitivityError("--config needs --multiquantizer (the quantized weights come from it)")
    if args.multiquantizer:
        from ..multiquantizer import load_multiquantizer

        if not Path(args.multiquantizer).is_file():
            what = "is not a file" if Path(args.multiquantizer).exists() else "does not exist"
            raise SensitivityError(f"--multiquantizer {args.multiquantizer!r} {what}")
        mq = load_multiquantizer(args.multiquantizer)
        mq_family = str(mq.model_id).split(":", 1)[0]
        if mq_family != fam.name:
            raise SensitivityError(f"multiquantizer {Path(args.multiquantizer).name} was built for {mq.model_id}, "
                                   f"not for model {fam.name!r}")
    if args.config and not args.finetuned:
        from ..calibration.artifact import load_config_or_calibrated

        config, calibrated = load_config_or_calibrated(args.config, trust_pickle=args.trust_pickle)
        if calibrated is not None and args.act_bits:
            raise SensitivityError(f"{args.config}: a calibrated config carries its own activation ranges; "
                                   "drop --act-bits")
        try:
            mq.validate(config.options)
        except SensitivityError as exc:
            raise SensitivityError(f"--config {args.config}: {exc}") from None
        if config.multiquantizer_hash and config.multiquantizer_hash != mq.hash:
            print(f"warning: {args.config} was made for multiquantizer {config.multiquantizer_hash[:12]}, "
                  f"using {mq.hash[:12]} (its layers and options fit)", file=sys.stderr)

    out = check_writable(args.out, "--out", directory=True)
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=args.seed)
    den = fam.denoiser(pipe)
    check_finite_weights(den, None, f"--weights {weights}")
    settings = fam.settings(pipe, **overrides)  # validates the overrides before any work
    t_load = time.time() - t0

    applied = {}
    if record is not None:
        from ..export import load_quantized

        qden = load_quantized(args.quantized, device=device, dtype=den.dtype, materialize=args.materialize,
                              expect_class=type(den).__name__)
        setattr(pipe, fam.denoiser_attr, qden)
        del den
        den = qden
        t_load = time.time() - t0
    if mq is not None:
        from ..multiquantizer import apply

        mq.check_model(den)
        if calibrated is not None:
            from ..calibration.artifact import apply_calibrated

            info = apply_calibrated(den, mq, calibrated)
            applied = dict(config.options)
            act = info["activations"]
        elif config is not None:
            applied = apply(den, mq, config)
    if calibrated is None:
        act = None
    if args.act_bits:
        act = enable_activation_quant(den, fam.find_layers(den), args.act_bits)

    t1 = time.time()
    images = fam.generate(pipe, conditions, seeds, progress=not args.no_progress, **overrides)
    t_gen = time.time() - t1
    records = [{"file": f"{i:05d}.png", ("class_id" if fam.conditioning == "class" else "prompt"): c, "seed": s}
               for i, (c, s) in enumerate(zip(conditions, seeds))]

    import diffusers

    run_record = {
        "command": "infer",
        "model": fam.name,
        "model_id": fam.model_id(weights),
        "weights": weights,
        "seed": args.seed,
        "device": str(device),
        "dtype": str(den.dtype).replace("torch.", ""),
        "multiquantizer": None if mq is None else {"path": str(args.finetuned or args.multiquantizer),
                                                   "hash": mq.hash, "model_id": mq.model_id,
                                                   "finetuned": bool(args.finetuned)},
        "config": None if config is None else {
            "path": str(args.config), "hash": config.config_hash, "quantized_layers": len(applied),
            "avg_bits": mq.avg_bits(config.options), "provenance": config.provenance},
        "quantized": None if record is None else {
            "path": str(args.quantized), "format": record["export_format"], "materialize": args.materialize,
            "model_id": record.get("model_id"), "multiquantizer_hash": record["multiquantizer"]["hash"],
            "config_hash": record["config"]["hash"], "avg_bits": record.get("avg_bits")},
        "act_bits": args.act_bits if calibrated is None else (calibrated.activations.bits if calibrated.activations else None),
        "calibration": None if calibrated is None else {"calibration_hash": calibrated.calibration_hash,
                                                        "weights_method": calibrated.manifest.get("weights_method"),
                                                        "calibrated_layers": len(calibrated.weights)},
        "activation_quantization": act,
        "settings": settings.to_dict(),
        "images": records,
        "image_shape": list(images.shape[1:]),
        "seconds": {"load": round(t_load, 3), "generate": round(t_gen, 3)},
        "versions": {"sensitivity": sensitivity_version, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    with atomic_dir(out, "--out") as tmp:  # the PNGs and run.json appear together, or not at all
        for img, rec in zip(images, records):
            _save_png(img, tmp / rec["file"])
        (tmp / "run.json").write_text(json.dumps(run_record, indent=1, default=str) + "\n")
    bits = f"{run_record['config']['avg_bits']:.3f}-bit weights" if config is not None else "full-precision weights"
    if record is not None:
        bits = f"{record['avg_bits']:.3f}-bit {record['export_format']} weights"
    acts = f", A{run_record['act_bits']}" if run_record["act_bits"] else ""
    if calibrated is not None:
        acts += ", calibrated"
    print(f"wrote {n} images ({bits}{acts}) and run.json to {out} in {t_gen:.1f} s")
    return 0
