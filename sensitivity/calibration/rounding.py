"""Data-aware weight rounding: pure tensor math on one layer.

Every function works on the layer's weight as rows ``W`` float32 ``[C, K]`` (``K`` = inputs per
output channel, conv weights flattened as ``weight.reshape(C, -1)``) and the input second moment
``H = E[x xᵀ]`` float ``[K, K]`` of the layer's inputs (conv: unfolded patches), so that the
layer's mean squared output error of a quantized ``Ŵ`` is :func:`output_error`
``tr((Ŵ - W) H (Ŵ - W)ᵀ)``. The grid is the option's stored ``table`` float32 ``[C or 1, L]``
(``L = 2^bits``; ``table[r, q]`` is the value of code ``q`` in row ``r``), so every result keeps the
option's bit width and parameter sizes:

* :func:`gptq_codes` — GPTQ (Frantar et al. 2023): codes chosen column by column (largest
  ``H`` diagonal first), each column's rounding error fed back into the not yet quantized columns
  through the inverse Hessian's Cholesky factor. Works on any table (uniform or codebook).
* :func:`adaround_codes` — AdaRound (Nagel et al. 2020) on a uniform table: every weight learns to
  round down or up (rectified sigmoid, annealed regulariser) to minimise the output error.
* :func:`refit_table` — codes fixed, the stored params refit by least squares on the output error
  (k-means codebooks: every entry; UAQ: per-row scale and offset; int8: the scale).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..errors import SensitivityError
from ..quantizers.fp8 import FP8E4M3PerTensor
from ..quantizers.int8 import Int8Symmetric
from ..quantizers.kmeans import KMeansPerChannel, KMeansPerTensor
from ..quantizers.uaq import UniformAffine, UniformAffinePerGroup
from ..registry import HandlerRegistry


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((Ŵ - W) H (Ŵ - W)ᵀ)``: the layer's mean squared output error over the inputs of ``H``."""
    D = (W_hat - W).double()
    return float(((D @ H.double()) * D).sum())


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """:func:`output_error` divided by ``tr(W H Wᵀ)`` (0 = exact)."""
    Wd = W.double()
    ref = float(((Wd @ H.double()) * Wd).sum())
    return output_error(W, W_hat, H) / ref if ref > 0 else 0.0


