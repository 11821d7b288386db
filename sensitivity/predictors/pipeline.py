"""The ``sensitivity train`` / ``sensitivity predict`` pipelines as functions.

:func:`train`: cache -> layer table (the cache's layer stats, in the traced graph's layer order) ->
dataset -> k-fold cross-validation of the GNN and every baseline on the same folds -> predictor folder
with the report and the primary predictor's layer / module scores.

:func:`evaluate_on_cache`: a saved predictor's members scored on another cache's configs (same
correlations as the report).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import SensitivityError
from ..evaluation.metric_specs import resolve_transform
from .base import Context
from .data import CacheData, Dataset, LayerTable, Target, load_cache
from .predictor import DEFAULT_TABULAR_KINDS, DEFAULT_PREDICTOR, cross_validate, load_predictor, read_manifest, save_predictors
from .metrics import ranking_metrics
from .scores import MAX_MODULE_CONFIGS

N_BACKGROUND = 64  # configs kept in the predictor folder as the background of the scores


def model_graph(model: str, weights: str = "meta", layers: Sequence[str] = (), model_id: Optional[str] = None):
    """The traced graph of zoo family ``model`` (on meta weights by default); for ``layers`` of a pipeline
    multiquantizer (names starting with their component), the joined graph of those components."""
    from ..graph.pipeline import graph_for_layers

    return graph_for_layers(model, list(layers), weights=weights, model_id=model_id)


def cache_graph(cache: str | Path, model: Optional[str] = None, weights: str = "meta"):
    """The graph for training on ``cache``: ``model``'s (default: the cache's family), of the cache's layers."""
    data = load_cache(cache)
    fam = model or data.family
    if not fam:
        raise SensitivityError(f"cache {cache} does not name its model: pass --model")
    return model_graph(fam, weights, list(data.layer_stats or ()), data.model_id)


def layer_table(data: CacheData, layers: Sequence[str], specs: Optional[Sequence[Any]] = None,
                multiquantizer: Optional[str] = None) -> LayerTable:
    """The layer table of ``data`` in the order ``layers`` (layer stats of the cache, else of the
    multiquantizer, else sizes from ``specs`` without errors). Raises if the layer sets differ."""
    if data.layer_stats:
        have = set(data.layer_stats)
        missing = [l for l in layers if l not in have]
        extra = [l for l in data.layer_stats if l not in set(layers)]
        if missing or extra:
            what = f"layer {missing[0]!r} of the model is not in" if missing else f"layer {extra[0]!r} of"
            raise SensitivityError(f"{what} cache {data.path} (the cache is of another model or layer rules; "
                                   f"{len(missing)} missing, {len(extra)} extra)")
        return LayerTable.from_layer_stats(list(layers), data.layer_stats)
    if multiquantizer:
        from ..multiquantizer import load_multiquantizer

        return LayerTable.from_multiquantizer(load_multiquantizer(multiquantizer), list(layers))
    if specs is None:
        raise SensitivityError(f"cache {data.path} has no layer stats: pass --multiquantizer")
    opts: List[str] = []
    for rec in data.records:
        for o in (rec.get("config") or {}).values():
            from ..options import canonical, FP16

            c = canonical(o)
            if c != FP16 and c not in opts:
                opts.append(c)
    from ..options import OPTION_NAMES

    opts = [o for o in OPTION_NAMES if o in opts] + [o for o in opts if o not in OPTION_NAMES]
    return LayerTable.from_specs(specs, opts)


