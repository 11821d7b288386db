"""Low-bit modules: ``nn.Linear`` / ``nn.Conv2d`` (any weight layer) whose weight is bit-packed codes.

:func:`pack_module` turns a weight module into a subclass of its own class (``PackedLinear`` for
``nn.Linear`` ...) that holds, per part of its weight (one part, or the ``#main`` / ``#skip`` halves of
a split layer), either the bit-packed uint8 codes and the method's params (buffers), or a plain float
slice. Its ``weight`` is a property that looks the codes up in the method's table
(:func:`sensitivity.quantizers.get_method`; the same values :func:`~sensitivity.multiquantizer.apply`
computes, bit for bit). Its forward (``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``) runs the module's
run-time kernel (:mod:`sensitivity.export.runtime`): ``on_the_fly`` (fused unpack + lookup into a
reused scratch buffer, :mod:`.kernels`; memory held: the packed bytes), ``cached`` (dequantized once,
buffer ``runtime_weight``) or ``int8_dynamic`` (W8A8: linear layers on ``torch._int_mm``, buffers ``int8_*``;
conv2d layers on oneDNN's int8 conv, :class:`~.runtime.Int8Conv`).
:func:`materialize` dequantizes every packed module once into a plain module of its original class.
The modules are still instances of ``nn.Linear`` / ``nn.Conv2d``, so ``isinstance`` checks hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..options import QuantOption
from ..quantizers import TableMethod, get_method
from ..quantizers.packing import unpack_codes
from .kernels import PAD


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


def part_table(packed: torch.Tensor, params: Dict[str, torch.Tensor], part: PartSpec):
    """``(table float32 [T, 2**bits], group)`` of a part whose values are a table lookup, else ``None``.

    ``T`` is 1 (per tensor), the rows (per row) or rows x groups (``uaq_g<N>``: ``group = N``).
    """
    opt = QuantOption.parse(part.option)
    method = get_method(opt.method)
    k = part.numel // int(part.shape[0])
    if isinstance(method, TableMethod):
        return method.table(params, opt.bits).to(torch.float32).contiguous(), k
    group_table = getattr(method, "group_table", None)
    if group_table is not None:
        return group_table(params, opt.bits).to(torch.float32).contiguous(), int(method.config.group_size)
    return None


class PackedWeightMixin:
    """Mixed into a copy of a weight module's class; see the module docstring.

    Per part ``i``: ``part{i}_codes`` (bit-packed, :data:`~.kernels.PAD` zero bytes appended on CPU),
    ``part{i}_<param>``, or ``part{i}_weight`` (float slice); ``_runtime`` is the module's kernel
    (:data:`sensitivity.export.runtime.KERNELS`).
    """

    _packed_parts: List[PartSpec]
    _packed_shape: Tuple[int, ...]
    _packed_dtype: torch.dtype
    _runtime: str = "on_the_fly"
    _act_bits: Optional[int] = None
    _act_slices: Tuple[Tuple[int, int], ...] = ()

    def _dequantize(self, use_scratch: bool = False, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float weight (``_packed_dtype``); ``use_scratch``: into the shared scratch buffer (CPU, float32);
        ``buffer``: into this float32 CPU tensor of at least the weight's size instead."""
        from . import runtime

        shape = self._packed_shape
        rows = int(shape[0])
        cols = math.prod(int(s) for s in shape[1:])
        on_cpu = self._packed_device().type == "cpu"
        if buffer is not None and on_cpu and self._packed_dtype == torch.float32:
            out = buffer[:rows * cols].view(rows, cols)
        elif use_scratch and on_cpu and self._packed_dtype == torch.float32:
            out = runtime.scratch(rows * cols).view(rows, cols)
        else:
            out = torch.empty(rows, cols, dtype=torch.float32, device=self._packed_device())
        self._dequantize_rows(0, rows, out, self._part_tables())
        w = out.view(shape)
        return w if self._packed_dtype == torch.float32 else w.to(self._packed_dtype)

    def _part_tables(self) -> List[Optional[Tuple[torch.Tensor, int]]]:
        """Per part: ``(table, group)`` of a CPU lookup part with padded codes, else ``None``."""
        out: List[Optional[Tuple[torch.Tensor, int]]] = []
        for i, part in enumerate(self._packed_parts):
            if part.option == "fp16" or not getattr(self, f"_part{i}_padded", False):
                out.append(None)
                continue
            table = getattr(self, f"part{i}_table", None)
            if table is not None:
                out.append((table, self.__dict__[f"_part{i}_group"]))
            else:
                out.append(part_table(getattr(self, f"part{i}_codes"),
                                      {p: getattr(self, f"part{i}_{p}") for p in part.params}, part))
        return out

    def tile_rows_allowed(self, rows_per_block: int) -> bool:
        """Whether :meth:`_dequantize_rows` can cut the weight every ``rows_per_block`` output rows (CPU,
        float32, one group, every part a table lookup or a float slice, block starts on a byte)."""
        if self._packed_dtype != torch.float32 or getattr(self, "groups", 1) != 1:
            return False
        if rows_per_block <= 0 or rows_per_block >= int(self._packed_shape[0]):
            return False
        for i, (part, found) in enumerate(zip(self._packed_parts, self._part_tables())):
            if part.option == "fp16":
                continue
            if found is None:
                return False
            width = part.numel // int(part.shape[0])
            if (rows_per_block * width * QuantOption.parse(part.option).bits) % 8:
                return False
        return True

    def _dequantize_rows(self, r0: int, r1: int, out: torch.Tensor,
                         tables: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> None:
        """Output rows ``[r0, r1)`` of the float32 weight into ``out`` ``[r1 - r0, in_features x kernel]``
        (``tables``: :meth:`_part_tables`; a part without one, e.g. off the CPU, only for all the rows)."""
        from .kernels import dequantize_into

        rows = int(self._packed_shape[0])
        n = r1 - r0
        col = 0
        for i, (part, found) in enumerate(zip(self._packed_parts, tables)):
            width = part.numel // rows
            view = out[:, col:col + width]
            col += width
            if part.option == "fp16":
                view.copy_(getattr(self, f"part{i}_weight").reshape(rows, width)[r0:r1])
                continue
            if found is None:  # no lookup table (or not on the CPU): the method's own dequantizer, whole weight
                packed = getattr(self, f"part{i}_codes")
                raw = packed[:packed.numel() - PAD] if getattr(self, f"_part{i}_padded", False) else packed
                params = {p: getattr(self, f"part{i}_{p}") for p in part.params}
                view.copy_(dequantize_part(raw, params, part).reshape(rows, width))
                continue
            table, group = found
            bits = QuantOption.parse(part.option).bits
            if table.shape[0] == rows:
                table = table[r0:r1]
            elif table.shape[0] > 1:
                per_row = table.shape[0] // rows
                table = table[r0 * per_row:r1 * per_row]
            start = r0 * width * bits // 8
            dequantize_into(getattr(self, f"part{i}_codes")[start:], bits, table, n, width, group, view)

    def _tiled_forward(self, input: torch.Tensor, rows_per_block: int) -> torch.Tensor:  # noqa: A002
        """The layer's output computed ``rows_per_block`` output channels at a time, each block's weight
        dequantized into the scratch buffer just before its matmul / conv (see :mod:`.runtime`)."""
        from . import runtime

        shape = self._packed_shape
        rows = int(shape[0])
        cols = sum(p.numel for p in self._packed_parts) // rows
        tables = self._part_tables()
        buf = runtime.scratch(rows_per_block * cols)
        linear = isinstance(self, nn.Linear)
        out = None
        for r0 in range(0, rows, rows_per_block):
            r1 = min(r0 + rows_per_block, rows)
            w = buf[:(r1 - r0) * cols].view(r1 - r0, cols)
            self._dequantize_rows(r0, r1, w, tables)
            w = w.view((r1 - r0,) + tuple(shape[1:]))
            bias = self.bias[r0:r1] if self.bias is not None else None
            y = F.linear(input, w, bias) if linear else self._conv_forward(input, w, bias)
            dim = y.dim() - 1 if linear else 1
            if out is None:
                out = y.new_empty(y.shape[:dim] + (rows,) + y.shape[dim + 1:])
            out.narrow(dim, r0, r1 - r0).copy_(y)
        return out

    def _packed_device(self) -> torch.device:
        for n, b in self.named_buffers(recurse=False):
            if n.startswith("part"):
                return b.device
        return torch.device("cpu")

    def __new__(cls, *args, **kwargs):
        # called with a layer's arguments, e.g. by peft, which builds a LoRA conv as type(base_layer)(...):
        # a plain module of the float class (pack_module and materialize call __new__ without arguments)
        if args or kwargs:
            return cls.__mro__[2](*args, **kwargs)
        return super().__new__(cls)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        cached = self._buffers.get("runtime_weight")
        if cached is not None:
            return cached
        return self._dequantize()

    def forward(self, input, *args, **kwargs):  # noqa: A002 - torch's name
        if type(self).__mro__[2] not in _PLAIN_FORWARD:
            return super().forward(input, *args, **kwargs)
        if self._runtime == "int8_dynamic" and input.device.type == "cpu":
            conv = self.__dict__.get("_int8_conv")
            if conv is not None:
                return conv(input, self.bias, self._dequantize)
            if isinstance(self, nn.Linear):
                from .runtime import int8_linear

                return int8_linear(input, self._int8_tensors(), self.bias)
        if self._act_bits is not None:
            input = self._quantize_input(input)
        w = self._buffers.get("runtime_weight")
        if w is None and input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled():
            from .runtime import tile_rows

            rows_per_block = tile_rows(self, input)
            if rows_per_block:
                return self._tiled_forward(input, rows_per_block)
        if w is None:
            w = self._dequantize(use_scratch=not torch.is_grad_enabled())
        return self._float_forward(input, w)

    def _float_forward(self, input: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if isinstance(self, nn.Linear):
            return F.linear(input, w, self.bias)
        return self._conv_forward(input, w, self.bias)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantizers.activation import quantize_channels, quantize_tokens

        bits = int(self._act_bits)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() and not self._act_slices
                and not (torch.is_grad_enabled() and x.requires_grad)):
            # one fused pass (same values as the torch ops below)
            from .kernels import fake_quantize_rows_fused

            rows = x.reshape(x.shape[0] * x.shape[1], -1) if not isinstance(self, nn.Linear) else x.reshape(-1, x.shape[-1])
            return fake_quantize_rows_fused(rows.contiguous(), bits).reshape(x.shape)
        if not isinstance(self, nn.Linear):
            return quantize_channels(x, bits)
        if self._act_slices:
            return torch.cat([quantize_tokens(x[..., a:b], bits) for a, b in self._act_slices], dim=-1)
        return quantize_tokens(x, bits)

    def _int8_tensors(self) -> Dict[str, torch.Tensor]:
        from .runtime import INT8_TENSORS

        return {k: getattr(self, f"int8_{k}") for k in INT8_TENSORS}

    @property
    def packed_nbytes(self) -> int:
        """Bytes held by the packed parts (codes, params, float slices, int8 codes, a cached weight)."""
        conv = self.__dict__.get("_int8_conv")
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False)
                   if n.startswith(("part", "int8_", "runtime_"))) + (conv.nbytes if conv is not None else 0)

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        parts = ", ".join(p.option for p in self._packed_parts)
        return f"{super().extra_repr()}, packed=[{parts}], runtime={self._runtime}"


