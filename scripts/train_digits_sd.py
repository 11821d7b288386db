#!/usr/bin/env python
"""Train the embedded text-to-image latent model ``digits-sd`` from a seed; reproduces the shipped weights.

    python scripts/train_digits_sd.py train          # VAE, then UNet + text encoder -> sensitivity/zoo/weights/digits-sd/
    python scripts/train_digits_sd.py eval           # re-measure the shipped (or --out) weights
    python scripts/train_digits_sd.py prompts        # (re)write the prompt files only

Stage 1 trains the ``AutoencoderKL`` on the 1,797 scikit-learn digits, nearest-upsampled to 32x32
(+-1 pixel random shifts before upsampling), loss: pixel MSE + ``--kl-weight`` x KL. The latent
``scaling_factor`` is set to 1 / std of the data's latent means. Stage 2 encodes every digit under
each of the 9 shifts once (posterior means) and trains the ``UNet2DConditionModel`` and the
``CLIPTextModel`` together from random init (v-prediction, cosine schedule, caption dropout 0.1 to
the empty prompt so classifier-free guidance works, AdamW with warmup + cosine decay, EMA of both
networks, which is what is saved, in float16). Captions are drawn per sample from the train
templates of :mod:`sensitivity.zoo.digits_sd` with the image's style (bold / thin = ink above /
below its class's median). ``training_report.json`` beside the weights records the seed, settings,
wall and CPU time per stage (with this machine's ``sum(range(10**7))`` seconds as calibrator),
losses, and the metrics of the saved weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits import env_info, lr_at  # noqa: E402

from sensitivity.io import atomic_dir, atomic_write_json  # noqa: E402
from sensitivity.zoo import digits_sd as S  # noqa: E402
from sensitivity.zoo.digits_data import NUM_CLASSES, digits_dataset  # noqa: E402

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # index 4 = no shift


def calibrator_seconds() -> float:
    t = time.time()
    sum(range(10 ** 7))
    return round(time.time() - t, 3)


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 ``[N, 8, 8]`` shifted by (dy, dx) pixels, background 0."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def to_pixels(images8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 8, 8]`` -> float ``[N, 1, 32, 32]`` in [-1, 1]."""
    return torch.as_tensor(S.upsample(images8)).float().div(127.5).sub(1.0).unsqueeze(1)


