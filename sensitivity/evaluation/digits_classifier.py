"""A small CNN classifier of 8x8 digits: the feature network for FID on the digits families.

Trained by ``scripts/train_digits.py classifier`` on 80 % of scikit-learn's ``load_digits`` (seeded
split, small-shift and noise augmentation) and shipped as ``weights/digits_classifier.safetensors``
(the file's metadata holds the architecture, the seed and the held-out accuracy). Its penultimate
layer (64 features after GELU) plays the role Inception's pool3 plays for real images; its argmax is
the per-class accuracy metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

CLASSIFIER_PATH = Path(__file__).resolve().parent / "weights" / "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """CNN on ``[N, 1, 8, 8]`` inputs in [0, 1]; ``features`` -> ``[N, feature_dim]``, ``forward`` -> logits ``[N, 10]``."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, feature_dim), nn.GELU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_input(images: Union[np.ndarray, torch.Tensor], device=None) -> torch.Tensor:
    """uint8 images ``[N, 8, 8]`` / ``[N, 8, 8, 1]`` / ``[N, 8, 8, 3]`` (0..255) -> float ``[N, 1, 8, 8]`` in [0, 1].

    RGB input is averaged to gray; larger images (``H``, ``W`` multiples of 8, e.g. digits-sd's
    32x32) are average-pooled to 8x8.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, device=device).float()
    if x.ndim == 4:
        x = x.mean(dim=-1)
    if x.ndim != 3:
        raise ValueError(f"digits images must be [N, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
    x = (x / 255.0).unsqueeze(1)
    if x.shape[-2:] != (8, 8):  # digits-sd's 32x32 images: average-pool back to the classifier's 8x8
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"digits images must be 8x8 or a multiple of it, got {h}x{w}")
        x = torch.nn.functional.avg_pool2d(x, (h // 8, w // 8))
    return x


def save_classifier(model: DigitsClassifier, path: Union[str, Path], metadata: Optional[Dict] = None) -> None:
    """Save weights + config (safetensors; metadata values JSON-encoded), atomically."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    meta = {"config": json.dumps(model.config)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_path(path, "classifier") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)


def load_classifier(path: Union[str, Path, None] = None, device="cpu") -> Tuple[DigitsClassifier, Dict]:
    """Load a saved classifier in eval mode: ``(model, metadata)`` (metadata values decoded from JSON)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..errors import SensitivityError

    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise SensitivityError(f"{path}: digits classifier weights not found (run scripts/train_digits.py classifier)")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    model = DigitsClassifier(**meta.get("config", {}))
    model.load_state_dict(load_file(str(path)))
    return model.eval().to(device), meta

