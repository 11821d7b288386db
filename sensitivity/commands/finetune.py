"""``sensitivity finetune MODEL --multiquantizer MQ --config X.json --steps N --out finetuned/NAME/``.

Quantization-aware fine-tuning with knowledge distillation from the full-precision teacher (see
:mod:`sensitivity.finetune`). Data: the digits data for the digits models (default), ``--data DIR``
(imagefolder with ``metadata.jsonl`` captions) or ``--prompts FILE`` (data-free: the teacher's own
samples). Writes ``OUT/quantized.safetensors`` (codes + tables), ``OUT/config.json`` and
``OUT/finetune.json``; ``OUT/checkpoints/last.pt`` while it runs. Rerun the same command after a kill
to resume. ``sensitivity infer|evaluate MODEL --finetuned OUT`` use the result.

```
sensitivity finetune digits-dit --multiquantizer multiquantizers/digits-dit.safetensors \
    --config quant_configs/digits-dit-search-3.4.json --steps 300 --lr 1e-4 --out finetuned/dit-3.4
```
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting (numba's and torch's) slow training on a shared CPU 10-50x
# (measured: a digits-dit step of batch 32 took 1.1 s instead of 0.04 s); must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import SensitivityError


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_device_argument, add_weights_argument

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning of a config with distillation",
                       description="Fine-tune the quantized layers of a config (straight-through estimator: latent "
                                   "weights, scales / zero points / codebooks) to match the full-precision teacher's "
                                   "predictions; the result keeps every option's codes + tables layout (same average "
                                   "bits). Resumable: rerun the same command after a kill.")
    p.add_argument("model", help="model family (see `sensitivity models`)")
    add_weights_argument(p, help="hub id or local diffusers folder, or shipped / random / tiny")
    add_device_argument(p)
    p.add_argument("--multiquantizer", required=True, help="multiquantizer .safetensors file of MODEL")
    p.add_argument("--config", default=None, help="quantization config .json to fine-tune")
    p.add_argument("--calibrated", default=None, metavar="DIR",
                   help="start from a calibrated artifact (`sensitivity calibrate --out DIR`) instead of the "
                        "multiquantizer's codes (its GPTQ / AdaRound codes and refit tables are the starting point; its "
                        "activation ranges are not part of the result); its config is used when --config is not given")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--data", default=None, metavar="DIR",
                   help="imagefolder with metadata.jsonl captions (default for the digits models: the digits data)")
    d.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt per line: data-free distillation on the teacher's own samples")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the latent weights (default 1e-4)")
    p.add_argument("--lr-quant", type=float, default=None,
                   help="learning rate of scales / zero points / codebooks (default: --lr)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the training data order and noise (and of --weights random/tiny); default 0")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (default 20)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the trained tensors; 0 = no EMA")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the output distillation loss")
    p.add_argument("--denoise-weight", type=float, default=0.0, help="weight of the ordinary denoising loss")
    p.add_argument("--feature-weight", type=float, default=0.0, help="weight of block-feature matching")
    p.add_argument("--assign", choices=("rederive", "fixed"), default="rederive",
                   help="k-means options: re-derive the nearest-entry codes every step, or keep the stored codes")
    p.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every K steps (default 50)")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast dtype (default: bf16 on cuda, off on cpu)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="--prompts: sampler steps of the teacher's trajectories (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="--prompts: guidance of the teacher's sampling (default: the model's)")
    p.add_argument("--out", required=True, help="output folder, e.g. finetuned/NAME/")
    p.add_argument("--restart", action="store_true", help="discard a checkpoint in OUT and start afresh")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _read_prompts(path: str) -> list:
    f = Path(path)
    if not f.is_file():
        raise SensitivityError(f"--prompts {path!r} does not exist")
    prompts = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SensitivityError(f"--prompts {path!r} holds no prompts")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import QuantConfig
    from ..finetune import DigitsData, FinetuneSettings, ImageFolderData, TeacherSamplesData, finetune
    from ..finetune.data import DIGITS_FAMILIES, read_imagefolder
    from ..multiquantizer import load_multiquantizer
    from ..zoo import get_family

    t0 = time.time()
    fam = get_family(args.model)
    weights = fam.resolve_weights(args.weights)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SensitivityError(f"--device {device!r} is not a torch device") from None
    amp = args.amp if args.amp is not None else ("bf16" if dev.type == "cuda" else "off")
    settings = FinetuneSettings(
        steps=args.steps, lr=args.lr, lr_quant=args.lr_quant, batch_size=args.batch_size, seed=args.seed,
        warmup=args.warmup, ema_decay=args.ema_decay, distill_weight=args.distill_weight,
        denoise_weight=args.denoise_weight, feature_weight=args.feature_weight, assign=args.assign,
        checkpoint_every=args.checkpoint_every, amp=None if amp == "off" else amp)

    # every file is checked before the model is loaded or anything is written
    if args.data:
        read_imagefolder(args.data)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if not Path(args.multiquantizer).is_file():
        raise SensitivityError(f"--multiquantizer {args.multiquantizer!r} does not exist")
    mq = load_multiquantizer(args.multiquantizer)
    if str(mq.model_id).split(":", 1)[0] != fam.name:
        raise SensitivityError(f"multiquantizer {Path(args.multiquantizer).name} was built for {mq.model_id}, "
                               f"not for model {fam.name!r}")
    calibrated = None
    if args.calibrated:
        calibrated = _load_calibrated(args.calibrated, mq)
    if args.config:
        config = QuantConfig.load(args.config)
        source = args.config
    elif calibrated is not None:
        config, source = calibrated.config, args.calibrated
    else:
        raise SensitivityError("give --config X.json (or --calibrated DIR)")
    if config.model and str(config.model).split(":", 1)[0] != fam.name:
        raise SensitivityError(f"{source} is a config of {config.model}, not of model {fam.name!r}")
    try:
        mq.validate(config.options)
    except SensitivityError as exc:
        raise SensitivityError(f"{source}: {exc}") from None
    if calibrated is not None and dict(calibrated.config.options) != dict(config.options):
        raise SensitivityError(f"--calibrated {args.calibrated}: its config differs from {args.config}")
    digits = fam.name in DIGITS_FAMILIES
    if not digits and not (args.data or prompts):
        raise SensitivityError(f"model {fam.name!r}: give --data DIR (imagefolder) or --prompts FILE")
    if digits and (args.data or prompts):
        raise SensitivityError(f"model {fam.name!r} trains on the digits data; --data / --prompts are for "
                               "text-to-image models")

    dtype = torch.float32  # fp32 master weights; --amp autocasts the forward passes
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=args.seed)
    den = fam.denoiser(pipe)
    mq.check_model(den)
    if digits:
        data = DigitsData(fam.name, settings.batch_size)
    elif args.data:
        data = ImageFolderData.from_folder(fam, pipe, args.data, settings.batch_size, seed=args.seed)
    else:
        overrides = {k: v for k, v in (("steps", args.sample_steps), ("guidance", args.guidance)) if v is not None}
        data = TeacherSamplesData.from_prompts(fam, pipe, prompts, settings.batch_size, seed=args.seed, **overrides)
    start = None
    if calibrated is not None:
        opts = {k: v for k, v in config.options.items() if v != "fp16"}
        start = {n: calibrated.quantized_weight(n, mq) for n in opts}
    t_load = time.time() - t0
    record = finetune(den, mq, config, data, args.out, settings, model_id=fam.model_id(weights), start=start,
                      device=dev, progress=not args.no_progress, restart=args.restart,
                      extra={"weights": weights, "config_path": str(source),
                             "calibrated": str(args.calibrated) if args.calibrated else None,
                             "load_seconds": round(t_load, 2)})
    if record.get("already_done"):
        print(f"{args.out} is already fine-tuned with these settings ({record['steps']} steps); nothing to do")
        return 0
    vb, va = record["val_loss_before"], record["val_loss_after"]
    vl = ", ".join(f"{k} {vb[k]:.4g} -> {va[k]:.4g}" for k in va if k in vb)
    resumed = f", resumed from step {record['resumed_from_step']}" if record["resumed_from_step"] else ""
    print(f"fine-tuned {record['config']['quantized_layers']} layers of {fam.name} for {record['steps']} steps "
          f"in {record['train_seconds']:.1f} s{resumed}; held-out validation loss: {vl or 'n/a'}", file=sys.stderr)
    print(f"wrote {args.out}/quantized.safetensors, config.json, finetune.json "
          f"(avg bits {record['avg_bits_after']:.4f}, unchanged)")
    return 0


def _load_calibrated(path: str, mq):
    """A calibrated artifact of issue 13 (``sensitivity.calibration``), checked against ``mq``."""
    try:
        from ..calibration import load_calibrated
    except ImportError:
        raise SensitivityError("--calibrated needs sensitivity.calibration (`sensitivity calibrate`), "
                               "which this installation does not have") from None
    art = load_calibrated(path)
    if getattr(art, "multiquantizer_hash", mq.hash) != mq.hash:
        raise SensitivityError(f"--calibrated {path} was made with multiquantizer {art.multiquantizer_hash[:12]}, "
                               f"not {mq.hash[:12]}")
    return art
