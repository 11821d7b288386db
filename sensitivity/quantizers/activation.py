"""Online activation fake-quantization (A8 / A6), as in the reference but actually switched on.

The reference (``docs/method.md`` §1.4) quantizes activations online and dynamically, with no
calibration: asymmetric uniform min/max quantization per row, ``Δ = (max - min) / (2^b - 1)``,
``z = round(-min / Δ)``, ``x̂ = (clamp(round(x / Δ) + z, 0, 2^b - 1) - z) · Δ``. Its released
scripts never enable it (``act_quant=False``); here :func:`enable_activation_quant` does.

Rows (what one ``(Δ, z)`` pair covers):

* inputs of quantized ``Linear`` layers, ``[..., C]``: one row per token (all leading dims), over
  the ``C`` input features (**token-wise**); for a split layer each half is quantized on its own
  (the reference gives each half its own activation quantizer);
* inputs of quantized ``Conv1d``/``Conv2d`` layers, ``[B, C, *spatial]``: one row per
  (sample, channel), over the spatial positions;
* attention Q / K / V: the outputs of ``to_q`` / ``to_k`` / ``to_v`` of every attention module
  (anything with ``to_q``, ``to_k``, ``to_v`` and ``heads``), one row per (token, head) over the
  head dimension, i.e. the reference's quantizer on ``head_to_batch_dim`` tensors. It runs
  before ``norm_q``/``norm_k`` and rotary embeddings, as in the reference's Hunyuan processor.
  The softmax output (the reference's fixed 8-bit ``act_quantizer_w``) is not quantized here:
  diffusers computes attention with fused ``scaled_dot_product_attention``, which never
  materialises the probabilities.

Everything is computed in float32 and cast back to the input dtype. Nothing is quantized unless
:func:`enable_activation_quant` was called; :func:`disable_activation_quant` removes every hook.
Works on any device. Pure torch: layers are given as objects with ``module_path``, ``in_slice``
and ``tied`` (:class:`sensitivity.layers.LayerSpec`) or as module paths.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import SensitivityError

ACT_BITS = (8, 6)
_STATE_ATTR = "_sensitivity_act_quant"


def quantize_rows_codes(x: torch.Tensor, bits: int):
    """Asymmetric min/max codes of each row of float32 ``x`` ``[R, K]``: ``(q, delta, zero, flat)``, q float
    codes in ``[0, 2**bits - 1]``, the rest ``[R, 1]`` (a flat row has delta 1). The one rounding rule of the
    activation fake quantizer and the W8A8 run-time kernel."""
    levels = 2 ** int(bits) - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    rng = hi - lo
    flat = rng <= 0
    delta = torch.where(flat, torch.ones_like(rng), rng / levels)
    zero = torch.round(-lo / delta)
    q = torch.clamp(torch.round(x / delta) + zero, 0, levels)
    return q, delta, zero, flat


def fake_quantize_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max fake-quantization of each row of ``rows`` (float ``[R, K]``) to ``bits``.

    A constant row is returned unchanged (it is exactly representable).
    """
    x = rows.float()
    q, delta, zero, flat = quantize_rows_codes(x, bits)
    out = (q - zero) * delta
    return torch.where(flat, x, out).to(rows.dtype)


def quantize_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Token-wise: one row per position of the leading dims, over the last dim. Same shape."""
    if x.numel() == 0:
        return x
    return fake_quantize_rows(x.reshape(-1, x.shape[-1]), bits).reshape(x.shape)


def quantize_channels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per (sample, channel) of a conv input ``[B, C, *spatial]``, over the spatial positions."""
    if x.numel() == 0:
        return x
    b, c = x.shape[:2]
    return fake_quantize_rows(x.reshape(b * c, -1), bits).reshape(x.shape)


