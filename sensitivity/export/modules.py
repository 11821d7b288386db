"""Low-bit modules: ``nn.Linear`` / ``nn.Conv2d`` (any weight layer) whose weight is bit-packed codes.

:func:`pack_module` turns a weight module into a subclass of its own class (``PackedLinear`` for
``nn.Linear`` ...) that holds, per part of its weight (one part, or the ``#main`` / ``#skip`` halves of
a split layer), either the bit-packed uint8 codes and the method's params (buffers), or a plain float
slice. Its ``weight`` is a property: each forward unpacks the codes and looks them up in the method's
table (:func:`sensitivity.quantizers.get_method`), the same functions :func:`~sensitivity.
multiquantizer.apply` uses, so the values are bit-identical to the fake-quantized weight. Memory held
is the packed bytes; one layer's float weight exists only while that layer runs.
:func:`materialize` dequantizes every packed module once into a plain module of its original class.
The modules are still instances of ``nn.Linear`` / ``nn.Conv2d``, so ``isinstance`` checks hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..options import QuantOption
from ..quantizers import TableMethod, get_method
from ..quantizers.packing import unpack_codes


@dataclass(frozen=True)
class PartSpec:
    """One part of a module's weight: ``shape`` (of the part), ``in_slice`` (input channels, dim 1, or
    ``None`` for the whole weight), ``option`` (``"fp16"``: stored as a float tensor)."""

    name: str
    shape: Tuple[int, ...]
    in_slice: Optional[Tuple[int, int]]
    option: str
    params: Tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def unpack_codes_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`~sensitivity.quantizers.packing.unpack_codes` in torch ops (any device): uint8 1-D."""
    if bits == 8:
        return packed[:n]
    groups = (n + 7) // 8
    p = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel())).view(groups, bits).to(torch.int64)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << shifts).sum(1)  # the bytes' bits do not overlap: sum == or
    out_shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word[:, None] >> out_shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


_SMALL = 1 << 18  # weights per part below which CPU dequantization uses torch ops


def dequantize_part(packed: torch.Tensor, params: Dict[str, torch.Tensor], part: PartSpec) -> torch.Tensor:
    """float32 values of one packed part, shaped ``part.shape`` (bit-identical to the multiquantizer's)."""
    opt = QuantOption.parse(part.option)
    rows = int(part.shape[0])
    method = get_method(opt.method)
    small = packed.device.type != "cpu" or part.numel <= _SMALL
    if small:
        # torch ops: any device; on CPU also for small layers, where numba's parallel launch (~20 ms) dominates
        codes = unpack_codes_torch(packed, opt.bits, part.numel).view(rows, -1)
        if isinstance(method, TableMethod):
            table = method.table(params, opt.bits)
            idx = codes.long()
            values = table[0][idx] if table.shape[0] == 1 else torch.gather(table.expand(rows, -1), 1, idx)
            return values.view(part.shape)
    else:
        codes = torch.from_numpy(unpack_codes(packed.numpy(), opt.bits, part.numel)).view(rows, -1)
    return method.dequantize_rows(codes, params, opt.bits).view(part.shape)


class PackedWeightMixin:
    """Mixed into a copy of a weight module's class; see the module docstring."""

    _packed_parts: List[PartSpec]
    _packed_shape: Tuple[int, ...]
    _packed_dtype: torch.dtype

    def __new__(cls, *args, **kwargs):
        # called with a layer's arguments, e.g. by peft, which builds a LoRA conv as type(base_layer)(...):
        # a plain module of the float class (pack_module and materialize call __new__ without arguments)
        if args or kwargs:
            return cls.__mro__[2](*args, **kwargs)
        return super().__new__(cls)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        values = []
        for i, part in enumerate(self._packed_parts):
            if part.option == "fp16":
                values.append(getattr(self, f"part{i}_weight").to(self._packed_dtype))
            else:
                params = {p: getattr(self, f"part{i}_{p}") for p in part.params}
                values.append(dequantize_part(getattr(self, f"part{i}_codes"), params, part).to(self._packed_dtype))
        if len(values) == 1:
            return values[0]
        return torch.cat(values, dim=1)

    @property
    def packed_nbytes(self) -> int:
        """Bytes held by the packed parts (codes, params, float slices)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n.startswith("part"))

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        parts = ", ".join(p.option for p in self._packed_parts)
        return f"{super().extra_repr()}, packed=[{parts}]"


_CLASSES: Dict[type, type] = {}


def _packed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Packed{cls.__name__}", (PackedWeightMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def pack_module(module: nn.Module, parts: Sequence[PartSpec], tensors: Sequence[Dict[str, torch.Tensor]],
                dtype: torch.dtype) -> nn.Module:
    """A packed copy of ``module`` (same hyper-parameters and bias, no float weight).

    ``tensors[i]``: part ``i``'s ``{"codes": packed uint8 1-D, <param>: tensor}`` or ``{"weight": float}``;
    ``dtype``: the dtype of the weight it computes.
    """
    cls = _packed_class(type(module))
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in module.__dict__.items()
                         if k not in ("_parameters", "_buffers", "_non_persistent_buffers_set")})
    new._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._packed_parts = list(parts)
    new._packed_shape = tuple(module.weight.shape)
    new._packed_dtype = dtype
    for i, (part, t) in enumerate(zip(parts, tensors)):
        for key, value in t.items():
            new.register_buffer(f"part{i}_{key}", value, persistent=False)
    return new


def is_packed(module: nn.Module) -> bool:
    return isinstance(module, PackedWeightMixin)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Dequantize every packed module of ``model`` once, into a plain module of its original class (in place)."""
    for name, sub in list(model.named_modules()):
        if not is_packed(sub):
            continue
        base = type(sub).__mro__[2]  # (Packed<X>, PackedWeightMixin, X, ...)
        plain = base.__new__(base)
        weight = nn.Parameter(sub.weight.detach().clone(), requires_grad=False)
        plain.__dict__.update({k: v for k, v in sub.__dict__.items()
                               if k not in ("_parameters", "_buffers", "_non_persistent_buffers_set")
                               and not k.startswith("_packed")})
        plain._parameters = {"weight": weight, **sub._parameters}
        plain._buffers = {k: v for k, v in sub._buffers.items() if not k.startswith("part")}
        plain._non_persistent_buffers_set = {k for k in sub._non_persistent_buffers_set if not k.startswith("part")}
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model
