"""Training inputs of the denoiser for fine-tuning: one :class:`Batch` per step, seeded and resumable.

Sources (each a small class with ``next_batch(generator) -> Batch``; the ``torch.Generator`` is owned
by the trainer, so its state in a checkpoint decides every later batch):

* :class:`DigitsData` — the embedded models' data (scikit-learn digits, as
  ``scripts/train_digits.py``): a clean image ``x0`` and its class, ``t ~ U{0..999}``, noise ``eps``,
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` on the cosine schedule; the denoising target is
  ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (v-prediction);
* :class:`ImageFolderData` — the diffusers ``imagefolder`` layout: images plus ``metadata.jsonl``
  lines ``{"file_name": ..., "text": ...}`` (``caption`` / ``prompt`` accepted too). Images are
  encoded by the pipeline's VAE once; the conditioning of each caption is what the pipeline passes
  to the denoiser (captured from a one-step generation, so every family's text encoders and
  micro-conditions are used as the pipeline uses them); noise is added with the pipeline's scheduler
  and the target follows its ``prediction_type``;
* :class:`TeacherSamplesData` — data-free: prompts alone. The full-precision pipeline samples them
  once, and every denoiser call of its trajectories (``x_t``, ``t``, conditioning) is recorded; a
  batch is a random set of recorded calls (no denoising target: distillation only).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import SensitivityError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: families trained on the digits data (:class:`DigitsData`)
DIGITS_FAMILIES = ("digits-dit", "digits-unet")


@dataclass
class Batch:
    """Named arguments of one denoiser call (``kwargs``) and the denoising target (or ``None``)."""

    kwargs: Dict[str, Any]
    target: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        kw = {k: _to(v, device) for k, v in self.kwargs.items()}
        return Batch(kw, None if self.target is None else self.target.to(device))


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v


def model_output(out) -> torch.Tensor:
    """The prediction tensor of a diffusers denoiser output (``.sample`` or the tuple's first item)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


class DigitsData:
    """Noised digits for ``digits-dit`` / ``digits-unet`` (see the module docstring)."""

    kind = "digits"

    def __init__(self, family_name: str, batch_size: int):
        from ..zoo import digits as D

        if family_name not in DIGITS_FAMILIES:
            raise SensitivityError(f"model {family_name!r} is not a digits model ({', '.join(DIGITS_FAMILIES)})")
        self.family_name = family_name
        self.batch_size = int(batch_size)
        images, labels = D.digits_dataset()
        self.x = D.images_to_tensor(images)
        self.y = torch.as_tensor(labels)
        self.acp = D.make_scheduler().alphas_cumprod.float()
        self.num_train_timesteps = len(self.acp)

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "images": len(self.x), "batch_size": self.batch_size,
                "timesteps": f"uniform 0..{self.num_train_timesteps - 1}", "prediction": "v"}

    def next_batch(self, gen: torch.Generator) -> Batch:
        b = torch.randint(0, len(self.x), (self.batch_size,), generator=gen)
        x0, y = self.x[b], self.y[b]
        t = torch.randint(0, self.num_train_timesteps, (self.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = self.acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        if self.family_name == "digits-unet":
            un = torch.nn.functional.pixel_unshuffle
            return Batch({"sample": un(xt, 2), "timestep": t, "class_labels": y}, un(v, 2))
        return Batch({"hidden_states": xt, "timestep": t, "class_labels": y}, v)


# ---------------------------------------------------------------------------------- captured calls
def _bind(denoiser: torch.nn.Module, args, kwargs) -> Dict[str, Any]:
    sig = inspect.signature(denoiser.forward)
    bound = sig.bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


def capture_calls(family, pipe, conditions: Sequence, seeds: Sequence[int], **overrides) -> List[Dict[str, Any]]:
    """Every denoiser call of ``family.generate(pipe, conditions, seeds, **overrides)``, as named
    arguments (CPU tensors), split into one record per image of the call's batch."""
    den = family.denoiser(pipe)
    calls: List[Dict[str, Any]] = []

    def hook(module, args, kwargs):
        calls.append(_detach(_bind(module, args, kwargs)))

    handle = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        family.generate(pipe, list(conditions), list(seeds), **overrides)
    finally:
        handle.remove()
    records: List[Dict[str, Any]] = []
    for call in calls:
        name = sample_name(den)
        n = call[name].shape[0]
        for i in range(n):
            records.append(_split(call, i, n))
    return records


def sample_name(denoiser: torch.nn.Module) -> str:
    """Name of the denoiser's noisy-input argument (``sample`` or ``hidden_states``)."""
    return next(iter(inspect.signature(denoiser.forward).parameters))


def _split(v, i: int, n: int):
    if isinstance(v, torch.Tensor):
        if v.dim() >= 1 and v.shape[0] == n:
            return v[i:i + 1]
        return v
    if isinstance(v, dict):
        return {k: _split(x, i, n) for k, x in v.items()}
    return v


def _stack(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    first = records[0]
    out: Dict[str, Any] = {}
    for k, v in first.items():
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != 1:  # a scalar timestep (shared by the batch) -> one per record
                vals = [r[k].reshape(-1)[:1] if r[k].dim() else r[k].reshape(1) for r in records]
                out[k] = torch.cat(vals)
            else:
                out[k] = torch.cat([r[k] for r in records])
        elif isinstance(v, dict):
            out[k] = _stack([r[k] for r in records])
        else:
            out[k] = v
    return out


class TeacherSamplesData:
    """Data-free distillation: recorded denoiser calls of the teacher's own sampling of ``prompts``."""

    kind = "prompts"

    def __init__(self, records: List[Dict[str, Any]], batch_size: int, prompts: int):
        if not records:
            raise SensitivityError("data-free fine-tuning: the teacher's sampling recorded no denoiser call")
        self.records = records
        self.batch_size = int(batch_size)
        self.prompts = prompts

    @classmethod
    def from_prompts(cls, family, pipe, prompts: Sequence[str], batch_size: int, seed: int = 0,
                     **overrides) -> "TeacherSamplesData":
        if not prompts:
            raise SensitivityError("data-free fine-tuning needs at least one prompt")
        seeds = [seed + i for i in range(len(prompts))]
        with torch.no_grad():
            records = capture_calls(family, pipe, prompts, seeds, **overrides)
        return cls(records, batch_size, len(prompts))

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "prompts": self.prompts, "recorded_calls": len(self.records),
                "batch_size": self.batch_size, "prediction": "none (distillation only)"}

    def next_batch(self, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.records), (self.batch_size,), generator=gen).tolist()
        return Batch(_stack([self.records[i] for i in idx]), None)


def read_imagefolder(folder: str | Path) -> List[Dict[str, str]]:
    """``[{"file": path, "text": caption}]`` of a diffusers imagefolder with ``metadata.jsonl``."""
    root = Path(folder)
    if not root.is_dir():
        raise SensitivityError(f"--data {str(root)!r} is not a folder")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise SensitivityError(f"--data {str(root)!r} has no metadata.jsonl (imagefolder layout: "
                               '{"file_name": ..., "text": ...} per line)')
    items = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            raise SensitivityError(f"{meta}: line {n} is not JSON") from None
        name = d.get("file_name")
        text = next((d[k] for k in ("text", "caption", "prompt") if isinstance(d.get(k), str)), None)
        if not isinstance(name, str) or text is None:
            raise SensitivityError(f"{meta}: line {n} needs \"file_name\" and \"text\" (or caption / prompt)")
        path = root / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SensitivityError(f"{meta}: line {n}: {name!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        if not path.is_file():
            raise SensitivityError(f"{meta}: line {n}: image {name!r} does not exist")
        items.append({"file": str(path), "text": text})
    if not items:
        raise SensitivityError(f"--data {str(root)!r} holds no images (metadata.jsonl lists none)")
    return items


def _load_image(path: str, height: int, width: int) -> torch.Tensor:
    """RGB image resized (shorter side) and center-cropped to ``[3, height, width]`` in [-1, 1]."""
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise SensitivityError(f"image {path!r} cannot be read ({exc})") from None
    scale = max(height / im.height, width / im.width)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    im = im.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


class ImageFolderData:
    """Captioned images (imagefolder layout), VAE-encoded once, noised with the pipeline's scheduler."""

    kind = "imagefolder"

    def __init__(self, latents: torch.Tensor, conds: List[Dict[str, Any]], sample_key: str, scheduler,
                 batch_size: int, folder: str):
        self.latents = latents
        self.conds = conds
        self.sample_key = sample_key
        self.scheduler = scheduler
        self.batch_size = int(batch_size)
        self.folder = folder
        self.acp = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise SensitivityError(f"scheduler prediction_type {self.prediction_type!r} is not supported")

    @classmethod
    def from_folder(cls, family, pipe, folder: str | Path, batch_size: int, seed: int = 0,
                    **overrides) -> "ImageFolderData":
        items = read_imagefolder(folder)
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise SensitivityError(f"model {family.name!r} has no VAE: --data imagefolder is for latent models")
        settings = family.settings(pipe, **overrides)
        h, w = int(settings.height), int(settings.width)
        den = family.denoiser(pipe)
        key = sample_name(den)
        gen = torch.Generator().manual_seed(seed)
        latents = []
        with torch.no_grad():
            for it in items:
                x = _load_image(it["file"], h, w)[None].to(vae.device, vae.dtype)
                dist = vae.encode(x).latent_dist
                z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                latents.append(((z - shift) * vae.config.scaling_factor).float().cpu())
            conds = []
            for i, it in enumerate(items):  # the conditioning the pipeline passes for this caption
                rec = capture_calls(family, pipe, [it["text"]], [seed + i],
                                    **{**overrides, "steps": 1, "guidance": 1.0})[0]
                conds.append(rec)
        return cls(torch.cat(latents), conds, key, pipe.scheduler, batch_size, str(folder))

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "folder": self.folder, "images": len(self.latents), "batch_size": self.batch_size,
                "timesteps": f"uniform 0..{len(self.acp) - 1}", "prediction": self.prediction_type}

    def next_batch(self, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.latents), (self.batch_size,), generator=gen)
        x0 = self.latents[idx]
        t = torch.randint(0, len(self.acp), (self.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = self.acp[t].view(-1, *([1] * (x0.dim() - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if self.prediction_type == "epsilon":
            target = eps
        elif self.prediction_type == "v_prediction":
            target = a.sqrt() * eps - (1 - a).sqrt() * x0
        else:
            target = x0
        kw = _stack([self.conds[i] for i in idx.tolist()])
        kw[self.sample_key] = xt
        kw["timestep"] = t
        return Batch(kw, target)
