"""Predictor-free configs under the same budget (the search's baselines): uniform configs, the best cached
config, the error ILP. The allocators people use (SDNQ, HAWQ, MixDQ) are in :mod:`sensitivity.allocators`."""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional

import numpy as np
import pandas as pd

from ..config import canonical_options
from ..errors import SensitivityError
from ..evaluation.metric_specs import lower_is_better as _lower_is_better, record_metric
from ..options import canonical
from ..sizes import SizeTable
from .budgets import _table, budget_bytes, fp16_total
from .groups import layer_groups
from .searching import SearchResult, _result, solve_groups
from .solver import InfeasibleTargetError


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------


def uniform_config(sizes: pd.DataFrame, option: str) -> SearchResult:
    """Every layer of ``sizes`` at ``option`` (e.g. all ``uaq-4``)."""
    opt = canonical(option)
    sizes = _table(sizes)
    have = {l for l, o, _ in sizes.entries() if o == opt}
    layers = sizes.layers
    missing = [l for l in layers if l not in have]
    if missing:
        raise SensitivityError(f"uniform {opt}: layer {missing[0]!r} has no {opt} in the multiquantizer")
    return _result({l: opt for l in layers}, sizes, f"uniform-{opt}")


def uniform_configs(sizes: pd.DataFrame, target_bits: Optional[float] = None) -> List[SearchResult]:
    """All uniform configs of the options in ``sizes`` (only those at or below ``target_bits`` if given)."""
    sizes = _table(sizes)
    out = [uniform_config(sizes, o) for o in dict.fromkeys(o for _, o, _ in sizes.entries())]
    if target_bits is not None:
        budget = budget_bytes(target_bits, fp16_total(sizes))
        out = [r for r in out if r.quantized_bytes <= budget]
    for r in out:
        r.target_bits = None if target_bits is None else float(target_bits)
    return out


def cache_best(
    records: Iterable[Mapping[str, Any]], sizes: pd.DataFrame, target_bits: float, metric: str = "fid",
    lower_is_better: Optional[bool] = None,
) -> SearchResult:
    """The best evaluated config (``metric``) of a cache with average bits ≤ ``target_bits``.

    ``records``: cache records (dicts with ``config`` {layer: option} and ``metrics``). The average
    bits are recomputed from ``sizes`` (not trusted from the record).
    """
    lower = _lower_is_better(metric, lower_is_better)
    sizes = _table(sizes)
    budget = budget_bytes(target_bits, sizes.fp16_total)
    best, best_v, n_ok, n_all = None, None, 0, 0
    for rec in records:
        n_all += 1
        v = record_metric(rec, metric)
        if v is None:
            continue
        opts = canonical_options(rec["config"])
        q, _ = sizes.config_bytes(opts)
        if q > budget:
            continue
        n_ok += 1
        if best_v is None or (v < best_v if lower else v > best_v):
            best, best_v = (opts, rec), v
    if best is None:
        raise InfeasibleTargetError(
            f"no cached config with '{metric}' has avg bits ≤ {target_bits:g} ({n_all} records); "
            f"the lowest cached avg bits is {_lowest_cached(records, sizes)}"
        )
    opts, rec = best
    res = _result(opts, sizes, "cache-best", target_bits=float(target_bits), budget_bytes=budget)
    res.details.update(metric=metric, metric_value=best_v, candidates=n_ok, records=n_all,
                       config_hash=rec.get("config_hash"), cache_index=rec.get("index"))
    return res


def _lowest_cached(records: Iterable[Mapping[str, Any]], sizes: SizeTable) -> str:
    vals = [sizes.avg_bits(canonical_options(r["config"])) for r in records if r.get("config")]
    return f"{min(vals):.4f}" if vals else "n/a (empty cache)"


def error_ilp(
    sizes: pd.DataFrame, target_bits: float, error: str = "error", method: str = "auto",
    what: str = "this multiquantizer",
) -> SearchResult:
    """MixDQ / HAWQ-style baseline: minimise Σ per-layer quantization error under the byte budget.

    ``error`` is a column of ``sizes`` (the multiquantizer stats: ``error`` = ``||W-Ŵ||²/||W||²``,
    or ``sse``). ``objective`` is the minimised summed error (lower = better).
    """
    if isinstance(sizes, pd.DataFrame) and error not in sizes.columns:
        raise SensitivityError(f"error-ILP baseline needs a '{error}' column (multiquantizer stats); have {list(sizes.columns)}")
    table = _table(sizes)
    values = {"error": table.error, "sse": table.sse}.get(error)
    if values is None and isinstance(sizes, pd.DataFrame):  # another error column of a DataFrame
        scores = sizes[["layer", "option"]].assign(score=-np.asarray(sizes[error], dtype=np.float64))
    else:
        cells = [(i, j) for i, j in table.rows]
        if values is None or not np.isfinite([values[i, j] for i, j in cells]).all():
            raise SensitivityError(f"error-ILP baseline needs the '{error}' of every (layer, option) "
                                   f"(multiquantizer stats); the size table lacks them")
        scores = pd.DataFrame({"layer": [table.layers[i] for i, _ in cells], "option": [table.options[j] for _, j in cells],
                               "score": [-float(values[i, j]) for i, j in cells]})
    sizes = table
    groups = layer_groups(scores, sizes)
    res = solve_groups(groups, sizes, target_bits, method=method, label=f"error-ilp-{error}", what=what)
    res.objective = -float(res.objective)
    res.details["error"] = error
    return res
