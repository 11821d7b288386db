"""MODEL names as users give them: a family name, or ``diffusers`` plus a pipeline class or folder."""

from __future__ import annotations

from typing import Optional

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
