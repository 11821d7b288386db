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

# OpenMP threads that spin while waiting (numba's and torch's) slow training on a shared CPU 10-50x
# (measured: a digits-dit step of batch 32 took 1.1 s instead of 0.04 s); must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_device_argument, add_multiquantizer_argument, add_progress_argument, add_weights_argument

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning of a config with distillation",
                       description="Fine-tune the quantized layers of a config (straight-through estimator: latent "
                                   "weights, scales / zero points / codebooks) to match the full-precision teacher's "
                                   "predictions; the result keeps every option's codes + tables layout (same average "
                                   "bits). Resumable: rerun the same command after a kill.")
    p.add_argument("model", help="model family (see `sensitivity models`)")
    add_weights_argument(p, help="hub id or local diffusers folder, or shipped / random / tiny")
    add_device_argument(p)
    add_multiquantizer_argument(p)
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
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.finetune import finetune_config

    res = finetune_config(args.model, args.multiquantizer, args.out, config=args.config, calibrated=args.calibrated,
                          weights=args.weights, device=args.device, data=args.data, prompts=args.prompts,
                          sample_steps=args.sample_steps, guidance=args.guidance, amp=args.amp,
                          restart=args.restart, progress=not args.no_progress, steps=args.steps, lr=args.lr,
                          lr_quant=args.lr_quant, batch_size=args.batch_size, seed=args.seed, warmup=args.warmup,
                          ema_decay=args.ema_decay, distill_weight=args.distill_weight,
                          denoise_weight=args.denoise_weight, feature_weight=args.feature_weight,
                          assign=args.assign, checkpoint_every=args.checkpoint_every)
    record = res.record
    if record.get("already_done"):
        print(f"{args.out} is already fine-tuned with these settings ({record['steps']} steps); nothing to do")
        return 0
    vb, va = record["val_loss_before"], record["val_loss_after"]
    vl = ", ".join(f"{k} {vb[k]:.4g} -> {va[k]:.4g}" for k in va if k in vb)
    resumed = f", resumed from step {record['resumed_from_step']}" if record["resumed_from_step"] else ""
    print(f"fine-tuned {record['config']['quantized_layers']} layers of {res.family.name} for {record['steps']} steps "
          f"in {record['train_seconds']:.1f} s{resumed}; held-out validation loss: {vl or 'n/a'}", file=sys.stderr)
    print(f"wrote {args.out}/quantized.safetensors, config.json, finetune.json "
          f"(avg bits {record['avg_bits_after']:.4f}, unchanged)")
    return 0