def quantize_samples(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per sample of ``[B, ...]``, over everything else (the grid of the run-time int8 conv). Same shape."""
    if x.numel() == 0:
        return x
    return fake_quantize_rows(x.reshape(x.shape[0], -1), bits).reshape(x.shape)


def quantize_heads(x: torch.Tensor, heads: int, bits: int) -> torch.Tensor:
    """Per (token, head) of a projection output ``[..., heads * d]``, over ``d``."""
    if x.numel() == 0:
        return x
    d = x.shape[-1] // heads
    if d * heads != x.shape[-1]:
        return quantize_tokens(x, bits)
    return fake_quantize_rows(x.reshape(-1, d), bits).reshape(x.shape)


def check_act_bits(bits: int) -> int:
    """``bits`` of activation quantization (2..16), or one line saying the allowed range."""
    bits = int(bits)
    if not 2 <= bits <= 16:
        raise SensitivityError(f"activation bits must be between 2 and 16 (8 or 6 as in the reference), got {bits}")
    return bits


def _layer_slices(layers: Iterable) -> Dict[str, List[Optional[Tuple[int, int]]]]:
    """``{module_path: [input slices or None]}`` from LayerSpecs (tied copies included) or paths."""
    out: Dict[str, List[Optional[Tuple[int, int]]]] = defaultdict(list)
    for item in layers:
        if isinstance(item, str):
            out[item].append(None)
            continue
        sl = tuple(item.in_slice) if getattr(item, "in_slice", None) is not None else None
        for path in (item.module_path,) + tuple(getattr(item, "tied", ()) or ()):
            if sl not in out[path]:
                out[path].append(sl)
    return out


def _segments(halves: Sequence[Tuple[int, int]], width: int) -> List[Tuple[int, int]]:
    """The input columns ``[0, width)`` cut at the split halves' bounds: each half is its own segment (its own
    scale per token), and columns of a half not in the quantized layers form segments of their own."""
    cuts = sorted({0, width, *(c for h in halves for c in h if 0 < c < width)})
    return list(zip(cuts[:-1], cuts[1:]))


def _input_hook(module: nn.Module, slices: Sequence[Optional[Tuple[int, int]]], bits: int, per_sample: bool = False):
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    halves = [s for s in slices if s is not None]

    def hook(mod, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        x = args[0]
        if conv:
            # per channel or per sample: halves need no separate treatment
            y = quantize_samples(x, bits) if per_sample else quantize_channels(x, bits)
        elif halves:
            y = torch.cat([quantize_tokens(x[..., a:b], bits) for a, b in _segments(halves, x.shape[-1])], dim=-1)
        else:
            y = quantize_tokens(x, bits)
        return (y,) + tuple(args[1:])

    return hook


def _qkv_hook(heads: int, bits: int):
    def hook(mod, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return quantize_heads(output, heads, bits)
        return None

    return hook


def enable_activation_quant(model: nn.Module, layers: Iterable, bits: int, attention: bool = True,
                            per_sample: Iterable[str] = ()) -> Dict[str, int]:
    """Quantize, online, the inputs of ``layers`` and (``attention``) every attention's Q/K/V to ``bits``.

    ``per_sample``: module paths of conv layers whose input gets one grid per sample instead of one per
    (sample, channel) (:func:`quantize_samples`: the grid of the run-time int8 conv).

    ``layers``: the quantized layers (``LayerSpec`` objects, split halves and tied copies handled,
    or module paths). Replaces any earlier activation quantization of ``model``. Returns counts
    ``{"bits", "layer_inputs", "attention_modules"}``.
    """
    bits = check_act_bits(bits)
    disable_activation_quant(model)
    modules = dict(model.named_modules())
    handles = []
    slices = _layer_slices(layers)
    per_sample = set(per_sample)
    for path, sl in slices.items():
        if path not in modules:
            raise SensitivityError(f"activation quantization: the model has no layer {path!r}")
        handles.append(modules[path].register_forward_pre_hook(_input_hook(modules[path], sl, bits, path in per_sample)))
    n_attn = 0
    if attention:
        for path, mod in modules.items():
            heads = getattr(mod, "heads", None)
            projs = [getattr(mod, n, None) for n in ("to_q", "to_k", "to_v")]
            if isinstance(heads, int) and heads > 0 and all(isinstance(p, nn.Module) for p in projs):
                for proj in projs:
                    handles.append(proj.register_forward_hook(_qkv_hook(heads, bits)))
                n_attn += 1
    info = {"bits": bits, "layer_inputs": len(slices), "attention_modules": n_attn}
    model.__dict__[_STATE_ATTR] = {"handles": handles, **info}
    return dict(info)


def disable_activation_quant(model: nn.Module) -> None:
    """Remove the activation quantization of ``model`` (no-op if none)."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state:
        for h in state["handles"]:
            h.remove()


