"""Exact multiple-choice knapsack (MCKP): :func:`solve_mckp`, LP-bound reduction, bounded DP, HiGHS."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import SensitivityError


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
