"""1-D k-means codebooks: ``kmeans_c`` (one codebook per output row) and ``kmeans_a`` (one per tensor).

Algorithm (per row ``x`` of length n, ``k = 2**bits`` clusters), deterministic, no random init:

1. sort the row; prefix sums of ``x - mean`` and ``(x - mean)²`` in float64;
2. cut the sorted row into about ``n_cuts`` groups (default ``8k + 16`` per row, 2048 per tensor)
   with density ∝ p^(1/3), the density of optimal 1-D k-means centroids: every gap between
   neighbouring values weighs gap^(2/3) (capped so a tail gap takes one cut at most), and the cuts sit
   at equal steps of the cumulative weight. This is fine in the dense centre *and* in the tails;
   equal-count or equal-width histograms are not (an outlier at 37 sigma makes equal-width bins
   useless and equal-count bins merge the tail points);
3. exact optimal k-clustering of the groups (clusters are unions of whole groups) by dynamic
   programming, with the divide-and-conquer speed-up that the 1-D k-means cost allows (the argmin is
   monotone, as used by Ckmeans.1d.dp): ``O(k G log G)`` O(1) cost evaluations from the prefix sums;
4. Lloyd iterations on the sorted row: a cluster is a run of the sorted row, so one iteration is
   ``k - 1`` binary searches for the midpoints plus ``k`` prefix-sum differences (``O(k log n)``,
   independent of n); stop when no boundary moves;
5. round the centroids to fp16 (what is stored), sort them, and give every weight the code of its
   nearest fp16 centroid, so the codes are optimal for the stored table.

A row with at most ``n_cuts`` values is clustered exactly (every value is its own group). Rows with
fewer distinct values than k get duplicate centroids (never NaN). The squared error (fp16 codebook
included) lands within 0.5 % of the exact 1-D optimum (:func:`kmeans1d_optimal`) on every row we
measured (Student-t df 2.5-6, n = 320 to 11520, k = 8 and 16), never below it;
``benchmarks/bench_kmeans.py`` prints the figures.

Why hand-written: scikit-learn's KMeans (the reference) is general-purpose: 5-10 ms of CPU per row,
and with ``n_init=1`` 3-11 % above the 1-D optimum on average on heavy-tailed rows (up to 27 %).
flash1dkmeans (kmeans++ init + Lloyd on sorted data) is faster but 1.5-11 % above the optimum on
average (Lloyd's local minima). The exact DP (Ckmeans.1d.dp) is optimal but ``O(k n log n)`` per
row. Measured with ``benchmarks/bench_kmeans.py`` (one thread, Student-t rows of 320-11520 values,
k = 8 and 16): ours takes 36-400 µs per row, 62-231x less than
scikit-learn and 2.5-5x less than flash1dkmeans, at most 0.32 % above the optimum on every row.
A whole SD1.5 UNet (329k rows) needs about 80 s of CPU for both bit widths.

Back ends: numba on CPU (``prange`` over rows; rows are sorted with numpy's SIMD sort first), and a
batched torch path used for CUDA tensors (sort, searchsorted, dense min-plus DP over the groups,
batched Lloyd) that computes the same thing; ``backend="torch"`` forces it on any device.

Public API: :func:`kmeans1d_rows`,
:func:`kmeans1d_tensor`, :func:`assign_nearest`, :func:`kmeans1d_optimal`, :func:`row_cuts`; the method
classes (``kmeans_c``, ``kmeans_a``) are in :mod:`sensitivity.quantizers.kmeans`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from numba import njit, prange

from .. import numba_cache  # noqa: F401,E402  (kernels cached per machine, not per checkout; before @njit)

_FP16_MAX = 65504.0
_INF = np.inf

#: DP groups for one codebook over a whole tensor (millions of values)
TENSOR_CUTS = 2048
MAX_ITER = 300


def row_cuts(k: int) -> int:
    """DP groups per row for a k-entry per-row codebook: ``8 k + 16`` (144 for k=16, 80 for k=8)."""
    return 8 * k + 16


# --------------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def centered_prefix_sums(x, p1, p2):  # pragma: no cover - compiled
    """Prefix sums of a row minus its mean, for exact run sums without cancellation.

    ``x`` [n] (float32 or float64); fills float64 ``p1``/``p2`` [n+1] with ``sum(x[:i] - shift)`` and
    ``sum((x[:i] - shift)**2)``; returns ``shift`` (the mean, float64).
    """
    n = x.shape[0]
    shift = 0.0
    for i in range(n):
        shift += x[i]
    shift /= n
    p1[0] = 0.0
    p2[0] = 0.0
    for i in range(n):
        v = np.float64(x[i]) - shift
        p1[i + 1] = p1[i] + v
        p2[i + 1] = p2[i] + v * v
    return shift


@njit(cache=True, inline="always")
def _cost(p1, p2, p0, inv, i, j):  # pragma: no cover - compiled
    """SSE of the points between cut i and cut j (prefix sums p1, p2; int counts p0; inv[c] = 1/c)."""
    c = p0[j] - p0[i]
    s = p1[j] - p1[i]
    if c < inv.shape[0]:
        v = (p2[j] - p2[i]) - s * s * inv[c]
    else:
        v = (p2[j] - p2[i]) - s * s / c
    return v if v > 0.0 else 0.0


@njit(cache=True)
def _dp_cuts(p1, p2, p0, inv, k, opt, prev, cur, stack):  # pragma: no cover - compiled
    """Optimal split of cuts 0..G into k (<= G) non-empty runs; divide-and-conquer DP.

    ``p1, p2``: float64 [G+1] prefix sums at the cuts, ``p0`` int64 [G+1] the cut positions (strictly
    increasing), ``inv`` float64 reciprocals (``inv[c] = 1/c``). ``opt`` int64 [k, G+1] receives the
    argmins (start cut of the last run); ``prev``/``cur`` float64 [G+1] and ``stack`` int64 [S, 4] are
    work space. Uses the monotonicity of the argmin in j (divide and conquer) and across cluster
    counts (``opt[m-1, j] <= opt[m, j]``, as Ckmeans.1d.dp). Returns the optimal SSE.
    """
    G = p1.shape[0] - 1
    for j in range(1, G + 1):
        prev[j] = _cost(p1, p2, p0, inv, 0, j)
        opt[0, j] = 0
    prev[0] = _INF
    for m in range(1, k):
        # cur[j] = min_{m <= i < j} prev[i] + cost(i, j) for j in [m+1, G]
        for j in range(m + 1):
            cur[j] = _INF
        stack[0, 0] = m + 1
        stack[0, 1] = G
        stack[0, 2] = m
        stack[0, 3] = G - 1
        top = 1
        while top > 0:
            top -= 1
            jlo = stack[top, 0]
            jhi = stack[top, 1]
            ilo = stack[top, 2]
            ihi = stack[top, 3]
            if jlo > jhi:
                continue
            jm = (jlo + jhi) >> 1
            iend = ihi if ihi < jm - 1 else jm - 1
            i0 = opt[m - 1, jm]
            if i0 < ilo or i0 > iend:
                i0 = ilo
            best = _INF
            bi = i0
            for i in range(i0, iend + 1):
                v = prev[i] + _cost(p1, p2, p0, inv, i, jm)
                if v < best:
                    best = v
                    bi = i
            cur[jm] = best
            opt[m, jm] = bi
            stack[top, 0] = jlo
            stack[top, 1] = jm - 1
            stack[top, 2] = ilo
            stack[top, 3] = bi
            top += 1
            stack[top, 0] = jm + 1
            stack[top, 1] = jhi
            stack[top, 2] = bi
            stack[top, 3] = ihi
            top += 1
        for j in range(G + 1):
            prev[j] = cur[j]
    return prev[G]


@njit(cache=True, inline="always")
def _lower_bound(x, lo, hi, shift, value):  # pragma: no cover - compiled
    """First index i in [lo, hi) with x[i] - shift >= value (x sorted), else hi."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if np.float64(x[mid]) - shift < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


