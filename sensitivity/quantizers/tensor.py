"""Tensor-level entry points: :func:`quantize` a weight with an option, :class:`QuantizedWeight`, :func:`lookup`.

Every method works on ``rows = weight.reshape(C, -1)`` (one row per output channel, dim 0) and
returns ``codes`` uint8 ``[C, K]`` (values in ``[0, 2**bits)``) plus the parameter tensors of its
:meth:`~sensitivity.quantizers.base.QuantMethod.param_layout`. The error reported is the error of
exactly what is stored (fp16 / fp32 tables included).

**Error** (one definition for all methods): relative squared error ``||W - W_hat||_F^2 / ||W||_F^2``
over the whole layer (``sse`` holds the unnormalised sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..errors import SensitivityError, UnknownOptionError
from .option import QuantOption
from .base import TableMethod, get_method


def lookup(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize: ``table`` float ``[R or 1, L]``, ``codes`` uint8 ``[R, K]`` -> ``[R, K]`` values.

    ``out``: optional float32 ``[R, K]`` CPU tensor to write into (no temporaries). On CPU with uint8
    codes a compiled per-row gather is used: for SD1.5's 859M weights it writes float32 values in
    about one pass over memory, where ``torch.gather`` first widens the codes to int64 (8 bytes each)
    and then casts and copies the result (see benchmarks/bench_multiquantizer.py).
    """
    if codes.device.type == "cpu" and codes.dtype == torch.uint8 and table.device.type == "cpu" and codes.dim() == 2:
        from .packing import gather_rows

        if out is None:
            out = torch.empty(codes.shape, dtype=torch.float32)
        if out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == tuple(codes.shape):
            gather_rows(table.to(torch.float32).contiguous().numpy(), codes.contiguous().numpy(), out.numpy())
            return out
    values = table[0][codes.long()] if table.shape[0] == 1 else torch.gather(table, 1, codes.long())
    if out is not None:
        out.copy_(values)
        return out
    return values


@dataclass
class QuantizedWeight:
    """A weight stored as codes + params. ``shape``/``dtype`` are the original weight's."""

    option: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor
    params: Dict[str, torch.Tensor]
    error: float = float("nan")
    sse: float = float("nan")

    @property
    def bits(self) -> int:
        return QuantOption.parse(self.option).bits

    @property
    def method(self) -> str:
        return QuantOption.parse(self.option).method

    @property
    def nbytes(self) -> int:
        """Payload (bits per weight) + parameter bytes, as :meth:`QuantOption.nbytes`."""
        return QuantOption.parse(self.option).nbytes(self.shape)

    def table(self) -> torch.Tensor:
        """float32 ``[R or 1, 2**bits]`` lookup table (table methods only)."""
        m = get_method(self.method)
        if not isinstance(m, TableMethod):
            raise SensitivityError(f"option {self.option!r} is not a single-table method; use dequantize()")
        return m.table(self.params, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight, same shape and dtype as the input weight."""
        values = get_method(self.method).dequantize_rows(self.codes, self.params, self.bits)
        return values.reshape(self.shape).to(self.dtype)


def squared_norm(rows: torch.Tensor, shape: Tuple[int, ...] | None = None) -> float:
    """``Σ rows²``: float32 elementwise squares summed by numpy in float64 (the same last bits
    whatever the thread count); raises if ``rows`` holds NaN or Inf.

    The finiteness check rides on the sum: only a non-finite sum is followed by ``torch.isfinite``
    (squares above float32's range make the sum infinite for finite weights).
    ``shape``: the weight's shape, for the message (default: the rows').
    """
    import numpy as np

    norm = float(np.sum((rows**2).cpu().numpy().reshape(-1), dtype=np.float64))
    if not math.isfinite(norm) and not bool(torch.isfinite(rows).all()):
        raise SensitivityError(f"weight of shape {tuple(rows.shape if shape is None else shape)} contains NaN or Inf values")
    return norm


def squared_error(values: torch.Tensor, rows: torch.Tensor) -> float:
    """``Σ (values - rows)²``, float32 elementwise, summed by numpy in float64 (see :func:`squared_norm`)."""
    import numpy as np

    sq = (values - rows).square_()  # a fresh tensor: squared in place, as ``** 2`` would
    return float(np.sum(sq.cpu().numpy().reshape(-1), dtype=np.float64))


def quantize(weight: torch.Tensor, option: str, device: torch.device | str | None = None) -> QuantizedWeight:
    """Quantize ``weight`` (any shape, dim 0 = output channels) with ``option`` (e.g. ``"uaq-4"``).

    ``device``: where the math runs (default: the weight's device; CPU uses numba kernels, CUDA the
    batched torch paths). Codes and params are returned on that device.
    """
    opt = QuantOption.parse(option)
    if opt.is_fp:
        raise UnknownOptionError("'fp16' is not a quantization method; leave the layer out of the config")
    if weight.dim() < 2 or weight.numel() == 0:
        raise SensitivityError(f"cannot quantize a weight of shape {tuple(weight.shape)}: need >= 2 dims")
    w = weight.detach()
    if device is not None:
        w = w.to(device)
    rows = w.reshape(w.shape[0], -1).to(torch.float32)
    return quantize_prepared(rows, opt, tuple(w.shape), w.dtype, squared_norm(rows, tuple(w.shape)))


def quantize_prepared(rows: torch.Tensor, option: QuantOption, shape: Tuple[int, ...], dtype: torch.dtype,
                      norm: float) -> QuantizedWeight:
    """:func:`quantize` on prepared rows: float32 ``[C, K]`` of a weight of ``shape``/``dtype`` and
    ``norm = squared_norm(rows)``, so that the options of one layer share the rows and their norm."""
    m = get_method(option.method)
    codes, params = m.quantize_rows(rows, option.bits)
    sse = squared_error(m.dequantize_rows(codes, params, option.bits), rows)
    err = sse / norm if norm > 0 else (0.0 if sse == 0 else float("inf"))
    return QuantizedWeight(option.name, shape, dtype, codes, params, err, sse)