def train(
    cache: str | Path,
    out: str | Path,
    model: Optional[str] = None,
    weights: str = "meta",
    predictor: str = DEFAULT_PREDICTOR,
    baselines: Sequence[str] = DEFAULT_TABULAR_KINDS,
    folds: int = 5,
    seed: int = 0,
    metric: str = "fid",
    lam: float = 0.0,
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    device: Optional[str] = None,
    multiquantizer: Optional[str] = None,
    graph: Any = None,
    scores: bool = True,
    max_module_configs: int = MAX_MODULE_CONFIGS,
    min_configs: int = 10,
    progress: bool = True,
    fidelity: str = "auto",
    cheap_metrics: Optional[Sequence[str]] = None,
    target_transform: str = "auto",
) -> Dict[str, Any]:
    """Train ``predictor`` and ``baselines`` on ``cache`` with k-fold CV; write folder ``out``.

    ``model``: zoo family (default: the one in the cache's evaluation description), its graph traced on
    ``weights`` (default meta: no memory); ``graph``: a prebuilt :class:`~sensitivity.graph.DenoiserGraph`
    instead. ``params``: ``{kind: {parameter: value}}``. Everything is checked before any work; returns
    the report (also in ``out/report.json``).

    ``fidelity``: ``auto`` learns from the cache's cheap labels too when it has them (``sample
    --full-configs``: :mod:`.fidelity`, members learning ``cheap_metrics``, a stack fitted on the full
    labels, ``baselines`` trained on the full labels alone); ``full`` ignores them; ``mixed`` requires them.
    ``target_transform``: ``none``, ``log`` (learn ``-log(metric)``; :class:`~.data.Target`) or ``auto``: ``log``
    for FID without a bit penalty, else ``none`` (:func:`~sensitivity.evaluation.metric_specs.resolve_transform`).
    """
    from ..checks import check_device, check_values
    from ..io import check_writable
    from .base import get_kind

    check_values(folds=folds, seed=seed, lam=lam, max_module_configs=max_module_configs)
    target_transform = resolve_transform(target_transform, metric, lam)  # an unknown one fails here, before any work
    if not Path(cache).exists():
        raise SensitivityError(f"cache {str(cache)!r} does not exist")
    for kind in [predictor, *baselines, *(params or {})]:
        get_kind(kind)  # unknown names fail here, before any work
    prior = ((params or {}).get("gnn") or {}).get("init_from")
    if prior:  # a transfer prior (another model's predictor folder): readable, with a gnn member
        from .predictor import read_fold_state

        read_fold_state(prior, "gnn", 0)
    check_device(device)
    check_writable(out, "--out", directory=True)
    if fidelity not in ("auto", "full", "mixed"):
        raise SensitivityError(f"--fidelity {fidelity!r}: expected auto, full or mixed")
    t0 = time.perf_counter()
    data = load_cache(cache)
    target = Target(metric, float(lam), transform=target_transform)
    min_records = max(min_configs, folds)
    from ..evaluation.cache import CHEAP
    from .fidelity import cheap_metrics_of

    cheap_records = data.fidelity_records.get(CHEAP) if fidelity != "full" else None
    if fidelity == "mixed" and not cheap_records:
        raise SensitivityError(f"cache {cache} has no cheap labels (`sensitivity sample --full-configs` writes them)")
    if cheap_metrics and not cheap_records:
        raise SensitivityError(f"--cheap-targets: cache {cache} has no cheap labels")
    mets: List[str] = []
    if cheap_records:
        mets = cheap_metrics_of(cheap_records, metric, cheap_metrics)
        for m in mets:
            Dataset.labelled_configs(cheap_records, Target(m), f"{cache} (cheap labels)", min_records)
        min_records = folds  # the full labels only rank the stack: a few are enough
    Dataset.labelled_configs(data.records, target, str(cache), min_records)  # before tracing a model
    fam = model or data.family
    if graph is None:
        if not fam:
            raise SensitivityError(f"cache {cache} does not name its model: pass --model")
        graph = model_graph(fam, weights, list(data.layer_stats or ()), data.model_id)
    table = layer_table(data, graph.weight_nodes, graph.layers, multiquantizer)
    ds = Dataset.from_records(data.records, table, target, source=str(cache), min_records=min_records)
    if cheap_records:
        return _train_multifidelity(cache, out, data, ds, table, graph, cheap_records, mets, predictor, baselines,
                                    folds, seed, params, device, fam, multiquantizer, scores, max_module_configs,
                                    progress, t0)
    kinds = [predictor] + [b for b in baselines if b != predictor]
    cls = get_kind(predictor)
    if hasattr(cls, "members_of"):  # an ensemble's members are reported (and saved) as kinds of their own too
        kinds += [k for k in cls.members_of((params or {}).get(predictor)) if k not in kinds]
    ctx = Context(table, target, graph, device)
    res = cross_validate(ds, ctx, kinds, folds=folds, seed=seed, params=params, progress=progress)
    rng = np.random.default_rng(seed)
    bg = ds.codes[np.sort(rng.choice(len(ds), min(N_BACKGROUND, len(ds)), replace=False))]
    meta = {"model_id": data.model_id or (graph.model_id if graph is not None else None), "family": fam,
            "cache": str(cache), "cache_signature": data.signature, "n_configs": len(ds),
            "multiquantizer_hash": data.multiquantizer_hash, "multiquantizer_path": multiquantizer,
            "act_bits": data.evaluation.get("act_bits")}
    res.report["model_id"] = meta["model_id"]
    res.report["cache"] = str(cache)
    save_predictors(out, res, predictor, meta, bg, compute_scores=scores, progress=progress,
                    max_module_configs=max_module_configs)
    res.report["seconds"] = round(time.perf_counter() - t0, 2)
    return res.report


