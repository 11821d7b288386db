"""K-Means methods: ``kmeans_c`` (a 1-D k-means codebook per output channel) and ``kmeans_a`` (one
codebook for the whole tensor). The clustering is :mod:`sensitivity.quantizers.kmeans1d` (imported
lazily); codebooks are stored fp16, codes are the nearest stored entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import SensitivityError
from .base import MethodConfig, TableMethod, register_method


@dataclass(frozen=True)
class KMeansConfig(MethodConfig):
    """DP initialisation groups (``cuts_per_entry * k + cuts_offset`` per row, ``tensor_cuts`` per
    tensor) and the Lloyd iteration cap; see :mod:`sensitivity.quantizers.kmeans1d`."""

    cuts_per_entry: int = 8
    cuts_offset: int = 16
    tensor_cuts: int = 2048
    max_iter: int = 300

    def validate(self) -> None:
        for name in ("cuts_per_entry", "tensor_cuts", "max_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SensitivityError(f"k-means setting {name} must be a positive integer, got {v!r}")
        if not isinstance(self.cuts_offset, int) or self.cuts_offset < 0:
            raise SensitivityError(f"k-means setting cuts_offset must be an integer >= 0, got {self.cuts_offset!r}")


class _KMeans(TableMethod):
    config_class = KMeansConfig
    per_row: bool = True
    compute_bits = 16  # the codebook values are fp16

    def __init__(self, name: str, config: KMeansConfig | None = None, backend: str = "auto"):
        super().__init__(name, config)
        self.backend = backend

    def param_layout(self, bits: int, shape: Sequence[int]):
        rows = int(shape[0]) if self.per_row else 1
        return {"codebook": ((rows, 2**bits), "float16")}

    def quantize_rows(self, rows, bits: int):
        from . import kmeans1d

        k, cfg = 2**bits, self.config
        if self.per_row:
            codes, cb = kmeans1d.kmeans1d_rows(rows, k, cfg.cuts_per_entry * k + cfg.cuts_offset, cfg.max_iter, self.backend)
        else:
            codes, cb = kmeans1d.kmeans1d_tensor(rows, k, cfg.tensor_cuts, cfg.max_iter, self.backend)
        return codes, {"codebook": cb}

    def table(self, params: Mapping[str, Any], bits: int):
        import torch

        return params["codebook"].to(torch.float32).reshape(-1, 2**bits)


class KMeansPerChannel(_KMeans):
    """``kmeans_c``: codebook ``[C, 2**bits]`` fp16."""

    per_row = True


class KMeansPerTensor(_KMeans):
    """``kmeans_a``: codebook ``[1, 2**bits]`` fp16."""

    per_row = False


register_method(KMeansPerChannel("kmeans_c"), aliases=("kmeans",))
register_method(KMeansPerTensor("kmeans_a"), aliases=("kmeans_all",))
