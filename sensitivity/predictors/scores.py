"""Per-layer and per-module option scores derived from a trained predictor (partial dependence).

For a layer ``l`` and option ``o``::

    score(l, o) = mean_b q(b with l := o)  −  mean_{o'} mean_b q(b with l := o')

where ``b`` runs over ``n_background`` configs drawn (seeded) from the training cache and ``q`` is the
predicted **quality** ``y + λ·avg_bits`` (e.g. −FID: the bit-penalty of the target is removed, since the
search enforces the bit budget itself). Units: the metric's (a score of −0.8 = 0.8 FID worse than the
layer's average option). A module (:meth:`~sensitivity.graph.DenoiserGraph.modules`: an attention,
cross-attention, FFN, embedding or output module, ...) is scored the same way for every combination of
its layers' options when there are at most ``max_combinations`` of them; the score then includes the
interactions the predictor learned between those layers.

The same definition serves every predictor kind: for the additive model it returns exactly its
centred weights, for the GNN and LightGBM it averages their non-additive responses over realistic
surroundings.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .data import LayerTable, Target

MAX_COMBINATIONS = 1296
MAX_MODULE_CONFIGS = 10_000  # predictions per fold model spent on module scores (combinations × background)


def combination_limit(modules: Dict[str, Dict[str, Any]], n_options: int, n_background: int,
                      max_combinations: int = MAX_COMBINATIONS, max_configs: int = MAX_MODULE_CONFIGS) -> int:
    """The largest ``limit ≤ max_combinations`` (a power of ``n_options``) whose modules cost at most
    ``max_configs`` predictions (Σ combinations × background); 0 if even pairs do not fit."""
    sizes = sorted(n_options ** len(d["layers"]) for d in modules.values() if len(d["layers"]) > 1)
    best = 0
    for limit in sorted({s for s in sizes if s <= max_combinations}):
        if sum(s for s in sizes if s <= limit) * n_background <= max_configs:
            best = limit
    return best


def _quality(predict: Callable[[np.ndarray], np.ndarray], table: LayerTable, target: Target,
             codes: np.ndarray, chunk: int) -> np.ndarray:
    out = []
    for b in range(0, len(codes), chunk):
        c = codes[b:b + chunk]
        out.append(target.quality(predict(c), table.avg_bits(c)))
    return np.concatenate(out) if out else np.zeros(0)


def background(codes: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` configs drawn without replacement (seeded) from ``codes`` (all of them if fewer)."""
    codes = np.asarray(codes)
    if len(codes) <= n:
        return codes.copy()
    rng = np.random.default_rng(seed)
    return codes[np.sort(rng.choice(len(codes), n, replace=False))]


def layer_scores(predict: Callable[[np.ndarray], np.ndarray], table: LayerTable, target: Target,
                 bg: np.ndarray, chunk: int = 4096, progress: bool = True) -> pd.DataFrame:
    """``DataFrame(layer, option, score)`` for every layer and quantized option (see the module docstring)."""
    L, O = len(table.layers), len(table.options)
    B = len(bg)
    opts = np.arange(1, O + 1)
    rows = []
    layers_per_call = max(1, chunk // max(1, O * B))
    it = range(0, L, layers_per_call)
    bar = tqdm(it, desc="layer scores", unit="batch", disable=not progress, leave=False)
    for start in bar:
        ls = list(range(start, min(L, start + layers_per_call)))
        codes = np.repeat(bg[None, None], len(ls), 0).repeat(O, 1)  # [nl, O, B, L]
        for i, l in enumerate(ls):
            codes[i, :, :, l] = opts[:, None]
        q = _quality(predict, table, target, codes.reshape(-1, L), chunk).reshape(len(ls), O, B).mean(2)
        q = q - q.mean(1, keepdims=True)
        for i, l in enumerate(ls):
            for j in range(O):
                rows.append((table.layers[l], table.options[j], float(q[i, j])))
    bar.close()
    return pd.DataFrame(rows, columns=["layer", "option", "score"])


def module_scores(predict: Callable[[np.ndarray], np.ndarray], table: LayerTable, target: Target,
                  modules: Dict[str, Dict[str, Any]], bg: np.ndarray, max_combinations: int = MAX_COMBINATIONS,
                  chunk: int = 4096, progress: bool = True) -> pd.DataFrame:
    """``DataFrame(module, module_type, layers, options, score)``: one row per option combination of
    every module with ``1 < combinations ≤ max_combinations`` (``layers``/``options``: tuples)."""
    O = len(table.options)
    rows = []
    todo = [(m, d) for m, d in modules.items() if len(d["layers"]) > 1 and O ** len(d["layers"]) <= max_combinations]
    bar = tqdm(todo, desc="module scores", unit="module", disable=not progress, leave=False)
    for name, d in bar:
        ls = [table.index[l] for l in d["layers"]]
        combos = np.array(list(itertools.product(range(1, O + 1), repeat=len(ls))), dtype=np.int16)  # [C, n]
        C, B = len(combos), len(bg)
        codes = np.repeat(bg[None], C, 0)  # [C, B, L]
        codes[:, :, ls] = combos[:, None, :]
        q = _quality(predict, table, target, codes.reshape(C * B, -1), chunk).reshape(C, B).mean(1)
        q = q - q.mean()
        names = table.options
        for c in range(C):
            rows.append((name, d.get("type"), tuple(d["layers"]), tuple(names[k - 1] for k in combos[c]), float(q[c])))
    bar.close()
    return pd.DataFrame(rows, columns=["module", "module_type", "layers", "options", "score"])


# ---- CSV round trip (tuples as "a|b|c") ----------------------------------------------------------
def module_scores_to_csv(df: pd.DataFrame, path) -> None:
    out = df.copy()
    out["layers"] = out["layers"].map(lambda t: "|".join(t))
    out["options"] = out["options"].map(lambda t: "|".join(t))
    out.to_csv(path, index=False)


def module_scores_from_csv(path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"module": str, "module_type": str, "layers": str, "options": str})
    df["layers"] = df["layers"].map(lambda s: tuple(s.split("|")))
    df["options"] = df["options"].map(lambda s: tuple(s.split("|")))
    return df
