"""Search: the config with the best predicted quality at an exact average-bit target.

The reference (method.md §6) keeps the top-scored variant of every module, so its bit width only
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

Baselines (same budget, same output format): :func:`uniform_config` (every layer one option),
:func:`cache_best` (the best evaluated config of a cache at or below the target) and
:func:`error_ilp` (MixDQ / HAWQ style: minimise the summed per-layer quantization error of the
multiquantizer, ``error`` = ``||W-Ŵ||²/||W||²`` or ``sse``, under the same byte budget).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .config import QuantConfig, canonical_options
from .errors import SensitivityError
from .evaluation.metric_specs import lower_is_better as _lower_is_better, record_metric
from .options import canonical
from .sizes import SizeTable

# default cap on the number of option combinations of one module group (6**4)
MAX_COMBINATIONS = 1296
# DP states kept at most before the dynamic program gives up (memory guard)
MAX_DP_STATES = 2_000_000


class InfeasibleTargetError(SensitivityError):
    """A bit target below what the cheapest config reaches. ``min_avg_bits`` is the smallest feasible one."""

    def __init__(self, message: str, min_avg_bits: float | None = None, min_cost: int | None = None):
        super().__init__(message)
        self.min_avg_bits = min_avg_bits
        self.min_cost = min_cost


# ---------------------------------------------------------------------------------------------
# exact multiple-choice knapsack
# ---------------------------------------------------------------------------------------------


class MCKPSolution(NamedTuple):
    """``choice`` int64 [G] (option index per group), ``value`` (sum), ``cost`` (int, sum), ``solver``:
    what proved it optimal — ``"unconstrained"`` (the best choices fit), ``"lp-bounds"`` (the LP bounds
    alone), ``"bounded-dp"``, ``"milp-highs"`` (HiGHS ran on the core), ``"dp"`` (plain DP) or
    ``"brute-force"``."""

    choice: np.ndarray
    value: float
    cost: int
    solver: str = ""


def _check_instance(costs: Sequence[Any], values: Sequence[Any]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    if len(costs) != len(values):
        raise SensitivityError(f"knapsack: {len(costs)} cost arrays but {len(values)} value arrays")
    if len(costs) == 0:
        raise SensitivityError("knapsack: no groups to choose from")
    cs = [np.asarray(c) for c in costs]
    vs = [np.asarray(v, dtype=np.float64) for v in values]
    for g, (c, v) in enumerate(zip(cs, vs)):
        if c.ndim != 1 or v.ndim != 1 or c.size != v.size or c.size == 0:
            raise SensitivityError(f"knapsack group {g}: costs and values must be non-empty 1-D arrays of one length")
    sizes = np.array([c.size for c in cs])
    call = np.concatenate(cs)
    ci = np.asarray(np.rint(call), dtype=np.int64)
    bad_c = (ci != call) | (ci < 0)
    bad_v = ~np.isfinite(np.concatenate(vs))
    for bad, what in ((bad_c, "costs must be non-negative integers (bytes)"), (bad_v, "values must be finite")):
        if bad.any():
            g = int(np.searchsorted(np.cumsum(sizes), int(np.flatnonzero(bad)[0]), side="right"))
            raise SensitivityError(f"knapsack group {g}: {what}")
    return np.split(ci, np.cumsum(sizes)[:-1]), vs


def _pad(arrays: Sequence[np.ndarray], fill: Any, dtype: Any) -> np.ndarray:
    """[G, Kmax] matrix of ragged rows, padded with ``fill``."""
    sizes = np.array([a.size for a in arrays])
    out = np.full((len(arrays), int(sizes.max())), fill, dtype=dtype)
    out[np.repeat(np.arange(len(arrays)), sizes), np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = \
        np.concatenate(arrays)
    return out


_BIG = np.iinfo(np.int64).max // 4


def _kept_choices(cs: Sequence[np.ndarray], vs: Sequence[np.ndarray], slack: int) -> List[np.ndarray]:
    """Per group, the non-dominated choices that fit with every other group at its cheapest, by
    increasing cost (and value). Dominated: another choice costs no more and is worth at least as much."""
    C = _pad(cs, _BIG, np.int64)
    V = _pad(vs, -np.inf, np.float64)
    idx = np.broadcast_to(np.arange(C.shape[1]), C.shape)
    order = np.lexsort((idx, -V, C), axis=-1)  # per row: cost asc, value desc, index asc
    Cs = np.take_along_axis(C, order, axis=1)
    Vs = np.take_along_axis(V, order, axis=1)
    prev = np.concatenate([np.full((C.shape[0], 1), -np.inf), np.maximum.accumulate(Vs, axis=1)[:, :-1]], axis=1)
    keep = (Vs > prev) & (Cs - C.min(axis=1, keepdims=True) <= slack)
    return [order[g][keep[g]] for g in range(C.shape[0])]


def min_total_cost(costs: Sequence[Any]) -> int:
    """Σ over groups of the cheapest choice: the smallest feasible budget."""
    return int(sum(int(np.min(c)) for c in costs))


def solve_mckp(costs: Sequence[Any], values: Sequence[Any], budget: int, method: str = "auto") -> MCKPSolution:
    """Exact multiple-choice knapsack: one choice per group, Σ cost ≤ budget, maximise Σ value.

    ``costs[g]`` int [K_g] (bytes), ``values[g]`` float [K_g] (higher = better). ``method``:
    ``"auto"`` (LP-bound reduction, then a bounded exact DP on the core; HiGHS if the DP frontier
    exceeds MAX_DP_STATES), ``"milp"`` (the same reduction, HiGHS with zero gap on the core) or
    ``"dp"`` (plain Pareto-frontier DP over all groups, no LP bounds: an independent cross-check for
    small instances). Optimal up to float round-off (values within ~1e-10 · max|value| · G are ties).
    A choice dominated within its group (another costs no more and is worth at least as much) is never
    taken. Raises :class:`InfeasibleTargetError` (with ``min_cost``) when even the cheapest choices
    exceed the budget.
    """
    if method not in ("auto", "milp", "dp"):
        raise SensitivityError(f"knapsack: unknown method {method!r} (use auto, milp or dp)")
    cs, vs = _check_instance(costs, values)
    budget = int(budget)
    mins = np.array([int(c.min()) for c in cs], dtype=np.int64)
    total_min = int(mins.sum())
    if total_min > budget:
        raise InfeasibleTargetError(
            f"knapsack budget {budget} is below the cheapest choice total {total_min}", min_cost=total_min
        )
    slack = budget - total_min
    # exact reductions: drop dominated choices and those that cannot fit even with all others cheapest
    kept = _kept_choices(cs, vs, slack)
    # the unconstrained optimum (most valuable, i.e. last kept choice per group) may already fit
    best = np.array([k[-1] for k in kept], dtype=np.int64)
    if sum(int(c[b]) for c, b in zip(cs, best)) <= budget:
        choice, solver = best, "unconstrained"
    elif method in ("auto", "milp"):
        choice, solver = _solve_reduced(cs, vs, kept, mins, slack, core="dp" if method == "auto" else "milp")
    else:
        choice, solver = _solve_dp(cs, vs, kept, budget), "dp"
    cost = int(sum(int(c[k]) for c, k in zip(cs, choice)))
    value = float(sum(float(v[k]) for v, k in zip(vs, choice)))
    assert cost <= budget, (cost, budget)
    return MCKPSolution(choice, value, cost, solver)


def _upper_hull(r: np.ndarray, v: np.ndarray) -> List[int]:
    """Positions (into r, v sorted by cost, value increasing) of the concave upper hull from the cheapest."""
    hull: List[int] = []
    for i in range(r.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or below the segment a -> i: drop it
            if (v[b] - v[a]) * (r[i] - r[a]) <= (v[i] - v[a]) * (r[b] - r[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _hull_increments(R: List[np.ndarray], V: List[np.ndarray]) -> Tuple[np.ndarray, ...]:
    """LP relaxation data: every group's hull increments, sorted by decreasing slope (value per byte).

    Returns (group int [n], to_pos int [n], dr float [n], dv float [n]).
    """
    g_, to_, dr_, dv_ = [], [], [], []
    for g, (r, v) in enumerate(zip(R, V)):
        h = _upper_hull(r, v)
        for a, b in zip(h[:-1], h[1:]):
            g_.append(g)
            to_.append(b)
            dr_.append(float(r[b] - r[a]))
            dv_.append(float(v[b] - v[a]))
    g_, to_, dr_, dv_ = (np.asarray(x) for x in (g_, to_, dr_, dv_))
    if g_.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    order = np.lexsort((g_, -(dv_ / dr_)))
    return g_[order].astype(np.int64), to_[order].astype(np.int64), dr_[order], dv_[order]


def _lp_gain(dr: np.ndarray, dv: np.ndarray, budget: np.ndarray, integral: bool = False):
    """Value the LP relaxation adds over the all-cheapest config for each budget (float array).

    With ``integral``, also returns the gain of the LP's integral part (the increments taken whole):
    a feasible completion, hence a lower bound.
    """
    budget = np.asarray(budget, dtype=np.float64)
    if dr.size == 0:
        z = np.zeros_like(budget)
        return (z, z) if integral else z
    cum_r = np.concatenate([[0.0], np.cumsum(dr)])
    cum_v = np.concatenate([[0.0], np.cumsum(dv)])
    i = np.searchsorted(cum_r, budget, side="right") - 1  # increments fully taken (budget >= 0)
    np.clip(i, 0, dr.size, out=i)
    nxt = np.minimum(i, dr.size - 1)
    whole = cum_v[i]
    frac = whole + np.where(i < dr.size, (budget - cum_r[i]) / dr[nxt] * dv[nxt], 0.0)
    return (frac, whole) if integral else frac


def _solve_reduced(cs, vs, kept, mins, slack: int, core: str = "dp") -> Tuple[np.ndarray, str]:
    """Exact: LP relaxation -> greedy incumbent -> per-choice LP bounds (the LP optimum with that
    choice forced) drop every choice that cannot beat the incumbent -> the remaining core is solved
    by a bounded DP (``core="dp"``, HiGHS when its states would exceed MAX_DP_STATES) or by HiGHS
    (``core="milp"``). Returns the better of the core optimum and the incumbent, and the name of
    the last solver that ran (``lp-bounds`` when the bounds alone settled it)."""
    G = len(cs)
    R = [cs[g][kept[g]] - mins[g] for g in range(G)]  # relative costs, increasing
    V = [vs[g][kept[g]] for g in range(G)]  # values, increasing
    inc_g, inc_to, inc_dr, inc_dv = _hull_increments(R, V)
    # incumbent: the integral part of the LP solution ...
    pos = np.zeros(G, dtype=np.int64)  # position into kept[g]
    left = slack
    for g, to, dr in zip(inc_g, inc_to, inc_dr):
        if dr > left:
            break
        left -= int(dr)
        pos[g] = to
    # ... improved by repeatedly taking the single-group move with the largest gain that fits
    Rm = _pad(R, _BIG, np.int64)
    Vm = _pad(V, -np.inf, np.float64)
    rows = np.arange(G)
    for _ in range(4 * G):
        cur_r, cur_v = Rm[rows, pos], Vm[rows, pos]
        gain = np.where(Rm - cur_r[:, None] <= left, Vm - cur_v[:, None], -np.inf)
        g, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[g, k] > 0:
            break
        left -= int(Rm[g, k] - cur_r[g])
        pos[g] = k
    inc_value = float(Vm[rows, pos].sum())
    incumbent = np.array([kept[g][pos[g]] for g in range(G)], dtype=np.int64)
    # per-choice bound: LP of the other groups with the budget left by the choice, plus its value
    base = float(sum(v[0] for v in V))
    tol = 1e-10 * (float(np.abs(Vm[np.isfinite(Vm)]).max()) * G + 1e-300)
    bound = base - Vm[:, :1] + _lp_gain_without_own(inc_g, inc_dr, inc_dv, slack - Rm, G) + Vm
    alive = (bound >= inc_value - tol) & np.isfinite(Vm)
    if not alive.any(axis=1).all():  # nothing in some group can beat the incumbent
        return incumbent, "lp-bounds"
    kept2 = [kept[g][np.flatnonzero(alive[g, : kept[g].size])] for g in range(G)]
    choice, solver = None, "bounded-dp"
    if core == "dp":
        choice = _solve_bounded_dp(cs, vs, kept2, mins, slack, inc_value - tol, tol)
    if choice is None:  # the DP found nothing above the incumbent's floor, or its frontier grew too large
        choice, solver = _solve_milp(cs, vs, kept2, mins, slack), "milp-highs"
    if choice is None:
        return incumbent, solver
    value = float(sum(float(vs[g][choice[g]]) for g in range(G)))
    return (choice if value >= inc_value else incumbent), solver


def _solve_bounded_dp(cs, vs, kept, mins, slack: int, floor_value: float, tol: float = 0.0) -> Optional[np.ndarray]:
    """Exact DP over the Pareto frontier of partial (bytes, value) sums, pruned by an LP bound.

    Groups with the widest byte range go first, so the LP bound of the groups still open (small
    items, nearly integral LP) is tight. A partial state is dropped when even the LP optimum of the
    open groups cannot lift it to ``floor_value`` (the incumbent's value minus a tolerance).
    Returns None when no state reaches ``floor_value`` or the frontier exceeds MAX_DP_STATES.
    """
    G = len(cs)
    # costs relative to each group's cheapest remaining choice; the budget pays for those first
    lows = [int(cs[g][kept[g]].min()) for g in range(G)]
    R = [(cs[g][kept[g]] - lows[g]).astype(np.int64) for g in range(G)]
    V = [vs[g][kept[g]] for g in range(G)]
    fixed_value = float(sum(float(v[0]) for v, r in zip(V, R) if r.size == 1))
    free = [g for g in range(G) if R[g].size > 1]
    budget = slack - int(sum(lo - int(m) for lo, m in zip(lows, mins)))
    if budget < 0:
        return None
    free.sort(key=lambda g: (-int(R[g][-1]), g))
    Rf, Vf = [R[g] for g in free], [V[g] for g in free]
    open_g, _, open_dr, open_dv = _hull_increments(Rf, Vf)  # LP increments of the groups still open
    rest_base = float(sum(v[0] for v in Vf))
    st_cost = np.zeros(1, dtype=np.int64)
    st_val = np.zeros(1, dtype=np.float64)
    parents: List[np.ndarray] = []
    picks: List[np.ndarray] = []
    for j in range(len(free)):
        r, v = Rf[j], Vf[j]
        keep = open_g != j
        open_g, open_dr, open_dv = open_g[keep], open_dr[keep], open_dv[keep]
        rest_base -= float(v[0])
        n_st = st_cost.size
        cand_cost = (st_cost[None, :] + r[:, None]).ravel()
        cand_val = (st_val[None, :] + v[:, None]).ravel()
        ok = cand_cost <= budget
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return None
        cost_ok, val_ok = cand_cost[idx], cand_val[idx]
        if open_dr.size:
            # LP of the open groups at each state's remaining budget: upper bound; its integral part
            # is a feasible completion, whose best value raises the floor for everybody
            cum_r = np.empty(open_dr.size + 1)
            cum_r[0] = 0.0
            np.cumsum(open_dr, out=cum_r[1:])
            cum_v = np.empty(open_dv.size + 1)
            cum_v[0] = 0.0
            np.cumsum(open_dv, out=cum_v[1:])
            left = (budget - cost_ok).astype(np.float64)
            i = np.searchsorted(cum_r, left, side="right") - 1
            nxt = np.minimum(i, open_dr.size - 1)
            lower = val_ok + cum_v[i]
            upper = lower + np.where(i < open_dr.size, (left - cum_r[i]) * (open_dv[nxt] / open_dr[nxt]), 0.0)
            floor_value = max(floor_value, fixed_value + rest_base + float(lower.max()) - tol)
            good = fixed_value + rest_base + upper >= floor_value
        else:
            floor_value = max(floor_value, fixed_value + rest_base + float(val_ok.max()) - tol)
            good = fixed_value + rest_base + val_ok >= floor_value
        idx, cost_ok, val_ok = idx[good], cost_ok[good], val_ok[good]
        if idx.size == 0:
            return None
        order = np.lexsort((-val_ok, cost_ok))  # cost asc, value desc (stable: candidate order)
        cv = val_ok[order]
        prev = np.empty_like(cv)
        prev[0] = -np.inf
        np.maximum.accumulate(cv[:-1], out=prev[1:])
        sel = order[cv > prev]
        st_cost, st_val = cost_ok[sel], val_ok[sel]
        chosen = idx[sel]
        parents.append(chosen % n_st)
        picks.append(chosen // n_st)
        if st_cost.size > MAX_DP_STATES:
            return None
    s = int(np.argmax(st_val))
    choice = np.array([kept[g][0] for g in range(G)], dtype=np.int64)
    for j in range(len(free) - 1, -1, -1):
        choice[free[j]] = kept[free[j]][picks[j][s]]
        s = int(parents[j][s])
    return choice


def _lp_gain_without_own(inc_g: np.ndarray, dr: np.ndarray, dv: np.ndarray, budgets: np.ndarray, G: int) -> np.ndarray:
    """For every group g and budget ``budgets[g, k]``: the LP gain of all *other* groups (float [G, K]).

    Vectorised over all groups: the greedy over the slope-sorted increments with group g's own
    increments skipped passes full-sequence position i while ``cum_r[i] - D_g(i) <= b``, where
    ``D_g(i)`` sums g's own increments before i; between two own increments ``D_g`` is constant, so
    each segment is one ``searchsorted``. Budgets < 0 (unaffordable choices) give -inf.
    """
    budgets = np.asarray(budgets, dtype=np.float64)
    n = dr.size
    if n == 0:
        return np.where(budgets >= 0, 0.0, -np.inf)
    cum_r = np.concatenate([[0.0], np.cumsum(dr)])
    cum_v = np.concatenate([[0.0], np.cumsum(dv)])
    # own increment positions per group, padded with n: P [G, M]
    counts = np.bincount(inc_g, minlength=G)
    M = max(int(counts.max()), 1)
    order = np.argsort(inc_g, kind="stable")  # positions grouped by group, increasing within a group
    slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    P = np.full((G, M), n, dtype=np.int64)
    P[inc_g[order], slot] = order
    own_r = np.where(P < n, dr[np.minimum(P, n - 1)], 0.0)
    own_v = np.where(P < n, dv[np.minimum(P, n - 1)], 0.0)
    # segments s = 0..M: positions i in [lo_s, hi_s], D = sum of own dr before lo_s
    lo = np.concatenate([np.zeros((G, 1), dtype=np.int64), P + 1], axis=1)  # [G, M+1]
    hi = np.concatenate([P, np.full((G, 1), n, dtype=np.int64)], axis=1)
    D = np.concatenate([np.zeros((G, 1)), np.cumsum(own_r, axis=1)], axis=1)
    valid = lo <= hi  # padded own positions (n) make empty segments
    b = np.maximum(budgets, 0.0)[:, :, None]  # [G, K, 1]
    cnt = np.searchsorted(cum_r, b + D[:, None, :], side="right")  # [G, K, M+1]
    cnt = np.clip(cnt, lo[:, None, :], hi[:, None, :] + 1) - lo[:, None, :]
    I = (np.where(valid[:, None, :], cnt, 0)).sum(axis=2) - 1  # last position passed, [G, K]
    before = P[:, None, :] < I[:, :, None]  # own increments before I, [G, K, M]
    D_I = (own_r[:, None, :] * before).sum(axis=2)
    E_I = (own_v[:, None, :] * before).sum(axis=2)
    nxt = np.minimum(I, n - 1)
    frac = np.where(I < n, (budgets - (cum_r[I] - D_I)) / dr[nxt] * dv[nxt], 0.0)
    gain = cum_v[I] - E_I + frac
    return np.where(budgets >= 0, gain, -np.inf)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level writes to stdout (some HiGHS builds print debug lines from inside the MIP solver)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _solve_milp(cs, vs, kept, mins, slack: int) -> Optional[np.ndarray]:
    """HiGHS on the given choices; None when they admit no solution within the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    G = len(cs)
    choice = np.array([k[0] for k in kept], dtype=np.int64)
    free = [g for g in range(G) if kept[g].size > 1]
    slack = slack - int(sum(int(cs[g][kept[g][0]] - mins[g]) for g in range(G) if kept[g].size == 1))
    if slack < 0:
        return None
    if not free:
        return choice
    # variables: the kept choices of the free groups; costs relative to each group's cheapest
    var_group = np.concatenate([np.full(kept[g].size, j) for j, g in enumerate(free)])
    var_opt = np.concatenate([kept[g] for g in free])
    rel_cost = np.concatenate([cs[g][kept[g]] - mins[g] for g in free]).astype(np.float64)
    val = np.concatenate([vs[g][kept[g]] - vs[g][kept[g]].max() for g in free])
    scale = max(float(np.max(-val)), 1e-300)  # objective in units of the largest within-group range
    n = var_opt.size
    budget_left = float(slack)
    for _ in range(8):  # tighten on the (rare) tolerance overshoot of the float feasibility check
        A = csr_array(
            (
                np.concatenate([np.ones(n), rel_cost]),
                (np.concatenate([var_group, np.full(n, len(free))]), np.concatenate([np.arange(n)] * 2)),
            ),
            shape=(len(free) + 1, n),
        )
        lb = np.concatenate([np.ones(len(free)), [-np.inf]])
        ub = np.concatenate([np.ones(len(free)), [budget_left]])
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore", RuntimeWarning)  # mip_abs_gap is passed to HiGHS verbatim
            res = milp(
                -val / scale,
                integrality=np.ones(n),
                bounds=Bounds(0, 1),
                constraints=LinearConstraint(A, lb, ub),
                options={"mip_rel_gap": 0.0, "mip_abs_gap": 1e-9, "presolve": True},
            )
        if res.status == 2:  # infeasible
            return None
        if res.x is None or res.status != 0:
            raise SensitivityError(f"knapsack: HiGHS did not solve the instance ({res.message})")
        x = np.rint(res.x).astype(np.int64)
        out = choice.copy()
        ok = True
        for j, g in enumerate(free):
            sel = np.flatnonzero((var_group == j) & (x == 1))
            if sel.size != 1:
                ok = False
                break
            out[g] = var_opt[sel[0]]
        used = int(sum(int(cs[g][out[g]] - mins[g]) for g in free)) if ok else None
        if ok and used <= slack:
            return out
        budget_left = (budget_left - 1.0) if used is None else budget_left - (used - slack)
    raise SensitivityError("knapsack: HiGHS returned no integral solution within the budget")


def _solve_dp(cs, vs, kept, budget: int) -> np.ndarray:
    """Exact DP over the Pareto frontier of (cost, value) partial sums, with suffix-min pruning."""
    G = len(cs)
    suffix_min = np.zeros(G + 1, dtype=np.int64)
    for g in range(G - 1, -1, -1):
        suffix_min[g] = suffix_min[g + 1] + int(cs[g][kept[g]].min())
    st_cost = np.zeros(1, dtype=np.int64)
    st_val = np.zeros(1, dtype=np.float64)
    parents: List[np.ndarray] = []
    picks: List[np.ndarray] = []
    for g in range(G):
        ks = kept[g]
        cand_cost = (st_cost[None, :] + cs[g][ks][:, None]).ravel()
        cand_val = (st_val[None, :] + vs[g][ks][:, None]).ravel()
        cand_par = np.tile(np.arange(st_cost.size), ks.size)
        cand_pick = np.repeat(ks, st_cost.size)
        fits = cand_cost + suffix_min[g + 1] <= budget
        cand_cost, cand_val, cand_par, cand_pick = cand_cost[fits], cand_val[fits], cand_par[fits], cand_pick[fits]
        order = np.lexsort((cand_pick, -cand_val, cand_cost))
        cv = cand_val[order]
        run_max = np.maximum.accumulate(cv)
        prev = np.concatenate([[-np.inf], run_max[:-1]])
        sel = order[cv > prev]
        st_cost, st_val = cand_cost[sel], cand_val[sel]
        parents.append(cand_par[sel])
        picks.append(cand_pick[sel])
        if st_cost.size > MAX_DP_STATES:
            raise SensitivityError(
                f"knapsack DP: more than {MAX_DP_STATES} frontier states at group {g}; use method='milp'"
            )
    s = int(np.argmax(st_val))  # frontier values increase with cost: the last state
    choice = np.empty(G, dtype=np.int64)
    for g in range(G - 1, -1, -1):
        choice[g] = picks[g][s]
        s = int(parents[g][s])
    return choice


def brute_force_mckp(costs: Sequence[Any], values: Sequence[Any], budget: int) -> Optional[MCKPSolution]:
    """Enumerate every combination (tests, tiny instances only); ``None`` when infeasible."""
    import itertools

    cs, vs = _check_instance(costs, values)
    best: Optional[MCKPSolution] = None
    for combo in itertools.product(*[range(c.size) for c in cs]):
        cost = sum(int(c[k]) for c, k in zip(cs, combo))
        if cost > budget:
            continue
        value = sum(float(v[k]) for v, k in zip(vs, combo))
        if best is None or value > best.value:
            best = MCKPSolution(np.asarray(combo, dtype=np.int64), value, cost, "brute-force")
    return best


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


# ---------------------------------------------------------------------------------------------
# groups: layers or modules with their choices
# ---------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One knapsack group: ``choices[k]`` gives one option per layer of ``layers``."""

    name: str
    layers: Tuple[str, ...]
    choices: Sequence[Sequence[str]]  # [K][len(layers)] option names (list of tuples or 2-D object array)
    costs: np.ndarray  # int64 [K], bytes
    values: np.ndarray  # float64 [K], higher = better


def _check_scores(df: pd.DataFrame, cols: Sequence[str], what: str) -> pd.DataFrame:
    missing = set(cols) - set(df.columns)
    if missing:
        raise SensitivityError(f"{what} lacks columns {sorted(missing)} (needs {', '.join(cols)})")
    scores = np.asarray(df["score"], dtype=np.float64)
    if not np.isfinite(scores).all():
        raise SensitivityError(f"{what}: non-finite score in row {int(np.flatnonzero(~np.isfinite(scores))[0])}")
    return df


def layer_groups(layer_scores: pd.DataFrame, sizes: pd.DataFrame, layers: Optional[Sequence[str]] = None) -> List[Group]:
    """One group per layer; the choices are the options present in both ``layer_scores`` and ``sizes``."""
    _check_scores(layer_scores, ("layer", "option", "score"), "layer scores")
    table = _table(sizes)
    scores = {(l, canonical(o)): float(s) for l, o, s in zip(layer_scores["layer"], layer_scores["option"], layer_scores["score"])}
    by_layer: Dict[str, List[Tuple[str, int]]] = {}
    for l, o, b in table.entries():
        by_layer.setdefault(l, []).append((o, b))
    groups = []
    for layer in layers if layers is not None else table.layers:
        opts = [(o, b) for o, b in by_layer.get(layer, []) if (layer, o) in scores]
        if not opts:
            raise SensitivityError(f"layer {layer!r}: no score for any of its options (predictor and multiquantizer disagree?)")
        groups.append(
            Group(
                layer,
                (layer,),
                [(o,) for o, _ in opts],
                np.array([b for _, b in opts], dtype=np.int64),
                np.array([scores[(layer, o)] for o, _ in opts]),
            )
        )
    return groups


def module_groups(
    module_scores: pd.DataFrame, sizes: pd.DataFrame, max_combinations: int = MAX_COMBINATIONS
) -> List[Group]:
    """One group per module of ``module_scores`` (rows = scored combinations); modules with more
    than ``max_combinations`` rows are skipped (their layers fall back to layer groups), and
    combinations using an option outside ``sizes`` are dropped."""
    _check_scores(module_scores, ("module", "layers", "options", "score"), "module scores")
    table = _table(sizes)
    nbytes = {(l, o): b for l, o, b in table.entries()}
    known = set(table.layers)
    canon: Dict[str, str] = {}

    def _canon(o: str) -> str:
        if o not in canon:
            canon[o] = canonical(o)
        return canon[o]

    groups, owner = [], {}
    modules = module_scores["module"].to_numpy()
    order = pd.unique(modules)
    rows_of = pd.Series(np.arange(len(modules))).groupby(modules, sort=False).apply(np.asarray).to_dict()
    all_layers = module_scores["layers"].to_numpy()
    all_opts = module_scores["options"].to_numpy()
    all_scores = module_scores["score"].to_numpy(dtype=np.float64)
    for module in order:
        rows = rows_of[module]
        layers = tuple(all_layers[rows[0]])
        if any(tuple(all_layers[r]) != layers for r in rows):
            raise SensitivityError(f"module {module!r}: rows list different layers")
        for layer in layers:
            if layer not in known:
                raise SensitivityError(f"module {module!r}: layer {layer!r} is not in the multiquantizer")
            if layer in owner:
                raise SensitivityError(f"layer {layer!r} is in two modules ({owner[layer]!r}, {module!r})")
            owner[layer] = module
        if rows.size > max_combinations:
            continue
        combos = [tuple(all_opts[r]) for r in rows]
        bad = next((c for c in combos if len(c) != len(layers)), None)
        if bad is not None:
            raise SensitivityError(f"module {module!r}: a combination has {len(bad)} options for {len(layers)} layers")
        uniq, inv = np.unique(np.array(combos, dtype=str).reshape(len(combos), len(layers)), return_inverse=True)
        inv = inv.reshape(len(combos), len(layers))
        canon_uniq = np.array([_canon(u) for u in uniq], dtype=object)
        cost = np.zeros(len(combos), dtype=np.int64)
        ok = np.ones(len(combos), dtype=bool)
        for j, layer in enumerate(layers):
            col = np.array([nbytes.get((layer, o), -1) for o in canon_uniq], dtype=np.int64)[inv[:, j]]
            ok &= col >= 0  # an option outside the allowed set drops the combination
            cost += np.maximum(col, 0)
        if ok.any():
            choices = canon_uniq[inv[ok]]  # object array [K, len(layers)]: row k = options of choice k
            groups.append(Group(str(module), layers, choices, cost[ok], all_scores[rows][ok]))
    return groups


def build_groups(
    layer_scores: Optional[pd.DataFrame],
    sizes: pd.DataFrame,
    module_scores: Optional[pd.DataFrame] = None,
    max_combinations: int = MAX_COMBINATIONS,
) -> List[Group]:
    """Module groups where available, layer groups for every other layer (network order)."""
    sizes = _table(sizes)
    groups = module_groups(module_scores, sizes, max_combinations) if module_scores is not None else []
    covered = {l for g in groups for l in g.layers}
    rest = [l for l in layer_order(sizes) if l not in covered]
    if rest:
        if layer_scores is None:
            raise SensitivityError(f"layer {rest[0]!r} is in no scored module and there are no layer scores")
        groups += layer_groups(layer_scores, sizes, rest)
    return groups


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


def _target_budget(sizes: SizeTable, target_bits: float, what: str = "this multiquantizer") -> int:
    fp = sizes.fp16_total
    budget = budget_bytes(target_bits, fp)
    lo = sizes.min_bytes()
    if lo > budget:
        m = _ceil4(16.0 * lo / fp)
        raise InfeasibleTargetError(
            f"target {target_bits:g} avg bits is infeasible for {what}: the smallest feasible target is {m:.4f} "
            f"(every layer at its smallest option)",
            min_avg_bits=m,
            min_cost=lo,
        )
    return budget


def solve_groups(
    groups: Sequence[Group], sizes: pd.DataFrame, target_bits: float, method: str = "auto", label: str = "search",
    what: str = "this multiquantizer",
) -> SearchResult:
    """Solve the knapsack over ``groups`` at ``target_bits``; the result's ``objective`` is the summed value."""
    sizes = _table(sizes)
    budget = _target_budget(sizes, target_bits, what)
    t0 = time.perf_counter()
    sol = solve_mckp([g.costs for g in groups], [g.values for g in groups], budget, method=method)
    seconds = time.perf_counter() - t0
    options: Dict[str, str] = {}
    for g, k in zip(groups, sol.choice):
        options.update(zip(g.layers, (str(o) for o in g.choices[int(k)])))
    res = _result(options, sizes, label, target_bits=float(target_bits), budget_bytes=budget,
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
) -> SearchResult:
    """Exact best-scored config at ``target_bits`` from score tables (no predictor needed).

    ``what`` names the size source in the infeasible-target error (e.g. the multiquantizer file).
    """
    sizes = _table(sizes)
    groups = build_groups(layer_scores, sizes, module_scores, max_combinations)
    level = "module" if any(len(g.layers) > 1 for g in groups) else "layer"
    res = solve_groups(groups, sizes, target_bits, method=method, label=f"search-{level}", what=what)
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
) -> SearchResult:
    """The best config the predictor finds with average bits ≤ ``target_bits``.

    ``predictor`` follows the protocol of this module's docstring; ``mq`` is the multiquantizer the
    scores refer to (``sizes`` overrides its size table); ``level`` is ``"layer"`` or ``"module"``.
    The chosen config is re-scored whole with ``predictor.predict`` (``result.predicted``).
    """
    if level not in ("layer", "module"):
        raise SensitivityError(f"search level must be 'layer' or 'module', got {level!r}")
    sizes = SizeTable.of(sizes if sizes is not None else mq, options)
    layer_scores = predictor.layer_scores(mq)
    module_scores = None
    if level == "module":
        if not hasattr(predictor, "module_scores"):
            raise SensitivityError(f"{type(predictor).__name__} has no module scores; use --level layer")
        module_scores = predictor.module_scores(mq, max_combinations=max_combinations)
    res = search_scores(layer_scores, sizes, target_bits, module_scores, max_combinations, method, what)
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


def uniform_baselines(sizes: pd.DataFrame, target_bits: Optional[float] = None) -> List[SearchResult]:
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
