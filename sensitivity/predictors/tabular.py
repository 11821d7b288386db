"""Tabular predictor kinds (the GNN's baselines): features of the config's options, no graph; trained and
scored on the same folds as the GNN.

* ``bits``     — average bits alone: ``y ≈ a + b·avg_bits`` (least squares on the training fold).
* ``error``    — Σ per-layer relative squared error: ``y ≈ a + b·Σ error`` (the MixDQ/HAWQ proxy).
* ``additive`` — per-layer additive linear model ``y ≈ c + Σ_l w[l, option_l]``: ridge regression on
  one-hot option features, ridge strength chosen by efficient leave-one-out CV on the training fold.
* ``lightgbm`` — gradient-boosted trees on the same one-hot features (LightGBM, seeded, deterministic);
  ``feature_tables``: CSVs ``layer,option,value`` (measured per-layer sensitivities) each adding the
  column ``Σ_l value(l, option_l)`` (trees split poorly on sums of many one-hots); the tables' values
  are stored in the predictor folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from .base import Context, FoldModel, KindParams, State, register_kind
from .data import Dataset, read_feature_table


def _lstsq_1d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return coef


class _LinearOnOneFeature(FoldModel):
    """``y ≈ coef[0] + coef[1]·x`` for one scalar feature ``x`` of a config (subclasses choose ``x``)."""

    coef: np.ndarray

    def get_state(self) -> State:
        return {"coef": self.coef.tolist()}, {}, {}

    def set_state(self, meta, tensors, texts) -> None:
        self.coef = np.array(meta["coef"], dtype=np.float64)


@register_kind
class BitsModel(_LinearOnOneFeature):
    kind = "bits"
    description = "average bits alone (linear)"

    def fit(self, ds: Dataset, seed: int = 0) -> "BitsModel":
        self.coef = _lstsq_1d(ds.avg_bits, ds.y)
        return self

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.coef[0] + self.coef[1] * self.ctx.table.avg_bits(codes)


@register_kind
class ErrorModel(_LinearOnOneFeature):
    kind = "error"
    description = "sum of per-layer quantization error (linear)"

    @classmethod
    def available(cls, ctx: Context, ds: Optional[Dataset] = None) -> Optional[str]:
        if ctx.table.has_errors:
            return None
        if ds is not None and ds.summed_error is not None:
            return None
        return "no per-layer errors (the cache has no layer stats and its records no summed_error)"

    def fit(self, ds: Dataset, seed: int = 0) -> "ErrorModel":
        err = self.ctx.table.summed_error(ds.codes) if self.ctx.table.has_errors else ds.summed_error
        self.coef = _lstsq_1d(np.asarray(err, dtype=np.float64), ds.y)
        return self

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        if not self.ctx.table.has_errors:
            from ..errors import SensitivityError

            raise SensitivityError("the error baseline needs per-layer errors (layer stats) to score new configs")
        return self.coef[0] + self.coef[1] * self.ctx.table.summed_error(codes)


@register_kind
class AdditiveModel(FoldModel):
    kind = "additive"
    description = "per-layer additive linear model (ridge on one-hot options)"

    @dataclass(frozen=True)
    class Params(KindParams):
        """``alphas``: ridge strengths tried by leave-one-out CV on the training fold."""

        alphas: Tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)

    def fit(self, ds: Dataset, seed: int = 0) -> "AdditiveModel":
        from sklearn.linear_model import RidgeCV

        X = self.ctx.table.onehot(ds.codes).astype(np.float64)
        m = RidgeCV(alphas=list(self.params["alphas"])).fit(X, ds.y)
        K = 1 + len(self.ctx.table.options)
        self.weights = m.coef_.reshape(len(self.ctx.table.layers), K)
        self.intercept = float(m.intercept_)
        self.info = {"alpha": float(m.alpha_)}
        return self

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        return self.intercept + self.weights[np.arange(codes.shape[1])[None, :], codes].sum(1)

    def get_state(self) -> State:
        return {"intercept": self.intercept, **self.info}, {"weights": self.weights.astype(np.float64)}, {}

    def set_state(self, meta, tensors, texts) -> None:
        self.intercept = float(meta["intercept"])
        self.weights = np.asarray(tensors["weights"], dtype=np.float64)
        self.info = {k: v for k, v in meta.items() if k != "intercept"}


@register_kind
class LightGBMModel(FoldModel):
    kind = "lightgbm"
    description = "LightGBM on per-layer one-hot options"

    @dataclass(frozen=True)
    class Params(KindParams):
        """LightGBM's own parameters, plus ``feature_tables``: CSVs ``layer,option,value`` (see the module doc)."""

        n_estimators: int = 400
        learning_rate: float = 0.03
        num_leaves: int = 15
        min_child_samples: int = 10
        subsample: float = 0.8
        subsample_freq: int = 1
        colsample_bytree: float = 0.5
        reg_lambda: float = 1.0
        n_jobs: int = 1
        feature_tables: Union[str, Tuple[str, ...]] = ()

    @classmethod
    def available(cls, ctx: Context, ds: Optional[Dataset] = None) -> Optional[str]:
        try:
            import lightgbm  # noqa: F401
        except ImportError:
            return "lightgbm is not installed (pip install lightgbm)"
        return None

    def fit(self, ds: Dataset, seed: int = 0) -> "LightGBMModel":
        import lightgbm as lgb

        tabs = self.params.get("feature_tables") or []
        if isinstance(tabs, str):
            tabs = [tabs]
        self.tables = [read_feature_table(t, self.ctx.table) for t in tabs]
        X = self._features(ds.codes)
        p = {k: v for k, v in self.params.items() if k != "feature_tables"}
        model = lgb.LGBMRegressor(random_state=int(seed), deterministic=True, force_row_wise=True, verbose=-1, **p)
        model.fit(X, ds.y)
        self.booster = model.booster_
        return self

    def _features(self, codes: np.ndarray) -> np.ndarray:
        """One-hot options, then one summed column per feature table: ``float32 [n, L·(1+O) + T]``."""
        X = self.ctx.table.onehot(codes)
        if not getattr(self, "tables", None):
            return X
        c = np.asarray(codes, dtype=np.int64)
        L = np.arange(c.shape[1])[None, :]
        sums = [np.log10(t[L, c].sum(1) + 1e-12)[:, None] for t in self.tables]
        return np.concatenate([X] + [s.astype(np.float32) for s in sums], 1)

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        X = self._features(codes)
        return np.asarray(self.booster.predict(X, num_threads=int(self.params.get("n_jobs", 1))), dtype=np.float64)

    def get_state(self) -> State:
        tensors = {f"feature_table{i}": t.astype(np.float64) for i, t in enumerate(getattr(self, "tables", []))}
        return {"num_trees": int(self.booster.num_trees())}, tensors, {"model": self.booster.model_to_string()}

    def set_state(self, meta, tensors, texts) -> None:
        import lightgbm as lgb

        self.tables = [np.asarray(tensors[f"feature_table{i}"], dtype=np.float64) for i in range(len(tensors))]
        self.booster = lgb.Booster(model_str=texts["model"])
