"""UAQ: asymmetric uniform affine quantization per output row, with a per-row clipping search.

For a row ``w`` (one output channel), ``bits`` = b and ``L = 2**b - 1``, every clipping ratio ``r`` of
:data:`CLIP_RATIOS` gives::

    Δ = fp16((max(w) - min(w)) * r / L)          # stored scale
    z = fp16(round(-min(w) * r / Δ))             # stored zero point (an integer)
    q = clamp(round(w / Δ) + z, 0, L)            # uint8 code
    ŵ = (q - z) * Δ                              # table[r, q]

and the ratio with the smallest squared error ``Σ (w - ŵ)²`` is kept. The error is evaluated on the
stored fp16 ``Δ`` and ``z``, so the choice is optimal for what is saved. The reference (q-diffusion's
``init_mse``) used an L2.4 norm over the 10 ratios 1.0, 0.9, ..., 0.1; we use one error definition for
all methods (squared error) and a finer grid of 70 ratios: 1.00 to 0.50 in steps of 0.01, then
0.48 to 0.12 in steps of 0.02 (heavy-tailed rows at 3 bits often want r < 0.3). On Student-t rows this
grid lands within 0.1 % of a 0.0025-step search, the reference's grid 0.5-2 % above it.

Degenerate rows: when ``Δ`` rounds to 0 in fp16 (a constant row, or a range below fp16's resolution)
``Δ = fp16(max|w|)`` (1 for an all-zero row), which reproduces a constant row up to fp16 rounding.

Two back ends compute the same errors (to float64 rounding):

* CPU (numba): each row is sorted once; with prefix sums of ``w`` and ``w²`` the squared error of one
  candidate costs ``2**b`` binary searches instead of a pass over the row (the codes of a sorted row
  are contiguous runs): 40-90 µs of one core per row of 320-2560 values, all 70 ratios included
  (``benchmarks/bench_kmeans.py``; the elementwise torch path takes 0.3-5 ms per row on a CPU).
* CUDA / any device (torch): all candidates of a chunk of rows elementwise, chunked to bound memory.

Public API: :func:`uaq_params`, :func:`uaq_grid_errors`, :func:`uaq_codes`; the method classes
(``uaq``, ``uaq_ls``, ``uaq_g<N>``) are in :mod:`sensitivity.quantizers.uaq`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from numba import njit, prange

from .. import numba_cache  # noqa: F401,E402  (kernels cached per machine, not per checkout; before @njit)

from .kmeans1d import centered_prefix_sums  # noqa: E402 - the one prefix-sum kernel
from .uaq import CLIP_RATIOS  # noqa: F401 - the grid lives with the method's config

_FP16_MAX = 65504.0
_TORCH_CHUNK_ELEMS = 1 << 24  # elements of one [rows, ratios, K] block on the torch path


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (saturating at ±65504), returned as float32."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)


def uaq_candidates(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, ratios: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stored (fp16-rounded, as float32) scale and zero of every row × ratio.

    ``wmin``/``wmax``: float32 ``[R]``; ``ratios``: float32 ``[G]`` -> ``(scale, zero)`` float32 ``[R, G]``.
    """
    levels = 2**bits - 1
    lo = wmin[:, None] * ratios[None, :]
    hi = wmax[:, None] * ratios[None, :]
    scale = _fp16((hi - lo) / levels)
    # degenerate rows: Δ would be 0 -> use max|w| (1 for an all-zero row)
    fallback = _fp16(torch.maximum(wmin.abs(), wmax.abs()))
    fallback = torch.where(fallback > 0, fallback, torch.ones_like(fallback))
    scale = torch.where(scale > 0, scale, fallback[:, None].expand_as(scale))
    zero = _fp16(torch.round(-lo / scale))
    return scale, zero


