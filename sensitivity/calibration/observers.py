"""Activation range observers: min-max, percentile and MSE, per tensor or per channel.

An observer sees the values of one activation point batch after batch, as rows ``[n, C]`` (``C`` =
the point's channel axis, see :func:`sensitivity.quantizers.activation.point_channel_dim`), and
returns a range ``(lo, hi)``: float32 scalars (``granularity="tensor"``) or ``[C]`` (``"channel"``).

* ``minmax``: ``lo = min(x)``, ``hi = max(x)`` over everything seen (exact).
* ``percentile``: ``lo`` / ``hi`` = the ``100 - p`` / ``p`` percentiles (``p = 99.99`` by default,
  linear interpolation, ``torch.quantile``) of a uniform random sample of at most ``max_rows`` rows
  (reservoir with seeded random keys; exact when fewer rows were seen).
* ``mse``: the min-max range shrunk by the ratio ``r`` (both ends, ``r`` in 1.00, 0.98, ..., 0.30)
  that minimises the squared error of ``bits``-bit fake quantization of that sample (q-diffusion's
  MSE initialisation, squared error instead of its L2.4 norm).

Ranges never widen past min-max. ``(lo, hi)`` is what the static hooks use:
``Δ = (hi - lo) / (2^b - 1)``, ``z = round(-lo / Δ)`` (:func:`scale_zero`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..checks import constraint_for
from ..errors import SensitivityError
from ..quantizers.activation import fake_quantize_static

from .names import GRANULARITIES, OBSERVERS  # noqa: E402,F401 (torch-free, re-exported)
MSE_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(36))


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero_point int32)`` of a range, as an integer kernel / ONNX QDQ takes them
    (unsigned ``bits``-bit codes: ``x ≈ (q - zero) * scale``, ``q`` in ``0 .. 2^b-1``)."""
    levels = 2 ** int(bits) - 1
    rng = (hi - lo).float()
    scale = torch.where(rng > 0, rng / levels, torch.ones_like(rng))
    zero = torch.round(-lo.float() / scale).to(torch.int32)
    return scale, zero


class RangeObserver:
    """Collects one activation point's statistics; :meth:`range` gives ``(lo, hi)``.

    ``method``: one of :data:`OBSERVERS`; ``granularity``: ``"tensor"`` or ``"channel"``; ``bits``: the
    activation bits (used by ``mse``); ``percentile``: ``p`` of the percentile observer;
    ``max_rows``: rows kept for percentile / MSE; ``seed``: the reservoir's random keys.
    """

    def __init__(self, method: str = "minmax", granularity: str = "tensor", bits: int = 8,
                 percentile: float = 99.99, max_rows: int = 512, seed: int = 0):
        if method not in OBSERVERS:
            raise SensitivityError(f"unknown observer {method!r}; use one of {', '.join(OBSERVERS)}")
        if granularity not in GRANULARITIES:
            raise SensitivityError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
        constraint_for("percentile").check("percentile", percentile)
        self.method, self.granularity, self.bits = method, granularity, int(bits)
        self.percentile, self.max_rows = float(percentile), int(max_rows)
        self._gen = torch.Generator().manual_seed(int(seed))
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None
        self.keys: Optional[torch.Tensor] = None
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        """``rows``: float ``[n, C]`` values of the point (channel last)."""
        x = rows.detach().float().cpu()
        if x.numel() == 0:
            return
        lo, hi = x.amin(0), x.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += x.shape[0]
        if self.method == "minmax":
            return
        keys = torch.rand(x.shape[0], generator=self._gen)
        if self.rows is not None:
            x, keys = torch.cat([self.rows, x]), torch.cat([self.keys, keys])
        if x.shape[0] > self.max_rows:
            keep = torch.topk(keys, self.max_rows, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.rows, self.keys = x, keys

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` float32: scalars (``tensor``) or ``[C]`` (``channel``)."""
        if self.lo is None:
            raise SensitivityError("observer saw no values (the calibration set never reached this point)")
        per_channel = self.granularity == "channel"
        mn = self.lo if per_channel else self.lo.min()
        mx = self.hi if per_channel else self.hi.max()
        if self.method == "minmax":
            return mn.clone(), mx.clone()
        sample = self.rows if per_channel else self.rows.reshape(-1, 1)
        if self.method == "percentile":
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
            qs = _quantile(sample.double(), q).float()  # [2, C]
            lo, hi = torch.maximum(qs[0], mn.reshape(-1)), torch.minimum(qs[1], mx.reshape(-1))
            return (lo, hi) if per_channel else (lo[0], hi[0])
        lo, hi = mse_range(sample, mn.reshape(-1), mx.reshape(-1), self.bits)
        return (lo, hi) if per_channel else (lo[0], hi[0])


def _quantile(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile`` over dim 0, chunked (it refuses inputs over 16M elements)."""
    cols = max(1, (1 << 24) // max(1, x.shape[0]))
    return torch.cat([torch.quantile(x[:, a:a + cols], q, dim=0) for a in range(0, x.shape[1], cols)], dim=1)


def mse_range(sample: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int,
              ratios: Tuple[float, ...] = MSE_RATIOS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``sample [n, C]``: the ``(r * mn, r * mx)`` with the least squared fake-quant error."""
    best_err = torch.full((sample.shape[1],), float("inf"), dtype=torch.float64)
    best_lo, best_hi = mn.clone(), mx.clone()
    for r in ratios:
        lo, hi = mn * r, mx * r
        err = (fake_quantize_static(sample, lo, hi, bits, 1) - sample).double().square().sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi
