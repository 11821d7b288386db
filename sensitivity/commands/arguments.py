"""Command-line arguments shared by the subcommands: each is declared here once.

```python
add_model_arguments(parser)            # MODEL, --weights, --device, --dtype, --seed
add_multiquantizer_argument(parser)    # --multiquantizer FILE; add_progress_argument: --no-progress
add_generation_arguments(parser)       # --steps, --guidance, --height, --width, --scheduler, --batch-size, --set
add_protocol_arguments(parser)         # `sample` / `evaluate`: MODEL, --weights, --multiquantizer, the protocol
overrides = generation_overrides(args) # {setting: value} for fam.generate(..., **overrides); checks the numbers
kw = protocol_kwargs(args)             # the keywords of sensitivity.evaluation.protocol.protocol_for
```
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

from ..checks import check_values, constraint_for
from ..errors import SensitivityError

DEVICE_HELP = "torch device (default: cuda if available, else cpu)"

WEIGHTS_HELP = ("hub id or local diffusers folder (default: the model's official weights), 'random' (official "
                "architecture, seeded random init), 'meta' (structure only, no memory), 'tiny' (official layer "
                "names, tiny widths), or 'shipped' / 'random' for the digits models")


def add_model_arguments(p: argparse.ArgumentParser, device: bool = True, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=None, help="model family (see `sensitivity models`)")
    else:
        p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    add_weights_argument(p)
    add_pipeline_class_argument(p)
    if device:
        add_device_argument(p)
        add_dtype_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random init for --weights random/tiny")


def add_weights_argument(p, default: Optional[str] = None, help: str = WEIGHTS_HELP) -> None:
    """``--weights`` (hub id, local folder or a special name of the family)."""
    p.add_argument("--weights", default=default, help=help)


MULTIQUANTIZER_HELP = "multiquantizer .safetensors file of MODEL"


def add_multiquantizer_argument(p, required: bool = True, help: str = MULTIQUANTIZER_HELP) -> None:
    """``--multiquantizer FILE`` (the quantized weights of every option)."""
    p.add_argument("--multiquantizer", required=required, default=None, help=help)


def add_progress_argument(p) -> None:
    """``--no-progress`` (no tqdm bars)."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device_argument(p, help: str = DEVICE_HELP) -> None:
    """``--device`` (a torch device; checked by ``checks.check_device`` where it is used)."""
    p.add_argument("--device", default=None, help=help)


def add_dtype_argument(p) -> None:
    """``--dtype fp32|fp16|bf16`` (the weights' dtype)."""
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="weights dtype (default: fp16 on cuda, fp32 on cpu)")


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


def check_generation_arguments(args: argparse.Namespace) -> None:
    """Numbers at the door: steps, guidance, height, width, batch size (``checks.CONSTRAINTS``; unset ones pass)."""
    from ..zoo.base import NUMERIC_SETTINGS

    check_values(**{key: getattr(args, key, None) for key in NUMERIC_SETTINGS})


