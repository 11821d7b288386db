"""Example forward inputs of the zoo's denoiser classes, for tracing the graph (meta tensors by default).

One builder per diffusers denoiser class; each family's :meth:`~sensitivity.zoo.base.ModelFamily.example_inputs`
calls its own. Sizes come from the model's ``config`` (latent ``sample_size``, channels, text widths),
so the traced shapes are the model's native ones.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import SensitivityError

Builder = Callable[..., Dict[str, Any]]


def model_config(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SensitivityError(f"{type(model).__name__} has no diffusers config: pass inputs= to build_graph")
    return dict(cfg)


def _size(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def tensor_makers(model: nn.Module, batch: int, device, dtype) -> Tuple[Callable, Callable, torch.Tensor]:
    """``(f, i64, t)``: zeros in the model's float dtype, int64 zeros, and the timestep tensor [batch]."""
    p = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtype = dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)

    def f(*shape):
        return torch.zeros(*shape, device=device, dtype=dtype)

    def i64(*shape):
        return torch.zeros(*shape, device=device, dtype=torch.long)

    return f, i64, torch.full((batch,), 500.0, device=device, dtype=dtype)


def unet2d_condition_inputs(model: nn.Module, batch: int = 1, device=None, dtype=None,
                            text_len: Optional[int] = None) -> Dict[str, Any]:
    """Forward keyword arguments of a ``UNet2DConditionModel``."""
    name, c, B, L = type(model).__name__, model_config(model), batch, text_len or 77
    f, i64, t = tensor_makers(model, batch, device, dtype)
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


def unet2d_inputs(model: nn.Module, batch: int = 1, device=None, dtype=None,
                  text_len: Optional[int] = None) -> Dict[str, Any]:
    """Forward keyword arguments of a ``UNet2DModel``."""
    c, B = model_config(model), batch
    f, i64, t = tensor_makers(model, batch, device, dtype)
    s = _size(c["sample_size"])
    kw = {"sample": f(B, c["in_channels"], s, s), "timestep": t}
    if c.get("num_class_embeds") is not None or c.get("class_embed_type") is not None:
        kw["class_labels"] = i64(B)
    return kw


def dit_inputs(model: nn.Module, batch: int = 1, device=None, dtype=None,
               text_len: Optional[int] = None) -> Dict[str, Any]:
    """Forward keyword arguments of a ``DiTTransformer2DModel``."""
    c, B = model_config(model), batch
    f, i64, t = tensor_makers(model, batch, device, dtype)
    s = _size(c["sample_size"])
    return {"hidden_states": f(B, c["in_channels"], s, s), "timestep": t.long(), "class_labels": i64(B)}


def pixart_inputs(model: nn.Module, batch: int = 1, device=None, dtype=None,
                  text_len: Optional[int] = None) -> Dict[str, Any]:
    """Forward keyword arguments of a ``PixArtTransformer2DModel``."""
    c, B, L = model_config(model), batch, text_len or 120
    f, i64, t = tensor_makers(model, batch, device, dtype)
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


def hunyuan_inputs(model: nn.Module, batch: int = 1, device=None, dtype=None,
                   text_len: Optional[int] = None) -> Dict[str, Any]:
    """Forward keyword arguments of a ``HunyuanDiT2DModel``."""
    c, B = model_config(model), batch
    f, i64, t = tensor_makers(model, batch, device, dtype)
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
