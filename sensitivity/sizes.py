"""Sizes of configs: one table of bytes and error per (layer, option), the one place that counts them.

:class:`SizeTable` holds, for the layers of one model, the fp16 bytes of each layer and the bytes
(payload + overhead) and relative squared error ``||W-Ŵ||²/||W||²`` of each quantization option.
Build it from a multiquantizer (:meth:`SizeTable.from_multiquantizer`), a cache's layer stats
(:meth:`SizeTable.from_layer_stats`), layer shapes (:meth:`SizeTable.from_shapes`, bytes by
:meth:`sensitivity.options.QuantOption.nbytes`, no errors) or a DataFrame with columns
``layer, option, nbytes, fp16_bytes[, error, sse]`` (:meth:`SizeTable.from_frame`);
:meth:`SizeTable.of` takes any of these.

Definitions (every stage uses these and no other):

* quantized bytes of a config = Σ over the table's layers of the chosen option's bytes; a layer absent
  from the config (or set to ``fp16``) counts its fp16 bytes;
* average bits = ``16 · quantized bytes / Σ fp16 bytes`` over the table's layers;
* summed error = Σ of the chosen options' errors (``fp16``: 0), in the table's layer order.

Configs are ``{layer: option}`` mappings, or code matrices ``int [n, L]`` where code 0 is fp16 and
code ``k`` is ``options[k-1]`` (the predictors' encoding).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import SensitivityError
from .options import FP16, OPTION_NAMES, QuantOption, canonical
from .registry import Registry

MISSING = -1  # nbytes of a (layer, option) the table does not hold


class SizeTable:
    """Bytes and error per (layer, option) of one model's layers.

    ``layers`` [L] (model order), ``options`` [O] (quantized option names), ``fp16_bytes`` int64 [L],
    ``nbytes`` int64 [L, O] (:data:`MISSING` where a layer lacks the option), ``error`` float64 [L, O]
    (NaN = unknown), ``sse`` float64 [L, O] or None. ``rows`` (optional) fixes the (layer, option)
    row order of :meth:`frame` and :meth:`entries` (default: layer-major, option order).
    """

    def __init__(self, layers: Sequence[str], options: Sequence[str], fp16_bytes: Any, nbytes: Any,
                 error: Any = None, sse: Any = None, rows: Optional[Sequence[Tuple[int, int]]] = None):
        self.layers: List[str] = [str(l) for l in layers]
        self.options: List[str] = [canonical(o) for o in options]
        L, O = len(self.layers), len(self.options)
        self.fp16_bytes = np.asarray(fp16_bytes, dtype=np.int64).reshape(L)
        self.nbytes = np.asarray(nbytes, dtype=np.int64).reshape(L, O)
        self.error = np.full((L, O), np.nan) if error is None else np.asarray(error, dtype=np.float64).reshape(L, O)
        self.sse = None if sse is None else np.asarray(sse, dtype=np.float64).reshape(L, O)
        self.index: Dict[str, int] = {l: i for i, l in enumerate(self.layers)}
        if len(self.index) != L:
            dup = next(l for l in self.layers if self.layers.count(l) > 1)
            raise SensitivityError(f"size table: layer {dup!r} appears twice")
        self.opt_index: Dict[str, int] = {o: j for j, o in enumerate(self.options)}
        if len(self.opt_index) != O or FP16 in self.opt_index:
            raise SensitivityError(f"size table: options must be distinct quantized options, got {self.options}")
        if rows is None:
            rows = [(i, j) for i in range(L) for j in range(O) if self.nbytes[i, j] != MISSING]
        self.rows: List[Tuple[int, int]] = [(int(i), int(j)) for i, j in rows]
        self.fp16_total = int(self.fp16_bytes.sum())

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_multiquantizer(cls, mq: Any, options: Optional[Iterable[str]] = None) -> "SizeTable":
        """From ``mq.layers`` (``spec.fp16_bytes``), ``mq.options`` and ``mq.stats(layer, option)``."""
        opts = [canonical(o) for o in (options if options is not None else mq.options)]
        have = {canonical(o) for o in mq.options}
        unknown = [o for o in opts if o not in have]
        if unknown:
            raise SensitivityError(f"option(s) {sorted(unknown)} are not in the multiquantizer (has {sorted(have)})")
        layers = [s.name for s in mq.layers]
        L, O = len(layers), len(opts)
        nb = np.zeros((L, O), np.int64)
        err, sse = np.zeros((L, O)), np.zeros((L, O))
        for i, spec in enumerate(mq.layers):
            for j, o in enumerate(opts):
                s = mq.stats(spec.name, o)
                nb[i, j], err[i, j], sse[i, j] = int(s["nbytes"]), float(s["error"]), float(s.get("sse", np.nan))
        return cls(layers, opts, [s.fp16_bytes for s in mq.layers], nb, err, sse)

    @classmethod
    def from_layer_stats(cls, stats: Mapping[str, Mapping[str, Any]], layers: Optional[Sequence[str]] = None,
                         options: Optional[Iterable[str]] = None) -> "SizeTable":
        """From a cache's layer stats ``{layer: {"fp16_bytes": int, "options": {option: [nbytes, error]}}}``
        (``ConfigCache.layer_stats``; ``error`` may be null = unknown). ``layers`` selects and orders them
        (default: the stats' order); ``options`` restricts the options (default: all, first-seen order)."""
        layers = list(layers) if layers is not None else list(stats)
        missing = [l for l in layers if l not in stats]
        if missing:
            raise SensitivityError(f"layer {missing[0]!r} has no stats in the cache ({len(missing)} layers missing)")
        per_layer = []
        seen: Dict[str, None] = {}
        for l in layers:
            opts = {}
            for o, val in (stats[l].get("options") or {}).items():
                nb, err = (val[0], val[1]) if isinstance(val, (list, tuple)) else (val["nbytes"], val.get("error"))
                opts[canonical(o)] = (int(nb), np.nan if err is None else float(err))
                seen.setdefault(canonical(o), None)
            per_layer.append(opts)
        use = [canonical(o) for o in options] if options is not None else list(seen)
        L, O = len(layers), len(use)
        nb = np.full((L, O), MISSING, np.int64)
        err = np.full((L, O), np.nan)
        for i, opts in enumerate(per_layer):
            for j, o in enumerate(use):
                if o in opts:
                    nb[i, j], err[i, j] = opts[o]
        if options is not None:
            for i, l in enumerate(layers):
                j = next((j for j in range(O) if nb[i, j] == MISSING), None)
                if j is not None:
                    raise SensitivityError(f"layer {l!r}: option {use[j]!r} missing from the layer stats")
        return cls(layers, use, [int(stats[l]["fp16_bytes"]) for l in layers], nb, err)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], options: Optional[Iterable[str]] = None) -> "SizeTable":
        """From ``{layer: weight shape}``: bytes by :meth:`QuantOption.nbytes`, errors unknown (NaN)."""
        opts = [canonical(o) for o in (options if options is not None else OPTION_NAMES)]
        parsed = [QuantOption.parse(o) for o in opts]
        layers = list(shapes)
        nb = np.array([[p.nbytes(shapes[l]) for p in parsed] for l in layers], dtype=np.int64).reshape(len(layers), len(opts))
        return cls(layers, opts, [2 * math.prod(shapes[l]) for l in layers], nb)

    @classmethod
    def from_frame(cls, df: Any, options: Optional[Iterable[str]] = None) -> "SizeTable":
        """From a DataFrame ``layer, option, nbytes, fp16_bytes[, error, sse]`` (one row per pair; the
        row order is kept). ``options`` keeps only those options (all must be present)."""
        missing = {"layer", "option", "nbytes", "fp16_bytes"} - set(df.columns)
        if missing:
            raise SensitivityError(f"size table lacks columns {sorted(missing)}")
        opt_col = [canonical(o) for o in df["option"]]
        keep = None
        if options is not None:
            keep = [canonical(o) for o in options]
            unknown = set(keep) - set(opt_col)
            if unknown:
                raise SensitivityError(f"option(s) {sorted(unknown)} are not in the multiquantizer (has {sorted(set(opt_col))})")
        layer_col = [str(l) for l in df["layer"]]
        layers = list(dict.fromkeys(layer_col))
        opts = keep if keep is not None else list(dict.fromkeys(opt_col))
        opts = [o for o in opts if o != FP16]  # fp16 rows (some baselines add them) are implied by fp16_bytes
        li = {l: i for i, l in enumerate(layers)}
        oi = {o: j for j, o in enumerate(opts)}
        L, O = len(layers), len(opts)
        nb = np.full((L, O), MISSING, np.int64)
        fp = np.zeros(L, np.int64)
        err = np.full((L, O), np.nan)
        has_sse = "sse" in df.columns
        sse = np.full((L, O), np.nan) if has_sse else None
        e_col = np.asarray(df["error"], dtype=np.float64) if "error" in df.columns else None
        s_col = np.asarray(df["sse"], dtype=np.float64) if has_sse else None
        rows = []
        for r, (l, o, b, f) in enumerate(zip(layer_col, opt_col, df["nbytes"], df["fp16_bytes"])):
            j = oi.get(o)
            if j is None:
                continue
            i = li[l]
            if nb[i, j] != MISSING:
                raise SensitivityError(f"size table: duplicate row for layer {l!r} option {o!r}")
            nb[i, j], fp[i] = int(b), int(f)
            if e_col is not None:
                err[i, j] = e_col[r]
            if s_col is not None:
                sse[i, j] = s_col[r]
            rows.append((i, j))
        present = np.zeros(L, bool)
        present[[i for i, _ in rows]] = True
        if not present.all():  # a layer with none of the kept options
            layers = [l for l, p in zip(layers, present) if p]
            remap = np.cumsum(present) - 1
            rows = [(int(remap[i]), j) for i, j in rows]
            nb, fp, err = nb[present], fp[present], err[present]
            sse = sse[present] if sse is not None else None
        return cls(layers, opts, fp, nb, err, sse, rows=rows)

    @classmethod
    def of(cls, source: Any, options: Optional[Iterable[str]] = None) -> "SizeTable":
        """A SizeTable from a SizeTable, a multiquantizer, a DataFrame, cache layer stats or ``{layer: shape}``."""
        if isinstance(source, SizeTable):
            return source if options is None else source.restrict(options)
        if hasattr(source, "stats") and hasattr(source, "layers") and hasattr(source, "options"):
            return cls.from_multiquantizer(source, options)
        if hasattr(source, "columns") and hasattr(source, "iloc"):
            return cls.from_frame(source, options)
        if isinstance(source, Mapping) and source and all(isinstance(v, Mapping) for v in source.values()):
            return cls.from_layer_stats(source, options=options)
        if isinstance(source, Mapping):
            return cls.from_shapes(source, options)
        raise SensitivityError(f"size table: expected a multiquantizer, a DataFrame, layer stats or {{layer: shape}}, "
                               f"got {type(source).__name__}")

    def restrict(self, options: Iterable[str]) -> "SizeTable":
        """The same layers with only ``options`` (all must be in the table)."""
        opts = [canonical(o) for o in options]
        unknown = [o for o in opts if o not in self.opt_index]
        if unknown:
            raise SensitivityError(f"option(s) {sorted(unknown)} are not in the multiquantizer (has {sorted(self.options)})")
        cols = [self.opt_index[o] for o in opts]
        return SizeTable(self.layers, opts, self.fp16_bytes, self.nbytes[:, cols], self.error[:, cols],
                         None if self.sse is None else self.sse[:, cols])

    # ---- lookups ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    @property
    def has_errors(self) -> bool:
        """Every present (layer, option) has a known error."""
        present = self.nbytes != MISSING
        return bool(np.isfinite(self.error[present]).all())

    def entries(self) -> Iterable[Tuple[str, str, int]]:
        """``(layer, option, nbytes)`` per row, in row order."""
        for i, j in self.rows:
            yield self.layers[i], self.options[j], int(self.nbytes[i, j])

    def _layer(self, layer: str) -> int:
        i = self.index.get(layer)
        if i is None:
            raise SensitivityError(f"config layer {layer!r} is not in the size table (multiquantizer)")
        return i

    def _cell(self, layer: str, option: str) -> Tuple[int, Optional[int]]:
        """(layer index, option column or None for fp16); raises naming the layer / option."""
        i = self._layer(layer)
        name = canonical(option)
        if name == FP16:
            return i, None
        j = self.opt_index.get(name)
        if j is None or self.nbytes[i, j] == MISSING:
            raise SensitivityError(f"layer {layer!r}: option {name!r} is not in the size table")
        return i, j

    # ---- configs as {layer: option} ----------------------------------------------------------------
    def config_bytes(self, config: Mapping[str, str]) -> Tuple[int, int]:
        """``(Σ quantized bytes, Σ fp16 bytes)`` over the table's layers (absent / fp16 layers at fp16 bytes)."""
        q = self.fp16_total
        for layer, opt in config.items():
            i, j = self._cell(layer, opt)
            if j is not None:
                q += int(self.nbytes[i, j]) - int(self.fp16_bytes[i])
        return q, self.fp16_total

    def layer_bytes(self, layer: str, option: str) -> int:
        """Bytes of ``layer`` stored as ``option`` (``fp16``: its fp16 bytes)."""
        i, j = self._cell(layer, option)
        return int(self.fp16_bytes[i] if j is None else self.nbytes[i, j])

    def quantized_bytes(self, config: Mapping[str, str]) -> int:
        return self.config_bytes(config)[0]

    def component_bytes(self, config: Mapping[str, str]) -> Dict[str, int]:
        """``{component: Σ bytes of its layers}`` under ``config`` (absent / fp16 layers at fp16 bytes); the
        component of a layer is the first part of a pipeline multiquantizer's names, else ``denoiser``."""
        from .mqfile import layer_component

        out: Dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            c = layer_component(layer)
            out[c] = out.get(c, 0) + int(self.fp16_bytes[i])
        for layer, opt in config.items():
            i, j = self._cell(layer, opt)
            if j is not None:
                c = layer_component(layer)
                out[c] += int(self.nbytes[i, j]) - int(self.fp16_bytes[i])
        return out

    def avg_bits(self, config: Mapping[str, str]) -> float:
        """``16 · Σ quantized bytes / Σ fp16 bytes`` over the table's layers."""
        q, fp = self.config_bytes(config)
        return 16.0 * q / fp if fp else float("nan")

    def summed_error(self, config: Mapping[str, str], column: str = "error") -> float:
        """Σ error of the config's quantized layers, in table layer order (``column``: error or sse)."""
        table = self.error if column == "error" else self.sse
        if table is None:
            raise SensitivityError(f"size table has no {column!r} values")
        cells = sorted(c for c in (self._cell(l, o) for l, o in config.items()) if c[1] is not None)
        return float(sum(float(table[i, j]) for i, j in cells))

    def config_stats(self, config: Mapping[str, str]) -> Tuple[float, int, float]:
        """``(avg_bits, quantized_bytes, summed_error)`` — what a cache record stores about a config."""
        q, fp = self.config_bytes(config)
        return 16.0 * q / fp, q, self.summed_error(config)

    # ---- configs as code matrices ----------------------------------------------------------------
    def _code_table(self, values: np.ndarray, fp_column: np.ndarray) -> np.ndarray:
        """``[L, 1 + O]``: column 0 = the fp16 value, then ``values``."""
        return np.concatenate([np.asarray(fp_column).reshape(len(self.layers), 1), values], axis=1)

    def bytes_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """Σ quantized bytes per config, int64 [n], of codes ``int [n, L]`` (0 = fp16, k = options[k-1])."""
        codes = np.asarray(codes, dtype=np.int64)
        table = self._code_table(self.nbytes, self.fp16_bytes)
        return table[np.arange(len(self.layers))[None, :], codes].sum(1)

    def avg_bits_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """Average bits per config, float64 [n]."""
        return 16.0 * self.bytes_of_codes(codes) / float(self.fp16_total)

    def error_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """Summed error per config, float64 [n] (fp16 = 0)."""
        codes = np.asarray(codes, dtype=np.int64)
        table = self._code_table(self.error, np.zeros(len(self.layers)))
        return table[np.arange(len(self.layers))[None, :], codes].sum(1)

    # ---- range and views -------------------------------------------------------------------------
    def _present(self) -> np.ndarray:
        return self.nbytes != MISSING

    def min_bytes(self) -> int:
        """Σ over layers of the smallest option's bytes."""
        return int(np.where(self._present(), self.nbytes, np.iinfo(np.int64).max).min(1).sum())

    def max_bytes(self) -> int:
        return int(np.where(self._present(), self.nbytes, -1).max(1).sum())

    def min_avg_bits(self) -> float:
        """Smallest reachable average bits (every layer at its smallest option)."""
        return 16.0 * self.min_bytes() / self.fp16_total

    def max_avg_bits(self) -> float:
        """Largest average bits with quantized options only (every layer at its largest option)."""
        return 16.0 * self.max_bytes() / self.fp16_total

    def frame(self):
        """DataFrame ``layer, option, method, bits, nbytes, fp16_bytes, bits_per_weight[, error][, sse]``,
        one row per (layer, option) in row order (``error`` when any is known, ``sse`` when held)."""
        import pandas as pd

        ii = np.array([i for i, _ in self.rows], dtype=np.int64)
        jj = np.array([j for _, j in self.rows], dtype=np.int64)
        parsed = [QuantOption.parse(o) for o in self.options]
        nb, fp = self.nbytes[ii, jj], self.fp16_bytes[ii]
        data = {"layer": [self.layers[i] for i in ii], "option": [self.options[j] for j in jj],
                "method": [parsed[j].method for j in jj], "bits": [parsed[j].bits for j in jj],
                "nbytes": nb.astype(np.int64), "fp16_bytes": fp.astype(np.int64),
                "bits_per_weight": 16.0 * nb / np.maximum(fp, 1)}
        if np.isfinite(self.error).any():  # no column when no error is known (sizes from shapes)
            data["error"] = self.error[ii, jj]
        if self.sse is not None:
            data["sse"] = self.sse[ii, jj]
        return pd.DataFrame(data)

    def __repr__(self) -> str:
        return f"SizeTable({len(self.layers)} layers x {len(self.options)} options, {self.fp16_total} fp16 bytes)"


