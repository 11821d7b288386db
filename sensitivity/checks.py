"""Checks at the door: numeric arguments, devices and loaded weights, each failing with one line.

```python
finite("--guidance", args.guidance)                  # NaN / Inf -> SensitivityError
at_least("--steps", args.steps, 1)                   # None passes (unset), 0 fails
in_range("--target-bits", 17, 1.0, 16.0, why="...")  # finite and lo <= value <= hi
check_device("cuda")                                 # 'cuda' without CUDA -> one line, before loading
check_finite_weights(denoiser, layers, "weights folder x/")   # NaN / Inf weights name the layer
```
Torch is imported only by the functions that need it, so commands that take no model stay light.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from .errors import SensitivityError


def finite(name: str, value: Optional[float]) -> Optional[float]:
    """``value`` unless it is NaN or infinite (``None``, meaning unset, passes)."""
    if value is None:
        return None
    try:
        ok = math.isfinite(float(value))
    except (TypeError, ValueError):
        raise SensitivityError(f"{name} must be a number, got {value!r}") from None
    if not ok:
        raise SensitivityError(f"{name} must be a finite number, got {value}")
    return value


def at_least(name: str, value: Optional[float], low: float) -> Optional[float]:
    """``value`` unless it is below ``low`` or not finite (``None`` passes)."""
    if value is None:
        return None
    finite(name, value)
    if value < low:
        raise SensitivityError(f"{name} must be >= {low:g}, got {value}")
    return value


def in_range(name: str, value: Optional[float], low: float, high: float, why: str = "") -> Optional[float]:
    """``value`` unless it is outside ``[low, high]`` or not finite (``None`` passes)."""
    if value is None:
        return None
    finite(name, value)
    if not low <= value <= high:
        raise SensitivityError(f"{name} {value:g} is outside {low:g}..{high:g}" + (f" ({why})" if why else ""))
    return value


def check_device(device: Optional[str], name: str = "--device") -> Optional[str]:
    """``device`` unless torch cannot use it here (unknown name, CUDA/MPS not available, index too high).

    Runs before any model is loaded; ``None`` (the command's default) passes.
    """
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SensitivityError(f"{name} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SensitivityError(f"{name} {device}: CUDA is not available here (torch {torch.__version__}, "
                                   f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SensitivityError(f"{name} {device}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SensitivityError(f"{name} {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise SensitivityError(f"{name} {device}: device type {dev.type!r} is not available here")
    return device


def check_finite_weights(module: Any, layers: Optional[Iterable[Any]] = None, source: str = "the model") -> None:
    """Raise SensitivityError naming the first layer (or parameter) of ``module`` with NaN / Inf weights.

    ``layers``: :class:`~sensitivity.layers.LayerSpec` list (their weights, e.g. ``mq.layers`` or
    ``fam.find_layers(den)``); ``None`` checks every floating-point parameter and buffer.
    ``source`` names where the weights came from (a folder, hub id, 'random'...). Meta tensors are skipped.
    """
    import torch

    def bad(t) -> bool:
        return t is not None and t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())

    with torch.no_grad():
        if layers is not None:
            modules = dict(module.named_modules())
            for spec in layers:
                sub = modules.get(spec.module_path)
                if sub is not None and bad(getattr(sub, "weight", None)):
                    raise SensitivityError(f"{source}: layer {spec.name!r} has NaN or Inf weights")
            return
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if bad(t):
                raise SensitivityError(f"{source}: {name} has NaN or Inf values")