_ONE_BITS = 1065353216  # bit pattern of float32 1.0


_GAP_CHUNK = 4096


@njit(cache=True)
def _gap_weights(x, w):  # pragma: no cover - compiled
    """``w[i] ≈ (x[i+1] - x[i]) ** (2/3)`` as float32 (bit trick, a few % off; 0 for a zero gap).

    Returns ``sum(w)``. Works in cache-sized chunks (one pass over ``x``).
    """
    n = x.shape[0]
    g = np.empty(_GAP_CHUNK, np.float32)
    wi = np.empty(_GAP_CHUNK, np.int32)
    gi = g.view(np.int32)
    wf = wi.view(np.float32)
    tot = 0.0
    for a in range(0, n - 1, _GAP_CHUNK):
        m = min(_GAP_CHUNK, n - 1 - a)
        for i in range(m):
            g[i] = x[a + i + 1] - x[a + i]
        for i in range(m):  # log-domain scaling of the bit pattern: bits(g^p) ≈ p bits(g) + (1-p) bits(1)
            wi[i] = np.int32(np.float64(gi[i]) * (2.0 / 3.0) + _ONE_BITS / 3.0)
        for i in range(m):
            v = wf[i] if g[i] > 0 else np.float32(0.0)
            w[a + i] = v
            tot += v
    return tot


