"""Ranking quality of predictions: Spearman ρ, Kendall τ (τ-b) and NDCG@k.

NDCG uses the reference's relevance (docs/method.md §5): ``clip((y − q20) / (max − q20), 0, 1)`` over the
evaluated set, so the worst 20 % of configs have relevance 0 and the best has 1; the ranking is by
the prediction (higher = better). Constant predictions have undefined correlations: reported as NaN.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
from scipy import stats


def relevance(y: np.ndarray, quantile: float = 0.2) -> np.ndarray:
    """The reference's relevance in [0, 1]: ``clip((y − q20)/(max − q20), 0, 1)``."""
    y = np.asarray(y, dtype=np.float64)
    lo, hi = np.quantile(y, quantile), y.max()
    if hi <= lo:
        return np.ones_like(y)
    return np.clip((y - lo) / (hi - lo), 0.0, 1.0)


def ndcg_at_k(y_true: np.ndarray, y_pred: np.ndarray, k: int = 10) -> float:
    """NDCG@k of ranking by ``y_pred`` with relevance :func:`relevance` of ``y_true`` (ties: stable order)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    rel = relevance(y_true)
    k = min(k, len(rel))
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-y_pred, kind="stable")[:k]
    ideal = np.sort(rel)[::-1][:k]
    idcg = float((ideal * disc).sum())
    if idcg <= 0:
        return float("nan")
    return float((rel[order] * disc).sum() / idcg)


def ranking_metrics(y_true: np.ndarray, y_pred: np.ndarray, k: int = 10) -> Dict[str, float]:
    """``{"spearman", "kendall", "ndcg@k", "n"}`` of predictions against targets (higher = better for both)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if len(y_true) < 2 or np.ptp(y_pred) == 0 or np.ptp(y_true) == 0:
        rho = tau = float("nan")
    else:
        rho = float(stats.spearmanr(y_true, y_pred).statistic)
        tau = float(stats.kendalltau(y_true, y_pred).statistic)
    return {"spearman": rho, "kendall": tau, f"ndcg@{k}": ndcg_at_k(y_true, y_pred, k), "n": int(len(y_true))}


def mean_std(values) -> Dict[str, float]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def cache_regret(metric: np.ndarray, avg_bits: np.ndarray, score: np.ndarray, targets, lower_is_better: bool = True
                 ) -> list:
    """Regret of choosing, among an evaluated set's configs at or under each target, the one a
    predictor scores best — no new evaluation needed (issue 14).

    ``metric [n]``: measured metric (e.g. FID), ``avg_bits [n]``, ``score [n]``: the predictor's
    prediction (higher = better), ``targets``: bit budgets. Per target: ``{"target", "n" (configs
    within), "best" (best metric within), "chosen" (metric of the top-scored config within),
    "regret" (|chosen − best|, 0 = the predictor found the best), "rank" (1-based rank of the chosen
    config by metric within)}``; ``n = 0`` gives NaN values.
    """
    metric = np.asarray(metric, dtype=np.float64)
    avg_bits = np.asarray(avg_bits, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    if not (len(metric) == len(avg_bits) == len(score)):
        raise ValueError(f"cache_regret: lengths differ (metric {len(metric)}, avg_bits {len(avg_bits)}, score {len(score)})")
    out = []
    for t in targets:
        within = np.where(avg_bits <= float(t) + 1e-9)[0]
        if len(within) == 0:
            out.append({"target": float(t), "n": 0, "best": math.nan, "chosen": math.nan, "regret": math.nan,
                        "rank": math.nan})
            continue
        m = metric[within] if lower_is_better else -metric[within]
        pick = within[int(np.argmax(score[within]))]
        mp = metric[pick] if lower_is_better else -metric[pick]
        best = float(m.min())
        out.append({"target": float(t), "n": int(len(within)), "best": float(metric[within][np.argmin(m)]),
                    "chosen": float(metric[pick]), "regret": float(mp - best), "rank": int((m < mp).sum() + 1)})
    return out
