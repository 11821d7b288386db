"""Search results and the search itself: solve the groups at a bit target, re-score with the predictor."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ..config import QuantConfig, canonical_options
from ..errors import SensitivityError
from ..options import canonical
from ..sizes import SizeTable
from .budgets import _ceil4, _table, budget_bytes
from .groups import Group, _check_scores, build_groups
from .solver import MAX_COMBINATIONS, InfeasibleTargetError, solve_mckp


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """A config found by the search or a baseline, with its size and scores.

    ``objective``: Σ of the group scores of the chosen options (the knapsack value; baselines: their
    own objective or None); ``predicted``: the predictor's whole-config score (higher = better) or None.
    """

    options: Dict[str, str]
    method: str
    avg_bits: float
    quantized_bytes: int
    fp16_bytes: int
    target_bits: Optional[float] = None
    budget_bytes: Optional[int] = None
    objective: Optional[float] = None
    predicted: Optional[float] = None
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def option_mix(self) -> Dict[str, int]:
        """Number of layers per option, most used first."""
        return dict(Counter(self.options.values()).most_common())

    def mix_text(self) -> str:
        n = max(len(self.options), 1)
        return ", ".join(f"{o} {c} ({100.0 * c / n:.0f}%)" for o, c in self.option_mix.items())

    def summary(self) -> str:
        parts = [f"{self.method}: avg bits {self.avg_bits:.4f}"]
        if self.target_bits is not None:
            parts[0] += f" (target {self.target_bits:g})"
        if self.objective is not None:
            parts.append(f"summed score {self.objective:.4f}")
        if self.predicted is not None:
            parts.append(f"predicted {self.predicted:.4f}")
        parts.append(f"mix: {self.mix_text()}")
        return "; ".join(parts)

    def to_config(self, model: Optional[str] = None, multiquantizer_hash: Optional[str] = None, **provenance: Any) -> QuantConfig:
        prov = {
            "command": "search",
            "method": self.method,
            "target_bits": self.target_bits,
            "budget_bytes": self.budget_bytes,
            "quantized_bytes": self.quantized_bytes,
            "objective": self.objective,
            "predicted": self.predicted,
            "solve_seconds": round(self.seconds, 6),
        }
        prov.update({k: v for k, v in self.details.items() if isinstance(v, (str, int, float, bool, type(None)))})
        prov.update(provenance)
        return QuantConfig(dict(self.options), model=model, multiquantizer_hash=multiquantizer_hash,
                           avg_bits=round(self.avg_bits, 6), provenance=prov)


def _result(options: Dict[str, str], sizes: SizeTable, method: str, **kw: Any) -> SearchResult:
    q, fp = sizes.config_bytes(options)
    return SearchResult(options=options, method=method, avg_bits=16.0 * q / fp, quantized_bytes=q, fp16_bytes=fp, **kw)


def _target_budget(sizes: SizeTable, target_bits: Optional[float], what: str = "this multiquantizer",
                   budget: Optional[int] = None) -> int:
    fp = sizes.fp16_total
    lo = sizes.min_bytes()
    if budget is not None:  # a byte budget (--target-memory: the memory the layers may take)
        if lo > budget:
            raise InfeasibleTargetError(
                f"a budget of {int(budget)} bytes for the layers is infeasible for {what}: every layer at its "
                f"smallest option takes {lo} bytes", min_avg_bits=_ceil4(16.0 * lo / fp), min_cost=lo)
        return int(budget)
    budget = budget_bytes(target_bits, fp)
    if lo > budget:
        m = _ceil4(16.0 * lo / fp)
        raise InfeasibleTargetError(
            f"target {target_bits:g} avg bits is infeasible for {what}: the smallest feasible target is {m:.4f} "
            f"(every layer at its smallest option)",
            min_avg_bits=m,
            min_cost=lo,
        )
    return budget


def _solve(groups: Sequence[Group], budget: int, method: str):
    """(options of the optimum, the MCKPSolution, solver seconds) of the knapsack over ``groups``."""
    t0 = time.perf_counter()
    sol = solve_mckp([g.costs for g in groups], [g.values for g in groups], budget, method=method)
    seconds = time.perf_counter() - t0
    options: Dict[str, str] = {}
    for g, k in zip(groups, sol.choice):
        options.update(zip(g.layers, (str(o) for o in g.choices[int(k)])))
    return options, sol, seconds


def solve_groups(
    groups: Sequence[Group], sizes: pd.DataFrame, target_bits: Optional[float], method: str = "auto",
    label: str = "search", what: str = "this multiquantizer", budget: Optional[int] = None,
) -> SearchResult:
    """Solve the knapsack over ``groups`` at ``target_bits`` (or at ``budget`` bytes of ``sizes``, which then
    replaces the target); the result's ``objective`` is the summed value."""
    sizes = _table(sizes)
    budget = _target_budget(sizes, target_bits, what, budget)
    options, sol, seconds = _solve(groups, budget, method)
    res = _result(options, sizes, label, target_bits=None if target_bits is None else float(target_bits),
                  budget_bytes=budget,
                  objective=sol.value, seconds=seconds)
    res.details.update(groups=len(groups), solver=sol.solver)
    assert res.quantized_bytes == sol.cost and res.quantized_bytes <= budget
    return res