@njit(cache=True)
def _compander_cuts(x, n_cuts, cuts):  # pragma: no cover - compiled
    """Cut positions (strictly increasing, from 0 to n) of a sorted row; returns how many.

    About ``n_cuts`` groups placed with density ∝ p^(1/3) (the density of optimal 1-D k-means
    centroids): each gap gets weight gap^(2/3), capped (twice) so that a big tail gap takes at most
    one cut, and cuts are put where the cumulative weight crosses equal steps.
    """
    n = x.shape[0]
    if n <= n_cuts:  # short row: every value its own group (the DP is then exact)
        for i in range(n + 1):
            cuts[i] = i
        return n + 1
    w = np.empty(n - 1, np.float32)
    tot = _gap_weights(x, w)
    for _ in range(2):
        cap = tot / n_cuts
        tot = 0.0
        for i in range(n - 1):
            tot += min(np.float64(w[i]), cap)
    nc = 0
    cuts[nc] = 0
    nc += 1
    if tot > 0.0:
        step = tot / n_cuts
        acc = 0.0
        t = 1
        for i in range(n - 1):
            acc += min(np.float64(w[i]), cap)
            if t < n_cuts and acc >= t * step:
                cuts[nc] = i + 1
                nc += 1
                while t < n_cuts and acc >= t * step:
                    t += 1
    cuts[nc] = n
    nc += 1
    return nc


@njit(cache=True)
def _reciprocals(n):  # pragma: no cover - compiled
    """float64 [min(n, 65536) + 1]: ``inv[c] = 1/c`` (``inv[0] = 0``); larger counts divide."""
    m = min(n, 65536)
    inv = np.empty(m + 1, np.float64)
    inv[0] = 0.0
    for c in range(1, m + 1):
        inv[c] = 1.0 / c
    return inv


@njit(cache=True)
def _fit_sorted_row(x, k, n_cuts, max_iter, inv, out):  # pragma: no cover - compiled
    """Fit k centroids to one sorted float32 row ``x``; writes float64 [k] (ascending) into ``out``.

    ``inv``: float64 reciprocals ``inv[c] = 1/c`` (:func:`_reciprocals`).
    """
    n = x.shape[0]
    p1 = np.empty(n + 1, np.float64)
    p2 = np.empty(n + 1, np.float64)
    shift = centered_prefix_sums(x, p1, p2)
    cuts = np.empty(n_cuts + 2, np.int64)
    G = _compander_cuts(x, n_cuts, cuts) - 1  # non-empty groups
    kk = k if k < G else G
    q1 = np.empty(G + 1, np.float64)
    q2 = np.empty(G + 1, np.float64)
    for g in range(G + 1):
        q1[g] = p1[cuts[g]]
        q2[g] = p2[cuts[g]]
    opt = np.empty((kk, G + 1), np.int64)
    prev = np.empty(G + 1, np.float64)
    cur = np.empty(G + 1, np.float64)
    stack = np.empty((256, 4), np.int64)
    _dp_cuts(q1, q2, cuts, inv, kk, opt, prev, cur, stack)
    # element boundaries of the kk clusters
    b = np.empty(kk + 1, np.int64)
    b[kk] = n
    j = G
    for m in range(kk - 1, -1, -1):
        i = opt[m, j]
        b[m] = cuts[i]
        j = i
    b[0] = 0
    c = np.empty(kk, np.float64)
    for m in range(kk):
        c[m] = (p1[b[m + 1]] - p1[b[m]]) / (b[m + 1] - b[m])
    # Lloyd on the sorted row: clusters are runs cut at the midpoints between centroids
    for _ in range(max_iter):
        changed = False
        start = 0
        for m in range(1, kk):
            nb = _lower_bound(x, start, n, shift, 0.5 * (c[m - 1] + c[m]))
            if nb != b[m]:
                b[m] = nb
                changed = True
            start = nb
        if not changed:
            break
        for m in range(kk):
            cnt = b[m + 1] - b[m]
            if cnt > 0:
                c[m] = (p1[b[m + 1]] - p1[b[m]]) / cnt
    for m in range(k):
        out[m] = c[m if m < kk else kk - 1] + shift


