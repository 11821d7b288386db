"""Bit-packing of uint8 codes: ``bits`` (1..8) bits per code, little-endian within each group.

Every group of 8 codes becomes ``bits`` bytes: the codes are summed into one 64-bit word
``Σ_i code_i << (bits * i)``, whose low ``bits`` bytes are kept (3-bit: 8 codes in 3 bytes; 4-bit: two
codes per byte, the first in the low nibble). The last group is zero-padded, so
``len(packed) == ceil(bits * n / 8)``. A numba kernel (parallel over groups of 8 codes) does the bit
work: 250-400 MB of codes per second measured on a busy 2-core machine (``benchmarks/bench_kmeans.py``).

``pack_codes`` / ``unpack_codes`` accept numpy arrays or torch tensors and return the same kind
(a torch result is on the input's device; the work is done on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .. import numba_cache  # noqa: F401,E402  (kernels cached per machine, not per checkout; before @njit)

_CHUNK = 1 << 26  # codes per kernel call (a multiple of 8)
_WORD = np.dtype("<u8")


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    return bits


def _as_numpy(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy(), a.device
    return np.asarray(a), None


def _back(a: np.ndarray, device):
    return a if device is None else torch.from_numpy(a).to(device)


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` packed ``bits``-bit codes: ``ceil(bits * n / 8)``."""
    return (_check_bits(bits) * int(n) + 7) // 8


@njit(parallel=True, cache=True)
def _pack_groups(words, bits, out):  # pragma: no cover - compiled
    """codes viewed as little-endian uint64 [m] (code i of a group in byte i) -> packed uint8 [m * bits]."""
    m = words.shape[0]
    mask = np.uint64((1 << bits) - 1)
    for g in prange(m):
        w = words[g]
        word = np.uint64(0)
        for i in range(8):
            word |= ((w >> np.uint64(8 * i)) & mask) << np.uint64(bits * i)
        for j in range(bits):
            out[bits * g + j] = np.uint8((word >> np.uint64(8 * j)) & np.uint64(255))


@njit(parallel=True, cache=True)
def _unpack_groups(p, bits, words):  # pragma: no cover - compiled
    """packed uint8 [m * bits] -> codes written into ``words`` (uint8 [8m] viewed as little-endian uint64 [m])."""
    m = p.shape[0] // bits
    mask = np.uint64((1 << bits) - 1)
    for g in prange(m):
        word = np.uint64(0)
        for j in range(bits):
            word |= np.uint64(p[bits * g + j]) << np.uint64(8 * j)
        w = np.uint64(0)
        for i in range(8):
            w |= ((word >> np.uint64(bits * i)) & mask) << np.uint64(8 * i)
        words[g] = w


def pack_codes(codes, bits: int):
    """uint8 codes (1-D, values < 2**bits) -> packed uint8 1-D of ``ceil(bits * n / 8)`` bytes."""
    bits = _check_bits(bits)
    arr, device = _as_numpy(codes)
    if arr.ndim != 1:
        raise ValueError(f"pack_codes expects a 1-D array of codes, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"pack_codes expects uint8 codes, got {arr.dtype}")
    n = arr.size
    if n and bits < 8 and int(arr.max()) >= (1 << bits):
        raise ValueError(f"code {int(arr.max())} does not fit in {bits} bits")
    if bits == 8:
        return _back(arr.copy(), device)
    out = np.empty(packed_size(n, bits), np.uint8)
    full = n - n % 8
    src = np.ascontiguousarray(arr)
    for a in range(0, full, _CHUNK):
        b = min(a + _CHUNK, full)
        _pack_groups(src[a:b].view(_WORD), bits, out[a * bits // 8 : b * bits // 8])
    if full < n:
        tail = np.zeros(8, np.uint8)
        tail[: n - full] = arr[full:]
        last = np.empty(bits, np.uint8)
        _pack_groups(tail.view(_WORD), bits, last)
        out[full * bits // 8 :] = last[: out.size - full * bits // 8]
    return _back(out, device)


def unpack_codes(packed, bits: int, n: int):
    """Inverse of :func:`pack_codes`: packed uint8 1-D -> the first ``n`` codes, uint8 1-D."""
    bits = _check_bits(bits)
    arr, device = _as_numpy(packed)
    n = int(n)
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise ValueError(f"unpack_codes expects packed uint8 1-D data, got {arr.dtype} {arr.shape}")
    if arr.size != packed_size(n, bits):
        raise ValueError(f"{arr.size} packed bytes do not hold {n} {bits}-bit codes ({packed_size(n, bits)} needed)")
    if bits == 8:
        return _back(arr.copy(), device)
    out = np.empty(n, np.uint8)
    full = n - n % 8
    src = np.ascontiguousarray(arr)
    for a in range(0, full, _CHUNK):
        b = min(a + _CHUNK, full)
        _unpack_groups(src[a * bits // 8 : b * bits // 8], bits, out[a:b].view(_WORD))
    if full < n:
        tail = np.zeros(bits, np.uint8)
        rest = arr[full * bits // 8 :]
        tail[: rest.size] = rest
        last = np.empty(8, np.uint8)
        _unpack_groups(tail, bits, last.view(_WORD))
        out[full:] = last[: n - full]
    return _back(out, device)


@njit(parallel=True, cache=True)
def _gather_rows(table, codes, out):  # pragma: no cover - compiled
    shared = table.shape[0] == 1
    for r in prange(codes.shape[0]):
        t = table[0] if shared else table[r]
        for k in range(codes.shape[1]):
            out[r, k] = t[codes[r, k]]


def gather_rows(table: np.ndarray, codes: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[r, k] = table[r or 0, codes[r, k]]``: float32 ``table [R or 1, L]``, uint8 ``codes [R, K]``,
    float32 ``out [R, K]`` (written in place, rows in parallel; torch's thread count is kept)."""
    if table.shape[0] not in (1, codes.shape[0]) or out.shape != codes.shape:
        raise ValueError(f"gather_rows: table {table.shape}, codes {codes.shape}, out {out.shape} do not fit")
    threads = torch.get_num_threads()
    try:
        _gather_rows(table, codes, out)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return out
