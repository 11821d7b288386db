"""CPU kernels of the packed run-time modules (numba, compiled once per machine).

* :func:`dequantize_into`: bit-packed codes -> float32 values through a lookup table, in one pass
  (unpack and look up fused, no uint8 or int64 temporaries), written into a caller's buffer. The
  table has one row per tensor, per output row or per (row, group) of ``group`` consecutive codes
  (``uaq_g<N>``). The packed stream is LSB-first (:mod:`sensitivity.quantizers.packing`), so code ``i``
  starts at bit ``i * bits``; the input must carry 8 bytes of zero padding (:func:`pad_packed`).

One pass replaces the numba unpack to uint8 followed by the row gather into a fresh tensor (two passes
and an allocation whose page faults are paid on every forward). Byte-aligned runs of codes (a row or
group that starts on a byte: every SD1.5-size layer) decode whole bytes, or 3-byte words of eight 3-bit
codes, per iteration of a loop indexed from 0, which LLVM vectorizes; at 4 bits that is 2x the
code-by-code loop, at 3 bits 5x (~6-7 G weights/s into float32 on 2 AVX512 cores, ``sum(range(10**7))``
0.15 s, commit b9666ff: 1.9 ms for a 10240 x 1280 weight where the float32 matmul at 256 tokens takes 42 ms).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .. import numba_cache  # noqa: F401,E402  (kernels cached per machine; before @njit)

PAD = 8  # zero bytes after the packed codes: the kernel reads up to 2 bytes past the last code


def pad_packed(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` uint8 1-D followed by :data:`PAD` zero bytes (the layout :func:`dequantize_into` reads).

    A contiguous CPU ``packed`` whose storage already holds :data:`PAD` zero bytes after it (as
    :meth:`sensitivity.export.packed.FileTensors.get_tensor` reads codes with ``pad``) is extended in
    place; otherwise the codes are copied. Sparing the copy at load keeps the freed originals from
    fragmenting the heap (at SD1.5 size ~100-270 MiB of peak RSS, ``benchmarks/bench_export.py``).
    """
    flat = packed.reshape(-1)
    n = flat.numel()
    if flat.dtype == torch.uint8 and flat.device.type == "cpu" and flat.is_contiguous():
        storage = flat.untyped_storage()
        if storage.nbytes() >= flat.storage_offset() + n + PAD:
            full = flat.new_empty(0).set_(storage, flat.storage_offset(), (n + PAD,))
            if not bool(full[n:].any()):
                return full
    return torch.cat([flat, torch.zeros(PAD, dtype=torch.uint8)])


@njit(parallel=True, cache=True)
def _dequant(p, bits, table, rows, k, group, out):  # pragma: no cover - compiled
    shared = table.shape[0] == 1
    ng = (k + group - 1) // group
    mask = (1 << bits) - 1
    for r in prange(rows):
        o = out[r]
        base = np.int64(r) * k * bits
        for gi in range(ng):
            t = table[0] if shared else table[r * ng + gi]
            k0 = gi * group
            k1 = min(k0 + group, k)
            start = base + np.int64(k0) * bits
            kk = k0
            # byte-aligned runs: whole bytes (or 3-byte words for 3 bits) per iteration, a loop LLVM vectorizes
            if (start & 7) == 0:
                b0 = start >> 3
                seg = o[k0:k1]  # views indexed from 0: LLVM then drops the negative-index checks and vectorizes
                if bits == 8:
                    src = p[b0:b0 + (k1 - k0)]
                    for j in range(k1 - k0):
                        seg[j] = t[src[j]]
                    kk = k1
                # written out per width: one generic loop over the codes of a byte ran 2.3-2.8x slower (numba
                # cannot unroll a trip count known only at run time)
                elif bits == 4:
                    n = (k1 - k0) >> 1
                    src = p[b0:b0 + n]
                    for j in range(n):
                        v = src[j]
                        seg[2 * j] = t[v & 15]
                        seg[2 * j + 1] = t[v >> 4]
                    kk = k0 + 2 * n
                elif bits == 2:
                    n = (k1 - k0) >> 2
                    src = p[b0:b0 + n]
                    for j in range(n):
                        v = src[j]
                        seg[4 * j] = t[v & 3]
                        seg[4 * j + 1] = t[(v >> 2) & 3]
                        seg[4 * j + 2] = t[(v >> 4) & 3]
                        seg[4 * j + 3] = t[v >> 6]
                    kk = k0 + 4 * n
                elif bits == 3:
                    n = (k1 - k0) >> 3
                    src = p[b0:b0 + 3 * n]
                    for j in range(n):
                        u = np.int32(src[3 * j]) | (np.int32(src[3 * j + 1]) << 8) | (np.int32(src[3 * j + 2]) << 16)
                        seg[8 * j] = t[u & 7]
                        seg[8 * j + 1] = t[(u >> 3) & 7]
                        seg[8 * j + 2] = t[(u >> 6) & 7]
                        seg[8 * j + 3] = t[(u >> 9) & 7]
                        seg[8 * j + 4] = t[(u >> 12) & 7]
                        seg[8 * j + 5] = t[(u >> 15) & 7]
                        seg[8 * j + 6] = t[(u >> 18) & 7]
                        seg[8 * j + 7] = t[u >> 21]
                    kk = k0 + 8 * n
            for kq in range(kk, k1):
                pos = base + np.int64(kq) * bits
                b = pos >> 3
                v = ((np.int64(p[b]) | (np.int64(p[b + 1]) << 8)) >> (pos & 7)) & mask
                o[kq] = t[v]


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


