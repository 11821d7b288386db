#!/usr/bin/env python
"""Train the embedded digits models and their classifier from a seed; reproduces the shipped weights.

    python scripts/train_digits.py classifier          # ~1 min  -> sensitivity/evaluation/weights/digits_classifier.safetensors
    python scripts/train_digits.py dit                 # ~49 min -> sensitivity/zoo/weights/digits-dit/
    python scripts/train_digits.py unet                # ~11 min -> sensitivity/zoo/weights/digits-unet/
    python scripts/train_digits.py eval dit            # re-measure shipped (or --out) weights

Run times are on 2 CPU cores (``--threads 2``); each run writes ``training_report.json`` next to the
weights (seed, settings, wall time, loss, and the metrics of the saved weights: class accuracy and
FID against the digits data on 500 images, 50 per class). Training is deterministic for a given
seed, torch build and device; the shipped weights were trained on CPU with torch 2.13.0.

The diffusion models are trained on all 1,797 images with small random shifts (+-1 pixel, with
probability ``--shift-prob``), v-prediction on a cosine schedule, label dropout 0.1 for
classifier-free guidance, AdamW with warmup and cosine decay, and an EMA of the weights (which is
what is saved, in float16 to keep the package small).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting slow training down several-fold;
# passive waiting keeps 2 threads faster than 1 under load. Must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensitivity.evaluation.digits_classifier import (  # noqa: E402
    CLASSIFIER_PATH,
    DigitsClassifier,
    save_classifier,
    to_input,
)
from sensitivity.io import atomic_dir, atomic_write_json  # noqa: E402
from sensitivity.zoo import digits as D  # noqa: E402


def random_shift(x: torch.Tensor, gen: torch.Generator, prob: float, max_shift: int = 1,
                 fill: float = 0.0) -> torch.Tensor:
    """Shift each image of ``x [N, C, H, W]`` by a random integer offset in [-max_shift, max_shift]
    (applied with probability ``prob``); uncovered pixels get ``fill``."""
    n, _, h, w = x.shape
    if prob <= 0 or max_shift <= 0:
        return x
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    off = torch.randint(-p, p + 1, (n, 2), generator=gen)
    off[torch.rand(n, generator=gen) >= prob] = 0
    rows = (p - off[:, 0])[:, None] + torch.arange(h)[None]  # [N, H]
    cols = (p - off[:, 1])[:, None] + torch.arange(w)[None]  # [N, W]
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def env_info() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- classifier


def train_classifier(args) -> int:
    from sklearn.model_selection import train_test_split

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = D.digits_dataset()
    idx_tr, idx_te = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=args.seed,
                                      stratify=labels)
    x_tr, y_tr = to_input(images[idx_tr]), torch.as_tensor(labels[idx_tr])
    x_te, y_te = to_input(images[idx_te]), torch.as_tensor(labels[idx_te])
    model = DigitsClassifier(width=args.width, feature_dim=args.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total = args.epochs * steps_per_epoch
    t0 = time.time()
    step = 0
    bar = tqdm(range(args.epochs), desc="classifier", unit="epoch")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for s in range(0, len(x_tr), args.batch_size):
            b = perm[s:s + args.batch_size]
            x = random_shift(x_tr[b], gen, prob=0.5)
            if args.intensity_jitter > 0:
                x = x * (1 - args.intensity_jitter / 2 + args.intensity_jitter * torch.rand(len(b), 1, 1, 1, generator=gen))
            if args.noise_std > 0:
                x = x + args.noise_std * torch.randn(x.shape, generator=gen)
            x = x.clamp(0, 1)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.lr or 2e-3, warmup=steps_per_epoch, floor=0.02)
            loss = F.cross_entropy(model(x), y_tr[b], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        acc_te = (model(x_te).argmax(1) == y_te).float().mean().item()
        acc_tr = (model(x_tr).argmax(1) == y_tr).float().mean().item()
    seconds = time.time() - t0
    out = Path(args.out) if args.out else CLASSIFIER_PATH
    meta = {"seed": args.seed, "epochs": args.epochs, "noise_std": args.noise_std,
            "intensity_jitter": args.intensity_jitter, "test_accuracy": round(acc_te, 4),
            "train_accuracy": round(acc_tr, 4), "train_seconds": round(seconds, 1), "env": env_info(),
            "split": "sklearn train_test_split(test_size=0.2, stratify, random_state=seed)"}
    save_classifier(model, out, meta)
    print(f"classifier: held-out accuracy {acc_te:.4f} (train {acc_tr:.4f}), {seconds:.0f} s -> {out}")
    return 0


# ----------------------------------------------------------------------------------- diffusion


def evaluate_pipeline(pipe, n_per_class: int = 50, steps: int = D.DEFAULT_STEPS,
                      guidance: float = D.DEFAULT_GUIDANCE, classifier_path=None) -> dict:
    """Class accuracy and FID/KID (classifier features) of ``n_per_class`` images per digit, seeds 0.."""
    from sensitivity.evaluation import metrics as M

    labels = np.repeat(np.arange(D.NUM_CLASSES), n_per_class)
    seeds = list(range(len(labels)))
    t0 = time.time()
    images = pipe(labels.tolist(), seeds, num_inference_steps=steps, guidance_scale=guidance)
    gen_s = time.time() - t0
    feats = M.DigitsFeatures(classifier_path)
    f_gen, pred = feats.features_and_predictions(images)
    ref = feats.reference_features()
    return {"images": len(labels), "steps": steps, "guidance": guidance,
            "accuracy": round(M.class_accuracy(pred, labels), 4),
            "fid": round(M.fid_from_features(f_gen, ref), 4),
            "kid": round(M.kid_from_features(f_gen, ref, seed=0), 5),
            "generate_seconds": round(gen_s, 2)}


def train_diffusion(args) -> int:
    kind = args.command
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images, labels = D.digits_dataset()
    x_all = D.images_to_tensor(images)  # [N,1,8,8] in [-1,1]
    y_all = torch.as_tensor(labels)
    model = D.build_dit(args.seed) if kind == "dit" else D.build_unet(args.seed)
    if kind == "dit":  # label dropout is done here (same RNG for both families), not inside diffusers
        model.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = 0.0
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    sched = D.make_scheduler()
    acp = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    out = Path(args.out) if args.out else (D.DIT_DIR if kind == "dit" else D.UNET_DIR)
    log = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"train digits-{kind}", unit="step", mininterval=5)
    loss_avg = None
    for step in bar:
        b = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        x0 = random_shift(x_all[b], gen, prob=args.shift_prob, fill=-1.0)
        y = y_all[b].clone()
        y[torch.rand(len(b), generator=gen) < args.label_dropout] = D.NULL_CLASS
        t = torch.randint(0, sched.config.num_train_timesteps, (len(b),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        if kind == "dit":
            pred = model(xt, timestep=t, class_labels=y).sample
        else:
            pred = D.unet_forward(model, xt, t, y)
        loss = F.mse_loss(pred, v)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            pipe = _pipeline(kind, copy.deepcopy(ema))
            m = evaluate_pipeline(pipe, n_per_class=20)
            log.append({"step": step + 1, "seconds": round(time.time() - t0, 1), "loss": round(loss_avg, 5), **m})
            print(f"\nstep {step + 1}: loss {loss_avg:.4f} acc {m['accuracy']:.3f} fid {m['fid']:.2f}", flush=True)
    seconds = time.time() - t0
    # save the EMA weights (float16, untied copies like hub DiT checkpoints)
    final = copy.deepcopy(ema)
    if kind == "dit":
        final.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = 0.1
        D.untie_dit_embedders(final)
    pipe = _pipeline(kind, final.to(torch.float16))
    with atomic_dir(out, "--out", replace=True) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    report = {"family": f"digits-{kind}", "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "ema": args.ema, "warmup": args.warmup, "shift_prob": args.shift_prob,
              "label_dropout": args.label_dropout, "parameters": n_params, "train_seconds": round(seconds, 1),
              "final_loss_ema": round(loss_avg, 5), "env": env_info(), "progress": log}
    print(f"digits-{kind}: {args.steps} steps in {seconds / 60:.1f} min, loss {loss_avg:.4f} -> {out}")
    _write_report(out, report)
    return evaluate_saved(kind, out)


def _pipeline(kind, model):
    sched = D.make_scheduler()
    if kind == "dit":
        return D.DigitsDiTPipeline(transformer=model, scheduler=sched)
    return D.DigitsUNetPipeline(unet=model, scheduler=sched)


def _write_report(out: Path, report: dict) -> None:
    atomic_write_json(out / "training_report.json", report)


def evaluate_saved(kind: str, out: Path, quantized: bool = True) -> int:
    """Reload the saved weights with from_pretrained and record their metrics in the report.

    With ``quantized``: also all-4-bit and all-3-bit configs of each method (a multiquantizer built in a
    temporary folder), evaluated with the package's Evaluator (500 images, default settings).
    """
    pipe = D.load_digits_pipeline(kind, out)
    metrics = {}
    for g in sorted({1.0, 2.0, D.DEFAULT_GUIDANCE}):
        m = evaluate_pipeline(pipe, guidance=g)
        metrics[f"guidance_{g:g}"] = m
        print(f"digits-{kind} (saved, guidance {g:g}): accuracy {m['accuracy']:.4f}, FID {m['fid']:.3f}, "
              f"KID {m['kid']:.5f}, 500 images in {m['generate_seconds']:.1f} s")
    path = out / "training_report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["metrics_of_saved_weights"] = metrics
    if quantized:
        report["uniform_configs"] = evaluate_uniform_configs(f"digits-{kind}", out)
    _write_report(out, report)
    return 0


def evaluate_uniform_configs(family: str, out: Path, options=None, n_per_class: int = 50, seed: int = 0) -> dict:
    """Metrics of full precision and of every layer at one option, ``n_per_class`` x 10 images from ``seed``.

    ``family``: a digits family name (digits-dit, digits-unet, digits-sd); ``options``: the option
    names (default: the six UAQ / K-Means options). Also used by ``train_digits_sd.py``.
    """
    import tempfile

    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.options import OPTION_NAMES
    from sensitivity.provenance import run_provenance
    from sensitivity.zoo import get_family

    started = run_provenance()
    options = tuple(options or OPTION_NAMES)
    fam = get_family(family)
    pipe = fam.load_pipeline(str(out))
    den = fam.denoiser(pipe)
    layers = fam.find_layers(den)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        mq = build_multiquantizer(den, Path(tmp) / "mq.safetensors", layers, model_id=fam.model_id(str(out)),
                                  options=options, progress=False)
        build_s = time.time() - t0
        protocol = EvalProtocol.for_family(fam, str(out), n_per_class=n_per_class, seed=seed)
        ev = Evaluator(fam, pipe, mq, protocol)
        for name in ("fp16",) + options:
            config = {} if name == "fp16" else {spec.name: name for spec in layers}
            m = ev.evaluate(config)
            m.pop("timings", None)
            m["avg_bits"] = 16.0 if name == "fp16" else mq.avg_bits(config)
            results[name] = {k: round(float(v), 5) for k, v in m.items()}
            print(f"{family} all {name:11s}: avg bits {m['avg_bits']:.3f}  FID {m['fid']:8.3f}  "
                  f"KID {m['kid']:.5f}  accuracy {m['accuracy']:.3f}  PSNR {m['psnr']:6.2f} dB  "
                  f"({m['seconds']:.1f} s)", flush=True)
    return {"images": len(protocol.seeds), "seeds": f"{seed}..", "multiquantizer_build_seconds": round(build_s, 1),
            "layers": len(layers), "configs": results, "provenance": run_provenance(started)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["classifier", "dit", "unet", "eval"])
    p.add_argument("kind", nargs="?", choices=["dit", "unet"], help="for eval: which family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output path (default: the shipped location in the package)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="diffusion: optimizer steps")
    p.add_argument("--epochs", type=int, default=60, help="classifier: epochs")
    p.add_argument("--noise-std", type=float, default=0.05, help="classifier: pixel noise augmentation (0..1 scale)")
    p.add_argument("--intensity-jitter", type=float, default=0.4, help="classifier: brightness scale range")
    p.add_argument("--width", type=int, default=32, help="classifier: conv width")
    p.add_argument("--feature-dim", type=int, default=64, help="classifier: feature (penultimate) width")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--shift-prob", type=float, default=0.25)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=0, help="diffusion: quick EMA evaluation every N steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "classifier":
        args.batch_size = args.batch_size or 128
        return train_classifier(args)
    if args.command == "eval":
        if not args.kind:
            p.error("eval needs a family: dit or unet")
        out = Path(args.out) if args.out else (D.DIT_DIR if args.kind == "dit" else D.UNET_DIR)
        return evaluate_saved(args.kind, out)
    defaults = {"dit": dict(steps=4000, batch_size=64, lr=1e-3), "unet": dict(steps=2500, batch_size=64, lr=5e-4)}
    for k, v in defaults[args.command].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return train_diffusion(args)


if __name__ == "__main__":
    sys.exit(main())