@njit(parallel=True, cache=True)
def _fit_sorted_rows_nb(xs, k, n_cuts, max_iter):  # pragma: no cover - compiled
    """Centroids float64 [R, k] of sorted float32 rows ``xs`` [R, n] (parallel over rows)."""
    R, n = xs.shape
    out = np.empty((R, k), np.float64)
    inv = _reciprocals(n)
    for r in prange(R):
        _fit_sorted_row(xs[r], k, n_cuts, max_iter, inv, out[r])
    return out


@njit(parallel=True, cache=True)
def _assign_nb(rows, cb):  # pragma: no cover - compiled
    """Code of the nearest centroid: rows float32 [R, K], cb float64 [R or 1, k] ascending -> uint8."""
    R, K = rows.shape
    k = cb.shape[1]
    shared = cb.shape[0] == 1
    codes = np.empty((R, K), np.uint8)
    for r in prange(R):
        c = cb[0] if shared else cb[r]
        mids = np.empty(max(k - 1, 1), np.float64)
        for j in range(k - 1):
            mids[j] = 0.5 * (c[j] + c[j + 1])  # exact for fp16 values
        for i in range(K):
            v = np.float64(rows[r, i])
            q = 0
            for j in range(k - 1):
                q += v > mids[j]
            codes[r, i] = q
    return codes


@njit(cache=True)
def _optimal_sorted_nb(x, k):  # pragma: no cover - compiled
    """Exact 1-D k-means of a sorted float64 row: (SSE, centroids [min(k, n)])."""
    n = x.shape[0]
    p1 = np.empty(n + 1, np.float64)
    p2 = np.empty(n + 1, np.float64)
    shift = centered_prefix_sums(x, p1, p2)
    p0 = np.arange(n + 1)
    inv = _reciprocals(n)
    kk = k if k < n else n
    opt = np.empty((kk, n + 1), np.int64)
    prev = np.empty(n + 1, np.float64)
    cur = np.empty(n + 1, np.float64)
    stack = np.empty((256, 4), np.int64)
    sse = _dp_cuts(p1, p2, p0, inv, kk, opt, prev, cur, stack)
    c = np.empty(kk, np.float64)
    j = n
    for m in range(kk - 1, -1, -1):
        i = opt[m, j]
        c[m] = (p1[j] - p1[i]) / (j - i) + shift
        j = i
    return sse, c


# --------------------------------------------------------------------------------------------------
# torch (CUDA) path
# --------------------------------------------------------------------------------------------------
_TORCH_DP_BYTES = 1 << 28  # bound on one [rows, G+1, G+1] float64 block


def _compander_cuts_torch(xs: torch.Tensor, n_cuts: int) -> torch.Tensor:
    """Batched :func:`_compander_cuts` (same weights): sorted float32 [R, n] -> int64 cuts [R, n_cuts+1].

    Unlike the numba version the cuts may repeat (empty groups); the DP handles that.
    """
    R, n = xs.shape
    if n <= n_cuts:  # short rows: every value its own group
        cuts = torch.cat([torch.arange(n + 1, device=xs.device), torch.full((n_cuts - n,), n, device=xs.device)])
        return cuts[None, :].expand(R, -1).contiguous()
    g = (xs[:, 1:] - xs[:, :-1]).contiguous()  # float32, as in numba
    gi = g.view(torch.int32)
    wi = (gi.to(torch.float64) * (2.0 / 3.0) + _ONE_BITS / 3.0).to(torch.int32)  # truncation, as numba
    w = torch.where(g > 0, wi.view(torch.float32).to(torch.float64), torch.zeros((), dtype=torch.float64, device=xs.device))
    for _ in range(2):
        w = torch.minimum(w, w.sum(1, keepdim=True) / n_cuts)
    cum = w.cumsum(1)
    step = cum[:, -1:] / n_cuts if n > 1 else torch.zeros(R, 1, dtype=torch.float64, device=xs.device)
    t = torch.arange(1, n_cuts, device=xs.device, dtype=torch.float64)[None, :]
    idx = torch.searchsorted(cum.contiguous(), (t * step).contiguous(), side="left") + 1
    zero = torch.zeros(R, 1, dtype=torch.int64, device=xs.device)
    return torch.cat([zero, idx.clamp_max(n), zero + n], 1)


