"""Uniform affine methods: ``uaq`` (per output channel, clipping search), ``uaq_ls`` (+ least-squares
refit) and ``uaq_g<N>`` (per group of N input values).

The math (clipping grid, numba / torch kernels) is in :mod:`sensitivity.quantizers.uniform`; this
module holds the method classes, their configs and their registration, and imports torch lazily.

``uaq_ls`` starts from the ``uaq`` solution and refits each row's scale and zero point by least
squares on the assigned codes (``w ≈ scale * (q - zero)``, zero no longer an integer), then reassigns
the codes to the refitted grid, twice; a row keeps the refit only where its squared error (on the
stored fp16 values) is lower, so it is never worse than ``uaq``. It is its own option, not a change
of ``uaq``: ``uaq`` stays the reference's method bit for bit, so caches labelled with it stay valid.
Measured on digits-dit and Student-t rows (``benchmarks/bench_multiquantizer.py``, README): see
``docs/quantization_methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Tuple

from ..errors import SensitivityError
from .base import MethodConfig, QuantMethod, TableMethod, register_method, register_method_family

#: clipping ratios searched per row, descending (1.0 = no clipping); see uniform.py
CLIP_RATIOS: Tuple[float, ...] = tuple(
    [round(1.0 - 0.01 * i, 2) for i in range(51)] + [round(0.48 - 0.02 * i, 2) for i in range(19)]
)


def _check_ratios(ratios: Tuple[float, ...]) -> None:
    if not ratios or any(not (0.0 < float(r) <= 1.0) for r in ratios):
        raise SensitivityError(f"clip_ratios must be a non-empty list of values in (0, 1], got {list(ratios)}")


@dataclass(frozen=True)
class UAQConfig(MethodConfig):
    """``clip_ratios``: candidate ratios of the row's range; ``least_squares_refit``: see module doc."""

    clip_ratios: Tuple[float, ...] = CLIP_RATIOS
    least_squares_refit: bool = False
    refit_iterations: int = 2

    def validate(self) -> None:
        _check_ratios(self.clip_ratios)
        if not isinstance(self.refit_iterations, int) or self.refit_iterations < 1:
            raise SensitivityError(f"refit_iterations must be a positive integer, got {self.refit_iterations!r}")


class UniformAffine(TableMethod):
    """UAQ: per-row asymmetric uniform grid; params ``{"scale": [C], "zero": [C]}`` fp16.

    ``table[r, q] = (q - zero[r]) * scale[r]``.
    """

    config_class = UAQConfig

    def __init__(self, name: str = "uaq", config: UAQConfig | None = None, backend: str = "auto"):
        super().__init__(name, config)
        self.backend = backend  # numba (CPU) or torch: the same errors, not a setting

    def param_layout(self, bits: int, shape: Sequence[int]):
        c = int(shape[0])
        return {"scale": ((c,), "float16"), "zero": ((c,), "float16")}

    def quantize_rows(self, rows, bits: int):
        import torch

        from .uniform import uaq_codes, uaq_params

        rows = rows.to(torch.float32)
        ratios = torch.tensor(self.config.clip_ratios, dtype=torch.float32, device=rows.device)
        scale, zero, _ = uaq_params(rows, bits, ratios, self.backend)
        codes = uaq_codes(rows, scale, zero, bits)
        if self.config.least_squares_refit:
            codes, scale, zero = least_squares_refit(rows, codes, scale, zero, bits, self.config.refit_iterations)
        return codes, {"scale": scale, "zero": zero}

    def table(self, params: Mapping[str, Any], bits: int):
        import torch

        d = params["scale"].to(torch.float32).reshape(-1, 1)
        z = params["zero"].to(torch.float32).reshape(-1, 1)
        q = torch.arange(2**bits, dtype=torch.float32, device=d.device)[None, :]
        return (q - z) * d


def _row_sse(rows, codes, scale, zero):
    import torch

    d = scale.to(torch.float32)[:, None]
    z = zero.to(torch.float32)[:, None]
    return (((codes.to(torch.float32) - z) * d - rows) ** 2).sum(1, dtype=torch.float64)


