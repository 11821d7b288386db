"""Sizes and byte budgets of the search: the DataFrame view of :class:`sensitivity.sizes.SizeTable`, budgets."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

from ..errors import SensitivityError
from ..options import canonical
from ..sizes import SizeTable


# ---------------------------------------------------------------------------------------------
# sizes and budgets
# ---------------------------------------------------------------------------------------------


def size_table(source: Any, options: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Bytes per (layer, option) as a DataFrame ``layer, option, nbytes, fp16_bytes[, error, sse, ...]``:
    the DataFrame view of :class:`sensitivity.sizes.SizeTable` (which every size below is computed with).

    ``source``: a multiquantizer, a SizeTable, such a DataFrame (returned validated and canonical, its
    extra columns kept), a cache's layer stats ``{layer: {"fp16_bytes": int, "options": {option:
    [nbytes, error]}}}`` (``ConfigCache.layer_stats``), or ``{layer: shape}`` (sizes from
    :mod:`sensitivity.options`; no errors). ``options`` restricts the option set. Rows follow the source's order.
    """
    table = SizeTable.of(source, options)
    if not isinstance(source, pd.DataFrame):
        return table.frame()
    df = source.assign(option=[canonical(o) for o in source["option"]])
    if options is not None:
        df = df[df["option"].isin(table.options)]
    df = df.assign(nbytes=df["nbytes"].astype(np.int64), fp16_bytes=df["fp16_bytes"].astype(np.int64))
    return df.reset_index(drop=True)


def _table(sizes: Any) -> SizeTable:
    return SizeTable.of(sizes)


def layer_order(sizes: Any) -> List[str]:
    return list(_table(sizes).layers)


def fp16_total(sizes: Any) -> int:
    return _table(sizes).fp16_total


def budget_bytes(target_bits: float, fp16_bytes: int) -> int:
    """Largest Σ quantized bytes with ``16 · bytes / fp16_bytes ≤ target_bits`` (exact decimal arithmetic)."""
    try:
        frac = Fraction(Decimal(str(target_bits)))
    except (InvalidOperation, ValueError):
        raise SensitivityError(f"target bits must be a number, got {target_bits!r}") from None
    if frac <= 0:
        raise SensitivityError(f"target bits must be positive, got {target_bits}")
    return math.floor(frac * int(fp16_bytes) / 16)


def _ceil4(x: float) -> float:
    return math.ceil(x * 1e4 - 1e-9) / 1e4


def config_bytes(options: Mapping[str, str], sizes: Any) -> Tuple[int, int]:
    """(Σ quantized bytes, Σ fp16 bytes): :meth:`SizeTable.config_bytes` of ``sizes``."""
    return _table(sizes).config_bytes(options)


def config_avg_bits(options: Mapping[str, str], sizes: Any) -> float:
    """:meth:`SizeTable.avg_bits` of ``sizes``."""
    return _table(sizes).avg_bits(options)


def min_avg_bits(sizes: Any) -> float:
    """Smallest reachable average bits (every layer at its smallest option)."""
    return _table(sizes).min_avg_bits()


def max_avg_bits(sizes: Any) -> float:
    return _table(sizes).max_avg_bits()
