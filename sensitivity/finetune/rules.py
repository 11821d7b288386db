"""Per-method fine-tuning rules: how a stored option becomes a differentiable fake-quantizer.

:data:`FINETUNE_RULES` maps a quantization method's class to its :class:`Rule` (a
:class:`~sensitivity.registry.HandlerRegistry`: ``uaq_g<N>`` is a :class:`UniformAffinePerGroup`, so its
rule is found by type, never by parsing the name). A rule works on the rows of a layer (``weight.reshape(C, -1)``, float32 ``[C, K]``)
and knows three things:

* :meth:`Rule.init` — the trainable tensors (float32 copies of the stored params) and fixed buffers,
  from the multiquantizer's :class:`~sensitivity.quantizers.tensor.QuantizedWeight`;
* :meth:`Rule.fake` — the fake-quantized rows, differentiable with a straight-through estimator (STE):
  rounding / nearest-entry assignment is the identity for the gradient of the latent weights, and the
  params get their exact gradient through the table (LSQ-style for scales and zero points);
* :meth:`Rule.export` — codes uint8 ``[C, K]`` and params in the stored shape and dtype (fp16 params
  rounded to fp16 *first*, then the codes are derived against the rounded params, so what is reported
  is what is stored).

Rules (``w`` latent row values, trainable unless said otherwise):

==================  ==============================================================  ====================
method              fake-quantized value                                            trained
==================  ==============================================================  ====================
uaq, uaq_ls         ``(clamp(round(w/s + z), 0, 2^b-1) - z) * s`` per row            w, s, z
uaq_g<N>            the same per group of N values of a row                         w, s, z
int8, int8_c        ``clamp(round(w/s), -128, 127) * s`` (per tensor / row)         w, s
fp8_e4m3            ``e4m3(clamp(w/s, ±448)) * s`` (per tensor)                      w, s
kmeans_c, kmeans_a  ``codebook[nearest(w)]`` (``assign="rederive"``) or              codebook (+ w when
                    ``codebook[stored codes]`` (``assign="fixed"``)                  re-derived)
==================  ==============================================================  ====================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch

from ..errors import SensitivityError
from ..options import QuantOption
from ..quantizers import get_method
from ..quantizers.fp8 import FP8E4M3PerTensor
from ..quantizers.int8 import Int8Symmetric
from ..quantizers.kmeans import KMeansPerChannel, KMeansPerTensor
from ..quantizers.uaq import UniformAffine, UniformAffinePerGroup
from ..registry import HandlerRegistry

#: quantization-method class -> the :class:`Rule` class that fine-tunes it
FINETUNE_RULES = HandlerRegistry("fine-tuning rule")

#: ``assign`` modes of codebook options
ASSIGN_MODES = ("rederive", "fixed")
#: smallest scale a uniform / int8 / fp8 rule keeps (a positive fp16 normal number)
MIN_SCALE = 2.0**-14


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


@dataclass
class LayerState:
    """Trainable ``params`` (float32 leaf tensors) and fixed ``buffers`` of one layer's rule."""

    params: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]


class Rule:
    """Base of a method's fine-tuning rule (see the module docstring)."""

    #: whether the latent weights take part (False: only the params are trained)
    trains_weights: bool = True

    def __init__(self, method_name: str, bits: int):
        self.method = get_method(method_name)
        self.bits = int(bits)

    def init(self, codes: torch.Tensor, params: Mapping[str, torch.Tensor], rows: torch.Tensor) -> LayerState:
        return LayerState({k: v.detach().to(torch.float32).clone() for k, v in params.items()}, {})

    def fake(self, rows: torch.Tensor, state: LayerState) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def project(self, state: LayerState) -> None:
        """Keep the params valid after an optimizer step (e.g. scales positive)."""

    def stored_params(self, state: LayerState, shape) -> Dict[str, torch.Tensor]:
        """The params rounded to the stored dtype of :meth:`param_layout`, shaped as stored."""
        layout = self.method.param_layout(self.bits, shape)
        out = {}
        for name, (pshape, dtype) in layout.items():
            v = state.params[name] if name in state.params else state.buffers[name]
            out[name] = v.detach().to(getattr(torch, dtype)).reshape(pshape).clone()
        return out

    def export(self, rows: torch.Tensor, state: LayerState, shape) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - abstract


@FINETUNE_RULES.register(UniformAffine, UniformAffinePerGroup)
class UniformRule(Rule):
    """``uaq`` / ``uaq_ls`` (one scale + zero per row) and ``uaq_g<N>`` (per group of N)."""

    def __init__(self, method_name: str, bits: int):
        super().__init__(method_name, bits)
        self.group = getattr(self.method.config, "group_size", None)
        self.levels = 2**self.bits - 1

    def _expand(self, p: torch.Tensor, k: int) -> torch.Tensor:
        if self.group is None:
            return p.reshape(-1, 1)
        return p.repeat_interleave(self.group, dim=1)[:, :k]

    def fake(self, rows, state):
        k = rows.shape[1]
        s = self._expand(state.params["scale"], k)
        z = self._expand(state.params["zero"], k)
        q = torch.clamp(round_ste(rows / s + z), 0, self.levels)
        return (q - z) * s

    @torch.no_grad()
    def project(self, state):
        state.params["scale"].clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def export(self, rows, state, shape):
        params = self.stored_params(state, shape)
        k = rows.shape[1]
        s = self._expand(params["scale"].to(torch.float32), k).to(rows.device)
        z = self._expand(params["zero"].to(torch.float32), k).to(rows.device)
        codes = torch.clamp(torch.round(rows.to(torch.float32) / s + z), 0, self.levels).to(torch.uint8)
        return codes, params


