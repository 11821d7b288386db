"""Active sampling: label the configs the predictor is least sure about near the target bits.

``sensitivity sample --strategy active`` starts from the first ``initial`` configs of the ordinary
random run (seed S, so they are shared with ``--strategy random``), then repeats rounds until
``num_configs`` are labelled: fit ``folds`` LightGBM models on k-fold subsets of the labelled configs
(one-hot options, as the LightGBM baseline), predict a pool of ``pool`` fresh random configs (indices
``1_000_000 + i`` of the same seed) whose average bits lie within ``window`` of a target, and label
the ``batch`` configs with the largest disagreement (std across the fold models). A round's picks
depend only on the labels before it and the seeds, so rerunning the command recomputes the same
rounds, finds their records in the cache and resumes where it stopped. Each round is its own run in
the cache (``algorithm: active/v1``, with the round number, the settings and the random start's run
id), its configs ordinary records; :func:`labelling_order` reads the order back from the cache, so
the first N labelled configs of an active run are well defined.

:func:`run_active` runs those rounds on a cache after the random start (``sensitivity sample
--strategy active`` calls it). This is a stage after the predictors (it trains models) and before
search; evaluation does not import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import SensitivityError

POOL_OFFSET = 1_000_000


@dataclass(frozen=True)
class ListSampler:
    """Config ``i`` = ``configs[i]`` (a fixed list); duck-types SamplerSpec for JobPlan."""

    configs: Tuple[Tuple[Tuple[str, str], ...], ...]
    meta: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def from_configs(cls, configs: Sequence[Mapping[str, str]], **meta: Any) -> "ListSampler":
        return cls(tuple(tuple(sorted(c.items())) for c in configs), tuple(sorted(meta.items())))

    def check_layers(self, layers: Iterable) -> None:
        names = {l if isinstance(l, str) else l.name for l in layers}
        for c in self.configs:
            for l, _ in c:
                if l not in names:
                    raise SensitivityError(f"active sampler: layer {l!r} is not in the multiquantizer")

    def sample(self, layers: Iterable, index: int) -> Dict[str, str]:
        return dict(self.configs[index])

    def to_dict(self) -> dict:
        h = hashlib.blake2b(json.dumps(self.configs).encode(), digest_size=8).hexdigest()
        return {"algorithm": "active/v1", **dict(self.meta), "configs": len(self.configs), "configs_hash": h}


def onehot(configs: Sequence[Mapping[str, str]], layers: Sequence[str], options: Sequence[str]) -> np.ndarray:
    """float32 [N, L·(K+1)]: per layer one-hot of (fp16, options...)."""
    idx = {o: k + 1 for k, o in enumerate(options)}
    K = len(options) + 1
    X = np.zeros((len(configs), len(layers) * K), dtype=np.float32)
    for i, c in enumerate(configs):
        for j, l in enumerate(layers):
            X[i, j * K + idx.get(c.get(l, "fp16"), 0)] = 1.0
    return X


def fold_ensemble_std(X: np.ndarray, y: np.ndarray, Xp: np.ndarray, folds: int = 5, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``folds`` LightGBM models, each fit on all labelled rows but one fold."""
    import lightgbm as lgb
    from sklearn.model_selection import KFold

    preds = []
    for k, (tr, _) in enumerate(KFold(n_splits=folds, shuffle=True, random_state=seed).split(X)):
        m = lgb.LGBMRegressor(n_estimators=300, learning_rate=0.03, num_leaves=15, min_child_samples=5, subsample=0.8,
                              subsample_freq=1, colsample_bytree=0.5, random_state=seed + k, deterministic=True,
                              force_row_wise=True, verbose=-1, n_jobs=1)
        m.fit(X[tr], y[tr])
        preds.append(m.predict(Xp))
    P = np.vstack(preds)
    return P.mean(axis=0), P.std(axis=0)