def search_scores(
    layer_scores: Optional[pd.DataFrame],
    sizes: pd.DataFrame,
    target_bits: float,
    module_scores: Optional[pd.DataFrame] = None,
    max_combinations: int = MAX_COMBINATIONS,
    method: str = "auto",
    what: str = "this multiquantizer",
    budget: Optional[int] = None,
) -> SearchResult:
    """Exact best-scored config at ``target_bits`` (or ``budget`` bytes of ``sizes``) from score tables.

    ``what`` names the size source in the infeasible-target error (e.g. the multiquantizer file).
    """
    sizes = _table(sizes)
    groups = build_groups(layer_scores, sizes, module_scores, max_combinations)
    level = "module" if any(len(g.layers) > 1 for g in groups) else "layer"
    res = solve_groups(groups, sizes, target_bits, method=method, label=f"search-{level}", what=what, budget=budget)
    res.details["level"] = level
    return res


class AdditiveScorer:
    """The search protocol from a fixed ``(layer, option, score)`` table (e.g. a CSV of any origin).

    A whole config scores the sum of its layers' scores; a layer missing from the config (full
    precision) counts with its ``fp16`` score if the table has one, else with its best score.
    """

    def __init__(self, layer_scores: pd.DataFrame, name: str = "scores"):
        _check_scores(layer_scores, ("layer", "option", "score"), f"scores {name}")
        self.name = name
        self.table = layer_scores[["layer", "option", "score"]].assign(
            option=[canonical(o) for o in layer_scores["option"]], score=layer_scores["score"].astype(float))
        self._lut = {(l, o): s for l, o, s in zip(self.table["layer"], self.table["option"], self.table["score"])}
        self._full = self.table.groupby("layer", sort=False)["score"].max().to_dict()
        self._full.update({l: s for (l, o), s in self._lut.items() if o == "fp16"})

    def layer_scores(self, mq: Any = None) -> pd.DataFrame:
        return self.table

    def predict(self, configs: Sequence[Mapping[str, str]]) -> np.ndarray:
        out = np.empty(len(configs))
        for i, cfg in enumerate(configs):
            opts = canonical_options(cfg)
            total = 0.0
            for layer, full in self._full.items():
                o = opts.get(layer, "fp16")
                if (layer, o) in self._lut:
                    total += self._lut[(layer, o)]
                elif o == "fp16":
                    total += full
                else:
                    raise SensitivityError(f"scores {self.name}: no score for layer {layer!r} option {o!r}")
            unknown = set(opts) - set(self._full)
            if unknown:
                raise SensitivityError(f"scores {self.name}: no scores for layer {sorted(unknown)[0]!r}")
            out[i] = total
        return out


def _predict_one(predictor: Any, options: Mapping[str, str]) -> float:
    out = np.asarray(predictor.predict([dict(options)]), dtype=np.float64).ravel()
    if out.size != 1:
        raise SensitivityError(f"predictor.predict returned {out.size} values for one config")
    return float(out[0])


def predict_results(predictor: Any, results: Sequence[SearchResult]) -> List[SearchResult]:
    """Fill ``predicted`` of each result with the predictor's whole-config score (one batched call)."""
    if results:
        preds = np.asarray(predictor.predict([dict(r.options) for r in results]), dtype=np.float64).ravel()
        if preds.size != len(results):
            raise SensitivityError(f"predictor.predict returned {preds.size} values for {len(results)} configs")
        for r, p in zip(results, preds):
            r.predicted = float(p)
    return list(results)


def _scores(predictor: Any, mq: Any, level: str, max_combinations: int):
    """(layer scores, module scores or None) of ``predictor`` for a ``level`` search."""
    if level not in ("layer", "module"):
        raise SensitivityError(f"search level must be 'layer' or 'module', got {level!r}")
    module_scores = None
    if level == "module":
        if not hasattr(predictor, "module_scores"):
            raise SensitivityError(f"{type(predictor).__name__} has no module scores; use --level layer")
        module_scores = predictor.module_scores(mq, max_combinations=max_combinations)
    return predictor.layer_scores(mq), module_scores


