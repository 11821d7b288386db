"""MODEL names as users give them: a family name, or ``diffusers`` plus a pipeline class or folder."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from ..errors import SensitivityError


def family_name_for(model: Optional[str], pipeline_class: Optional[str] = None, weights: Optional[str] = None
                    ) -> Optional[str]:
    """``model``, with ``diffusers`` resolved to ``diffusers-<pipelineclass>`` (``pipeline_class`` or the
    ``weights`` folder's ``model_index.json``); one-line error when neither says which pipeline."""
    if model is None:
        return model
    model = str(model)
    if model.lower() != "diffusers":
        if pipeline_class:
            raise SensitivityError(f"--pipeline-class is for MODEL 'diffusers', not {model!r}")
        return model
    from .generic import GENERIC_PREFIX, pipeline_class_name, pipeline_class_of_folder

    if pipeline_class:
        return GENERIC_PREFIX + pipeline_class_name(pipeline_class).lower()
    if not weights:
        raise SensitivityError("MODEL 'diffusers' needs --weights FOLDER (a pipeline folder) or --pipeline-class")
    return GENERIC_PREFIX + pipeline_class_of_folder(weights).lower()


class ResolvedModel(NamedTuple):
    """A model as the stages take it: the family object, its weights, the torch device and dtype."""

    family: Any
    weights: Any
    device: str
    dtype: Any


def resolve_model(model: Optional[str], weights: Optional[str] = None, pipeline_class: Optional[str] = None,
                  device: Optional[str] = None, dtype: Any = None) -> ResolvedModel:
    """``model`` (a family name, or ``diffusers`` + ``pipeline_class`` / a ``weights`` folder) resolved: the
    family, its weights (the family's default when None), ``device`` checked (default cuda if available,
    else cpu) and ``dtype`` (``"fp16"``, ``"bf16"``, ``"fp32"``, a torch dtype, or None: the family's default)."""
    import torch

    from ..checks import check_device
    from . import get_family
    from .base import resolve_dtype

    check_device(device)  # e.g. cuda without CUDA: one line, before any loading
    fam = get_family(family_name_for(model, pipeline_class, weights))
    return ResolvedModel(fam, fam.resolve_weights(weights), device or ("cuda" if torch.cuda.is_available() else "cpu"),
                         resolve_dtype(dtype))
