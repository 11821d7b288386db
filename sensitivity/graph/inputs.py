"""Example forward inputs of diffusers denoisers, for tracing (meta tensors by default).

:func:`example_inputs` knows the denoiser classes of the zoo (``UNet2DConditionModel``,
``UNet2DModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``HunyuanDiT2DModel``) and two
the reference never covered (``SD3Transformer2DModel``, ``FluxTransformer2DModel``). It reads sizes from
the model's ``config`` (latent ``sample_size``, channels, text widths), so the traced shapes are the
model's native ones. Any other module: pass ``inputs=`` to :func:`sensitivity.graph.build_graph`.

Only the *named* conditioning inputs become ``input`` nodes of the graph (:data:`GRAPH_INPUTS`); masks,
position ids and rotary tables are treated as constants.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import SensitivityError

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

# default text lengths per model class (tokens)
_TEXT_LEN = {
    "UNet2DConditionModel": 77,
    "PixArtTransformer2DModel": 120,
    "SD3Transformer2DModel": 333,
    "FluxTransformer2DModel": 512,
}


def _cfg(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SensitivityError(f"{type(model).__name__} has no diffusers config: pass inputs= to build_graph")
    return dict(cfg)


def _size(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def example_inputs(
    model: nn.Module,
    batch: int = 1,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    text_len: Optional[int] = None,
) -> Dict[str, Any]:
    """Keyword arguments for one forward pass of ``model`` (``batch`` samples, native latent size).

    Tensors are created on ``device`` (default: the model's parameter device, e.g. ``meta``) in
    ``dtype`` (default: the model's). Integer inputs (class labels, style) are int64 zeros.
    Raises :class:`SensitivityError` for a denoiser class it does not know.
    """
    p = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtype = dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)
    name = type(model).__name__
    c = _cfg(model)
    B = batch
    L = text_len or _TEXT_LEN.get(name, 77)

    def f(*shape):
        return torch.zeros(*shape, device=device, dtype=dtype)

    def i64(*shape):
        return torch.zeros(*shape, device=device, dtype=torch.long)

    t = torch.full((B,), 500.0, device=device, dtype=dtype)
    if name == "UNet2DConditionModel":
        s = _size(c["sample_size"])
        cad = c["cross_attention_dim"]
        cad = int(cad[0] if isinstance(cad, (list, tuple)) else cad)
        kw: Dict[str, Any] = {"sample": f(B, c["in_channels"], s, s), "timestep": t, "encoder_hidden_states": f(B, L, cad)}
        if c.get("addition_embed_type") == "text_time":
            n_time = 6
            text_dim = int(c["projection_class_embeddings_input_dim"]) - n_time * int(c["addition_time_embed_dim"])
            kw["added_cond_kwargs"] = {"text_embeds": f(B, text_dim), "time_ids": f(B, n_time)}
        elif c.get("addition_embed_type") is not None:
            raise SensitivityError(f"{name}: addition_embed_type {c['addition_embed_type']!r} is not supported; pass inputs=")
        if c.get("num_class_embeds") is not None or c.get("class_embed_type") is not None:
            kw["class_labels"] = i64(B)
        return kw
    if name == "UNet2DModel":
        s = _size(c["sample_size"])
        kw = {"sample": f(B, c["in_channels"], s, s), "timestep": t}
        if c.get("num_class_embeds") is not None or c.get("class_embed_type") is not None:
            kw["class_labels"] = i64(B)
        return kw
    if name == "DiTTransformer2DModel":
        s = _size(c["sample_size"])
        return {"hidden_states": f(B, c["in_channels"], s, s), "timestep": t.long(), "class_labels": i64(B)}
    if name == "PixArtTransformer2DModel":
        s = _size(c["sample_size"])
        kw = {
            "hidden_states": f(B, c["in_channels"], s, s),
            "encoder_hidden_states": f(B, L, int(c["caption_channels"] or c["cross_attention_dim"])),
            "timestep": t,
        }
        if getattr(model, "use_additional_conditions", False):
            kw["added_cond_kwargs"] = {"resolution": f(B, 2), "aspect_ratio": f(B, 1)}
        else:
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kw
    if name == "HunyuanDiT2DModel":
        s = _size(c["sample_size"])
        ps = int(c["patch_size"])
        heads, hd = int(c["num_attention_heads"]), int(c["attention_head_dim"])
        n_tok = (s // ps) ** 2
        kw = {
            "hidden_states": f(B, c["in_channels"], s, s),
            "timestep": t,
            "encoder_hidden_states": f(B, int(c["text_len"]), int(c["cross_attention_dim"])),
            "text_embedding_mask": i64(B, int(c["text_len"])),
            "encoder_hidden_states_t5": f(B, int(c["text_len_t5"]), int(c["cross_attention_dim_t5"])),
            "text_embedding_mask_t5": i64(B, int(c["text_len_t5"])),
            "image_rotary_emb": (f(n_tok, hd), f(n_tok, hd)),
        }
        if c.get("use_style_cond_and_image_meta_size", True):
            kw["image_meta_size"] = f(B, 6)
            kw["style"] = i64(B)
        del heads
        return kw
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