# --------------------------------------------------------------------------------------------------
# W8A8: the activation quantize prologue and the dequantize epilogue around torch._int_mm, one pass each
# --------------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _row_grid(x, r, levels):  # pragma: no cover - compiled
    """Row ``r``'s affine grid, the rule of ``quantize_rows_codes``: ``(flat, delta, zero)``; a flat row (max == min)
    gets ``delta`` 1 (its codes are then exact after the zero point)."""
    lo = x[r, 0]
    hi = x[r, 0]
    for j in range(1, x.shape[1]):
        v = x[r, j]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return _grid(lo, hi, levels)


@njit(inline="always", cache=True)
def _grid(lo, hi, levels):  # pragma: no cover - compiled
    """The affine grid of a row with minimum ``lo`` and maximum ``hi``: ``(flat, delta, zero)``."""
    rng = hi - lo
    flat = rng <= np.float32(0.0)
    delta = np.float32(1.0) if flat else rng / levels
    return flat, delta, np.float32(np.rint(-lo / delta))


@njit(parallel=True, cache=True)
def _quantize_rows_int8(x, xq, dx, e, sx, flat):  # pragma: no cover - compiled
    rows, k = x.shape
    levels = np.float32(255.0)
    for r in prange(rows):
        flat[r], delta, zero = _row_grid(x, r, levels)
        s = np.int64(0)
        for j in range(k):
            q = np.float32(np.rint(x[r, j] / delta)) + zero
            if q < np.float32(0.0):
                q = np.float32(0.0)
            elif q > levels:
                q = levels
            c = np.int32(q) - 128
            xq[r, j] = c
            s += c
        dx[r] = delta
        e[r] = np.float32(128.0) - zero
        sx[r] = np.float32(s)


@njit(parallel=True, cache=True)
def _int8_epilogue(s, x0, dx, e, sx, flat, d, c, swk, wsum, bias, out):  # pragma: no cover - compiled
    rows, n = out.shape
    has_bias = bias.shape[0] == n
    for r in prange(rows):
        if flat[r]:
            v = x0[r]
            for j in range(n):
                y = v * wsum[j]
                if has_bias:
                    y = y + bias[j]
                out[r, j] = y
        else:
            a = sx[r]
            b = e[r]
            g = dx[r]
            for j in range(n):
                y = (np.float32(s[r, j]) + a * c[j] + b * swk[j]) * (g * d[j])
                if has_bias:
                    y = y + bias[j]
                out[r, j] = y


# below this many elements a parallel launch costs more than it saves (digits-size layers): one thread
_SERIAL_NUMEL = 1 << 16
_quantize_rows_int8_serial = njit(cache=True)(_quantize_rows_int8.py_func)
_int8_epilogue_serial = njit(cache=True)(_int8_epilogue.py_func)


def _restore_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def quantize_rows_int8(x: torch.Tensor):
    """Per-row 8-bit codes of float32 ``x`` ``[T, K]`` by the rule of
    :func:`~sensitivity.quantizers.activation.quantize_rows_codes` (same codes), in one pass.

    Returns ``(xq int8 [T, K] = code - 128, delta [T], e = 128 - zero [T], sx = Σ_k xq [T], flat bool [T])``.
    """
    t, k = x.shape
    xq = torch.empty(t, k, dtype=torch.int8)
    dx, e, sx = (torch.empty(t, dtype=torch.float32) for _ in range(3))
    flat = torch.empty(t, dtype=torch.bool)
    threads = torch.get_num_threads()
    try:
        fn = _quantize_rows_int8 if x.numel() >= _SERIAL_NUMEL else _quantize_rows_int8_serial
        fn(x.numpy(), xq.numpy(), dx.numpy(), e.numpy(), sx.numpy(), flat.numpy())
    finally:
        _restore_threads(threads)
    return xq, dx, e, sx, flat