def least_squares_refit(rows, codes, scale, zero, bits: int, iterations: int = 2):
    """Refit per-row ``scale``/``zero`` (fp16 ``[R]``) to ``rows`` (float32 ``[R, K]``) by least squares.

    Returns ``(codes uint8 [R, K], scale fp16 [R], zero fp16 [R])``; each row keeps the refit only if
    its squared error on the stored fp16 values is lower than before.
    """
    import torch

    levels = 2**bits - 1
    w = rows.to(torch.float64)
    best_err = _row_sse(rows, codes, scale, zero)
    best_c, best_s, best_z = codes.clone(), scale.clone(), zero.clone()
    q = codes.to(torch.float64)
    for _ in range(iterations):
        qm = q.mean(1, keepdim=True)
        wm = w.mean(1, keepdim=True)
        var = ((q - qm) ** 2).sum(1)
        cov = ((q - qm) * (w - wm)).sum(1)
        ok = var > 0
        a = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), best_s.to(torch.float64))
        s16 = a.clamp(-65504.0, 65504.0).to(torch.float16)
        ok = ok & (s16.to(torch.float64) > 0)
        s = torch.where(ok, s16.to(torch.float64), best_s.to(torch.float64))
        b = wm[:, 0] - s * qm[:, 0]
        z16 = (-b / s).clamp(-65504.0, 65504.0).to(torch.float16)
        s16 = s.to(torch.float16)
        d = s16.to(torch.float32)[:, None]
        zf = z16.to(torch.float32)[:, None]
        c = torch.clamp(torch.round(rows / d + zf), 0, levels).to(torch.uint8)
        err = _row_sse(rows, c, s16, z16)
        better = (err < best_err) & ok
        best_err = torch.where(better, err, best_err)
        best_c[better] = c[better]
        best_s = torch.where(better, s16, best_s)
        best_z = torch.where(better, z16, best_z)
        q = c.to(torch.float64)
    return best_c, best_s, best_z


@dataclass(frozen=True)
class GroupConfig(MethodConfig):
    """``group_size``: consecutive input values of a row sharing one scale and zero point."""

    group_size: int = 128
    clip_ratios: Tuple[float, ...] = CLIP_RATIOS

    def validate(self) -> None:
        _check_ratios(self.clip_ratios)
        if not isinstance(self.group_size, int) or not 2 <= self.group_size <= 1 << 20:
            raise SensitivityError(f"group_size must be an integer >= 2, got {self.group_size!r}")


class UniformAffinePerGroup(QuantMethod):
    """UAQ per group of ``group_size`` values of each row (the last group of a row may be shorter).

    Params ``{"scale": [C, G], "zero": [C, G]}`` fp16 with ``G = ceil(K / group_size)``; the clipping
    search of ``uaq`` runs on every group.
    """

    config_class = GroupConfig

    def __init__(self, name: str, config: GroupConfig | None = None, backend: str = "auto"):
        super().__init__(name, config)
        self.backend = backend

    def groups(self, k: int) -> int:
        return math.ceil(k / self.config.group_size)

    def param_layout(self, bits: int, shape: Sequence[int]):
        c = int(shape[0])
        k = math.prod(shape) // c
        return {"scale": ((c, self.groups(k)), "float16"), "zero": ((c, self.groups(k)), "float16")}

    def _expand(self, p, k: int):
        import torch

        return p.to(torch.float32).repeat_interleave(self.config.group_size, dim=1)[:, :k]

    def quantize_rows(self, rows, bits: int):
        import torch

        from .uniform import uaq_params

        rows = rows.to(torch.float32)
        r, k = rows.shape
        g = self.config.group_size
        full = k // g
        ratios = torch.tensor(self.config.clip_ratios, dtype=torch.float32, device=rows.device)
        scales, zeros = [], []
        if full:
            s, z, _ = uaq_params(rows[:, : full * g].reshape(r * full, g), bits, ratios, self.backend)
            scales.append(s.reshape(r, full))
            zeros.append(z.reshape(r, full))
        if k - full * g:
            s, z, _ = uaq_params(rows[:, full * g :].contiguous(), bits, ratios, self.backend)
            scales.append(s.reshape(r, 1))
            zeros.append(z.reshape(r, 1))
        scale, zero = torch.cat(scales, 1), torch.cat(zeros, 1)
        d, zf = self._expand(scale, k), self._expand(zero, k)
        codes = torch.clamp(torch.round(rows / d) + zf, 0, 2**bits - 1).to(torch.uint8)
        return codes, {"scale": scale, "zero": zero}

    def dequantize_rows(self, codes, params: Mapping[str, Any], bits: int, out=None):
        import torch

        k = codes.shape[1]
        d = self._expand(params["scale"].to(codes.device), k)
        z = self._expand(params["zero"].to(codes.device), k)
        if out is None:
            return (codes.to(torch.float32) - z) * d
        torch.sub(codes.to(torch.float32), z, out=out)
        return out.mul_(d)


register_method(UniformAffine("uaq"), aliases=("mse",))
register_method(UniformAffine("uaq_ls", UAQConfig(least_squares_refit=True)))
register_method_family(r"uaq_g([0-9]+)", lambda m: UniformAffinePerGroup(m.group(0), GroupConfig(group_size=int(m.group(1)))),
                       "uaq_g<N> (e.g. uaq_g128)", member="uaq_g128")
