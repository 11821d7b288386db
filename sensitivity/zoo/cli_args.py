"""Command-line arguments shared by every subcommand that takes a model (``MODEL --weights ...``).

```python
add_model_arguments(parser)            # MODEL, --weights, --device, --dtype, --seed
add_generation_arguments(parser)       # --steps, --guidance, --height, --width, --scheduler, --batch-size, --set
fam, weights, device, dtype = model_from_args(args)
overrides = generation_overrides(args) # {setting: value} for fam.generate(..., **overrides); checks the numbers
```
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Tuple

from ..checks import check_device, check_values, constraint_for
from ..errors import SensitivityError

WEIGHTS_HELP = ("hub id or local diffusers folder (default: the model's official weights), 'random' (official "
                "architecture, seeded random init), 'meta' (structure only, no memory), 'tiny' (official layer "
                "names, tiny widths), or 'shipped' / 'random' for the digits models")


def add_model_arguments(p: argparse.ArgumentParser, device: bool = True, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=None, help="model family (see `sensitivity models`)")
    else:
        p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    add_pipeline_class_argument(p)
    if device:
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                       help="weights dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init for --weights random/tiny")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation settings (default: the model's reference settings)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--height", type=int, default=None, help="image height in pixels")
    g.add_argument("--width", type=int, default=None, help="image width in pixels")
    g.add_argument("--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler")
    g.add_argument("--batch-size", type=int, default=None, help="images per batch")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="other pipeline setting (value parsed as JSON if possible), e.g. --set denoising_end=0.8")


def add_pipeline_class_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline-class", default=None, metavar="CLASS",
                   help="with MODEL 'diffusers': the diffusers pipeline class (default: from the --weights "
                        "folder's model_index.json)")


def family_name(args: argparse.Namespace) -> str:
    """MODEL, with ``diffusers`` resolved to ``diffusers-<pipelineclass>`` (--pipeline-class or model_index.json)."""
    if args.model is None:
        return args.model
    model = str(args.model)
    cls = getattr(args, "pipeline_class", None)
    if model.lower() != "diffusers":
        if cls:
            raise SensitivityError(f"--pipeline-class is for MODEL 'diffusers', not {model!r}")
        return model
    from .generic import GENERIC_PREFIX, pipeline_class_name, pipeline_class_of_folder

    if cls:
        return GENERIC_PREFIX + pipeline_class_name(cls).lower()
    if not getattr(args, "weights", None):
        raise SensitivityError("MODEL 'diffusers' needs --weights FOLDER (a pipeline folder) or --pipeline-class")
    return GENERIC_PREFIX + pipeline_class_of_folder(args.weights).lower()


def model_from_args(args: argparse.Namespace) -> Tuple[Any, str, str, Any]:
    """``(family, weights, device, dtype)`` from the parsed arguments (device resolved)."""
    import torch

    from . import get_family
    from .base import resolve_dtype

    check_device(getattr(args, "device", None))  # e.g. cuda without CUDA: one line, before any loading
    fam = get_family(family_name(args))
    weights = fam.resolve_weights(args.weights)
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(getattr(args, "dtype", None))
    return fam, weights, device, dtype


def check_generation_arguments(args: argparse.Namespace) -> None:
    """Numbers at the door: steps, guidance, height, width, batch size (``checks.CONSTRAINTS``; unset ones pass)."""
    from .base import NUMERIC_SETTINGS

    check_values(**{key: getattr(args, key, None) for key in NUMERIC_SETTINGS})


def generation_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Settings given on the command line (unset ones are left out)."""
    from .base import NUMERIC_SETTINGS

    check_generation_arguments(args)
    out: Dict[str, Any] = {}
    for key in ("steps", "guidance", "height", "width", "scheduler", "batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise SensitivityError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in out and out[key] != value:
            raise SensitivityError(f"--set {item!r} and --{key.replace('_', '-')} {out[key]} disagree: give one")
        if key in NUMERIC_SETTINGS:
            constraint_for(key).check(f"--set {key}", value)
        out[key] = value
    from ..captions import check_clean_caption

    check_clean_caption(out)  # an explicit clean_caption=true without bs4/ftfy: refused here
    return out
