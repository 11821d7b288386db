"""The reference's own construction (Qua2SeDiMo, method.md §6): top-1 subgraph variant per module.

The reference trains its predictor on ``-FID - λ·avg_bits`` and keeps, for every module (subgraph),
the option combination with the highest predicted subgraph score; the bit width follows from λ, not
from a budget. With a predictor's module (or layer) score table the penalty is added per group:
``score(choice) − λ · 16 · bytes(choice) / Σ fp16 bytes`` (the choice's share of the average bits),
and the argmax is taken in every group independently. :func:`reference_allocate` sweeps λ so the
average bits land at or just under a target; the exact search (``sensitivity search``) instead solves
the budget as a constraint, which is what this baseline shows the value of.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import SensitivityError
from . import ALLOCATORS, result_from_options, sweep_to_target


def top1_choice(groups: Sequence, lam: float, fp16_bytes: int) -> Dict[str, str]:
    """Per group the choice maximising ``value − λ · 16 · cost / fp16_bytes`` (first on ties)."""
    out: Dict[str, str] = {}
    for g in groups:
        pen = np.asarray(g.values, dtype=np.float64) - lam * 16.0 * np.asarray(g.costs, dtype=np.float64) / fp16_bytes
        k = int(np.argmax(pen))
        out.update(zip(g.layers, (str(o) for o in g.choices[k])))
    return out


@ALLOCATORS.register("reference")
def reference_allocate(sizes: pd.DataFrame, target_bits: Optional[float], layer_scores: pd.DataFrame = None,
                       module_scores: Optional[pd.DataFrame] = None, lam: Optional[float] = None,
                       max_combinations: int = 1296, **_):
    """The top-1 rule at ``lam``, or at the smallest λ whose config fits ``target_bits``.

    ``layer_scores`` (layer, option, score) and optionally ``module_scores`` (module, layers,
    options, score) as the search protocol gives them (higher = better).
    """
    from ..search import build_groups, fp16_total

    if layer_scores is None:
        raise SensitivityError("reference allocator needs the predictor's layer scores (--predictor)")
    t0 = time.process_time()
    groups = build_groups(layer_scores, sizes, module_scores, max_combinations)
    fp = fp16_total(sizes)
    span = max(float(np.ptp(np.asarray(g.values))) for g in groups) + 1e-12
    if target_bits is None:
        if lam is None:
            raise SensitivityError("reference allocator: pass a target or lambda")
        opts, budget = top1_choice(groups, float(lam), fp), None
    else:
        # the top-1 choice of a group changes only where two choices' penalised scores cross
        cross = []
        for g in groups:
            v = np.asarray(g.values, dtype=np.float64)
            c = 16.0 * np.asarray(g.costs, dtype=np.float64) / fp
            if v.size > 64:  # module combinations: too many pairs, bisect continuously
                cross = None
                break
            dv, dc = v[:, None] - v[None, :], c[:, None] - c[None, :]
            ok = dc > 0
            x = dv[ok] / dc[ok]
            cross.append(x[x > 0])
        steps = [np.ptp(np.asarray(g.costs)) for g in groups]
        hi = (span + 1.0) * fp / 16.0 * 2.0 / max(1.0, min(float(np.min(np.diff(np.unique(g.costs)))) for g in groups
                                                         if np.unique(g.costs).size > 1) if any(steps) else 1.0)
        cand = None if cross is None else np.concatenate(cross + [np.zeros(0)])
        if cand is not None:
            # just above each crossing the cheaper choice wins: probe midpoints between crossings too
            u = np.unique(np.concatenate([[0.0], cand, [hi]]))
            cand = np.concatenate([u, 0.5 * (u[1:] + u[:-1])])
        lam, opts, budget = sweep_to_target(lambda x: top1_choice(groups, x, fp), sizes, target_bits, 0.0, hi,
                                            increasing_bits=False, log=False, candidates=cand)
    res = result_from_options(opts, sizes, "reference-top1", target_bits=None if target_bits is None else float(target_bits),
                              budget_bytes=budget)
    res.seconds = time.process_time() - t0
    res.objective = float(sum(
        float(np.asarray(g.values)[[tuple(str(o) for o in c) for c in g.choices].index(
            tuple(opts.get(l, "fp16") for l in g.layers))]) for g in groups))
    res.details.update(lam=float(lam), groups=len(groups),
                       level="module" if any(len(g.layers) > 1 for g in groups) else "layer")
    return res