_PLAIN_FORWARD = (nn.Linear, nn.Conv1d, nn.Conv2d)  # classes whose forward the mixin replaces
_RUNTIME_ATTRS = ("_packed", "_part", "_runtime", "_act_", "_int8")
_RUNTIME_BUFFERS = ("part", "int8_", "runtime_")
_CLASSES: Dict[type, type] = {}


def _packed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Packed{cls.__name__}", (PackedWeightMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def pack_module(module: nn.Module, parts: Sequence[PartSpec], tensors: Sequence[Dict[str, torch.Tensor]],
                dtype: torch.dtype, runtime: str = "on_the_fly", act_bits: Optional[int] = None) -> nn.Module:
    """A packed copy of ``module`` (same hyper-parameters and bias, no float weight).

    ``tensors[i]``: part ``i``'s ``{"codes": packed uint8 1-D, <param>: tensor}`` or ``{"weight": float}``;
    ``dtype``: the dtype of the weight it computes; ``runtime``: its kernel (``on_the_fly``, ``cached``,
    ``int8_dynamic``); ``act_bits``: quantize the input (W8A8, see :mod:`.runtime`).
    """
    from .kernels import pad_packed
    from .runtime import KERNELS, Int8Weight, int8_eligible

    if runtime not in KERNELS:
        raise ValueError(f"unknown run-time kernel {runtime!r}; use one of {', '.join(KERNELS)}")
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
    new._act_bits = act_bits
    new._act_slices = tuple(tuple(p.in_slice) for p in parts if p.in_slice) if len(parts) > 1 else ()
    kind = "linear" if isinstance(module, nn.Linear) else "conv2d" if isinstance(module, nn.Conv2d) else "conv1d"
    if runtime == "int8_dynamic" and (act_bits != 8 or not int8_eligible(kind, parts)):
        runtime = "on_the_fly"
    for i, (part, t) in enumerate(zip(parts, tensors)):
        for key, value in t.items():
            if key == "codes" and value.device.type == "cpu":
                value = pad_packed(value)
                new.__dict__[f"_part{i}_padded"] = True
            new.register_buffer(f"part{i}_{key}", value, persistent=False)
        if part.option != "fp16":
            found = part_table(t["codes"], {p: t[p] for p in part.params}, part)
            if found is not None:
                table, group = found
                # keep the table when it is small beside the codes (per row / tensor); per-group tables are rebuilt
                if table.numel() * 4 <= t["codes"].numel() // 4:
                    new.register_buffer(f"part{i}_table", table, persistent=False)
                    new.__dict__[f"_part{i}_group"] = group
    new._runtime = runtime
    if runtime == "int8_dynamic":
        from .methods import row_affine
        from .runtime import Int8Conv

        part = parts[0]
        opt = QuantOption.parse(part.option)
        rows = int(part.shape[0])
        codes = unpack_codes_torch(tensors[0]["codes"], opt.bits, part.numel).view(rows, -1)
        d, z = row_affine(opt.method, tensors[0], rows)
        if kind == "linear":
            for key, value in Int8Weight(codes, d, z).tensors().items():
                new.register_buffer(f"int8_{key}", value, persistent=False)
        else:
            conv = Int8Conv.from_codes(codes, d, z, module)
            if conv is None:  # q - z is no int8 value: the float kernel
                new._runtime = runtime = "on_the_fly"
            else:
                new.__dict__["_int8_conv"] = conv
    elif runtime == "cached":
        with torch.no_grad():
            new.register_buffer("runtime_weight", new._dequantize().detach(), persistent=False)
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
                               and not k.startswith(_RUNTIME_ATTRS)})
        plain._parameters = {"weight": weight, **sub._parameters}
        plain._buffers = {k: v for k, v in sub._buffers.items() if not k.startswith(_RUNTIME_BUFFERS)}
        plain._non_persistent_buffers_set = {k for k in sub._non_persistent_buffers_set
                                             if not k.startswith(_RUNTIME_BUFFERS)}
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model