def _fit_sorted_torch(xs: torch.Tensor, k: int, n_cuts: int, max_iter: int) -> torch.Tensor:
    """Batched version of ``_fit_sorted_row``: sorted float32 rows [R, n] -> float64 centroids [R, k].

    The DP over the ``n_cuts`` groups is a dense min-plus product per cluster (fine on a GPU).
    """
    if n_cuts < k:
        raise ValueError(f"n_cuts ({n_cuts}) must be at least k ({k})")
    R, n = xs.shape
    dev = xs.device
    x64 = xs.to(torch.float64)
    shift = x64.mean(1, keepdim=True)
    xc = x64 - shift
    zeros = torch.zeros(R, 1, dtype=torch.float64, device=dev)
    p1 = torch.cat([zeros, xc.cumsum(1)], 1)
    p2 = torch.cat([zeros, (xc * xc).cumsum(1)], 1)
    cuts = _compander_cuts_torch(xs, n_cuts)  # [R, E]
    E = cuts.shape[1]
    G = E - 1
    q1, q2, q0 = p1.gather(1, cuts), p2.gather(1, cuts), cuts.to(torch.float64)
    out = torch.empty(R, k, dtype=torch.float64, device=dev)
    chunk = max(1, _TORCH_DP_BYTES // (8 * E * E))
    upper = torch.triu(torch.ones(E, E, dtype=torch.bool, device=dev), diagonal=1)  # i < j
    for a in range(0, R, chunk):
        s = slice(a, a + chunk)
        cnt = q0[s, None, :] - q0[s, :, None]
        s1 = q1[s, None, :] - q1[s, :, None]
        cost = (q2[s, None, :] - q2[s, :, None]) - s1 * s1 / cnt.clamp_min(1)
        cost = torch.where(upper, cost.clamp_min(0), torch.full_like(cost, float("inf")))
        del cnt, s1
        D = torch.full((cost.shape[0], E), float("inf"), dtype=torch.float64, device=dev)
        D[:, 0] = 0
        args = []
        for _ in range(k):
            D, arg = (D[:, :, None] + cost).min(1)
            args.append(arg)
        j = torch.full((cost.shape[0], 1), G, dtype=torch.int64, device=dev)
        bounds = [torch.full_like(j, n)]
        for m in range(k - 1, -1, -1):
            j = args[m].gather(1, j)
            bounds.append(cuts[s].gather(1, j))
        b = torch.cat(bounds[::-1], 1)  # [r, k+1] element boundaries
        out[s] = _lloyd_torch(xc[s], p1[s], b, max_iter)
    return out + shift


def _lloyd_torch(xc: torch.Tensor, p1: torch.Tensor, b: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd on sorted centred rows from boundaries ``b`` [R, k+1]; returns centred centroids [R, k]."""
    n = xc.shape[1]

    def centroids(b: torch.Tensor, old: Optional[torch.Tensor]) -> torch.Tensor:
        cnt = (b[:, 1:] - b[:, :-1]).to(torch.float64)
        c = (p1.gather(1, b[:, 1:]) - p1.gather(1, b[:, :-1])) / cnt.clamp_min(1)
        if old is None:  # empty cluster at start: the value at its boundary
            old = xc.gather(1, b[:, :-1].clamp_max(n - 1))
        return torch.where(cnt > 0, c, old)

    c = centroids(b, None).sort(1).values
    edges = b[:, :1], b[:, -1:]
    for _ in range(max_iter):
        mids = 0.5 * (c[:, 1:] + c[:, :-1])
        nb = torch.cat([edges[0], torch.searchsorted(xc, mids.contiguous(), side="left"), edges[1]], 1)
        if torch.equal(nb, b):
            break
        b = nb
        c = centroids(b, c)
    return c


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------
def _to_fp16_sorted(centroids: torch.Tensor) -> torch.Tensor:
    """Round float centroids [R, k] to fp16 (saturating), sorted ascending per row."""
    return centroids.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).sort(1).values


def assign_nearest(rows: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """uint8 codes ``[R, K]`` of the nearest entry of an ascending ``codebook`` ``[R or 1, k]``.

    Ties (a value exactly between two entries) go to the lower entry.
    """
    backend = _backend(rows, backend)
    if backend == "numba":
        r = rows.detach().cpu().numpy().astype(np.float32, copy=False)
        cb = codebook.detach().cpu().to(torch.float64).numpy()
        return torch.from_numpy(_assign_nb(np.ascontiguousarray(r), np.ascontiguousarray(cb))).to(rows.device)
    cb = codebook.to(device=rows.device, dtype=torch.float64)
    mids = 0.5 * (cb[:, 1:] + cb[:, :-1])
    r64 = rows.to(torch.float64)
    if cb.shape[0] == 1:
        codes = torch.bucketize(r64, mids[0].contiguous(), right=False)
    else:
        codes = torch.searchsorted(mids.contiguous(), r64.contiguous(), side="left")
    return codes.to(torch.uint8)


def _backend(x: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        return "numba" if x.device.type == "cpu" else "torch"
    if backend not in ("numba", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use 'auto', 'numba' or 'torch'")
    return backend


def _fit_sorted(xs: torch.Tensor, k: int, n_cuts: int, max_iter: int, backend: str) -> torch.Tensor:
    if backend == "numba":
        arr = np.ascontiguousarray(xs.detach().cpu().numpy().astype(np.float32, copy=False))
        return torch.from_numpy(_fit_sorted_rows_nb(arr, k, n_cuts, max_iter)).to(xs.device)
    return _fit_sorted_torch(xs, k, n_cuts, max_iter)


def _sort_rows(rows: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "numba":  # numpy's SIMD sort is much faster than torch's on CPU
        return torch.from_numpy(np.sort(rows.detach().cpu().numpy().astype(np.float32, copy=False), axis=1))
    return rows.sort(1).values


def kmeans1d_rows(
    rows: torch.Tensor,
    k: int,
    n_cuts: Optional[int] = None,
    max_iter: int = MAX_ITER,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One k-entry codebook per row: float32 ``[R, K]`` -> (uint8 codes ``[R, K]``, fp16 codebook ``[R, k]``).

    ``n_cuts``: histogram groups of the DP initialisation (default :func:`row_cuts`).
    """
    backend = _backend(rows, backend)
    rows = rows.to(torch.float32)
    n_cuts = row_cuts(k) if n_cuts is None else int(n_cuts)
    cent = _fit_sorted(_sort_rows(rows, backend), k, n_cuts, max_iter, backend)
    cb = _to_fp16_sorted(cent.to(rows.device))
    return assign_nearest(rows, cb, backend), cb


def kmeans1d_tensor(
    rows: torch.Tensor,
    k: int,
    n_cuts: int = TENSOR_CUTS,
    max_iter: int = MAX_ITER,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One k-entry codebook for all values: float32 ``[R, K]`` -> (codes ``[R, K]``, fp16 codebook ``[1, k]``)."""
    backend = _backend(rows, backend)
    n_cuts = max(int(n_cuts), k)
    rows = rows.to(torch.float32)
    flat = rows.reshape(1, -1)
    if backend == "numba":
        xs = torch.from_numpy(np.sort(flat.detach().cpu().numpy().astype(np.float32, copy=False), axis=1))
    else:
        xs = flat.sort(1).values
    cent = _fit_sorted(xs, k, n_cuts, max_iter, backend)
    cb = _to_fp16_sorted(cent.to(rows.device))
    return assign_nearest(rows, cb, backend), cb


def kmeans1d_optimal(x, k: int) -> Tuple[float, np.ndarray]:
    """Exact 1-D k-means (DP, as Ckmeans.1d.dp): 1-D values -> (SSE, centroids float64 ``[min(k, n)]``).

    ``O(k n log n)``: a reference for tests and benchmarks, not a quantizer.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    xs = np.sort(arr.astype(np.float64).reshape(-1))
    if xs.size == 0:
        raise ValueError("kmeans1d_optimal needs at least one value")
    sse, c = _optimal_sorted_nb(xs, int(k))
    return float(sse), c
