"""Synthetic caches with a known answer, for tests and benchmarks of the predictors.

:func:`synthetic_cache` writes a real SQLite cache (:class:`~sensitivity.evaluation.cache.ConfigCache`)
whose configs are sampled as the reference samples them (per config ``p ~ U(0, 1)``; each layer 3-bit
with probability ``p``, method uniform) and whose "FID" comes from a hidden model::

    fid = 20 + Σ_l s_l · e(l, o_l)  +  γ · Σ_{(a, b) ∈ edges, both 3-bit} sqrt(s_a s_b)  +  N(0, noise²)

``s_l`` (layer sensitivity) is log-normal, larger for the first and last layers; ``e(l, o)`` grows
with fewer bits and depends on the method, with a per-layer method preference; the interaction term
runs over graph edges between weight nodes that are at most two hops apart (q/k of one attention,
FFN pairs, ...). The per-layer "error" in the layer stats is a noisy monotone function of ``e``, so
the Σ-error baseline has a real but imperfect signal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..options import OPTION_NAMES, QuantOption
from .data import LayerTable


def sample_configs(layers: Sequence[str], options: Sequence[str], n: int, seed: int = 0) -> List[Dict[str, str]]:
    """``n`` configs as the reference samples them (see the module docstring), seeded."""
    rng = np.random.default_rng(seed)
    methods = sorted({QuantOption.parse(o).method for o in options})
    bits = sorted({QuantOption.parse(o).bits for o in options})
    lo, hi = bits[0], bits[-1]
    out = []
    for _ in range(n):
        p = rng.uniform()
        b = np.where(rng.uniform(size=len(layers)) < p, lo, hi)
        m = rng.integers(0, len(methods), size=len(layers))
        out.append({l: QuantOption(methods[mi], int(bi)).name for l, mi, bi in zip(layers, m, b)})
    return out


def hidden_model(graph: Any, options: Sequence[str], seed: int = 0) -> Dict[str, Any]:
    """Parameters of the hidden FID model for ``graph``'s weight layers (see the module docstring)."""
    rng = np.random.default_rng(seed + 7919)
    layers = graph.weight_nodes
    L = len(layers)
    s = rng.lognormal(0.0, 0.8, size=L)
    s[0] *= 3.0
    s[-1] *= 3.0
    bits_eff = {3: 1.0, 4: 0.2}
    meth_eff = {"uaq": 1.0, "kmeans_c": 0.65, "kmeans_a": 1.25}
    pref = rng.lognormal(0.0, 0.25, size=(L, len(meth_eff)))
    meths = list(meth_eff)
    e = np.zeros((L, len(options)))
    for j, o in enumerate(options):
        q = QuantOption.parse(o)
        e[:, j] = bits_eff.get(q.bits, 0.5) * meth_eff.get(q.method, 1.0) * pref[:, meths.index(q.method) if q.method in meths else 0]
    # interaction pairs: weight nodes within two hops along data flow
    g = graph.graph
    idx = {l: i for i, l in enumerate(layers)}
    pairs = set()
    for a in layers:
        for b in g.successors(a):
            cands = [b] if b in idx else [c for c in g.successors(b) if c in idx]
            for c in cands:
                if c != a:
                    pairs.add((idx[a], idx[c]))
    return {"layers": layers, "options": list(options), "s": s, "e": e, "pairs": sorted(pairs), "gamma": 0.3}


def hidden_fid(model: Dict[str, Any], table: LayerTable, codes: np.ndarray, noise: float = 0.0,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """FID of the hidden model for ``codes [n, L]`` (code 0 = fp16 = no damage)."""
    codes = np.asarray(codes, dtype=np.int64)
    e = np.concatenate([np.zeros((len(model["layers"]), 1)), model["e"]], 1)
    lin = (model["s"][None, :] * e[np.arange(codes.shape[1])[None, :], codes]).sum(1)
    three = np.zeros_like(codes, dtype=bool)
    for k, o in enumerate(table.options):
        if QuantOption.parse(o).bits == 3:
            three |= codes == k + 1
    inter = np.zeros(len(codes))
    for a, b in model["pairs"]:
        inter += (three[:, a] & three[:, b]) * math.sqrt(model["s"][a] * model["s"][b])
    fid = 20.0 + lin + model["gamma"] * inter
    if noise and rng is not None:
        fid = fid + rng.normal(0.0, noise, size=len(fid))
    return fid


def synthetic_cache(path: str | Path, graph: Any, n: int = 200, seed: int = 0, noise: float = 0.5,
                    options: Sequence[str] = OPTION_NAMES, model_id: Optional[str] = None,
                    config_seed: Optional[int] = None) -> Path:
    """Write a SQLite cache of ``n`` synthetic records for ``graph``'s layers; returns its path.

    ``seed`` fixes the hidden model (and the noise); ``config_seed`` (default ``seed``) the sampled
    configs, so two caches of one hidden model with different configs test generalisation."""
    from ..evaluation.cache import ConfigCache, evaluation_signature

    options = list(options)
    table = LayerTable.from_specs(graph.layers, options)
    model = hidden_model(graph, options, seed)
    rng = np.random.default_rng(seed + 104729)
    # per-layer "error": noisy monotone function of the option's damage
    err = 0.02 * model["e"] * rng.lognormal(0.0, 0.5, size=model["e"].shape)
    table.error[:, 1:] = err
    configs = sample_configs(table.layers, options, n, seed if config_seed is None else config_seed)
    codes = table.encode(configs)
    fid = hidden_fid(model, table, codes, noise, rng)
    evaluation = {"model_id": model_id or graph.model_id or graph.model_class, "synthetic": True, "seed": seed,
                  "config_seed": seed if config_seed is None else config_seed,
                  "noise": noise, "n": n, "multiquantizer_hash": None}
    sig = evaluation_signature(evaluation)
    path = Path(path)
    cache = ConfigCache(path, signature=sig, evaluation=evaluation, create=True)
    try:
        cache.set_layer_stats({l: {"fp16_bytes": int(table.fp16_bytes[i]),
                                   "options": {o: [int(table.nbytes[i, j + 1]), float(table.error[i, j + 1])]
                                               for j, o in enumerate(options)}}
                               for i, l in enumerate(table.layers)})
        bits = table.avg_bits(codes)
        serr = table.summed_error(codes)
        for i, cfg in enumerate(configs):
            cache.add({"config": cfg, "avg_bits": float(bits[i]), "summed_error": float(serr[i]),
                       "quantized_bytes": int(round(bits[i] * table.fp16_bytes.sum() / 16.0)),
                       "metrics": {"fid": float(fid[i])}})
    finally:
        cache.close()
    return path
