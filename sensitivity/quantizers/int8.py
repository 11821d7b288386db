"""INT8 weights, symmetric min-max: ``int8`` (one scale per tensor, as the AMD Quark UNet seed) and
``int8_c`` (one scale per output channel).

``scale = max|w| / 127.5`` (the symmetric rule of torch.ao's MinMaxObserver for qint8,
``amax / ((qmax - qmin) / 2)``), ``q = clamp(round_half_even(w / scale), -128, 127)``, value
``q * scale``; scale stored float32. Codes are ``q + 128`` (uint8). An all-zero tensor / row gets
scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .base import MethodConfig, TableMethod, register_method


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """``per_row``: one scale per output channel (else one per tensor)."""

    per_row: bool = False


class Int8Symmetric(TableMethod):
    """Symmetric INT8, per tensor (``per_row=False``) or per output channel; params ``{"scale"}`` float32."""

    config_class = Int8Config
    fixed_bits = 8
    allowed_bits = (8,)

    @property
    def per_row(self) -> bool:
        return self.config.per_row

    def param_layout(self, bits: int, shape: Sequence[int]):
        return {"scale": ((int(shape[0]) if self.per_row else 1,), "float32")}

    def scale(self, rows):
        """float32 ``[R or 1]`` scales of float32 ``rows`` ``[R, K]``."""
        import torch

        amax = rows.abs().amax(1) if self.per_row else rows.abs().amax().reshape(1)
        scale = (amax / 127.5).to(torch.float32)
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def quantize_rows(self, rows, bits: int):
        import torch

        rows = rows.to(torch.float32)
        scale = self.scale(rows)
        q = torch.clamp(torch.round(rows / scale[:, None]), -128, 127)
        return (q + 128).to(torch.uint8), {"scale": scale}

    def table(self, params: Mapping[str, Any], bits: int):
        import torch

        s = params["scale"].to(torch.float32).reshape(-1, 1)
        return (torch.arange(256, dtype=torch.float32, device=s.device) - 128.0)[None, :] * s


register_method(Int8Symmetric("int8", Int8Config(per_row=False)))
register_method(Int8Symmetric("int8_c", Int8Config(per_row=True)))