@njit(parallel=True, cache=True)
def _grid_errors_sorted_nb(xs, scale, zero, levels):  # pragma: no cover - compiled
    """Squared error of every candidate. ``xs`` float32 [R, n] sorted rows; scale/zero float32 [R, G]."""
    R, n = xs.shape
    G = scale.shape[1]
    out = np.empty((R, G), np.float64)
    for r in prange(R):
        x = xs[r]
        p1 = np.empty(n + 1, np.float64)
        p2 = np.empty(n + 1, np.float64)
        shift = centered_prefix_sums(x, p1, p2)
        for g in range(G):
            d = scale[r, g]
            z = zero[r, g]
            err = 0.0
            start = 0
            for q in range(levels + 1):
                # elements with code q: those below the threshold between level q and q+1
                if q < levels:
                    thr = (np.float64(q) - np.float64(z) + 0.5) * np.float64(d)
                    lo_i = start
                    hi_i = n
                    while lo_i < hi_i:
                        mid = (lo_i + hi_i) >> 1
                        if x[mid] < thr:
                            lo_i = mid + 1
                        else:
                            hi_i = mid
                    end = lo_i
                else:
                    end = n
                c = end - start
                if c > 0:
                    val = np.float64(np.float32(np.float32(q) - z) * d) - shift  # table value, shifted
                    s1 = p1[end] - p1[start]
                    s2 = p2[end] - p2[start]
                    e = s2 - 2.0 * val * s1 + val * val * c
                    if e > 0.0:
                        err += e
                start = end
            out[r, g] = err
    return out


def _grid_errors_torch(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Elementwise squared error of every candidate: rows float32 [R, K] -> float64 [R, G]."""
    R, K = rows.shape
    G = scale.shape[1]
    out = torch.empty(R, G, dtype=torch.float64, device=rows.device)
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, G * K))
    for a in range(0, R, chunk):
        w = rows[a : a + chunk, None, :]
        d = scale[a : a + chunk, :, None]
        z = zero[a : a + chunk, :, None]
        q = torch.clamp(torch.round(w / d) + z, 0, levels)
        out[a : a + chunk] = ((q - z) * d - w).square_().sum(-1, dtype=torch.float64)
    return out


def uaq_grid_errors(
    rows: torch.Tensor, bits: int, ratios: Optional[torch.Tensor] = None, backend: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared error of every clipping candidate of every row.

    ``rows`` float32 ``[R, K]``; ``ratios`` float32 ``[G]`` (default :data:`CLIP_RATIOS`);
    ``backend``: ``"numba"`` (CPU), ``"torch"`` (any device) or ``"auto"`` (numba for CPU tensors).
    Returns ``(errors float64 [R, G], scale [R, G], zero [R, G])`` on ``rows.device``.
    """
    dev = rows.device
    if ratios is None:
        ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=dev)
    ratios = ratios.to(device=dev, dtype=torch.float32)
    scale, zero = uaq_candidates(rows.amin(1), rows.amax(1), bits, ratios)
    levels = 2**bits - 1
    if backend == "auto":
        backend = "numba" if dev.type == "cpu" else "torch"
    if backend == "numba":
        xs = np.ascontiguousarray(np.sort(rows.detach().cpu().numpy().astype(np.float32, copy=False), axis=1))
        errs = _grid_errors_sorted_nb(xs, scale.cpu().numpy(), zero.cpu().numpy(), levels)
        errs = torch.from_numpy(errs).to(dev)
    elif backend == "torch":
        errs = _grid_errors_torch(rows, scale, zero, levels)
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'auto', 'numba' or 'torch'")
    return errs, scale, zero


def uaq_codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w/Δ) + z, 0, 2**b-1)`` as uint8 ``[R, K]``; scale/zero float ``[R]``."""
    d = scale.to(torch.float32)[:, None]
    z = zero.to(torch.float32)[:, None]
    return torch.clamp(torch.round(rows / d) + z, 0, 2**bits - 1).to(torch.uint8)


def uaq_params(
    rows: torch.Tensor, bits: int, ratios: Optional[torch.Tensor] = None, backend: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best clipping per row: ``(scale fp16 [R], zero fp16 [R], ratio index int64 [R])``."""
    errs, scale, zero = uaq_grid_errors(rows, bits, ratios, backend)
    best = errs.argmin(1)  # first minimum: the largest ratio among ties
    pick = best[:, None]
    return scale.gather(1, pick)[:, 0].to(torch.float16), zero.gather(1, pick)[:, 0].to(torch.float16), best
