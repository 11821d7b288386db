"""Optional metrics next to FID: CLIP score (text-image agreement) and LPIPS (to the full-precision images).

```python
clip = ClipScore("path/to/clip-vit-large-patch14")     # a local transformers CLIP folder (or a cached hub id)
clip(images, prompts)                                  # mean 100 * max(cos(image, text), 0)  (torchmetrics' definition)
lp = Lpips("alex")                                     # the lpips package (+ torchvision), weights on disk
lp(images, reference)                                  # mean LPIPS over image pairs
```
Both are extras: :func:`check_clip` / :func:`check_lpips` say in one line what is missing (package,
weights) *before* any image is generated, and never download. Images are uint8 ``[N, H, W, C]``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SensitivityError

LPIPS_NETS = ("alex", "vgg", "squeeze")
#: torchvision backbone checkpoints LPIPS loads (torch hub cache names)
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def folder_identity(path: Path) -> str:
    """Content identity of a model folder: hash of config.json and every file's relative path and size."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}|{f.stat().st_size}\n".encode())
        if f.name == "config.json":
            h.update(f.read_bytes())
    return h.hexdigest()


def check_clip(model: str) -> str:
    """Check that the CLIP model ``model`` (local folder or hub id already in the cache) loads offline;
    returns its identity for the evaluation signature. One-line :class:`SensitivityError` otherwise."""
    try:
        from transformers import CLIPConfig
    except Exception as exc:  # noqa: BLE001
        raise SensitivityError(f"CLIP score needs transformers' CLIPModel ({_first_line(exc)})") from None
    p = Path(model).expanduser()
    try:
        CLIPConfig.from_pretrained(str(p) if p.is_dir() else model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SensitivityError(f"--clip-model {model!r}: not a CLIP model available offline "
                               f"(give a local transformers CLIP folder; {_first_line(exc)})") from None
    return f"clip:{folder_identity(p)}" if p.is_dir() else f"clip:{model}"


class ClipScore:
    """CLIP score of images against their prompts: ``mean_i 100 * max(cos(E_img(x_i), E_txt(t_i)), 0)``."""

    def __init__(self, model: str, device="cpu", batch_size: int = 32):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.name = check_clip(model)
        src = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(src, local_files_only=True).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(src, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(src, local_files_only=True)
        self.batch_size = int(batch_size)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> float:
        import torch

        imgs = np.asarray(images)
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, axis=-1)
        if len(imgs) != len(prompts):
            raise ValueError(f"CLIP score: {len(imgs)} images but {len(prompts)} prompts")
        scores = []
        with torch.no_grad():
            for s in range(0, len(imgs), self.batch_size):
                pix = self.processor(images=list(imgs[s:s + self.batch_size]), return_tensors="pt")["pixel_values"]
                tok = self.tokenizer(list(prompts[s:s + self.batch_size]), padding=True, truncation=True,
                                     return_tensors="pt")
                img = self.model.get_image_features(pixel_values=pix.to(self.device))
                txt = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device))
                img = getattr(img, "pooler_output", img)
                txt = getattr(txt, "pooler_output", txt)
                cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
                scores.append((100 * cos.clamp(min=0)).cpu().numpy())
        return float(np.concatenate(scores).mean())


def check_lpips(net: str = "alex") -> str:
    """Check that LPIPS with backbone ``net`` runs offline (the ``lpips`` package, torchvision, the backbone's
    weights in the torch hub cache); returns its identity. One-line :class:`SensitivityError` otherwise."""
    if net not in LPIPS_NETS:
        raise SensitivityError(f"--lpips {net!r}: use one of {', '.join(LPIPS_NETS)}")
    try:
        import lpips  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise SensitivityError(f"LPIPS needs the lpips package and torchvision: pip install 'sensitivity[lpips]' "
                               f"({_first_line(exc)})") from None
    import torch

    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not ckpt.is_file():
        raise SensitivityError(f"LPIPS ({net}): backbone weights {ckpt} not on disk (torchvision downloads them "
                               "on first use; fetch them once with network access)")
    import lpips as _lp

    return f"lpips:{net}:{getattr(_lp, '__version__', '?')}"


class Lpips:
    """Mean LPIPS distance between paired uint8 images (inputs scaled to [-1, 1], as the package expects)."""

    def __init__(self, net: str = "alex", device="cpu", batch_size: int = 16):
        import torch

        self.name = check_lpips(net)
        import lpips

        self.device = torch.device(device)
        self.model = lpips.LPIPS(net=net, verbose=False).to(self.device).eval()
        self.batch_size = int(batch_size)

    def __call__(self, images: np.ndarray, reference: np.ndarray) -> float:
        import torch

        a, b = np.asarray(images), np.asarray(reference)
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {a.shape} and {b.shape}")
        if a.shape[-1] == 1:
            a, b = np.repeat(a, 3, -1), np.repeat(b, 3, -1)
        out = []
        with torch.no_grad():
            for s in range(0, len(a), self.batch_size):
                x = torch.from_numpy(a[s:s + self.batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
                y = torch.from_numpy(b[s:s + self.batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
                out.append(self.model(x.to(self.device), y.to(self.device)).flatten().cpu().numpy())
        return float(np.concatenate(out).mean())
