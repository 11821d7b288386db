"""Search: the config with the best predicted quality at an exact average-bit target.

The reference (docs/method.md §6) keeps the top-scored variant of every module, so its bit width only
follows from the penalty in the training target. Here the target is a hard constraint: the search is
a **multiple-choice knapsack** (MCKP) over *groups* — one group per layer (op level), or per module
(several layers whose option *combinations* the predictor scored together) —

    maximise  Σ_g value[g][k_g]   subject to   Σ_g bytes[g][k_g] ≤ budget,   one choice k_g per group,

with ``budget = floor(B · Σ fp16_bytes / 16)`` for a target of ``B`` average bits
(avg bits = 16 · Σ quantized bytes / Σ fp16 bytes over the quantized layers, see
:mod:`sensitivity.options`). :func:`solve_mckp` solves it exactly: dominated choices are dropped, the
LP relaxation gives an incumbent and, per choice, a bound (the LP optimum with that choice forced);
every choice whose bound cannot beat the incumbent is dropped, and the small remaining core goes to
an exact dynamic program over the Pareto frontier of (bytes, value) states, pruned with LP bounds
(``scipy.optimize.milp`` / HiGHS with zero gap when that frontier grows too large, or on request).
On an SDXL-size instance (803 layers × 6 options) this takes 0.1–0.3 s where plain HiGHS needs
0.4–12 s (``benchmarks/bench_search.py``). An infeasible target (below the smallest-option config)
raises :class:`InfeasibleTargetError` naming the smallest feasible value. The chosen config is then
re-scored as a whole with the predictor, and both numbers are kept.

Predictor protocol (what :func:`search` needs from ``sensitivity.predictors``)::

    class SearchPredictor(Protocol):
        def layer_scores(self, mq) -> pd.DataFrame: ...
            # one row per (layer, option): columns layer, option, score (float, higher = better);
            # every layer of mq with every option the search may use.
        def predict(self, configs: Sequence[Mapping[str, str]]) -> np.ndarray: ...
            # whole-config predicted quality, shape [len(configs)], higher = better (e.g. -FID).
        # optional, for --level module:
        def module_scores(self, mq, max_combinations: int = 1296) -> pd.DataFrame: ...
            # one row per scored option combination of a module: columns module (str),
            # layers (tuple of layer names), options (tuple of option names, same order), score.
            # Modules must be disjoint; layers outside every module fall back to layer_scores.

Only score *differences within a group* matter to the solver, and scores of different groups are
summed, so they must share one scale (e.g. the predictor's standardised subgraph scores).

:func:`refined_search` goes beyond the additive proxy: the knapsack's configs at a few sub-targets are
rated by the whole predictor (fold ensemble) and the best ones improved by local moves that keep the
same exact byte budget (:mod:`.refine`).

Baselines (same budget, same output format): :func:`uniform_config` (every layer one option),
:func:`cache_best` (the best evaluated config of a cache at or below the target) and
:func:`error_ilp` (MixDQ / HAWQ style: minimise the summed per-layer quantization error of the
multiquantizer, ``error`` = ``||W-Ŵ||²/||W||²`` or ``sse``, under the same byte budget).
"""

from __future__ import annotations

from .predictor_free import cache_best, error_ilp, uniform_config, uniform_configs
from .budgets import budget_bytes, config_avg_bits, config_bytes, fp16_total, layer_order, max_avg_bits, min_avg_bits, size_table
from .memory import MemoryBudget, component_bytes, config_memory, memory_budget
from .groups import Group, build_groups, layer_groups, module_groups
from .inputs import bits_range, load_scores_csv, multiquantizer_for
from .refine import knapsack_candidates, rate, refined_search
from .searching import AdditiveScorer, SearchResult, parse_sweep, predict_results, search, search_cost, search_scores, solve_groups
from .solver import (MAX_COMBINATIONS, MAX_DP_STATES, InfeasibleTargetError, MCKPSolution, brute_force_mckp,
                     min_total_cost, solve_mckp)

__all__ = [
    "bits_range", "load_scores_csv", "multiquantizer_for",
    "AdditiveScorer", "Group", "InfeasibleTargetError", "MAX_COMBINATIONS", "MAX_DP_STATES", "MCKPSolution",
    "SearchResult", "brute_force_mckp", "budget_bytes", "build_groups", "cache_best", "config_avg_bits",
    "config_bytes", "error_ilp", "fp16_total", "layer_groups", "layer_order", "max_avg_bits", "min_avg_bits",
    "knapsack_candidates", "min_total_cost", "module_groups", "parse_sweep", "predict_results", "rate",
    "refined_search", "search", "search_cost", "search_scores", "size_table", "solve_groups", "solve_mckp",
    "uniform_configs", "uniform_config", "MemoryBudget", "component_bytes", "config_memory", "memory_budget",
]
