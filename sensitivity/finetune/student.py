"""The student: the teacher's own module run with fake-quantized weights (``torch.func.functional_call``).

The teacher (the full-precision denoiser) is never written to: every parameter of it is frozen, and
the student's forward passes substitute tensors for the weights of the quantized layers only. A layer
is one :class:`~sensitivity.layers.LayerSpec` of the multiquantizer: split halves (``in_slice``) are
concatenated back along dim 1 with the teacher's slice for a half left in full precision, and tied
copies (``spec.tied``) receive the same tensor.

Trainable tensors per quantized layer: the latent weight rows float32 ``[C, K]`` (when the layer's
rule trains them) and the rule's params (scales, zero points, codebooks), all float32.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import SensitivityError
from ..layers import LayerSpec, layer_weight
from .rules import LayerState, Rule, rule_for


class FakeQuantStudent:
    """Fake-quantized view of ``teacher`` for ``options`` ``{layer: option}``.

    ``quantized``: ``{layer: QuantizedWeight}`` of the starting point (the multiquantizer's options,
    or a calibrated artifact's); ``assign``: codebook assignment mode (see :mod:`.rules`).
    ``latent_from``: ``"weights"`` starts the latent weights at the teacher's full-precision weights
    (codes re-derived from them are the multiquantizer's nearest-grid codes); ``"start"`` at the
    dequantized ``quantized`` values, so that codes chosen otherwise (GPTQ / AdaRound rounding of a
    calibrated artifact) are what the first step re-derives.
    """

    def __init__(self, teacher: nn.Module, layers: List[LayerSpec], options: Mapping[str, str],
                 quantized: Mapping[str, Any], assign: str = "rederive", device=None, latent_from: str = "weights"):
        self.teacher = teacher
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.specs = {s.name: s for s in layers if s.name in options}
        missing = sorted(set(options) - set(self.specs))
        if missing:
            raise SensitivityError(f"layer {missing[0]!r} of the config is not a quantizable layer of the model")
        self.options = {n: options[n] for n in self.specs}
        self.rules: Dict[str, Rule] = {}
        self.states: Dict[str, LayerState] = {}
        self.latent: Dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            rule = rule_for(self.options[name], assign=assign)
            qw = quantized[name]
            if latent_from == "start":
                w = qw.dequantize().to(self.device, torch.float32)
            elif latent_from == "weights":
                w = layer_weight(teacher, spec).detach().to(self.device, torch.float32)
            else:
                raise SensitivityError(f"latent_from must be 'weights' or 'start', got {latent_from!r}")
            rows = w.reshape(w.shape[0], -1).clone()
            state = rule.init(qw.codes.to(self.device), {k: v.to(self.device) for k, v in qw.params.items()}, rows)
            for t in state.params.values():
                t.requires_grad_(True)
            self.rules[name], self.states[name] = rule, state
            if rule.trains_weights:
                self.latent[name] = rows.requires_grad_(True)
            else:
                self.latent[name] = rows  # fixed (used only for reporting the weight error)
        # modules whose weight is substituted: path -> [(in_slice or None, layer name or None)]
        self._modules: Dict[str, List[Tuple[Optional[Tuple[int, int]], Optional[str]]]] = {}
        for name, spec in self.specs.items():
            for path in (spec.module_path,) + tuple(spec.tied):
                self._modules.setdefault(path, []).append((spec.in_slice, name))
        for path, parts in self._modules.items():
            if any(sl is None for sl, _ in parts) and len(parts) > 1:
                raise SensitivityError(f"module {path!r} is quantized twice in the config")
            if parts[0][0] is not None:  # split halves: fill the unquantized slices with the teacher's
                w = teacher.get_submodule(path).weight
                full: List[Tuple[Optional[Tuple[int, int]], Optional[str]]] = []
                pos = 0
                for sl, n in sorted(parts, key=lambda p: p[0][0]):
                    if sl[0] > pos:
                        full.append(((pos, sl[0]), None))
                    full.append((sl, n))
                    pos = sl[1]
                if pos < w.shape[1]:
                    full.append(((pos, w.shape[1]), None))
                self._modules[path] = full

    # ------------------------------------------------------------------------------------ params
    def trainable(self) -> Dict[str, torch.Tensor]:
        """``{key: tensor}`` of every trained tensor (``<layer>|w`` latent rows, ``<layer>|<param>``)."""
        out: Dict[str, torch.Tensor] = {}
        for name in self.specs:
            if self.rules[name].trains_weights:
                out[f"{name}|w"] = self.latent[name]
            for p, t in self.states[name].params.items():
                out[f"{name}|{p}"] = t
        return out

    def weight_params(self) -> Iterator[torch.Tensor]:
        for name in self.specs:
            if self.rules[name].trains_weights:
                yield self.latent[name]

    def quant_params(self) -> Iterator[torch.Tensor]:
        for name in self.specs:
            yield from self.states[name].params.values()

    @torch.no_grad()
    def project(self) -> None:
        for name in self.specs:
            self.rules[name].project(self.states[name])

    # ------------------------------------------------------------------------------------ forward
    def fake_weights(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """``{module_path.weight: tensor}`` of the fake-quantized weights (differentiable)."""
        layer_vals: Dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            rows = self.rules[name].fake(self.latent[name], self.states[name])
            layer_vals[name] = rows.reshape(spec.shape)
        out: Dict[str, torch.Tensor] = {}
        for path, parts in self._modules.items():
            if len(parts) == 1 and parts[0][0] is None:
                value = layer_vals[parts[0][1]]
            else:
                w = self.teacher.get_submodule(path).weight
                pieces = [layer_vals[n] if n is not None else w[:, sl[0]:sl[1]].detach().to(torch.float32)
                          for sl, n in parts]
                value = torch.cat(pieces, dim=1)
            target = self.teacher.get_submodule(path).weight
            out[f"{path}.weight"] = value.to(dtype or target.dtype)
        return out

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.teacher, self.fake_weights(), args, kwargs, strict=False)

    # ------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self) -> Dict[str, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """``{layer: (codes uint8 [C, K] CPU, params in stored dtype CPU)}`` of the current state."""
        out = {}
        for name, spec in self.specs.items():
            codes, params = self.rules[name].export(self.latent[name].detach(), self.states[name], spec.shape)
            out[name] = (codes.cpu().contiguous(), {k: v.cpu().contiguous() for k, v in params.items()})
        return out
