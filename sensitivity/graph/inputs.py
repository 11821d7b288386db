"""Example forward inputs of diffusers denoisers, for tracing (meta tensors by default).

:func:`example_inputs` asks the denoiser's zoo family (each family builds its own, see
:mod:`sensitivity.zoo.inputs`) and knows two classes the reference never covered and the zoo does not hold
(``SD3Transformer2DModel``, ``FluxTransformer2DModel``). Sizes come from the model's ``config`` (latent
``sample_size``, channels, text widths), so the traced shapes are the model's native ones. Any other module: pass ``inputs=`` to :func:`sensitivity.graph.build_graph`.

Only the *named* conditioning inputs become ``input`` nodes of the graph (:data:`GRAPH_INPUTS`); masks,
position ids and rotary tables are treated as constants.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import SensitivityError
from ..zoo.inputs import _size, model_config, tensor_makers

# forward arguments that become input nodes of the graph (others, e.g. masks and ids, are constants)
GRAPH_INPUTS = (
    "sample",
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "encoder_hidden_states_t5",
    "class_labels",
    "pooled_projections",
    "guidance",
    "text_embeds",
    "time_ids",
    "resolution",
    "aspect_ratio",
    "image_meta_size",
    "style",
)

# default text lengths of the denoisers outside the zoo (tokens)
_TEXT_LEN = {"SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512}


def example_inputs(
    model: nn.Module,
    batch: int = 1,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    text_len: Optional[int] = None,
) -> Dict[str, Any]:
    """Keyword arguments for one forward pass of ``model`` (``batch`` samples, native latent size).

    A zoo denoiser gets its family's :meth:`~sensitivity.zoo.base.ModelFamily.example_inputs` (found by
    its class, :func:`sensitivity.zoo.family_for_denoiser`); SD3 and Flux transformers, outside the zoo,
    are known here. Tensors are created on ``device`` (default: the model's parameter device, e.g.
    ``meta``) in ``dtype`` (default: the model's). Integer inputs (class labels, style) are int64 zeros.
    Raises :class:`SensitivityError` for a denoiser class it does not know.
    """
    from ..zoo import family_for_denoiser

    fam = family_for_denoiser(model)
    name = type(model).__name__
    if fam is not None:
        try:
            return fam.example_inputs(model, batch, device, dtype, text_len)
        except SensitivityError:
            if name not in _TEXT_LEN:
                raise
            # a generic family (sd3, flux, `diffusers`): the class-based inputs below
    c = model_config(model)
    B = batch
    L = text_len or _TEXT_LEN.get(name, 77)
    f, i64, t = tensor_makers(model, batch, device, dtype)
    if name == "SD3Transformer2DModel":
        s = _size(c["sample_size"])
        return {
            "hidden_states": f(B, c["in_channels"], s, s),
            "encoder_hidden_states": f(B, L, int(c["joint_attention_dim"])),
            "pooled_projections": f(B, int(c["pooled_projection_dim"])),
            "timestep": t,
        }
    if name == "FluxTransformer2DModel":
        n_img = int(c.get("_graph_image_tokens", 256))
        kw = {
            "hidden_states": f(B, n_img, int(c["in_channels"])),
            "encoder_hidden_states": f(B, L, int(c["joint_attention_dim"])),
            "pooled_projections": f(B, int(c["pooled_projection_dim"])),
            "timestep": t,
            "img_ids": f(n_img, 3),
            "txt_ids": f(L, 3),
        }
        if c.get("guidance_embeds"):
            kw["guidance"] = t.clone()
        return kw
    raise SensitivityError(
        f"no example inputs for denoiser class {name}: pass inputs= (forward keyword arguments) to build_graph"
    )


def meta_copy(model: nn.Module) -> Tuple[nn.Module, bool]:
    """A copy of ``model``'s architecture on the meta device (no memory), if it is cheap to make.

    Diffusers models are rebuilt from their ``config``; returns ``(copy, True)``. A model already on
    meta, or one without a config, is returned as is with ``False``.
    """
    p = next(model.parameters(), None)
    if p is None or p.is_meta:
        return model, False
    from_config = getattr(type(model), "from_config", None)
    cfg = getattr(model, "config", None)
    if from_config is None or cfg is None:
        return model, False
    with torch.device("meta"):
        copy = from_config(cfg)
    copy.eval()
    return copy, True
