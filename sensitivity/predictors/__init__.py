"""``sensitivity.predictors``: predict a config's quality from its per-layer options.

>>> data = load_cache("caches/digits-dit.sqlite")
>>> ds = Dataset.from_records(data.records, table, Target("fid", lam=0.0))
>>> res = cross_validate(ds, Context(table, target, graph), ["gnn", "bits", "error", "additive", "lightgbm"])
>>> save_predictors("predictors/digits-dit", res, primary="gnn", meta={...}, background_codes=ds.codes)
>>> p = load_predictor("predictors/digits-dit")
>>> p.predict([{layer: option, ...}])          # higher = better (the target, e.g. -FID)
>>> p.layer_scores()                           # DataFrame(layer, option, score)
>>> p.module_scores()                          # DataFrame(module, module_type, layers, options, score)

Kinds (:data:`KINDS`): ``gnn`` (:mod:`.gnn`), the tabular kinds ``bits``, ``error``, ``additive``,
``lightgbm`` (:mod:`.tabular`, the GNN's baselines), and ``ensemble`` (:mod:`.ensemble_model`: the mean
of gnn and additive, the CLI's default). :func:`train` is the whole ``sensitivity train`` pipeline as a function.
"""

from .base import KINDS, Context, FoldModel, get_kind
from .data import CacheData, Dataset, LayerTable, Target, load_cache
from .predictor import (DEFAULT_TABULAR_KINDS, CVResult, Predictor, cross_validate, json_clean, load_predictor,
                       read_manifest, report_markdown, save_predictors)
from .metrics import ndcg_at_k, ranking_metrics, relevance
from .pipeline import evaluate_on_cache, train

__all__ = [
    "CVResult", "CacheData", "Context", "DEFAULT_TABULAR_KINDS", "Dataset", "FoldModel", "KINDS", "LayerTable",
    "Predictor", "Target", "cross_validate", "evaluate_on_cache", "get_kind", "json_clean", "load_cache", "load_predictor",
    "ndcg_at_k", "ranking_metrics", "read_manifest", "relevance", "report_markdown", "save_predictors", "train",
]