def int8_epilogue(s: torch.Tensor, x0: torch.Tensor, dx: torch.Tensor, e: torch.Tensor, sx: torch.Tensor,
                  flat: torch.Tensor, d: torch.Tensor, c: torch.Tensor, swk: torch.Tensor, wsum: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """``y[t, n] = (S + sx·c + e·swk)·dx·d + bias`` (float32 ``[T, N]``) from the int32 products ``S`` ``[T, N]``;
    a flat row ``t`` gives ``x0[t]·wsum + bias``. ``bias``: ``[N]`` or empty."""
    out = torch.empty(s.shape, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        fn = _int8_epilogue if s.numel() >= _SERIAL_NUMEL else _int8_epilogue_serial
        fn(s.numpy(), x0.numpy(), dx.numpy(), e.numpy(), sx.numpy(), flat.numpy(), d.numpy(),
                       c.numpy(), swk.numpy(), wsum.numpy(), bias.numpy(), out.numpy())
    finally:
        _restore_threads(threads)
    return out


# W8A8 conv: one 8-bit grid per sample (all channels and positions), uint8 codes for oneDNN's u8 x s8 conv
@njit(parallel=True, cache=True)
def _quantize_samples_u8(x, lo, hi, out, delta, zero, flat):  # pragma: no cover - compiled
    rows, k = x.shape
    levels = np.float32(255.0)
    chunk = 16384
    for r in range(rows):
        is_flat, d, z = _grid(lo[r], hi[r], levels)
        flat[r] = is_flat
        delta[r] = d
        zero[r] = z
        for c in prange((k + chunk - 1) // chunk):
            for j in range(c * chunk, min(k, (c + 1) * chunk)):
                q = np.float32(np.rint(x[r, j] / d)) + z
                if q < np.float32(0.0):
                    q = np.float32(0.0)
                elif q > levels:
                    q = levels
                out[r, j] = np.uint8(q)


def quantize_samples_u8(x: torch.Tensor):
    """8-bit codes of each row of float32 ``x`` ``[B, K]`` (one row per sample) by the rule of
    :func:`~sensitivity.quantizers.activation.quantize_rows_codes` (same codes), in one pass after torch's min/max.

    Returns ``(codes uint8 [B, K], delta [B], zero [B] (float32, any integer value), flat bool [B])``.
    """
    b, k = x.shape
    lo, hi = torch.aminmax(x, dim=1)
    out = torch.empty(b, k, dtype=torch.uint8)
    delta, zero = torch.empty(b, dtype=torch.float32), torch.empty(b, dtype=torch.float32)
    flat = torch.empty(b, dtype=torch.bool)
    threads = torch.get_num_threads()
    try:
        _quantize_samples_u8(x.numpy(), lo.contiguous().numpy(), hi.contiguous().numpy(), out.numpy(),
                             delta.numpy(), zero.numpy(), flat.numpy())
    finally:
        _restore_threads(threads)
    return out, delta, zero, flat


@njit(parallel=True, cache=True)
def _fake_quantize_rows(x, bits, out):  # pragma: no cover - compiled
    rows, k = x.shape
    levels = np.float32(2 ** bits - 1)
    for r in prange(rows):
        is_flat, delta, zero = _row_grid(x, r, levels)
        if is_flat:
            for j in range(k):
                out[r, j] = x[r, j]
            continue
        for j in range(k):
            q = np.float32(np.rint(x[r, j] / delta)) + zero
            if q < np.float32(0.0):
                q = np.float32(0.0)
            elif q > levels:
                q = levels
            out[r, j] = (q - zero) * delta


_fake_quantize_rows_serial = njit(cache=True)(_fake_quantize_rows.py_func)


def fake_quantize_rows_fused(x: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`~sensitivity.quantizers.activation.fake_quantize_rows` of float32 CPU ``x`` ``[R, K]`` in one pass
    (same values, bit for bit): the run-time modules' input quantizer where no integer kernel applies."""
    out = torch.empty(x.shape, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        fn = _fake_quantize_rows if x.numel() >= _SERIAL_NUMEL else _fake_quantize_rows_serial
        fn(x.numpy(), int(bits), out.numpy())
    finally:
        _restore_threads(threads)
    return out