def activation_bits(model: nn.Module) -> Optional[int]:
    """The activation bits currently enabled on ``model``, or ``None`` (full precision)."""
    state = model.__dict__.get(_STATE_ATTR)
    return state["bits"] if state else None


@contextlib.contextmanager
def activation_quant(model: nn.Module, layers: Iterable, bits: Optional[int],
                     attention: bool = True) -> Iterator[Optional[Dict[str, int]]]:
    """Context manager: activation quantization on inside the block (``bits=None``: off)."""
    if bits is None:
        yield None
        return
    info = enable_activation_quant(model, layers, bits, attention=attention)
    try:
        yield info
    finally:
        disable_activation_quant(model)


# --------------------------------------------------------------------------------------------------
# Static (calibrated) activation quantization
# --------------------------------------------------------------------------------------------------
# The same points as the online scheme above, but with ranges fixed in advance (observed on a
# calibration set by :mod:`sensitivity.calibration.observers`), as an integer kernel needs them:
#
# * ``"<module_path>"`` (``"<module_path>#main"`` / ``"#skip"`` for the halves of a split layer): the
#   input of a quantized Linear / Conv layer (tied copies: one point per copy, under the copy's path);
# * ``"<attention_path>.to_q@out"`` (``to_k``, ``to_v``): the output of an attention projection.
#
# The channel axis of a point (used by per-channel ranges) is the last dim for Linear inputs and
# projection outputs, dim 1 for Conv inputs. A half of a split layer covers ``in_slice`` of that axis.
# Fake quantization with a range ``[lo, hi]`` (float32 scalars or ``[C]``)::
#
#     Δ = (hi - lo) / (2^b - 1),  z = round(-lo / Δ),  x̂ = (clamp(round(x / Δ) + z, 0, 2^b - 1) - z) · Δ
#
# (``Δ = 0``: the point is passed through unchanged).


def static_points(model: nn.Module, layers: Iterable, attention: bool = True) -> Dict[str, Tuple[str, str, Optional[Tuple[int, int]]]]:
    """``{point: (module_path, kind, slice)}`` of the static activation points of ``model``.

    ``kind``: ``"linear"`` / ``"conv"`` (a layer input, ``slice`` = its ``in_slice`` or ``None``) or
    ``"out"`` (an attention projection output). ``layers``: LayerSpecs (names give the ``#`` suffix).
    """
    modules = dict(model.named_modules())
    points: Dict[str, Tuple[str, str, Optional[Tuple[int, int]]]] = {}
    for item in layers:
        if isinstance(item, str):
            paths, suffix, sl = (item,), "", None
        else:
            sl = tuple(item.in_slice) if getattr(item, "in_slice", None) is not None else None
            suffix = item.name[len(item.module_path):] if item.name.startswith(item.module_path) else ""
            paths = (item.module_path,) + tuple(getattr(item, "tied", ()) or ())
        for path in paths:
            mod = modules.get(path)
            if mod is None:
                raise SensitivityError(f"activation quantization: the model has no layer {path!r}")
            kind = "conv" if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "linear"
            points[path + suffix] = (path, kind, sl)
    if attention:
        for path, mod in modules.items():
            heads = getattr(mod, "heads", None)
            projs = [getattr(mod, n, None) for n in ("to_q", "to_k", "to_v")]
            if isinstance(heads, int) and heads > 0 and all(isinstance(p, nn.Module) for p in projs):
                for n in ("to_q", "to_k", "to_v"):
                    sub = f"{path}.{n}" if path else n
                    points[f"{sub}@out"] = (sub, "out", None)
    return points


