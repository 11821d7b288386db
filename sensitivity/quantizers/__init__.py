"""Weight quantizers: pure tensor math, no models.

``quantize(weight, "kmeans_c-3")`` returns a :class:`QuantizedWeight`. Every method works on the
weight reshaped to ``rows = weight.reshape(C, -1)`` (one row per output channel, dim 0) and returns

* ``codes``: uint8 ``[C, K]``, values in ``[0, 2**bits)``;
* ``params``: the tensors it stores besides the codes, all float16 (their count is the overhead
  of :mod:`sensitivity.options`): UAQ ``{"scale": [C], "zero": [C]}``, K-Means-C
  ``{"codebook": [C, 2**bits]}``, K-Means-A ``{"codebook": [1, 2**bits]}``.

The dequantized value of code ``q`` in row ``r`` is ``table[r, q]`` where ``table`` is computed from the
stored fp16 params, so the error reported is the error of exactly what is stored.

**Error** (one definition for all methods): relative squared error
``||W - W_hat||_F^2 / ||W||_F^2`` over the whole layer (``sse`` holds the unnormalised sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Protocol, Tuple

import torch

from ..errors import SensitivityError, UnknownOptionError
from ..options import QuantOption


class Quantizer(Protocol):
    """A weight quantization method, registered under its method name."""

    method: str

    def quantize_rows(self, rows: torch.Tensor, bits: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``rows``: float32 ``[R, K]`` -> (uint8 codes ``[R, K]``, fp16 params)."""

    def table(self, params: Dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """float32 ``[R or 1, 2**bits]``: the value of every code, from the stored params."""


QUANTIZERS: Dict[str, Quantizer] = {}


def register_quantizer(quantizer: Quantizer) -> Quantizer:
    QUANTIZERS[quantizer.method] = quantizer
    return quantizer


def get_quantizer(method: str) -> Quantizer:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise UnknownOptionError(f"no quantizer registered for method {method!r}; known: {sorted(QUANTIZERS)}")


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
    """A weight stored as codes + fp16 params. ``shape``/``dtype`` are the original weight's."""

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
        """Payload (bits per weight) + fp16 overhead, as in :mod:`sensitivity.options`."""
        return QuantOption.parse(self.option).nbytes(self.shape)

    def table(self) -> torch.Tensor:
        return get_quantizer(self.method).table(self.params, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight, same shape and dtype as the input weight."""
        values = lookup(self.table().to(self.codes.device), self.codes)
        return values.reshape(self.shape).to(self.dtype)


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
    if not torch.isfinite(rows).all():
        raise SensitivityError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values")
    q = get_quantizer(opt.method)
    codes, params = q.quantize_rows(rows, opt.bits)
    values = lookup(q.table(params, opt.bits), codes)
    sse = float(((values - rows) ** 2).sum(dtype=torch.float64))
    norm = float((rows**2).sum(dtype=torch.float64))
    err = sse / norm if norm > 0 else (0.0 if sse == 0 else float("inf"))
    return QuantizedWeight(opt.name, tuple(w.shape), w.dtype, codes, params, err, sse)


# Register the built-in methods (their modules call register_quantizer on import).
from . import uniform as _uniform  # noqa: E402,F401
from . import kmeans1d as _kmeans1d  # noqa: E402,F401