@FINETUNE_RULES.register(Int8Symmetric)
class Int8Rule(Rule):
    """``int8`` / ``int8_c``: symmetric, learnable float32 scale (per tensor / row); codes ``q + 128``."""

    def fake(self, rows, state):
        s = state.params["scale"].reshape(-1, 1)
        return torch.clamp(round_ste(rows / s), -128, 127) * s

    @torch.no_grad()
    def project(self, state):
        state.params["scale"].clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def export(self, rows, state, shape):
        params = self.stored_params(state, shape)
        s = params["scale"].to(torch.float32).reshape(-1, 1).to(rows.device)
        q = torch.clamp(torch.round(rows.to(torch.float32) / s), -128, 127)
        return (q + 128).to(torch.uint8), params


@FINETUNE_RULES.register(FP8E4M3PerTensor)
class FP8Rule(Rule):
    """``fp8_e4m3``: learnable float32 per-tensor scale; codes are the e4m3 bit patterns of ``w / s``."""

    E4M3_MAX = 448.0

    def fake(self, rows, state):
        s = state.params["scale"].reshape(1, 1)
        x = torch.clamp(rows / s, -self.E4M3_MAX, self.E4M3_MAX)
        y = x + (x.to(torch.float8_e4m3fn).to(torch.float32) - x).detach()
        return y * s

    @torch.no_grad()
    def project(self, state):
        state.params["scale"].clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def export(self, rows, state, shape):
        params = self.stored_params(state, shape)
        s = params["scale"].to(torch.float32).reshape(1, 1).to(rows.device)
        x = torch.clamp(rows.to(torch.float32) / s, -self.E4M3_MAX, self.E4M3_MAX)
        return x.to(torch.float8_e4m3fn).view(torch.uint8), params


def nearest_codes(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """int64 ``[R, K]`` index into (unsorted) ``codebook`` ``[R or 1, k]`` of each value's nearest entry."""
    from ..quantizers.kmeans1d import assign_nearest

    cb_sorted, perm = codebook.detach().sort(dim=1)
    idx = assign_nearest(rows.detach(), cb_sorted, backend="torch").long()
    if perm.shape[0] == 1:
        return perm[0][idx]
    return perm.gather(1, idx)


@FINETUNE_RULES.register(KMeansPerChannel, KMeansPerTensor)
class CodebookRule(Rule):
    """``kmeans_c`` / ``kmeans_a``: learnable fp16 codebook ``[C or 1, 2^b]``.

    ``assign="rederive"``: every step each latent weight takes its nearest entry (latent weights
    trained through the STE); ``assign="fixed"``: the stored codes are kept, only the codebook is
    trained (the latent weights play no part).
    """

    def __init__(self, method_name: str, bits: int, assign: str = "rederive"):
        super().__init__(method_name, bits)
        if assign not in ASSIGN_MODES:
            raise SensitivityError(f"codebook assignment {assign!r}: use one of {', '.join(ASSIGN_MODES)}")
        self.assign = assign
        self.trains_weights = assign == "rederive"

    def init(self, codes, params, rows):
        state = super().init(codes, params, rows)
        if self.assign == "fixed":
            state.buffers["codes"] = codes.detach().to(torch.int64).clone()
        return state

    def _gather(self, cb: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if cb.shape[0] == 1:
            return cb[0][codes]
        return cb.gather(1, codes)

    def fake(self, rows, state):
        cb = state.params["codebook"]
        if self.assign == "fixed":
            return self._gather(cb, state.buffers["codes"])
        codes = nearest_codes(rows, cb)
        return self._gather(cb, codes) + (rows - rows.detach())

    @torch.no_grad()
    def export(self, rows, state, shape):
        params = self.stored_params(state, shape)
        cb16 = params["codebook"]
        if self.assign == "fixed":
            return state.buffers["codes"].to(torch.uint8).cpu(), params
        cb_sorted = cb16.to(torch.float32).sort(dim=1).values.to(torch.float16)  # exact: fp16 values
        from ..quantizers.kmeans1d import assign_nearest

        codes = assign_nearest(rows.to(torch.float32), cb_sorted.to(torch.float64).to(rows.device), backend="torch")
        return codes, {"codebook": cb_sorted}


def rule_for(option: str, assign: str = "rederive") -> Rule:
    """The fine-tuning rule of ``option`` (e.g. ``"uaq-3"``); ``assign`` applies to codebook options."""
    opt = QuantOption.parse(option)
    method = get_method(opt.method)
    cls = FINETUNE_RULES.lookup(method)
    if cls is None:
        raise SensitivityError(f"option {opt.name!r}: no fine-tuning rule for method {opt.method!r} "
                               f"({FINETUNE_RULES.reason(method) or 'none is registered for ' + type(method).__name__})")
    if cls is CodebookRule:
        return cls(opt.method, opt.bits, assign=assign)
    return cls(opt.method, opt.bits)