def point_channel_dim(kind: str, ndim: int) -> int:
    """The channel axis of a point's tensor: dim 1 for conv inputs, the last dim otherwise."""
    return 1 if kind == "conv" and ndim >= 3 else ndim - 1


def fake_quantize_static(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, channel_dim: int) -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` with a fixed range ``[lo, hi]`` (float32 scalars, or ``[C]``
    along ``channel_dim``). Same shape and dtype as ``x``."""
    levels = 2 ** int(bits) - 1
    xf = x.float()
    lo = lo.to(xf.device, torch.float32)
    hi = hi.to(xf.device, torch.float32)
    if lo.numel() > 1:
        shape = [1] * xf.dim()
        shape[channel_dim] = lo.numel()
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    rng = hi - lo
    flat = rng <= 0
    delta = torch.where(flat, torch.ones_like(rng), rng / levels)
    zero = torch.round(-lo / delta)
    q = torch.clamp(torch.round(xf / delta) + zero, 0, levels)
    out = (q - zero) * delta
    return torch.where(flat, xf, out).to(x.dtype)


def _static_quantize_point(x: torch.Tensor, kind: str, sl, lo, hi, bits: int) -> torch.Tensor:
    cd = point_channel_dim(kind, x.dim())
    if sl is None:
        return fake_quantize_static(x, lo, hi, bits, cd)
    idx = [slice(None)] * x.dim()
    idx[cd] = slice(*sl)
    y = x.clone()
    y[tuple(idx)] = fake_quantize_static(x[tuple(idx)], lo, hi, bits, cd)
    return y


def enable_static_activation_quant(model: nn.Module, layers: Iterable, ranges: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                                   bits: int, attention: bool = True) -> Dict[str, int]:
    """Quantize the activation points of ``model`` (see :func:`static_points`) with fixed ``ranges``
    ``{point: (lo, hi)}`` to ``bits``. Every point of the model needs a range. Replaces any earlier
    activation quantization of ``model``; :func:`disable_activation_quant` removes it. Returns counts
    ``{"bits", "layer_inputs", "attention_outputs", "static": 1}``."""
    bits = check_act_bits(bits)
    disable_activation_quant(model)
    points = static_points(model, layers, attention=attention)
    missing = [p for p in points if p not in ranges]
    if missing:
        raise SensitivityError(f"static activation quantization: no range for point {missing[0]!r} "
                               f"({len(missing)} of {len(points)} points missing)")
    modules = dict(model.named_modules())
    by_module: Dict[str, List[Tuple[str, Optional[Tuple[int, int]]]]] = defaultdict(list)
    for point, (path, kind, sl) in points.items():
        by_module[(path, kind)].append((point, sl))
    handles = []
    n_in = n_out = 0
    for (path, kind), items in by_module.items():
        rs = [(sl, ranges[p][0], ranges[p][1]) for p, sl in items]
        if kind == "out":
            def out_hook(mod, args, output, rs=rs):
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    sl, lo, hi = rs[0]
                    return _static_quantize_point(output, "out", None, lo, hi, bits)
                return None
            handles.append(modules[path].register_forward_hook(out_hook))
            n_out += 1
        else:
            def in_hook(mod, args, rs=rs, kind=kind):
                if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                    return None
                x = args[0]
                for sl, lo, hi in rs:
                    x = _static_quantize_point(x, kind, sl, lo, hi, bits)
                return (x,) + tuple(args[1:])
            handles.append(modules[path].register_forward_pre_hook(in_hook))
            n_in += 1
    info = {"bits": bits, "layer_inputs": n_in, "attention_outputs": n_out, "static": 1}
    model.__dict__[_STATE_ATTR] = {"handles": handles, **info}
    return dict(info)
