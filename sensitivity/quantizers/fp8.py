"""FP8-E4M3 weights with one float32 scale per tensor (``fp8_e4m3``, as the AMD Quark UNet seed).

``scale = max|w| / 448`` (448 = largest E4M3 value), codes = the ``float8_e4m3fn`` bit patterns of
``w / scale`` (torch's cast: round to nearest even), value ``e4m3(code) * scale``. An all-zero
tensor gets scale 1.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .base import TableMethod, register_method

E4M3_MAX = 448.0


class FP8E4M3PerTensor(TableMethod):
    """``fp8_e4m3``: params ``{"scale": [1]}`` float32; table ``[1, 256]``."""

    fixed_bits = 8
    compute_bits = 8
    allowed_bits = (8,)

    def param_layout(self, bits: int, shape: Sequence[int]):
        return {"scale": ((1,), "float32")}

    def quantize_rows(self, rows, bits: int):
        import torch

        rows = rows.to(torch.float32)
        scale = (rows.abs().amax() / E4M3_MAX).to(torch.float32).reshape(1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = (rows / scale).clamp(-E4M3_MAX, E4M3_MAX)
        return x.to(torch.float8_e4m3fn).view(torch.uint8), {"scale": scale}

    def table(self, params: Mapping[str, Any], bits: int):
        import torch

        s = params["scale"].to(torch.float32).reshape(1, 1)
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        return values.to(s.device)[None, :] * s


register_method(FP8E4M3PerTensor("fp8_e4m3"), aliases=("fp8",))