def write_prompts(folder: Path, seed: int) -> dict:
    """The prompt files: train.txt / test.txt (components report: 20 each, 2 per digit), eval.txt (1,000)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": S.prompt_list(S.TRAIN_TEMPLATES, 20, seed),
             "test.txt": S.prompt_list(S.TEST_TEMPLATES, 20, seed + 1),
             "eval.txt": S.prompt_list(S.TRAIN_TEMPLATES, 1000, seed + 2)}
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {name: len(lines) for name, lines in files.items()}


# ----------------------------------------------------------------------------------------- VAE
def train_vae(vae, images, args, gen) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0, c0 = time.time(), time.process_time()
    loss_avg = rec_avg = None
    bar = tqdm(range(args.vae_steps), desc="digits-sd VAE", unit="step", mininterval=5)
    for step in bar:
        b = torch.randint(0, len(images), (args.vae_batch_size,), generator=gen).numpy()
        batch = images[b]
        if args.shift_prob > 0:
            k = torch.randint(0, len(SHIFTS), (len(b),), generator=gen).numpy()
            keep = torch.rand(len(b), generator=gen).numpy() >= args.shift_prob
            k[keep] = 4
            batch = np.stack([shifted(batch[i:i + 1], *SHIFTS[k[i]])[0] for i in range(len(b))])
        x = to_pixels(batch)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + args.kl_weight * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        rec_avg = rec_loss.item() if rec_avg is None else 0.98 * rec_avg + 0.02 * rec_loss.item()
        if (step + 1) % 50 == 0:
            bar.set_postfix(rec=f"{rec_avg:.5f}")
    vae.eval()
    return {"steps": args.vae_steps, "lr": args.vae_lr, "kl_weight": args.kl_weight,
            "wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "final_loss_ema": round(loss_avg, 6), "final_reconstruction_mse_ema": round(rec_avg, 6)}


@torch.no_grad()
def encode_all(vae, images) -> torch.Tensor:
    """Posterior means ``[9, N, 4, 4, 4]`` of every digit under each shift (unscaled)."""
    out = []
    for dy, dx in SHIFTS:
        x = to_pixels(shifted(images, dy, dx))
        out.append(torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, len(x), 256)]))
    return torch.stack(out)


# ------------------------------------------------------------------------------ UNet + text
def caption_table(tokenizer):
    """Token ids ``[10, T, 2, MAX_TOKENS]`` of every (digit, train template, style) and of ``""``."""
    ids = torch.zeros(NUM_CLASSES, len(S.TRAIN_TEMPLATES), 2, S.MAX_TOKENS, dtype=torch.long)
    for d in range(NUM_CLASSES):
        for t, tpl in enumerate(S.TRAIN_TEMPLATES):
            for s, style in enumerate(S.STYLES):
                enc = tokenizer(S.caption(tpl, d, style), padding="max_length", max_length=S.MAX_TOKENS,
                                truncation=True, return_tensors="pt")
                ids[d, t, s] = enc.input_ids[0]
    empty = tokenizer("", padding="max_length", max_length=S.MAX_TOKENS, truncation=True,
                      return_tensors="pt").input_ids[0]
    return ids, empty


def train_denoiser(unet, text_encoder, tokenizer, latents, labels, styles, args, gen, sched) -> dict:
    ids_table, empty = caption_table(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    acp = sched.alphas_cumprod.float()
    unet.train()
    text_encoder.train()
    n = latents.shape[1]
    t0, c0 = time.time(), time.process_time()
    loss_avg = None
    bar = tqdm(range(args.unet_steps), desc="digits-sd UNet + text encoder", unit="step", mininterval=5)
    for step in bar:
        b = torch.randint(0, n, (args.batch_size,), generator=gen)
        k = torch.randint(0, len(SHIFTS), (len(b),), generator=gen)
        k[torch.rand(len(b), generator=gen) >= args.shift_prob] = 4
        x0 = latents[k, b]
        tpl = torch.randint(0, len(S.TRAIN_TEMPLATES), (len(b),), generator=gen)
        ids = ids_table[labels[b], tpl, styles[b]]
        drop = torch.rand(len(b), generator=gen) < args.caption_dropout
        ids[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (len(b),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        cond = text_encoder(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, v)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema_params, params):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    return {"steps": args.unet_steps, "lr": args.unet_lr, "ema": args.ema, "caption_dropout": args.caption_dropout,
            "wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "final_loss_ema": round(loss_avg, 5), "ema_unet": ema_unet, "ema_text": ema_text}


def train(args) -> int:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images, labels = digits_dataset()
    ink = images.reshape(len(images), -1).sum(1)
    styles = np.zeros(len(images), np.int64)  # 0 = bold (STYLES[0]), 1 = thin
    for d in range(NUM_CLASSES):
        m = labels == d
        styles[m] = (ink[m] <= np.median(ink[m])).astype(np.int64)
    comps = S.build_components(args.seed)
    vae, unet, text_encoder, tokenizer = comps["vae"], comps["unet"], comps["text_encoder"], comps["tokenizer"]
    calib_before = calibrator_seconds()
    t0 = time.time()
    vae_report = train_vae(vae, images, args, gen)
    print(f"VAE: {vae_report['steps']} steps in {vae_report['wall_seconds'] / 60:.1f} min, reconstruction MSE "
          f"{vae_report['final_reconstruction_mse_ema']:.5f} ([-1, 1] scale)", flush=True)
    lat = encode_all(vae, images)
    std = float(lat[4].std())
    vae.register_to_config(scaling_factor=1.0 / std)
    lat = lat / std
    sched = comps["scheduler"]
    den_report = train_denoiser(unet, text_encoder, tokenizer, lat, torch.as_tensor(labels),
                                torch.as_tensor(styles), args, gen, sched)
    ema_unet, ema_text = den_report.pop("ema_unet"), den_report.pop("ema_text")
    print(f"UNet + text encoder: {den_report['steps']} steps in {den_report['wall_seconds'] / 60:.1f} min, "
          f"loss {den_report['final_loss_ema']:.4f}", flush=True)
    total = time.time() - t0
    out = Path(args.out) if args.out else S.SD_DIR
    pipe = S.assemble_pipeline({"vae": vae.to(torch.float16), "unet": ema_unet.to(torch.float16),
                                "text_encoder": ema_text.to(torch.float16), "tokenizer": tokenizer,
                                "scheduler": sched})
    with atomic_dir(out, "--out", replace=True) as tmp:  # the folder appears whole
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        prompt_files = write_prompts(tmp / "prompts", args.seed)
        n_params = {name: sum(p.numel() for p in m.parameters())
                    for name, m in (("vae", vae), ("unet", ema_unet), ("text_encoder", ema_text))}
        report = {
            "family": "digits-sd", "seed": args.seed, "batch_size": args.batch_size, "vae_batch_size": args.vae_batch_size, "shift_prob": args.shift_prob,
            "choices": {
                "resolution": "32x32x1: 8x8 digits nearest-upsampled x4 (smallest size an SD-shaped 4-level VAE "
                              "maps to a 4x4 latent grid; 4x4 average pooling inverts it exactly for the classifier)",
                "latents": "4 channels at 1/8 resolution (4x4), scaling_factor = 1/std of the data's latent means",
                "text_encoder": "trained jointly with the UNet from random init (no pretrained text model offline; "
                                "a frozen random encoder would leave synonyms like 'seven'/'7' unrelated)",
                "tokenizer": f"CLIPTokenizer, byte-level BPE over the caption words, {len(tokenizer)} tokens",
            },
            "latent_std_before_scaling": round(std, 5), "parameters": n_params,
            "vae": vae_report, "unet_and_text_encoder": den_report,
            "train_wall_seconds": round(total, 1),
            "train_cpu_seconds": round(vae_report["cpu_seconds"] + den_report["cpu_seconds"], 1),
            "calibrator_seconds": {"before": calib_before, "after": calibrator_seconds(),
                                   "what": "python -c 'sum(range(10**7))' on this machine"},
            "prompt_files": prompt_files, "env": env_info(),
        }
        (tmp / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"digits-sd: trained in {total / 60:.1f} min -> {out}")
    if args.no_eval:
        return 0
    return evaluate(out, args)


# -------------------------------------------------------------------------------- evaluation
def evaluate(out: Path, args) -> int:
    """FP and every-layer-at-one-option configs of the denoiser (the six options and int8), held-out seeds."""
    from train_digits import evaluate_uniform_configs  # scripts/ is on sys.path when a script runs

    from sensitivity.options import OPTION_NAMES

    uniform = evaluate_uniform_configs("digits-sd", out, options=tuple(OPTION_NAMES) + ("int8",),
                                       n_per_class=args.eval_per_class, seed=args.eval_seed)
    path = out / "training_report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["uniform_configs"] = uniform
    atomic_write_json(path, report)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "eval", "prompts"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the shipped location in the package)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--shift-prob", type=float, default=0.25)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--no-eval", action="store_true", help="train: skip the evaluation of the saved weights")
    p.add_argument("--eval-per-class", type=int, default=50, help="eval: images per digit (default 50)")
    p.add_argument("--eval-seed", type=int, default=10_000, help="eval: first image seed (held out; default 10000)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else S.SD_DIR
    if args.command == "train":
        return train(args)
    if args.command == "prompts":
        print(write_prompts(out / "prompts", args.seed))
        return 0
    return evaluate(out, args)


if __name__ == "__main__":
    sys.exit(main())
