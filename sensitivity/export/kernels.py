"""CPU kernels of the packed run-time modules (numba, compiled once per machine).

* :func:`dequantize_into`: bit-packed codes -> float32 values through a lookup table, in one pass
  (unpack and look up fused, no uint8 or int64 temporaries), written into a caller's buffer. The
  table has one row per tensor, per output row or per (row, group) of ``group`` consecutive codes
  (``uaq_g<N>``). The packed stream is LSB-first (:mod:`sensitivity.quantizers.packing`), so code ``i``
  starts at bit ``i * bits``; the input must carry 8 bytes of zero padding (:func:`pad_packed`).

One pass replaces the numba unpack to uint8 followed by the row gather into a fresh tensor (two passes
and an allocation whose page faults are paid on every forward).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .. import numba_cache  # noqa: F401,E402  (kernels cached per machine; before @njit)

PAD = 8  # zero bytes after the packed codes: the kernel reads up to 2 bytes past the last code


def pad_packed(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` uint8 1-D followed by :data:`PAD` zero bytes (the layout :func:`dequantize_into` reads)."""
    return torch.cat([packed.reshape(-1), torch.zeros(PAD, dtype=torch.uint8)])


@njit(parallel=True, cache=True)
def _dequant(p, bits, table, rows, k, group, out):  # pragma: no cover - compiled
    shared = table.shape[0] == 1
    ng = (k + group - 1) // group
    mask = (1 << bits) - 1
    for r in prange(rows):
        base = np.int64(r) * k * bits
        for gi in range(ng):
            t = table[0] if shared else table[r * ng + gi]
            k0 = gi * group
            k1 = min(k0 + group, k)
            if bits == 8:
                for kk in range(k0, k1):
                    out[r, kk] = t[p[np.int64(r) * k + kk]]
            elif bits == 4 and (base & 7) == 0 and (k0 & 1) == 0:
                b0 = (base >> 3) + (k0 >> 1)
                kk = k0
                while kk + 1 < k1:
                    v = p[b0 + ((kk - k0) >> 1)]
                    out[r, kk] = t[v & 15]
                    out[r, kk + 1] = t[v >> 4]
                    kk += 2
                if kk < k1:
                    out[r, kk] = t[p[b0 + ((kk - k0) >> 1)] & 15]
            else:
                for kk in range(k0, k1):
                    pos = base + np.int64(kk) * bits
                    b = pos >> 3
                    v = ((np.int64(p[b]) | (np.int64(p[b + 1]) << 8)) >> (pos & 7)) & mask
                    out[r, kk] = t[v]


def dequantize_into(padded: torch.Tensor, bits: int, table: torch.Tensor, rows: int, k: int, group: int,
                    out: torch.Tensor) -> torch.Tensor:
    """``out[r, i] = table[row(r, i), code(r * k + i)]`` for float32 ``out`` ``[rows, k]`` (CPU, any strides).

    ``padded``: packed codes + :data:`PAD` bytes; ``table``: float32 ``[1 | rows | rows * ceil(k / group), 2**bits]``.
    """
    threads = torch.get_num_threads()
    try:
        _dequant(padded.numpy(), int(bits), table.numpy(), int(rows), int(k), int(group), out.numpy())
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return out
