"""Checks at the door: numeric arguments, devices and loaded weights, each failing with one line.

```python
check_values(steps=50, guidance=7.5)                 # by name, against CONSTRAINTS (the one table)
check_arguments(parser, args, "sample")              # every int/float option of a parsed subcommand
finite("--guidance", args.guidance)                  # NaN / Inf -> SensitivityError (None passes: unset)
check_device("cuda")                                 # 'cuda' without CUDA -> one line, before loading
check_finite_weights(denoiser, layers, "weights folder x/")   # NaN / Inf weights name the layer
```
``CONSTRAINTS`` holds the allowed range of every numeric option, keyed by its name (the argparse
``dest``; ``"<command>.<name>"`` where one command means something else by it). The CLI applies it to
every ``int``/``float`` option after parsing (:func:`check_arguments`, called by ``sensitivity.cli``),
the library functions to their parameters (:func:`check_values`), so both refuse the same values;
a test fails on a numeric option that has no entry.
Torch is imported only by the functions that need it, so commands that take no model stay light.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

from .errors import SensitivityError


@dataclass(frozen=True)
class Constraint:
    """Allowed values of one numeric option: a finite number within the bounds given (``None``: unbounded).

    ``min`` / ``max``: inclusive bounds; ``above`` / ``below``: exclusive ones.
    """

    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None

    def describe(self) -> str:
        lo = f"[{self.min:g}" if self.min is not None else f"({self.above:g}" if self.above is not None else None
        hi = f"{self.max:g}]" if self.max is not None else f"{self.below:g})" if self.below is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return "a finite number"

    def check(self, name: str, value: Any) -> Any:
        """``value`` unless it is not a finite number within the bounds (``None``, meaning unset, passes)."""
        if value is None:
            return None
        finite(name, value)
        v = float(value)
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max) or \
                (self.above is not None and v <= self.above) or (self.below is not None and v >= self.below):
            raise SensitivityError(f"{name} must be {self.describe()}, got {value!r}")
        return value


_ANY = Constraint()
_COUNT = Constraint(min=1)       # how many of something
_SEED = Constraint(min=0)        # numpy seeds are non-negative
_NONNEG = Constraint(min=0)

#: option name -> allowed values (see the module docstring)
CONSTRAINTS: Dict[str, Constraint] = {
    # model, generation, images
    "seed": _SEED, "seed_base": _SEED, "image_seed": _SEED, "data_seed": _SEED, "calib_seed": _SEED,
    "steps": _COUNT, "sample_steps": _COUNT, "guidance": _ANY, "height": _COUNT, "width": _COUNT,
    "batch_size": _COUNT, "class_id": _NONNEG, "n_images": _COUNT, "num_images": Constraint(min=2),  # FID needs two images
    "images_per_class": _COUNT, "check_images_per_class": _COUNT, "images_per_prompt": _COUNT,
    "act_bits": Constraint(min=2, max=16), "kid_subsets": _COUNT,
    # jobs
    "threads": _COUNT, "workers": _COUNT, "limit": _COUNT, "num_configs": _COUNT, "full_configs": _COUNT,
    "full_images_per_class": _COUNT, "full_num_images": Constraint(min=2),
    "initial": _COUNT, "batch": _COUNT, "pool": _COUNT, "window": Constraint(above=0),
    # predictors and search
    "folds": Constraint(min=2), "lam": _NONNEG, "max_module_configs": _COUNT, "max_combinations": _COUNT,
    "target_bits": Constraint(min=1, max=16), "calibration_samples": _COUNT,
    "target_latency": Constraint(above=0), "repeats": _COUNT, "min_seconds": Constraint(above=0),
    # calibration
    "num": _COUNT, "timesteps": _COUNT, "chunk": _COUNT, "percentile": Constraint(above=50, max=100),
    "held_out": Constraint(min=0, below=1), "adaround_iters": _NONNEG,
    # export: torch.onnx's exporter writes opset 18 and later
    "opset": Constraint(min=18),
    # fine-tuning
    "lr": Constraint(above=0), "lr_quant": _NONNEG, "warmup": _NONNEG, "ema_decay": Constraint(min=0, below=1),
    "distill_weight": _NONNEG, "denoise_weight": _NONNEG, "feature_weight": _NONNEG, "checkpoint_every": _COUNT,
    "grad_clip": _NONNEG, "val_batches": _NONNEG,
}


def option_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size`` (how the CLI spells a parameter in messages)."""
    return "--" + name.replace("_", "-")


def constraint_for(name: str, command: Optional[str] = None) -> Optional[Constraint]:
    """The entry of ``name`` (``"<command>.<name>"`` first), or None if the table has none."""
    if command is not None and f"{command}.{name}" in CONSTRAINTS:
        return CONSTRAINTS[f"{command}.{name}"]
    return CONSTRAINTS.get(name)


def check_values(command: Optional[str] = None, **values: Any) -> None:
    """Check each ``name=value`` against the table (``None`` passes); messages name ``--name``.

    Raises KeyError for a name the table lacks (a programming error, not a user's)."""
    for name, value in values.items():
        c = constraint_for(name, command)
        if c is None:
            raise KeyError(f"no constraint for {name!r} in sensitivity.checks.CONSTRAINTS")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            c.check(option_name(name), v)


def numeric_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The ``int`` / ``float`` options of ``parser`` and of its subcommands' parsers."""
    out: List[argparse.Action] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out.extend(numeric_actions(sub))
        elif action.type in (int, float):
            out.append(action)
    return out


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, command: Optional[str] = None) -> None:
    """Every numeric option of ``parser`` (a subcommand's) that ``args`` sets, against the table."""
    for action in numeric_actions(parser):
        value = getattr(args, action.dest, None)
        c = constraint_for(action.dest, command) or _ANY
        name = max(action.option_strings, key=len) if action.option_strings else action.dest
        for v in value if isinstance(value, (list, tuple)) else [value]:
            c.check(name, v)


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
