"""Knapsack groups: one per layer (op level) or per scored module (option combinations)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..errors import SensitivityError
from ..options import canonical
from .budgets import _table, layer_order
from .solver import MAX_COMBINATIONS


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