def generation_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Settings given on the command line (unset ones are left out)."""
    check_generation_arguments(args)
    out: Dict[str, Any] = {}
    for key in ("steps", "guidance", "height", "width", "scheduler", "batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    for key, value in parse_set_items(getattr(args, "set", None)).items():
        if key in out and out[key] != value:
            raise SensitivityError(f"--set {key}={value} and --{key.replace('_', '-')} {out[key]} disagree: give one")
        out[key] = value
    from ..captions import check_clean_caption

    check_clean_caption(out)  # an explicit clean_caption=true without bs4/ftfy: refused here
    return out


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """`sample` / `evaluate`: MODEL, --weights, --device, --dtype, --multiquantizer, conditions, generation settings."""
    from .arguments import add_pipeline_class_argument

    p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    add_weights_argument(p, help="hub id or local diffusers folder (default: the model's official weights; digits "
                         "models: the shipped ones), or 'random'/'tiny'")
    add_pipeline_class_argument(p)
    add_multiquantizer_argument(p)
    add_device_argument(p, help="torch device of each worker (default: cuda if available, else cpu)")
    add_dtype_argument(p)
    c = p.add_argument_group("evaluation protocol (part of the cache's signature)")
    cond = c.add_mutually_exclusive_group()
    cond.add_argument("--prompts", default=None, metavar="FILE",
                      help="text models: COCO captions JSON (captions_val2017.json: the first --num-images "
                           "captions) or a text file with one prompt per line")
    cond.add_argument("--class-ids", default=None, metavar="IDS",
                      help="class models: class ids, e.g. '0-999' or '1,7,9' (default: all classes)")
    c.add_argument("--num-images", type=int, default=None,
                   help="text models: number of prompts used (default 1000, as the reference)")
    c.add_argument("--images-per-class", type=int, default=None,
                   help="class models: images per class id (default: digits 50, others 1)")
    c.add_argument("--image-seed", type=int, default=0, help="image i is drawn from seed IMAGE_SEED + i (default 0)")
    c.add_argument("--reference-dir", default=None, metavar="DIR",
                   help="real images for FID/KID (COCO val2017 / ImageNet val folder); digits models need none")
    c.add_argument("--reference-cache", default=".sensitivity-cache", metavar="DIR",
                   help="where the reference folder's features are cached (computed once)")
    c.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    c.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    c.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the model's)")
    c.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100, as clean-fid)")
    c.add_argument("--inception", default=None, metavar="PATH",
                   help="real models: local FID Inception file in clean-fid's format (inception-2015-12-05.pt; "
                        "default: clean-fid's copy in /tmp if present; never downloaded)")
    c.add_argument("--clip-model", default=None, metavar="PATH",
                   help="text models: add the CLIP score, with this local transformers CLIP folder")
    c.add_argument("--lpips", nargs="?", const="alex", default=None, metavar="NET",
                   help="add LPIPS to the full-precision images (alex|vgg|squeeze; needs sensitivity[lpips])")
    c.add_argument("--paired-features", action="store_true",
                   help="add feature_mse / fd_fp / kid_fp: the feature network's distance to the full-precision "
                        "images of the same seeds (paired: far less seed noise than FID on few images)")
    c.add_argument("--act-bits", type=int, choices=(8, 6), default=None,
                   help="quantize activations to 8 or 6 bits: online token-wise min/max, or static with "
                        "--act-calibration (default: full-precision activations)")
    c.add_argument("--act-calibration", default=None, metavar="FILE",
                   help="with --act-bits: static ranges observed (min/max) per config on this calibration set "
                        "(`sensitivity calibrate-data`)")
    c.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    c.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="other pipeline setting (JSON value if it parses), e.g. --set clean_caption=false")
    p.add_argument("--batch-size", default=None, metavar="N|auto",
                   help="images per generation batch (default: the model's); 'auto': the largest power of two "
                        "(<= 64) that fits the GPU (on CPU: the model's default). Does not change the images")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the denoiser (optionally with this backend, e.g. eager); not part of the "
                        "protocol: it changes the speed, not the images beyond float noise")


def parse_set_items(items: Optional[List[str]]) -> Dict[str, Any]:
    """``--set KEY=VALUE`` items -> {key: value} (the value parsed as JSON if it parses)."""
    from ..zoo.base import NUMERIC_SETTINGS

    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SensitivityError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in NUMERIC_SETTINGS:  # a number of the settings (steps, guidance...): the table's range
            constraint_for(key).check(f"--set {key}", value)
        out[key] = value
    return out


def protocol_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of :func:`sensitivity.evaluation.protocol.protocol_for` from `add_protocol_arguments`."""
    return dict(weights=args.weights, pipeline_class=args.pipeline_class, device=args.device,
                dtype=args.dtype, prompts=args.prompts, class_ids=args.class_ids,
                num_images=args.num_images, images_per_class=args.images_per_class, image_seed=args.image_seed,
                reference_dir=args.reference_dir, reference_cache=args.reference_cache, steps=args.steps,
                guidance=args.guidance, scheduler=args.scheduler, kid_subsets=args.kid_subsets,
                inception=args.inception, clip_model=args.clip_model,
                lpips=args.lpips, act_bits=args.act_bits,
                act_calibration=args.act_calibration, height=args.height,
                width=args.width, settings=parse_set_items(args.set),
                batch_size=args.batch_size, compile=args.compile, paired_features=args.paired_features)


def parse_fixed(items: List[str], fixed_file: Optional[str]) -> Dict[str, str]:
    """``--fixed LAYER=OPTION`` items and ``--fixed-file`` -> {layer or glob: option}."""
    from pathlib import Path

    out: Dict[str, str] = {}
    if fixed_file:
        p = Path(fixed_file)
        if not p.is_file():
            raise SensitivityError(f"--fixed-file {fixed_file!r} does not exist")
        from ..config import QuantConfig

        out.update(QuantConfig.load(p).options)
    for item in items or []:
        if "=" not in item:
            raise SensitivityError(f"--fixed {item!r}: expected LAYER=OPTION (LAYER may be a glob pattern)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