# ---- bytes in memory (``--target-memory``) -------------------------------------------------------
#: how a run-time policy holds a layer's weight: ``fn(layer, option, stored_bytes, fp16_bytes) -> bytes``
#: (``option`` may be ``fp16``); ``stored`` (the default) keeps the stored bytes: packed kernels read the codes
#: as stored. A policy that dequantizes a layer once returns its fp16 bytes for it.
MEMORY_MODELS: Registry = Registry("memory model", replace=True)
DEFAULT_MEMORY_MODEL = "stored"


def register_memory_model(name: str, fn: Any, replace: bool = False) -> Any:
    """Register memory model ``name`` (see :data:`MEMORY_MODELS`); a measured cost table registers ``runtime``
    (:func:`sensitivity.costs.register_runtime_memory_model`), ``search --target-memory --memory-model NAME`` uses them."""
    if name in MEMORY_MODELS.names() and not replace:
        raise SensitivityError(f"memory model {name!r} is already registered")
    return MEMORY_MODELS.register(name, fn)


def memory_model_names() -> List[str]:
    return list(MEMORY_MODELS.names())


def memory_model(name: str) -> Any:
    return MEMORY_MODELS.get(name)


def stored_bytes(layer: str, option: str, stored: int, fp16_bytes: int) -> int:
    """The ``stored`` memory model: a layer is held as stored (fp16 layers at fp16)."""
    return int(stored)


