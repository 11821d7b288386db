"""Training data for predictors: cache records -> option codes, targets, sizes, errors.

* :class:`Target` — what is predicted: ``y = s·metric − λ·avg_bits`` with ``s = −1`` for metrics where
  lower is better (FID, KID, MSE) and ``+1`` otherwise, so **higher y is always better**. ``λ = 0``
  predicts the metric alone (``−FID``); the reference trains ``−FID − 150·bits`` (``--lam 150``).
  ``quality = y + λ·avg_bits`` recovers the metric part exactly (avg bits are known arithmetic).
* :class:`LayerTable` — the layers (graph order), the option vocabulary (code 0 = ``fp16``, then the
  quantized options), bytes and relative squared error per (layer, option) from the cache's (or
  multiquantizer's) layer stats; errors are NaN where unknown.
* :class:`Dataset` — codes ``int16 [n, L]``, targets ``y [n]``, avg bits, summed error, config hashes.
* :func:`load_cache` — records + evaluation description + layer stats from a cache file (SQLite
  cache, or a ``.parquet``/``.csv`` export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import config_hash
from ..errors import SensitivityError
from ..evaluation.metric_specs import TARGET_TRANSFORMS, lower_is_better, record_metric  # noqa: F401 - re-exported
from ..options import FP16, canonical
from ..sizes import SizeTable


# ------------------------------------------------------------------------------------------ target
@dataclass(frozen=True)
class Target:
    """``y = sign·f(metric) − lam·avg_bits`` (higher = better): ``sign`` is −1 for lower-is-better metrics,
    ``f`` the identity (``transform="none"``) or ``log`` (``transform="log"``: a ratio of FIDs weighs the same
    at every level, so the few worst configs do not dominate a squared-error fit)."""

    metric: str = "fid"
    lam: float = 0.0
    lower_is_better: Optional[bool] = None
    transform: str = "none"

    def __post_init__(self) -> None:
        if self.transform not in TARGET_TRANSFORMS:
            raise SensitivityError(f"unknown target transform {self.transform!r}; use {', '.join(TARGET_TRANSFORMS)}")

    @property
    def sign(self) -> float:
        return -1.0 if lower_is_better(self.metric, self.lower_is_better) else 1.0

    def values(self, metric: np.ndarray, avg_bits: np.ndarray) -> np.ndarray:
        m = np.asarray(metric, dtype=np.float64)
        if self.transform == "log":
            if not (m > 0).all():
                bad = m[~(m > 0)][0]
                raise SensitivityError(f"target transform log needs {self.metric} > 0, got {bad:g}")
            m = np.log(m)
        return self.sign * m - self.lam * np.asarray(avg_bits, dtype=np.float64)

    def quality(self, y: np.ndarray, avg_bits: np.ndarray) -> np.ndarray:
        """``sign·f(metric)`` part of ``y`` (e.g. −FID, or −log FID): ``y + lam·avg_bits``."""
        return np.asarray(y, dtype=np.float64) + self.lam * np.asarray(avg_bits, dtype=np.float64)

    def metric_of(self, y: np.ndarray, avg_bits: Any = 0.0) -> np.ndarray:
        """The metric a prediction ``y`` stands for (the inverse of :meth:`values`), e.g. the predicted FID."""
        m = self.sign * self.quality(y, avg_bits)
        return np.exp(m) if self.transform == "log" else m

    def describe(self) -> str:
        f = f"log({self.metric})" if self.transform == "log" else self.metric
        s = ("-" if self.sign < 0 else "") + f
        return s if self.lam == 0 else f"{s} - {self.lam:g}*avg_bits"

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "lam": self.lam, "lower_is_better": self.lower_is_better,
                "transform": self.transform, "formula": self.describe()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Target":
        return cls(str(d["metric"]), float(d.get("lam", 0.0)), d.get("lower_is_better"), str(d.get("transform", "none")))


# ------------------------------------------------------------------------------------------ layers
@dataclass
class LayerTable:
    """Layers, option vocabulary and per-(layer, option) bytes / error.

    ``options``: quantized option names; code ``k`` (1-based) is ``options[k-1]``, code 0 is fp16.
    ``nbytes``/``error``: ``[L, 1 + O]`` (column 0 = fp16: fp16 bytes, error 0).
    """

    layers: List[str]
    options: List[str]
    fp16_bytes: np.ndarray
    nbytes: np.ndarray
    error: np.ndarray
    index: Dict[str, int] = field(init=False, repr=False)
    opt_index: Dict[str, int] = field(init=False, repr=False)
    _sizes: Optional[SizeTable] = field(init=False, repr=False, default=None, compare=False)

    def __post_init__(self) -> None:
        self.fp16_bytes = np.asarray(self.fp16_bytes, dtype=np.int64)
        self.nbytes = np.asarray(self.nbytes, dtype=np.int64)
        self.error = np.asarray(self.error, dtype=np.float64)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.opt_index = {FP16: 0, **{o: i + 1 for i, o in enumerate(self.options)}}

    @property
    def codes(self) -> List[str]:
        """Option name of each code (``[fp16, *options]``)."""
        return [FP16] + list(self.options)

    @property
    def has_errors(self) -> bool:
        return bool(np.isfinite(self.error[:, 1:]).all())

    @property
    def sizes(self) -> SizeTable:
        """The table's bytes and errors as a :class:`~sensitivity.sizes.SizeTable` (codes = its option order)."""
        if self._sizes is None:
            self._sizes = SizeTable(self.layers, self.options, self.fp16_bytes, self.nbytes[:, 1:], self.error[:, 1:])
        return self._sizes

    @classmethod
    def from_sizes(cls, sizes: SizeTable) -> "LayerTable":
        """From a SizeTable holding every option for every layer."""
        missing = np.argwhere(sizes.nbytes < 0)
        if missing.size:
            i, j = missing[0]
            raise SensitivityError(f"layer {sizes.layers[i]!r}: option {sizes.options[j]!r} missing from the layer stats")
        nb = np.concatenate([sizes.fp16_bytes[:, None], sizes.nbytes], axis=1)
        err = np.concatenate([np.zeros((len(sizes.layers), 1)), sizes.error], axis=1)
        return cls(list(sizes.layers), list(sizes.options), sizes.fp16_bytes, nb, err)

    @classmethod
    def from_layer_stats(cls, layers: Sequence[str], stats: Mapping[str, Mapping[str, Any]],
                         options: Optional[Sequence[str]] = None) -> "LayerTable":
        """From a cache's ``layer_stats`` (``{layer: {"fp16_bytes", "options": {opt: [nbytes, error]}}}``);
        ``options`` default: those of the first layer."""
        layers = list(layers)
        if options is None and layers and layers[0] in stats:
            options = [canonical(o) for o in stats[layers[0]]["options"]]
        return cls.from_sizes(SizeTable.from_layer_stats(stats, layers, options or []))

    @classmethod
    def from_specs(cls, specs: Sequence[Any], options: Sequence[str]) -> "LayerTable":
        """From :class:`~sensitivity.layers.LayerSpec` shapes (sizes by formula, errors unknown = NaN)."""
        return cls.from_sizes(SizeTable.from_shapes({s.name: s.shape for s in specs}, options))

    @classmethod
    def from_multiquantizer(cls, mq: Any, layers: Optional[Sequence[str]] = None) -> "LayerTable":
        layers = list(layers) if layers is not None else list(mq.layer_names)
        stats = {l: {"fp16_bytes": mq.fp16_bytes(l), "options": {o: [mq.stats(l, o)["nbytes"], mq.stats(l, o)["error"]]
                                                                 for o in mq.options}} for l in layers}
        return cls.from_layer_stats(layers, stats, list(mq.options))

    # ---- configs <-> codes -----------------------------------------------------------------------
    def encode(self, configs: Iterable[Mapping[str, str]], source: str = "config") -> np.ndarray:
        """``int16 [n, L]`` option codes; absent layers are fp16. Raises on unknown layers / options."""
        rows = []
        for i, cfg in enumerate(configs):
            row = np.zeros(len(self.layers), np.int16)
            for layer, opt in cfg.items():
                j = self.index.get(layer)
                if j is None:
                    raise SensitivityError(f"{source} {i}: layer {layer!r} is not a layer of this predictor's model")
                try:
                    k = self.opt_index.get(canonical(opt))
                except SensitivityError:
                    k = None
                if k is None:
                    raise SensitivityError(f"{source} {i}: layer {layer!r}: option {opt!r} is not one of "
                                           f"{', '.join(self.codes)}")
                row[j] = k
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(self.layers)), np.int16)

    def decode(self, codes: np.ndarray) -> List[Dict[str, str]]:
        """Configs ``{layer: option}`` (fp16 layers omitted) from codes."""
        names = self.codes
        return [{l: names[int(c)] for l, c in zip(self.layers, row) if c != 0} for row in np.asarray(codes)]

    def avg_bits(self, codes: np.ndarray) -> np.ndarray:
        """``16 · Σ bytes / Σ fp16 bytes`` per config (all layers of the table), float64 [n]."""
        return self.sizes.avg_bits_of_codes(codes)

    def summed_error(self, codes: np.ndarray) -> np.ndarray:
        """Σ relative squared error per config (fp16 = 0), float64 [n]."""
        return self.sizes.error_of_codes(codes)

    def onehot(self, codes: np.ndarray) -> np.ndarray:
        """``float32 [n, L·(1+O)]`` one-hot option features (column ``l·(1+O) + code``)."""
        codes = np.asarray(codes, dtype=np.int64)
        n, L = codes.shape
        K = 1 + len(self.options)
        out = np.zeros((n, L * K), np.float32)
        out[np.arange(n)[:, None], np.arange(L)[None, :] * K + codes] = 1.0
        return out

    # ---- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"layers": self.layers, "options": self.options, "fp16_bytes": self.fp16_bytes.tolist(),
                "nbytes": self.nbytes.tolist(),
                "error": [[None if not math.isfinite(v) else v for v in row] for row in self.error.tolist()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerTable":
        err = np.array([[np.nan if v is None else v for v in row] for row in d["error"]], dtype=np.float64)
        return cls(list(d["layers"]), list(d["options"]), np.array(d["fp16_bytes"]), np.array(d["nbytes"]), err)


def read_feature_table(path: str | Path, table: LayerTable) -> np.ndarray:
    """A per-(layer, option) feature from CSV ``layer,option,value`` (e.g. a measured single-layer
    sensitivity): ``float64 [L, 1 + O]`` in ``table``'s code order, fp16 column 0. Every quantized
    (layer, option) of ``table`` must be present and finite; values must be ≥ 0."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"feature table {str(path)!r} does not exist")
    try:
        df = pd.read_csv(p, dtype={"layer": str, "option": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise SensitivityError(f"feature table {p}: not a CSV ({exc})") from None
    missing_cols = [c for c in ("layer", "option", "value") if c not in df.columns]
    if missing_cols:
        raise SensitivityError(f"feature table {p}: no column {missing_cols[0]!r} (need layer,option,value)")
    out = np.full((len(table.layers), 1 + len(table.options)), np.nan)
    out[:, 0] = 0.0
    for layer, opt, v in zip(df["layer"], df["option"], df["value"]):
        i = table.index.get(layer)
        if i is None:
            raise SensitivityError(f"feature table {p}: layer {layer!r} is not a layer of this model")
        k = table.opt_index.get(canonical(opt))
        if k is None:
            raise SensitivityError(f"feature table {p}: layer {layer!r}: option {opt!r} is not one of {', '.join(table.codes)}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise SensitivityError(f"feature table {p}: layer {layer!r}, option {opt!r}: value {v!r} (need finite, >= 0)")
        if k:
            out[i, k] = v
    gaps = np.argwhere(~np.isfinite(out))
    if gaps.size:
        i, k = gaps[0]
        raise SensitivityError(f"feature table {p}: no value for layer {table.layers[i]!r}, option "
                               f"{table.codes[k]!r} ({len(gaps)} missing)")
    return out


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class Dataset:
    """Labelled configs: ``codes [n, L]``, ``y [n]`` (target), ``metric [n]``, ``avg_bits [n]``, hashes."""

    table: LayerTable
    target: Target
    codes: np.ndarray
    y: np.ndarray
    metric: np.ndarray
    avg_bits: np.ndarray
    hashes: List[str]
    summed_error: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "Dataset":
        idx = np.asarray(idx)
        return Dataset(self.table, self.target, self.codes[idx], self.y[idx], self.metric[idx], self.avg_bits[idx],
                       [self.hashes[i] for i in idx], None if self.summed_error is None else self.summed_error[idx])

    @staticmethod
    def labelled_configs(records: Sequence[Mapping[str, Any]], target: Target, source: str = "cache",
                         min_records: int = 1) -> Tuple[Dict[str, List[Tuple[Mapping[str, str], float, Optional[float]]]], List[str]]:
        """``({config hash: [(config, metric, summed error), ...]}, hashes in first-seen order)`` of the records
        with a finite ``target.metric``; raises :class:`SensitivityError` (naming ``source``) below ``min_records``
        distinct configs. Needs no layer table: callers check a cache before tracing a model."""
        by_hash: Dict[str, List[Tuple[Mapping[str, str], float, Optional[float]]]] = {}
        order: List[str] = []
        skipped = 0
        for rec in records:
            v = record_metric(rec, target.metric)
            if v is None or not isinstance(rec.get("config"), Mapping):
                skipped += 1
                continue
            cfg = {str(k): canonical(o) for k, o in rec["config"].items() if canonical(o) != FP16}
            h = config_hash(cfg) if cfg else "fp16"
            if h not in by_hash:
                by_hash[h] = []
                order.append(h)
            err = rec.get("summed_error")
            by_hash[h].append((cfg, v, None if err is None else float(err)))
        if len(order) < min_records:
            raise SensitivityError(f"{source}: {len(order)} configs with metric {target.metric!r} "
                                   f"({skipped} records without it); need at least {min_records}")
        return by_hash, order

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], table: LayerTable, target: Target,
                     source: str = "cache", min_records: int = 1) -> "Dataset":
        """Configs of ``records`` with a finite ``target.metric``; duplicate configs are averaged.

        Avg bits are recomputed from ``table`` (not trusted from the record). The summed error comes from
        the table's errors, else from the records' ``summed_error``.
        """
        by_hash, order = cls.labelled_configs(records, target, source, min_records)
        configs = [by_hash[h][0][0] for h in order]
        metric = np.array([np.mean([v for _, v, _ in by_hash[h]]) for h in order])
        codes = table.encode(configs, source=f"{source} config")
        bits = table.avg_bits(codes)
        if table.has_errors:
            err = table.summed_error(codes)
        else:
            errs = [by_hash[h][0][2] for h in order]
            err = None if any(e is None for e in errs) else np.array(errs, dtype=np.float64)
        return cls(table, target, codes, target.values(metric, bits), metric, bits, order, err)


# ------------------------------------------------------------------------------------------ caches
@dataclass
class CacheData:
    """What :func:`load_cache` returns: records, evaluation description, layer stats, source path."""

    records: List[Dict[str, Any]]
    evaluation: Dict[str, Any]
    layer_stats: Dict[str, Dict[str, Any]]
    path: str
    signature: Optional[str] = None
    #: records of the cache's other fidelities (``{"cheap": [...]}`` after ``sample --full-configs``), canonical order
    fidelity_records: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    @property
    def model_id(self) -> Optional[str]:
        return self.evaluation.get("model_id") or self.evaluation.get("model")

    @property
    def family(self) -> Optional[str]:
        mid = self.model_id
        return mid.split(":", 1)[0] if mid else None

    @property
    def multiquantizer_hash(self) -> Optional[str]:
        return self.evaluation.get("multiquantizer_hash")


def canonical_order(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Records sorted by (run, sampler index, config hash): the order parallel workers finished in
    (the cache's row order) must not change folds or training, or one cache would train two ways."""
    def key(r: Mapping[str, Any]):
        idx = r.get("index")
        return (r.get("run_id") is None, str(r.get("run_id") or ""), idx is None, int(idx) if idx is not None else 0,
                str(r.get("config_hash") or ""))

    return sorted((dict(r) for r in records), key=key)


def load_cache(path: str | Path) -> CacheData:
    """Read a cache: the SQLite file of ``sensitivity evaluate`` or a ``.parquet``/``.csv`` export.

    Records come in :func:`canonical_order`, whatever order the evaluation job wrote them in."""
    p = Path(path)
    if not p.exists():
        raise SensitivityError(f"cache {str(p)!r} does not exist")
    from ..evaluation.cache import ConfigCache, read_records_file

    if p.suffix.lower() in (".parquet", ".pq", ".csv", ".pkl", ".pickle"):
        sig, evaluation, recs, stats = read_records_file(p)
        return CacheData(canonical_order(recs), dict(evaluation or {}), dict(stats or {}), str(p), sig)
    cache = ConfigCache(p)
    try:
        others = {name: canonical_order(recs) for name, recs in cache.fidelity_records().items() if name != cache.fidelity}
        return CacheData(canonical_order(cache.records()), dict(cache.evaluation or {}), dict(cache.layer_stats or {}), str(p),
                         cache.signature, others)
    finally:
        cache.close()
