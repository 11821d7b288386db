"""Multi-fidelity predictors: many cheap labels, a few full ones, one predictor of the full label.

A cache filled by ``sensitivity sample --full-configs N`` holds two fidelities of the same run: *cheap*
labels (few images, paired metrics) of many configs and *full* labels (the target metric on many
images) of its configs ``0..N-1``. :func:`cross_validate_multifidelity` learns from both:

1. one predictor of kind K per cheap metric (``feature_mse``, ``fd_fp``, ``psnr``: those the cheap
   labels have), k-fold on the cheap labels exactly as single-fidelity training;
2. a ridge *stack* fitted on the configs with full labels: ``y_full ~ b + sum_m w_m (P_m(x) - mu_m) / sd_m``,
   whose inputs are the members' out-of-fold predictions (each config scored by the fold model that
   did not see its cheap label). One weight per cheap metric, so 20-40 full labels fit it; the ridge
   strength is chosen by leave-one-out.

The saved folder's primary is :data:`STACK_KIND`; its members ``KIND@METRIC`` are ordinary fold
ensembles of the cheap targets. Its report is cross-validated on the *full* labels (same seeded folds
for the stack, each member alone, and the baselines trained on the full labels only).

Why not a per-layer residual on the full labels (an additive ridge on ``y_full`` minus the cheap
prediction): tried on digits-dit (1,280 paired 20-image labels, FID on 200 images as the full label,
LightGBM): its Kendall tau against the 2,000-image ground truth fell from 0.823 to 0.793 at 160 full
labels; FID on 200 images is noisier than the paired metrics, and a per-layer residual learns that noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import SensitivityError
from .base import Context
from .data import Dataset, Target
from .metrics import mean_std, ranking_metrics
from .predictor import METRICS, CVResult, Predictor, cross_validate, kfold_assignment

#: the primary kind name of a multi-fidelity predictor folder
STACK_KIND = "multifidelity"
#: the cheap metrics learnt when the cheap labels have them (paired: low seed noise; docs/guide/evaluation.md)
DEFAULT_CHEAP_METRICS = ("feature_mse", "fd_fp", "psnr")
#: ridge strengths of the stack (leave-one-out picks one; inputs are standardised)
STACK_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def member_name(kind: str, metric: str) -> str:
    """Name of the member of kind ``kind`` learning cheap metric ``metric``: ``KIND@METRIC``."""
    return f"{kind}@{metric}"


def member_kind(name: str) -> str:
    """The fold-model kind of a member name (``lightgbm@fd_fp`` -> ``lightgbm``)."""
    return name.split("@", 1)[0]


@dataclass
class Stack:
    """``y = intercept + sum_m weights[m] * (pred_m - mean[m]) / std[m]`` over ``members`` (target units)."""

    members: List[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    intercept: float
    alpha: float

    def combine(self, preds: np.ndarray) -> np.ndarray:
        """``preds [M, n]`` (the members' predictions, in ``members`` order) -> ``[n]``."""
        z = (np.asarray(preds, dtype=np.float64) - self.mean[:, None]) / self.std[:, None]
        return self.intercept + self.weights @ z

    def to_dict(self) -> Dict[str, Any]:
        return {"members": list(self.members), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weights": self.weights.tolist(), "intercept": float(self.intercept), "alpha": float(self.alpha)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Stack":
        return cls(list(d["members"]), np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64),
                   np.asarray(d["weights"], dtype=np.float64), float(d["intercept"]), float(d["alpha"]))

    @classmethod
    def fit(cls, members: Sequence[str], X: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> "Stack":
        """Ridge (leave-one-out strength) of ``y [n]`` on the standardised ``X [n, M]``."""
        from sklearn.linear_model import RidgeCV

        Z = (X - mean) / std
        m = RidgeCV(alphas=list(STACK_ALPHAS)).fit(Z, y)
        return cls(list(members), mean, std, np.asarray(m.coef_, dtype=np.float64), float(m.intercept_), float(m.alpha_))


class MultiFidelityPredictor(Predictor):
    """The stack of cheap-metric members as one :class:`~.predictor.Predictor` of the full target."""

    def __init__(self, members: Mapping[str, Predictor], stack: Stack, ctx: Context,
                 meta: Optional[Dict[str, Any]] = None, path: Any = None):
        super().__init__(STACK_KIND, [], ctx, meta, path)
        self.members = dict(members)
        self.stack = stack

    def __repr__(self) -> str:
        return (f"MultiFidelityPredictor({', '.join(self.stack.members)}, target {self.target.describe()!r}, "
                f"{len(self.layers)} layers)")

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if len(codes) == 0:
            return np.zeros(0)
        return self.stack.combine(np.array([self.members[n].predict_codes(codes) for n in self.stack.members]))


def cheap_metrics_of(records: Sequence[Mapping[str, Any]], metric: str,
                     wanted: Optional[Sequence[str]] = None) -> List[str]:
    """The cheap metrics to learn: ``wanted`` (each must be in the records), else those of
    :data:`DEFAULT_CHEAP_METRICS` the records have, else ``[metric]``."""
    from ..evaluation.metric_specs import record_metric

    have = set()
    for r in records[:50]:
        have |= {k for k in (r.get("metrics") or {}) if record_metric(r, k) is not None}
    if wanted:
        missing = [m for m in wanted if m not in have]
        if missing:
            raise SensitivityError(f"--cheap-targets: the cheap labels have no metric {missing[0]!r} "
                                   f"(they have {', '.join(sorted(have))})")
        return list(wanted)
    found = [m for m in DEFAULT_CHEAP_METRICS if m in have]
    return found or [metric]


def cross_validate_multifidelity(cheap: Mapping[str, Dataset], full: Dataset, ctx: Context, kind: str,
                                 baselines: Sequence[str] = (), folds: int = 5, seed: int = 0,
                                 params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                                 progress: bool = True) -> "tuple[CVResult, Stack]":
    """Members of ``kind`` on each ``cheap`` dataset ``{metric: Dataset}``, the stack on ``full`` (see the
    module docstring), ``baselines`` on the full labels alone; every ranking on the same folds of ``full``.

    Returns ``(CVResult, Stack)``: the result's predictors are the members (``KIND@METRIC``, cheap
    targets) and the baselines (full target); its report ranks all of them and the stack on the full labels."""
    if len(full) < max(folds, 3):
        raise SensitivityError(f"{len(full)} configs with full labels: need at least {max(folds, 3)} for {folds} folds")
    members: Dict[str, Predictor] = {}
    cheap_reports: Dict[str, Any] = {}
    X = np.empty((len(full), len(cheap)))
    mean, std = np.empty(len(cheap)), np.empty(len(cheap))
    for j, (metric, ds) in enumerate(cheap.items()):
        mctx = Context(ctx.table, Target(metric, 0.0), ctx.graph, ctx.device)
        res = cross_validate(ds, mctx, [kind], folds=folds, seed=seed, params=params, progress=progress)
        if kind not in res.predictors:
            raise SensitivityError(f"predictor {kind} could not be trained on the cheap labels: {res.report['skipped']}")
        name = member_name(kind, metric)
        p = res.predictors[kind]
        members[name] = Predictor(name, p.models, mctx)
        cheap_reports[name] = {"n_configs": len(ds), "target": mctx.target.to_dict(),
                               **{k: res.report["predictors"][kind][k] for k in ("mean", "std", "pooled", "train_seconds")}}
        oof = dict(zip(ds.hashes, res.oof[kind]))
        unseen = [i for i, h in enumerate(full.hashes) if h not in oof]
        X[:, j] = [oof.get(h, np.nan) for h in full.hashes]
        if unseen:  # a full label without a cheap one: the members' prediction (they never saw it)
            X[unseen, j] = p.predict_codes(full.codes[unseen])
        o = res.oof[kind]
        mean[j], std[j] = float(np.mean(o)), float(np.std(o)) or 1.0
    names = list(members)
    fold_of = kfold_assignment(len(full), folds, seed)
    report: Dict[str, Any] = {"target": ctx.target.to_dict(), "n_configs": len(full), "folds": folds, "seed": seed,
                              "metrics": list(METRICS), "predictors": {}, "skipped": {},
                              "fidelity": {"mode": "stack", "cheap": cheap_reports, "n_full": len(full),
                                           "n_cheap": {m: len(d) for m, d in cheap.items()}}}
    rows: Dict[str, List[Dict[str, Any]]] = {n: [] for n in [STACK_KIND, *names]}
    pooled = {n: np.full(len(full), np.nan) for n in rows}
    t_stack = time.perf_counter()
    for f in range(folds):
        tr, te = np.where(fold_of != f)[0], np.where(fold_of == f)[0]
        st = Stack.fit(names, X[tr], full.y[tr], mean, std)
        preds = {STACK_KIND: st.combine(X[te].T), **{n: X[te, j] for j, n in enumerate(names)}}
        for n, p in preds.items():
            pooled[n][te] = p
            rows[n].append({"fold": f, "n_train": int(len(tr)), "n_test": int(len(te)), **ranking_metrics(full.y[te], p),
                            **({"info": {"alpha": st.alpha}} if n == STACK_KIND else {})})
    for n, r in rows.items():
        summ = {k: mean_std(x[k] for x in r) for k in METRICS}
        report["predictors"][n] = {
            "description": ("ridge stack of the cheap-label members, fitted on the full labels" if n == STACK_KIND
                            else f"{member_kind(n)} trained on the cheap labels' {n.split('@', 1)[1]}, ranked on the full labels"),
            "params": {"members": names} if n == STACK_KIND else dict(members[n].models[0].params),
            "folds": r, "mean": {k: summ[k]["mean"] for k in METRICS}, "std": {k: summ[k]["std"] for k in METRICS},
            "pooled": ranking_metrics(full.y, pooled[n]),
            "train_seconds": (round(time.perf_counter() - t_stack, 2) if n == STACK_KIND
                              else cheap_reports[n]["train_seconds"])}
    out: Dict[str, Predictor] = dict(members)
    oof_all = dict(pooled)
    if baselines:
        base = cross_validate(full, ctx, list(baselines), folds=folds, seed=seed, params=params, progress=progress)
        for k, rep in base.report["predictors"].items():
            report["predictors"][k] = dict(rep, description=rep["description"] + " (full labels only)")
        report["skipped"].update(base.report["skipped"])
        out.update(base.predictors)
        oof_all.update(base.oof)
    stack = Stack.fit(names, X, full.y, mean, std)
    report["fidelity"]["stack"] = stack.to_dict()
    return CVResult(out, report, fold_of, oof_all), stack