def _train_multifidelity(cache, out, data, ds, table, graph, cheap_records, mets, predictor, baselines, folds, seed,
                         params, device, fam, multiquantizer, scores, max_module_configs, progress, t0) -> Dict[str, Any]:
    """:func:`train` on a cache with cheap and full labels (:mod:`.fidelity`)."""
    from .fidelity import STACK_KIND, cross_validate_multifidelity

    cheap = {m: Dataset.from_records(cheap_records, table, Target(m), source=f"{cache} (cheap labels)")
             for m in mets}
    ctx = Context(table, ds.target, graph, device)
    res, stack = cross_validate_multifidelity(cheap, ds, ctx, predictor, baselines=list(baselines), folds=folds,
                                              seed=seed, params=params, progress=progress)
    first = next(iter(cheap.values()))
    rng = np.random.default_rng(seed)
    bg = first.codes[np.sort(rng.choice(len(first), min(N_BACKGROUND, len(first)), replace=False))]
    meta = {"model_id": data.model_id or (graph.model_id if graph is not None else None), "family": fam,
            "cache": str(cache), "cache_signature": data.signature, "n_configs": len(ds),
            "n_cheap_configs": len(first), "multiquantizer_hash": data.multiquantizer_hash,
            "multiquantizer_path": multiquantizer, "act_bits": data.evaluation.get("act_bits")}
    res.report["model_id"] = meta["model_id"]
    res.report["cache"] = str(cache)
    save_predictors(out, res, STACK_KIND, meta, bg, compute_scores=scores, progress=progress,
                    max_module_configs=max_module_configs, stack=stack, ctx=ctx)
    res.report["seconds"] = round(time.perf_counter() - t0, 2)
    return res.report


def evaluate_on_cache(predictor_path: str | Path, cache: str | Path, kinds: Optional[Sequence[str]] = None,
                      device: Optional[str] = None, out: Optional[str | Path] = None) -> Dict[str, Any]:
    """Score ``cache``'s configs with the saved members ``kinds`` (default all) and report the
    correlations against the predictor's own target. Returns ``{"n_configs", "target", "predictors":
    {kind: {spearman, kendall, ndcg@10, n}}, "predictions": {kind: [..]}, "y", "metric", "avg_bits",
    "hashes": [..]}``; with ``out``, also writes the predictions there as CSV (config hash, target, one
    column per member)."""
    from ..checks import check_device
    from ..io import atomic_path, check_writable

    man = read_manifest(predictor_path)  # a clear error for a wrong folder before reading the cache
    check_device(device)
    if out:
        check_writable(out, "--out")
    kinds = list(kinds or man["kinds"])
    data = load_cache(cache)
    first = load_predictor(predictor_path, kind=kinds[0], device=device)
    ds = Dataset.from_records(data.records, first.table, first.target, source=str(cache), min_records=2)
    res: Dict[str, Any] = {"cache": str(cache), "predictor": str(predictor_path), "n_configs": len(ds),
                           "target": first.target.to_dict(), "predictors": {}, "predictions": {},
                           "y": ds.y.tolist(), "metric": ds.metric.tolist(), "avg_bits": ds.avg_bits.tolist(),
                           "hashes": ds.hashes}
    for kind in kinds:
        p = first if kind == kinds[0] else load_predictor(predictor_path, kind=kind, device=device)
        pred = p.predict_codes(ds.codes)
        res["predictors"][kind] = ranking_metrics(ds.y, pred)
        res["predictions"][kind] = pred.tolist()
    if out:
        import pandas as pd

        table = pd.DataFrame({"config_hash": res["hashes"], "target": res["y"], **res["predictions"]})
        with atomic_path(out, "--out") as tmp:
            table.to_csv(tmp, index=False)
    return res


def out_of_fold_predictions(predictor_path: str | Path, cache: str | Path, kind: Optional[str] = None,
                            device: Optional[str] = None) -> Dict[str, Any]:
    """Out-of-fold predictions of a saved member on the cache it was trained on: each config scored by
    the fold model that did not see it (the folder's ``fold_of``). Returns ``{"y", "pred", "fold_of",
    "kind"}`` (lists). Raises if the cache is not the training cache (config count differs)."""
    man = read_manifest(predictor_path)
    p = load_predictor(predictor_path, kind=kind, device=device)
    if not p.models:  # a multi-fidelity stack: its folds are over the full labels, its members over the cheap ones
        raise SensitivityError(f"predictor {predictor_path}: {p.kind} has no fold models of its own (its cross-validated "
                               "predictions on the full labels are in report.json); pass kind= one of its members")
    data = load_cache(cache)
    ds = Dataset.from_records(data.records, p.table, p.target, source=str(cache), min_records=2)
    fold_of = np.asarray(man["folds"]["fold_of"], dtype=np.int64)
    if len(fold_of) != len(ds):
        raise SensitivityError(f"cache {cache} has {len(ds)} configs, predictor {predictor_path} was trained "
                               f"on {len(fold_of)}: not its training cache")
    pred = np.full(len(ds), np.nan)
    for f, m in enumerate(p.models):
        te = np.where(fold_of == f)[0]
        pred[te] = m.predict_codes(ds.codes[te])
    return {"kind": p.kind, "y": ds.y.tolist(), "pred": pred.tolist(), "fold_of": fold_of.tolist()}