def lookup_codes(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Values ``[C, K]`` of ``codes`` uint8 ``[C, K]`` under ``table`` ``[C or 1, L]``."""
    t = table.to(torch.float32)
    if t.shape[0] == 1:
        return t[0][codes.long()]
    return torch.gather(t, 1, codes.long())


def nearest_codes(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest: the code of the table entry closest to every value of ``values [C, n]``."""
    t = table.to(values.dtype)
    t = t.expand(values.shape[0], -1) if t.shape[0] == 1 else t
    order = torch.argsort(t, dim=1)
    ts = torch.gather(t, 1, order).contiguous()
    idx = torch.searchsorted(ts, values.contiguous()).clamp(1, ts.shape[1] - 1)
    left = torch.gather(ts, 1, idx - 1)
    right = torch.gather(ts, 1, idx)
    pick = torch.where((values - left).abs() <= (right - values).abs(), idx - 1, idx)
    return torch.gather(order, 1, pick).to(torch.uint8)


def _damped(H: torch.Tensor, damp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    mean = float(torch.diag(H).mean())
    H += damp * mean * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, dead


@torch.no_grad()
def gptq_codes(W: torch.Tensor, H: torch.Tensor, table: torch.Tensor, *, damp: float = 0.01,
               block: int = 128, act_order: bool = True) -> torch.Tensor:
    """GPTQ codes uint8 ``[C, K]`` of ``W [C, K]`` on the fixed grid ``table`` for inputs with moment ``H``.

    ``damp``: added to ``H``'s diagonal as a fraction of its mean (GPTQ's percdamp); ``act_order``:
    quantize the columns with the largest ``H`` diagonal first. Columns whose inputs are always zero
    are rounded to nearest (they do not affect the output).
    """
    C, K = W.shape
    if H.shape != (K, K):
        raise SensitivityError(f"GPTQ: Hessian of shape {tuple(H.shape)} for a weight of {K} inputs")
    Hd, dead = _damped(H, damp)
    W = W.to(torch.float64).clone()
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(K)
    inv = torch.argsort(perm)
    W, Hd, dead = W[:, perm], Hd[perm][:, perm], dead[perm]
    try:
        L = torch.linalg.cholesky(Hd)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError:  # numerically not positive definite: more damping
        return gptq_codes(W[:, inv].float(), H, table, damp=max(10 * damp, 0.1), block=block, act_order=act_order)
    tab = table.to(torch.float64)
    codes = torch.empty(C, K, dtype=torch.uint8)
    for a in range(0, K, block):
        b = min(K, a + block)
        W1 = W[:, a:b].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[a:b, a:b]
        for i in range(b - a):
            w = W1[:, i]
            q = nearest_codes(w[:, None], tab)
            codes[:, a + i] = q[:, 0]
            if dead[a + i]:
                continue
            v = lookup_codes(tab, q)[:, 0].to(torch.float64)
            err = (w - v) / U1[i, i]
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b:] -= E1 @ U[a:b, b:]
    return codes[:, inv].contiguous()


def uniform_grid(table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(first value [C], step [C])`` of a uniform table (``table[r, q] = first[r] + q * step[r]``);
    raises if the table is not uniform."""
    t = table.to(torch.float64)
    step = t[:, 1] - t[:, 0]
    pred = t[:, :1] + torch.arange(t.shape[1], dtype=torch.float64)[None, :] * step[:, None]
    if not torch.allclose(pred, t, rtol=1e-5, atol=1e-7 * float(t.abs().max().clamp_min(1e-30))) or (step <= 0).any():
        raise SensitivityError("AdaRound needs a uniform, increasing grid (uaq / int8 options)")
    return t[:, 0], step


def adaround_codes(W: torch.Tensor, H: torch.Tensor, table: torch.Tensor, *, iters: int = 1000,
                   lr: float = 1e-2, reg: float = 0.01, beta: Tuple[float, float] = (20.0, 2.0),
                   warmup: float = 0.2, seed: int = 0) -> torch.Tensor:
    """AdaRound codes uint8 ``[C, K]`` of ``W`` on the uniform grid ``table`` for inputs with moment ``H``.

    Loss: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) + reg * Σ (1 - |2h(V) - 1|^β)`` averaged over weights, with
    ``β`` annealed from ``beta[0]`` to ``beta[1]`` after the first ``warmup`` fraction of the
    ``iters`` Adam steps (``lr``); each weight starts at its fractional position (the round-to-nearest
    solution's soft equivalent). The result rounds ``h(V) >= 0.5`` up.
    """
    torch.manual_seed(int(seed))
    first, step = uniform_grid(table)
    first = first.to(torch.float32)[:, None]
    step = step.to(torch.float32)[:, None]
    levels = table.shape[1] - 1
    W = W.to(torch.float32)
    pos = ((W - first) / step).clamp(0, levels)
    base = torch.floor(pos).clamp(max=levels - 1)
    rest = (pos - base).clamp(1e-4, 1 - 1e-4)
    zeta, gamma = 1.1, -0.1
    V = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
    Hf = H.to(torch.float32)
    ref = float(((W @ Hf) * W).sum().clamp_min(1e-30))
    opt = torch.optim.Adam([V], lr=lr)
    n_warm = int(warmup * iters)
    for it in range(int(iters)):
        h = (torch.sigmoid(V) * (zeta - gamma) + gamma).clamp(0, 1)
        W_soft = first + (base + h) * step
        D = W_soft - W
        loss = ((D @ Hf) * D).sum() / ref
        if it >= n_warm:
            frac = (it - n_warm) / max(1, iters - n_warm)
            b = beta[1] + (beta[0] - beta[1]) * 0.5 * (1 + math.cos(math.pi * frac))
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = (torch.sigmoid(V) * (zeta - gamma) + gamma).clamp(0, 1)
        q = (base + (h >= 0.5).float()).clamp(0, levels)
    return q.to(torch.uint8)


# ----------------------------------------------------------------------------- table refits
def _code_moments(codes: torch.Tensor, H: torch.Tensor, W: torch.Tensor, L: int, row: int):
    """``(A = Sᵀ H S [L, L], b = Sᵀ H w [L])`` for row ``row`` (``S`` = one-hot of its codes, ``[K, L]``)."""
    c = codes[row].long()
    S = torch.zeros(codes.shape[1], L, dtype=torch.float64)
    S[torch.arange(codes.shape[1]), c] = 1.0
    HS = H @ S
    return S.T @ HS, HS.T @ W[row].to(torch.float64)


def _solve(A: torch.Tensor, b: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Least-squares solve; entries of unused codes (zero rows of ``A``) keep ``fallback``."""
    used = torch.diag(A) > 0
    out = fallback.to(torch.float64).clone()
    if used.any():
        Au = A[used][:, used]
        Au = Au + 1e-9 * float(torch.diag(Au).mean()) * torch.eye(Au.shape[0], dtype=Au.dtype)
        out[used] = torch.linalg.lstsq(Au, b[used, None]).solution[:, 0]
    return out


def _refit_codebook_rows(W, H, codes, params):
    cb = params["codebook"].to(torch.float64)
    L = cb.shape[1]
    out = cb.clone()
    for r in range(W.shape[0]):
        A, b = _code_moments(codes, H, W, L, r)
        out[r] = _solve(A, b, cb[r])
    return {"codebook": out.to(params["codebook"].dtype)}


def _refit_codebook_shared(W, H, codes, params):
    cb = params["codebook"].to(torch.float64)
    L = cb.shape[1]
    A = torch.zeros(L, L, dtype=torch.float64)
    b = torch.zeros(L, dtype=torch.float64)
    for r in range(W.shape[0]):
        Ar, br = _code_moments(codes, H, W, L, r)
        A += Ar
        b += br
    return {"codebook": _solve(A, b, cb[0])[None, :].to(params["codebook"].dtype)}


def _refit_affine_rows(W, H, codes, params):
    """UAQ: ``ŵ = (q - z) Δ = Δ q + c`` per row; (Δ, c) by least squares, then ``z = -c / Δ``."""
    scale = params["scale"].to(torch.float64).reshape(-1)
    zero = params["zero"].to(torch.float64).reshape(-1)
    new_s, new_z = scale.clone(), zero.clone()
    for r in range(W.shape[0]):
        q = codes[r].to(torch.float64)
        X = torch.stack([q, torch.ones_like(q)], 1)  # [K, 2]
        HX = H @ X
        A = X.T @ HX
        b = HX.T @ W[r].to(torch.float64)
        try:
            s, c = torch.linalg.solve(A + 1e-12 * torch.eye(2, dtype=A.dtype) * float(torch.diag(A).mean()), b)
        except RuntimeError:
            continue
        if not (math.isfinite(float(s)) and float(s) > 0):
            continue
        new_s[r], new_z[r] = s, -c / s
    return {"scale": new_s.to(params["scale"].dtype).reshape(params["scale"].shape),
            "zero": new_z.to(params["zero"].dtype).reshape(params["zero"].shape)}


def _refit_scale(W, H, codes, params, offset: float, shared: bool):
    """int8-style symmetric: ``ŵ = s (q - offset)``; ``s`` per row (or shared) by least squares."""
    scale = params["scale"].to(torch.float64).reshape(-1)
    Q = codes.to(torch.float64) - offset
    QH = Q @ H
    num = (QH * W.to(torch.float64)).sum(1)
    den = (QH * Q).sum(1)
    if shared:
        s = num.sum() / den.sum() if den.sum() > 0 else scale[0]
        out = s.reshape(scale.shape) if scale.numel() == 1 else torch.full_like(scale, float(s))
    else:
        out = torch.where(den > 0, num / den.clamp_min(1e-300), scale)
    return {"scale": out.to(params["scale"].dtype).reshape(params["scale"].shape)}


#: quantization-method class -> ``f(method, W, H, codes, params)``: its stored params refit by least
#: squares with the codes fixed (a method without one has no ``refine`` step; GPTQ still works on its table)
TABLE_REFITS = HandlerRegistry("least-squares table refit")
TABLE_REFITS.register(KMeansPerChannel, handler=lambda m, W, H, c, p: _refit_codebook_rows(W, H, c, p))
TABLE_REFITS.register(KMeansPerTensor, handler=lambda m, W, H, c, p: _refit_codebook_shared(W, H, c, p))
TABLE_REFITS.register(UniformAffine, handler=lambda m, W, H, c, p: _refit_affine_rows(W, H, c, p))
TABLE_REFITS.register(Int8Symmetric, handler=lambda m, W, H, c, p: _refit_scale(W, H, c, p, 128.0, shared=not m.per_row))
TABLE_REFITS.unsupported(FP8E4M3PerTensor, "the e4m3 grid's scale refit is not implemented (GPTQ rounds on its table)")
TABLE_REFITS.unsupported(UniformAffinePerGroup, "not a single-table method (a scale and zero point per group of a row)")


@torch.no_grad()
def refit_table(method: str, W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor,
                params: Dict[str, torch.Tensor], damp: float = 1e-4) -> Dict[str, torch.Tensor]:
    """New params (same names, shapes and dtypes) minimising the output error with ``codes`` fixed.

    ``method``: the option's method name (its class keys :data:`TABLE_REFITS`); ``damp``: ridge on ``H`` as a fraction
    of its mean diagonal (keeps rows of rarely used codes well posed).
    """
    from ..quantizers import get_method

    m = get_method(method)
    fn = TABLE_REFITS.get(m)
    Hd = H.to(torch.float64)
    Hd = Hd + damp * float(torch.diag(Hd).mean().clamp_min(1e-30)) * torch.eye(Hd.shape[0], dtype=Hd.dtype)
    out = fn(m, W.to(torch.float64), Hd, codes, params)
    for k, v in out.items():
        if not torch.isfinite(v.float()).all():
            return {k2: v2.clone() for k2, v2 in params.items()}
    return out
