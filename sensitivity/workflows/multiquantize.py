"""A model's multiquantizer as one call: ``multiquantize(model, weights=..., out=...)``.

Loads the family's denoiser (float32), finds its layers, checks the weights are finite, and builds
(or resumes) the multiquantizer file (:func:`sensitivity.multiquantizer.build_multiquantizer`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

from ..errors import SensitivityError
from ..options import OPTION_NAMES


def default_out(model: str, weights: Optional[str]) -> Path:
    """``multiquantizers/<model>-<weights tag>.safetensors``."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", (weights or "hub").strip("/").split("/")[-1])
    return Path("multiquantizers") / f"{model}-{tag}.safetensors"


def multiquantize(model: str, *, weights: Optional[str] = None, pipeline_class: Optional[str] = None,
                  out: Union[str, Path, None] = None, options: Sequence[str] = OPTION_NAMES,
                  device: Optional[str] = None, threads: Optional[int] = None, seed: int = 0, resume: bool = True,
                  progress: bool = True) -> Tuple[Any, Path]:
    """Build the multiquantizer of ``model`` (family name, or ``diffusers`` with ``pipeline_class`` / a
    ``weights`` folder) with ``options``; ``weights`` default: the family's default or hub id; ``out``
    default :func:`default_out`; ``seed``: random init of ``random`` / ``tiny`` weights. Returns ``(mq, out)``."""
    import torch

    from ..checks import check_device, check_finite_weights
    from ..io import check_writable
    from ..multiquantizer import build_multiquantizer
    from ..options import QuantOption
    from ..zoo import get_family
    from ..zoo.resolve import family_name_for

    options = [QuantOption.parse(o).name for o in options]  # bad names fail before the model loads
    if threads is not None and threads < 1:
        raise SensitivityError(f"--threads must be >= 1, got {threads}")
    check_device(device)
    fam = get_family(family_name_for(model, pipeline_class, weights))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = weights if weights is not None else (getattr(fam, "default_weights", None) or fam.hub_id)
    out = Path(out) if out else default_out(fam.name, weights)
    check_writable(out, "--out")
    denoiser = fam.load_denoiser(weights, device=device, dtype=torch.float32, seed=seed)
    layers = fam.find_layers(denoiser)
    check_finite_weights(denoiser, layers, f"--weights {weights}")  # before the build makes its resume folder
    mq = build_multiquantizer(denoiser, out, layers, model_id=fam.model_id(weights), options=options, device=device,
                              threads=threads, resume=resume, progress=progress,
                              extra={"family": fam.name, "weights": str(weights), "seed": seed})
    return mq, out


def describe_build(mq: Any, out: Union[str, Path]) -> str:
    """One line: what was written where, its size against the fp16 weights, and how the build went."""
    size = Path(out).stat().st_size
    return (f"wrote {out}: {len(mq)} layers x {len(mq.options)} options, {size / 2**20:.1f} MiB "
            f"({size / mq.fp16_bytes():.2f}x the fp16 weights), built in {mq.manifest['build_seconds']:.1f} s "
            f"({mq.manifest['resumed_layers']} layers resumed, {mq.manifest['recomputed_options']} options recomputed)")