def choose_batch(labelled: Sequence[Mapping[str, str]], y: np.ndarray, pool: Sequence[Mapping[str, str]],
                 pool_bits: np.ndarray, layers: Sequence[str], options: Sequence[str], targets: Sequence[float],
                 batch: int, window: float = 0.15, folds: int = 5, seed: int = 0) -> List[int]:
    """Indices into ``pool`` of the ``batch`` near-target configs with the largest fold disagreement."""
    near = np.min(np.abs(pool_bits[:, None] - np.asarray(targets)[None, :]), axis=1) <= window
    cand = np.flatnonzero(near)
    if cand.size == 0:
        raise SensitivityError(f"active sampling: no pool config within {window} bits of the targets {list(targets)}")
    X = onehot(labelled, layers, options)
    _, std = fold_ensemble_std(X, np.asarray(y, dtype=np.float64), onehot([pool[i] for i in cand], layers, options),
                               folds=folds, seed=seed)
    order = cand[np.lexsort((cand, -std))]
    return [int(i) for i in order[:batch]]


def labelling_order(cache: Any, seed: Optional[int] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of an active run in the order they were labelled: the random start (its run's
    indices 0..initial-1), then round 1, 2, ... (each in its run's index order); with ``limit``, the
    first ``limit`` of them (only the rounds they come from must be finished).

    ``cache``: a path or an open :class:`~sensitivity.evaluation.cache.ConfigCache`; ``seed`` picks
    the run when the cache holds active runs of several seeds or settings (otherwise it must hold
    one). Raises :class:`SensitivityError` when there is no active run, several match, or a round is
    missing or unfinished (rerun the same ``sensitivity sample --strategy active`` command to finish it).
    """
    from .evaluation.cache import ConfigCache

    own = not isinstance(cache, ConfigCache)
    c = ConfigCache(cache) if own else cache
    try:
        settings = ("seed", "initial", "initial_run", "batch", "pool", "window", "targets", "metric")
        groups: Dict[tuple, List[Dict[str, Any]]] = {}
        for run in c.runs():
            s = run["sampler"]
            if s.get("algorithm") != "active/v1" or (seed is not None and s.get("seed") != seed):
                continue
            groups.setdefault(tuple(json.dumps(s.get(k)) for k in settings), []).append(run)
        where = f"cache {c.path}" + ("" if seed is None else f" (seed {seed})")
        if not groups:
            raise SensitivityError(f"{where} holds no active run (sensitivity sample --strategy active)")
        if len(groups) > 1:
            seeds = sorted({json.loads(k[0]) for k in groups}, key=str)
            raise SensitivityError(f"{where} holds {len(groups)} active runs (seeds {seeds}, or other settings): "
                                   "pass the seed of one, or keep each run in its own cache")
        runs = sorted(next(iter(groups.values())), key=lambda r: int(r["sampler"]["round"]))
        first = runs[0]["sampler"]
        initial, start = int(first["initial"]), first["initial_run"]
        out = [r for r in c.records(start) if int(r["index"]) < initial]
        if len(out) < initial:
            raise SensitivityError(f"{where}: the random start has {len(out)} of its {initial} configs")
        for k, run in enumerate(runs, start=1):
            if limit is not None and len(out) >= limit:
                break
            if int(run["sampler"]["round"]) != k:
                raise SensitivityError(f"{where}: active round {k} is missing (found round {run['sampler']['round']})")
            recs = c.records(run["run_id"])
            if len(recs) < int(run["sampler"]["configs"]):
                raise SensitivityError(f"{where}: active round {k} has {len(recs)} of its {run['sampler']['configs']} "
                                       "configs; rerun the same command to finish it")
            out.extend(recs)
        return out if limit is None else out[:limit]
    finally:
        if own:
            c.close()


class ActiveResult(NamedTuple):
    """What :func:`run_active` did: the last round's job summary, the labelled configs in labelling
    order, the number of active rounds and the JSON file holding the order."""

    summary: Any
    labelled: List[Dict[str, str]]
    rounds: int
    order_path: Path


def run_active(cache_path: str, mq: Any, plan: Any, factory: Any, first: Any, *, num_configs: int,
               signature: str, evaluation: Mapping[str, Any], seed: int = 0, initial: int = 40, batch: int = 40,
               pool: int = 2000, targets: Sequence[float] = (3.4, 3.6, 3.8, 4.0), window: float = 0.15,
               metric: str = "fid", workers: int = 1, threads: Optional[int] = None,
               devices: Optional[Sequence[str]] = None, progress: bool = True) -> ActiveResult:
    """Active rounds after the random start until ``num_configs`` configs are labelled in ``cache_path``.

    ``plan``: the random start's ``JobPlan`` (its configs are the first labelled), ``first``: its
    ``JobSummary``; ``factory``: the evaluator factory of the job (``signature`` / ``evaluation`` its
    protocol's); each round labels ``batch`` configs of a ``pool`` of fresh random ones within ``window``
    bits of a target, on ``workers`` local workers (or one per ``devices`` entry). The order is written to
    ``<cache_path>.active.json``.
    """
    from .evaluation.cache import ConfigCache, config_hash
    from .evaluation.metric_specs import lower_is_better
    from .evaluation.runners import JobPlan, LocalRunner, run_job
    from .io import atomic_write_text
    from .sizes import SizeTable

    targets = [float(t) for t in targets]
    layers = list(mq.layer_names)
    selected = [plan.config(i) for i in range(plan.num_configs)]
    candidates = [dict(plan.sampler.sample(layers, POOL_OFFSET + i)) for i in range(pool)]
    sizes = SizeTable.from_layer_stats(plan.layer_stats, layers)
    pool_bits = np.array([sizes.avg_bits(c) for c in candidates])
    lower = lower_is_better(metric)
    rounds, summary = 0, first
    while len(selected) < num_configs:
        with ConfigCache(cache_path) as c:
            by_hash = {r["config_hash"]: r for r in c.records()}
        ys = []
        for cfg in selected:
            rec = by_hash.get(config_hash(cfg))
            v = None if rec is None else (rec.get("metrics") or {}).get(metric)
            if v is None:
                raise SensitivityError(f"active sampling: a labelled config has no '{metric}' in {cache_path}; "
                                       "rerun to finish the failed configs")
            ys.append(-float(v) if lower else float(v))
        taken = {config_hash(c) for c in selected}
        free = [i for i, c in enumerate(candidates) if config_hash(c) not in taken]
        n = min(batch, num_configs - len(selected))
        picks = choose_batch(selected, np.asarray(ys), [candidates[i] for i in free], pool_bits[free], layers,
                             list(mq.options), targets, n, window=window, seed=seed + rounds)
        new = [candidates[free[i]] for i in picks]
        rounds += 1
        sampler = ListSampler.from_configs(new, seed=seed, round=rounds, metric=metric,
                                           targets=",".join(f"{t:g}" for t in targets), initial=plan.num_configs,
                                           initial_run=first.run_id, batch=batch, pool=pool, window=window)
        rplan = JobPlan(layers, sampler, len(new), plan.layer_stats)
        runner = LocalRunner(factory, workers=workers, threads=threads, devices=list(devices) if devices else None)
        summary = run_job(cache_path, rplan, runner, signature=signature, evaluation=evaluation,
                          progress=progress, desc=f"active round {rounds}")
        if summary.failed:
            break
        selected.extend(new)
    out = Path(str(cache_path) + ".active.json")
    atomic_write_text(out, json.dumps({"seed": seed, "initial": initial, "batch": batch, "pool": pool,
                                       "targets": targets, "window": window, "metric": metric,
                                       "order": [config_hash(c) for c in selected]}, indent=1))
    return ActiveResult(summary, selected, rounds, out)