register_memory_model(DEFAULT_MEMORY_MODEL, stored_bytes)


def memory_table(sizes: "SizeTable", model: str = DEFAULT_MEMORY_MODEL) -> "SizeTable":
    """``sizes`` with every (layer, option)'s bytes and every layer's fp16 bytes as the memory model holds them."""
    fn = memory_model(model)
    if fn is stored_bytes:
        return sizes
    nb = sizes.nbytes.copy()
    fp = np.array([int(fn(l, FP16, int(b), int(b))) for l, b in zip(sizes.layers, sizes.fp16_bytes)], np.int64)
    for i, j in sizes.rows:
        nb[i, j] = int(fn(sizes.layers[i], sizes.options[j], int(sizes.nbytes[i, j]), int(sizes.fp16_bytes[i])))
    return SizeTable(sizes.layers, sizes.options, fp, nb, sizes.error, sizes.sse, rows=sizes.rows)


_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: Any, name: str = "--target-memory") -> int:
    """``"4.5GB"`` (10^9) / ``"4GiB"`` (2^30) / ``"800MB"`` / ``"123456"`` (bytes) -> int bytes."""
    import re
    from decimal import Decimal, InvalidOperation

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise SensitivityError(f"{name} {text!r}: expected a size such as 4.5GB, 4GiB, 800MB or a byte count")
    try:
        value = Decimal(m.group(1)) * _UNITS.get(unit or "b", 1)
    except InvalidOperation:
        raise SensitivityError(f"{name} {text!r}: not a number") from None
    if value <= 0:
        raise SensitivityError(f"{name} {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes as ``1.234 GB`` / ``12.3 MB`` / ``512 kB`` (powers of 10, as ``--target-memory`` reads them)."""
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"
