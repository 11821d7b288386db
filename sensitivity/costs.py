"""Run-time costs of configs: one table of measured forward time and run-time bytes per (layer, option).

A :class:`CostTable` holds, for the layers of one multiquantizer on one device, what each option of
each layer costs when the exported model runs: ``seconds`` (median forward time of the layer's
run-time module on its real input shape) and ``runtime_bytes`` (the weight bytes that module holds in
memory), plus the same for full precision (``fp16`` column: the plain float module). It is measured by
:func:`sensitivity.export.costs.measure_costs` (CLI ``sensitivity costs``) and stored as JSON beside the
multiquantizer, in ``<multiquantizer stem>.costs/``, one file per measuring key (device, torch version,
multiquantizer hash, dtype, batch, threads, run-time module version): :func:`cost_file`.

Definitions (the search and the plots use these and no other):

* latency of a config = Σ over the table's layers of the chosen option's ``seconds`` × the layer's
  calls per forward; a layer absent from the config counts its ``fp16`` seconds. It is the **sum of
  the layers' times**, not a whole-model forward: the ops between weight layers (attention, norms,
  activations) are not in it (``benchmarks/bench_latency.py`` compares the two);
* run-time bytes have ONE meaning, ``--target-memory``'s (:mod:`sensitivity.search.memory`): the table is
  the memory model ``runtime`` (:meth:`CostTable.memory_model`, :func:`register_runtime_memory_model`): a
  quantized option holds the ``runtime_bytes`` its run-time module was measured to hold, a full-precision
  layer its fp16 bytes, as every unquantized tensor (the table's ``fp_runtime_bytes`` are in the measuring
  dtype, fp32 on a CPU, and are not a budget's bytes).

:meth:`CostTable.unit_table` turns the latency into integer units (nanoseconds) laid out as a
:class:`~sensitivity.sizes.SizeTable`, so the exact knapsack of :mod:`sensitivity.search` runs on it
unchanged (``search --target-latency``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from .errors import CorruptFileError, SensitivityError
from .options import FP16, canonical

FORMAT = "sensitivity.costs/1"

# quantity -> (column of the table, integer units per stored unit, unit name of a budget, units per budget unit);
# memory is not a quantity here: it is --target-memory's, with this table as the memory model RUNTIME_MEMORY_MODEL
QUANTITIES: Dict[str, Tuple[str, int, str, int]] = {
    "latency": ("seconds", 10**9, "ms", 10**6),  # solver units: nanoseconds; budgets in milliseconds
}
RUNTIME_MEMORY_MODEL = "runtime"


def measuring_key(device: str, torch_version: str, multiquantizer_hash: str, dtype: str, batch: int,
                  threads: int, runtime: str) -> Dict[str, Any]:
    """What a measurement depends on; a table measured under another key is never reused."""
    return {"device": device, "torch": torch_version, "multiquantizer": multiquantizer_hash, "dtype": dtype,
            "batch": int(batch), "threads": int(threads), "runtime": runtime}


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(dict(key), sort_keys=True).encode(), digest_size=8).hexdigest()


def cost_file(multiquantizer_path: str | Path, key: Mapping[str, Any]) -> Path:
    """``<folder>/<mq stem>.costs/<device slug>-<key hash>.json`` beside the multiquantizer file."""
    mq = Path(multiquantizer_path)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(key["device"])).strip("-").lower()[:40] or "device"
    return mq.parent / f"{mq.stem}.costs" / f"{slug}-{key_hash(key)}.json"


class CostTable:
    """Measured run-time costs per (layer, option) of one model's layers on one device.

    ``layers`` [L] (model order), ``options`` [O] (quantized option names), ``seconds`` float64 [L, O]
    and ``fp_seconds`` [L] (one call; NaN = not measured), ``runtime_bytes`` int64 [L, O] and
    ``fp_runtime_bytes`` [L], ``calls`` int64 [L] (calls of the layer's module per forward), ``meta``
    (key, calibrator, repeats, ...).
    """

    def __init__(self, layers, options, seconds, fp_seconds, runtime_bytes, fp_runtime_bytes, calls=None,
                 meta: Optional[Mapping[str, Any]] = None):
        self.layers: List[str] = [str(l) for l in layers]
        self.options: List[str] = [canonical(o) for o in options]
        L, O = len(self.layers), len(self.options)
        self.seconds = np.asarray(seconds, dtype=np.float64).reshape(L, O)
        self.fp_seconds = np.asarray(fp_seconds, dtype=np.float64).reshape(L)
        self.runtime_bytes = np.asarray(runtime_bytes, dtype=np.int64).reshape(L, O)
        self.fp_runtime_bytes = np.asarray(fp_runtime_bytes, dtype=np.int64).reshape(L)
        self.calls = np.ones(L, dtype=np.int64) if calls is None else np.asarray(calls, dtype=np.int64).reshape(L)
        self.meta: Dict[str, Any] = dict(meta or {})
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.opt_index = {o: j for j, o in enumerate(self.options)}

    # ------------------------------------------------------------------------------ files
    @classmethod
    def from_record(cls, record: Mapping[str, Any], what: str = "cost table") -> "CostTable":
        """From the JSON record :func:`sensitivity.export.costs.measure_costs` writes."""
        if not isinstance(record, Mapping) or record.get("format") != FORMAT:
            raise CorruptFileError(f"{what}: not a {FORMAT} file")
        layers = record.get("layers") or {}
        options = list(record.get("options") or [])
        L, O = len(layers), len(options)
        sec, fsec = np.full((L, O), np.nan), np.full(L, np.nan)
        rb, frb = np.full((L, O), -1, dtype=np.int64), np.full(L, -1, dtype=np.int64)
        calls = np.ones(L, dtype=np.int64)
        for i, (name, entry) in enumerate(layers.items()):
            try:
                calls[i] = int(entry.get("calls", 1))
                for opt, cell in entry["options"].items():
                    if opt == FP16:
                        fsec[i], frb[i] = float(cell["seconds"]), int(cell["runtime_bytes"])
                    else:
                        j = options.index(opt)
                        sec[i, j], rb[i, j] = float(cell["seconds"]), int(cell["runtime_bytes"])
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CorruptFileError(f"{what}: layer {name!r} has a malformed entry") from None
        return cls(list(layers), options, sec, fsec, rb, frb, calls,
                   {k: v for k, v in record.items() if k not in ("layers", "options")})

    @classmethod
    def load(cls, path: str | Path, multiquantizer_hash: Optional[str] = None) -> "CostTable":
        """Read a cost file; ``multiquantizer_hash``: refuse a table measured for another multiquantizer."""
        p = Path(path)
        if not p.is_file():
            raise SensitivityError(f"cost table {str(p)!r} does not exist (measure it with `sensitivity costs`)")
        try:
            record = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{p}: not valid JSON ({exc})") from None
        table = cls.from_record(record, str(p))
        got = (table.meta.get("key") or {}).get("multiquantizer")
        if multiquantizer_hash is not None and got != multiquantizer_hash:
            raise SensitivityError(f"{p}: measured for multiquantizer {str(got)[:12]}, not {multiquantizer_hash[:12]}")
        table.meta["path"] = str(p)
        return table

    # ------------------------------------------------------------------------------ sums
    def check_complete(self, layers: Iterable[str], options: Iterable[str], what: str = "cost table") -> None:
        """Raise one line naming the first (layer, option) without a measurement."""
        for layer in layers:
            i = self.index.get(layer)
            if i is None:
                raise SensitivityError(f"{what}: layer {layer!r} was not measured (rerun `sensitivity costs`)")
            for o in options:
                o = canonical(o)
                v = self.fp_seconds[i] if o == FP16 else (self.seconds[i, self.opt_index[o]] if o in self.opt_index else np.nan)
                if not np.isfinite(v):
                    raise SensitivityError(f"{what}: layer {layer!r} option {o!r} was not measured (rerun `sensitivity costs`)")

    def _column(self, quantity: str) -> Tuple[np.ndarray, np.ndarray]:
        if quantity not in QUANTITIES:
            raise SensitivityError(f"unknown cost quantity {quantity!r}; use one of {', '.join(QUANTITIES)} "
                                   "(memory: --target-memory with the memory model 'runtime')")
        return self.seconds * self.calls[:, None], self.fp_seconds * self.calls

    def memory_model(self, layers: Optional[Iterable[str]] = None):
        """``fn(layer, option, stored_bytes, fp16_bytes) -> bytes`` (a :func:`sensitivity.sizes.register_memory_model`
        model): a quantized option holds its measured ``runtime_bytes``, full precision its ``fp16_bytes``.
        ``layers`` (default the table's) must all be measured: one line names the first that is not."""
        self.check_complete(self.layers if layers is None else layers, self.options)

        def held(layer: str, option: str, stored: int, fp16_bytes: int) -> int:
            if option == FP16:
                return int(fp16_bytes)
            i, j = self.index.get(layer), self.opt_index.get(option)
            if i is None or j is None:
                raise SensitivityError(f"cost table {self.meta.get('path', '')}: no run-time bytes of layer {layer!r} "
                                       f"option {option!r} (rerun `sensitivity costs`)")
            return int(self.runtime_bytes[i, j])

        return held

    def config_total(self, config: Mapping[str, str], quantity: str = "latency") -> float:
        """Σ over the table's layers of the quantity (seconds per forward); absent layers count at ``fp16``."""
        q, fp = self._column(quantity)
        total = 0.0
        opts = {k: canonical(v) for k, v in config.items()}
        unknown = set(opts) - set(self.index)
        if unknown:
            raise SensitivityError(f"cost table: no layer {sorted(unknown)[0]!r}")
        for layer, i in self.index.items():
            o = opts.get(layer, FP16)
            if o == FP16:
                total += float(fp[i])
            elif o in self.opt_index:
                total += float(q[i, self.opt_index[o]])
            else:
                raise SensitivityError(f"cost table: layer {layer!r} has no option {o!r}")
        return total

    def config_latency_ms(self, config: Mapping[str, str]) -> float:
        """Summed layer latency of ``config`` in milliseconds (see the module docstring)."""
        return 1e3 * self.config_total(config, "latency")

    def unit_table(self, quantity: str = "latency", options: Optional[Iterable[str]] = None,
                   layers: Optional[Iterable[str]] = None):
        """The ``quantity`` in integer units (ns or bytes) as a :class:`~sensitivity.sizes.SizeTable`
        (its ``nbytes`` = units of each option, ``fp16_bytes`` = units at full precision), for the knapsack."""
        from .sizes import SizeTable

        opts = [canonical(o) for o in (options if options is not None else self.options)]
        names = list(layers) if layers is not None else self.layers
        self.check_complete(names, opts + [FP16])
        q, fp = self._column(quantity)
        per = QUANTITIES[quantity][1]
        rows = [self.index[l] for l in names]
        units = np.rint(np.stack([q[rows, self.opt_index[o]] for o in opts], axis=1) * per).astype(np.int64)
        fp_units = np.rint(fp[rows] * per).astype(np.int64)
        return SizeTable(names, opts, np.maximum(fp_units, 1), np.maximum(units, 0))

    def frame(self):
        """DataFrame ``layer, option, seconds, runtime_bytes, calls`` (the ``fp16`` rows included)."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            rows.append((layer, FP16, self.fp_seconds[i], self.fp_runtime_bytes[i], self.calls[i]))
            for j, o in enumerate(self.options):
                rows.append((layer, o, self.seconds[i, j], self.runtime_bytes[i, j], self.calls[i]))
        return pd.DataFrame(rows, columns=["layer", "option", "seconds", "runtime_bytes", "calls"])


def budget_units(target: float, quantity: str = "latency", name: str = "--target-latency") -> int:
    """Largest integer cost (ns or bytes) within ``target`` (ms or bytes), exact decimal arithmetic."""
    from decimal import Decimal, InvalidOperation
    from fractions import Fraction

    try:
        frac = Fraction(Decimal(str(target)))
    except (InvalidOperation, ValueError):
        raise SensitivityError(f"{name} must be a number, got {target!r}") from None
    if not frac > 0:
        raise SensitivityError(f"{name} must be positive, got {target}")
    return math.floor(frac * QUANTITIES[quantity][3])


def register_runtime_memory_model(costs: CostTable, layers: Optional[Iterable[str]] = None) -> str:
    """Register ``costs`` as the memory model :data:`RUNTIME_MEMORY_MODEL` (replacing an earlier table's) and
    return its name, for ``memory_budget(mq, target, model=...)`` / ``search --target-memory --memory-model runtime``."""
    from .sizes import register_memory_model

    register_memory_model(RUNTIME_MEMORY_MODEL, costs.memory_model(layers), replace=True)
    return RUNTIME_MEMORY_MODEL


__all__ = ["CostTable", "FORMAT", "QUANTITIES", "RUNTIME_MEMORY_MODEL", "budget_units", "cost_file", "key_hash",
           "measuring_key", "register_runtime_memory_model"]