def search(
    predictor: Any,
    mq: Any,
    target_bits: float,
    level: str = "layer",
    options: Optional[Iterable[str]] = None,
    max_combinations: int = MAX_COMBINATIONS,
    method: str = "auto",
    sizes: Optional[pd.DataFrame] = None,
    what: str = "this multiquantizer",
    budget: Optional[int] = None,
) -> SearchResult:
    """The best config the predictor finds with average bits ≤ ``target_bits`` (or, with ``budget``, with
    Σ bytes of ``sizes`` ≤ ``budget``: ``--target-memory`` passes the memory table and the layers' share).

    ``predictor`` follows the protocol of this module's docstring; ``mq`` is the multiquantizer the
    scores refer to (``sizes`` overrides its size table); ``level`` is ``"layer"`` or ``"module"``.
    The chosen config is re-scored whole with ``predictor.predict`` (``result.predicted``).
    """
    sizes = SizeTable.of(sizes if sizes is not None else mq, options)
    layer_scores, module_scores = _scores(predictor, mq, level, max_combinations)
    res = search_scores(layer_scores, sizes, target_bits, module_scores, max_combinations, method, what, budget)
    res.predicted = _predict_one(predictor, res.options)
    return res


def search_cost(
    predictor: Any,
    mq: Any,
    costs: Any,
    target: float,
    quantity: str = "latency",
    level: str = "layer",
    options: Optional[Iterable[str]] = None,
    max_combinations: int = MAX_COMBINATIONS,
    method: str = "auto",
    sizes: Optional[pd.DataFrame] = None,
    what: str = "this multiquantizer",
) -> SearchResult:
    """The best config the predictor finds whose summed run-time cost stays within ``target``.

    ``costs``: a :class:`sensitivity.costs.CostTable` of ``mq``'s layers; ``quantity``: ``"latency"``
    (``target`` in ms: the **sum of the layers' measured times**, not a whole-model forward) or
    ``"memory"`` (``target`` in bytes: ``--target-memory``'s whole-pipeline bytes with the table as the memory
    model ``runtime``, :mod:`.memory`; the result's ``details`` are :func:`.memory.memory_result`'s). The same
    exact knapsack as :func:`search`, on the table's integer units (ns), so the budget check is exact.
    ``result.details`` holds ``quantity``, ``target``, ``budget_units``, ``cost_units`` and ``latency_ms``.
    """
    from ..costs import QUANTITIES, budget_units

    if quantity == "memory":  # one meaning of a memory budget: --target-memory's
        from ..costs import register_runtime_memory_model
        from .memory import memory_budget, memory_result

        stored = SizeTable.of(sizes if sizes is not None else mq, options)
        model = register_runtime_memory_model(costs, stored.layers)
        mb = memory_budget(mq, int(target), stored, model, what=what)
        res = search(predictor, mq, None, level=level, max_combinations=max_combinations, method=method,
                     sizes=mb.table, what=what, budget=mb.budget)
        return memory_result(res, mq, stored, mb)
    if quantity not in QUANTITIES:
        raise SensitivityError(f"unknown cost quantity {quantity!r}; use one of {', '.join(QUANTITIES)}")
    unit = QUANTITIES[quantity][2]
    flag = f"--target-{quantity}"
    sizes = SizeTable.of(sizes if sizes is not None else mq, options)
    units = costs.unit_table(quantity, options=sizes.options, layers=sizes.layers)
    budget = budget_units(target, quantity, flag)
    per_unit = QUANTITIES[quantity][3]
    lo = units.min_bytes()
    if lo > budget:
        m = math.ceil(lo / per_unit * 1e4) / 1e4
        raise InfeasibleTargetError(f"{flag} {target:g} {unit} is infeasible for {what}: the smallest feasible target "
                                    f"is {m:.4f} {unit} (every layer at its cheapest option)", min_cost=lo)
    layer_scores, module_scores = _scores(predictor, mq, level, max_combinations)
    groups = build_groups(layer_scores, units, module_scores, max_combinations)
    chosen, sol, seconds = _solve(groups, budget, method)
    level_name = "module" if any(len(g.layers) > 1 for g in groups) else "layer"
    res = _result(chosen, sizes, f"search-{quantity}", objective=sol.value, seconds=seconds)
    spent = units.quantized_bytes(chosen)
    assert spent == sol.cost and spent <= budget, (spent, sol.cost, budget)
    res.details.update(groups=len(groups), solver=sol.solver, level=level_name, quantity=quantity, target=float(target),
                       target_unit=unit, budget_units=int(budget), cost_units=int(spent))
    res.details["latency_ms" if quantity == "latency" else "runtime_bytes"] = (
        spent / per_unit if quantity == "latency" else int(spent))
    res.predicted = _predict_one(predictor, res.options)
    return res


def parse_sweep(text: str) -> List[float]:
    """``"3.2:4.0:0.1"`` -> [3.2, 3.3, …, 4.0] (inclusive, exact decimal steps); ``"3.5,3.9"`` -> list."""
    try:
        if ":" in text:
            parts = [Decimal(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise InvalidOperation
            start, stop, step = parts
            n = int((stop - start) / step)
            vals = [start + i * step for i in range(n + 1)]
            return [float(v) for v in vals if v <= stop]
        return [float(Decimal(p)) for p in text.split(",") if p.strip()]
    except (InvalidOperation, ValueError):
        raise SensitivityError(f"--sweep {text!r}: expected START:STOP:STEP (e.g. 3.2:4.0:0.1) or a comma list") from None
