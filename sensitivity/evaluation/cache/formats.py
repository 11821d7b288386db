"""Cache formats: export / import (Parquet, CSV, the reference's pickle layout) and reference layer names."""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ...config import canonical_options
from ...errors import CorruptFileError, SensitivityError
from ...io import atomic_path
from ...options import FP16, QuantOption
from .records import (_REF_METHOD, FORMAT, RECORD_FIELDS, REFERENCE_METRIC, SignatureMismatchError, _json,
                      describe_difference, evaluation_signature)


class FormatsMixin:
    """Export / import methods of :class:`~sensitivity.evaluation.cache.ConfigCache`."""

    def to_frame(self, run_id: Optional[str] = None):
        """pandas DataFrame, one row per record: metric columns (``fid``, ``kid``, ...) flattened,
        ``config``/``metrics``/``timings`` kept as JSON strings."""
        import pandas as pd

        recs = self.records(run_id)
        base = ["run_id", "index", "config_hash", "avg_bits", "quantized_bytes", "summed_error"]
        rows = []
        for r in recs:
            row = {k: r[k] for k in base}
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) or v is None:
                    row[k if k not in RECORD_FIELDS else f"metric_{k}"] = v
            row.update({"config": _json(r["config"]), "metrics": _json(r["metrics"]), "timings": _json(r["timings"]),
                        "signature": r["signature"], "host": r["host"], "created_at": r["created_at"]})
            rows.append(row)
        df = pd.DataFrame(rows, columns=None if rows else base + ["config", "metrics", "timings", "signature", "host", "created_at"])
        if "index" in df:
            df["index"] = df["index"].astype("Int64")
        return df

    def export(self, out: str | os.PathLike, fmt: Optional[str] = None, reference_names: bool = True) -> Tuple[Path, int]:
        """Write all records to ``out`` as ``parquet``, ``csv`` or the reference's ``pkl`` layout.

        Written through :func:`sensitivity.io.atomic_path` (whole or not at all). Returns ``(path, number of records)``.
        """
        out = Path(out)
        fmt = (fmt or out.suffix.lstrip(".")).lower()
        fmt = {"pickle": "pkl", "pq": "parquet"}.get(fmt, fmt)
        if fmt not in ("parquet", "csv", "pkl"):
            raise SensitivityError(f"export format {fmt!r} not supported (parquet, csv, pkl)")
        meta = {"format": FORMAT, "signature": self.signature, "evaluation": self.evaluation}
        with atomic_path(out, "export") as tmp:
            if fmt == "pkl":
                data = self.reference_records(reference_names=reference_names)
                with open(tmp, "wb") as fh:
                    pickle.dump(data, fh, protocol=4)
                n = len(data)
            else:
                df = self.to_frame()
                n = len(df)
                if fmt == "csv":
                    df = df.assign(evaluation=_json(meta["evaluation"]))
                    df.to_csv(tmp, index=False)
                else:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    table = pa.Table.from_pandas(df, preserve_index=False)
                    md = dict(table.schema.metadata or {})
                    md[b"sensitivity.cache"] = _json(meta).encode()
                    pq.write_table(table.replace_schema_metadata(md), tmp)
        return out, n

    def reference_records(self, reference_names: bool = True) -> List[Dict[str, Any]]:
        """The reference's ``quant_cache.pkl`` layout (docs/method.md §3): a list of dicts with ``config``
        (``{layer: [method-bits, fp_bytes, q_bytes, error]}``), ``quantized_size``, ``avg_bits``,
        ``quantized_error``, ``FID-GT-1k`` and ``bops`` (Tera-BOPs per image; None in records made before it), plus ``sensitivity``
        (our fields, so an import restores the record exactly). Layers at full precision are listed
        as ``["fp16", fp_bytes, fp_bytes, 0.0]``. With ``reference_names``, layer and method names are
        the reference's (``model.<path>.weight_quantizer[_0]``, ``mse``/``kmeans``/``kmeans_all``).
        """
        stats = self.layer_stats
        if not stats:
            raise SensitivityError(f"{self.path}: no per-layer stats stored (run `sensitivity sample` once, "
                                   "or import a reference pickle) — cannot write the reference layout")
        out = []
        for r in self.records():
            cfg = {}
            for layer, st in stats.items():
                opt = r["config"].get(layer, FP16)
                fp = st.get("fp16_bytes")
                if opt == FP16:
                    entry = [FP16, fp, fp, 0.0]
                else:
                    nbytes, err = (st.get("options") or {}).get(opt, [None, None])
                    o = QuantOption.parse(opt)
                    name = f"{_REF_METHOD.get(o.method, o.method)}-{o.bits}" if reference_names else opt
                    entry = [name, fp, nbytes, err]
                cfg[to_reference_name(layer) if reference_names else layer] = entry
            missing = set(r["config"]) - set(stats)
            if missing:
                raise SensitivityError(f"{self.path}: record {r['id']}: layer {sorted(missing)[0]!r} has no stored stats")
            out.append({
                "config": cfg,
                "quantized_size": r["quantized_bytes"],
                "avg_bits": r["avg_bits"],
                "quantized_error": r["summed_error"],
                REFERENCE_METRIC: r["metrics"].get("fid"),
                "bops": r["metrics"].get("bops"),  # Tera-BOPs per image (evaluation/bops.py)
                "sensitivity": {k: r[k] for k in RECORD_FIELDS} | {"evaluation": self.evaluation},
            })
        return out

    # ---- import ----------------------------------------------------------------------------------
    def import_file(self, path: str | os.PathLike, trust_pickle: bool = False, model: Optional[str] = None,
                    progress: bool = False) -> Tuple[int, int]:
        """Import records from our Parquet/CSV export or a (reference or our) ``.pkl``.

        The file's signature must equal the cache's (an empty cache adopts it). Reference pickles
        carry no signature: theirs is derived from ``model`` (``{"source": "reference quant_cache.pkl",
        "model": model}``), so pickles of one model import into one cache. Pickles are read only with
        ``trust_pickle`` (unpickling can run arbitrary code). Everything is parsed and checked before
        the first write; all records go in one transaction. Returns ``(read, inserted)``.
        """
        signature, evaluation, recs, stats = read_records_file(path, trust_pickle=trust_pickle, model=model)
        current = self.signature
        if current is not None and current != signature:
            raise SignatureMismatchError(
                f"{path}: its records were evaluated with another signature ({signature[:12]}) than {self.path}'s "
                f"({current[:12]}: {describe_difference(self.evaluation or {}, evaluation or {})}); "
                "import them into another cache file"
            )
        rows = [self._row(r, signature) for r in recs]  # validates every record first
        if current is None:
            self.ensure_signature(signature, evaluation)
        if stats:
            self.set_layer_stats(stats)
        inserted = 0
        with self._write() as cur:
            for r, row in zip(recs, rows):
                cur.execute(
                    "INSERT INTO records(run_id, idx, signature, config_hash, config, avg_bits, quantized_bytes, "
                    "summed_error, metrics, timings, host, created_at, checksum) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(signature, config_hash) DO NOTHING", (r.get("run_id"), r.get("index"), *row))
                inserted += cur.rowcount == 1
        return len(recs), inserted


# ---------------------------------------------------------------------------------- name mapping
def to_reference_name(layer: str) -> str:
    """``a.b#skip`` -> ``model.a.b.weight_quantizer_0``; ``a.b`` / ``a.b#main`` -> ``model.a.b.weight_quantizer``."""
    if layer.endswith("#skip"):
        return f"model.{layer[:-5]}.weight_quantizer_0"
    if layer.endswith("#main"):
        layer = layer[:-5]
    return f"model.{layer}.weight_quantizer"


def from_reference_names(names: Iterable[str]) -> Dict[str, str]:
    """Map reference quantizer names to layer names (inverse of :func:`to_reference_name`).

    A ``.weight_quantizer`` whose ``.weight_quantizer_0`` is also present is the ``#main`` half.
    Names not in the reference form are kept.
    """
    names = [str(n) for n in names]
    split = {n[: -len("_0")] for n in names if n.endswith(".weight_quantizer_0")}
    out = {}
    for n in names:
        base = n
        if base.endswith(".weight_quantizer_0") or base.endswith(".weight_quantizer"):
            stem = base.rsplit(".weight_quantizer", 1)[0]
            if stem.startswith("model."):
                stem = stem[len("model."):]
            if n.endswith("_0"):
                out[n] = stem + "#skip"
            else:
                out[n] = stem + ("#main" if n in split else "")
        else:
            out[n] = n
    return out


def _finite(x) -> Optional[float]:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def read_records_file(path: str | os.PathLike, trust_pickle: bool = False, model: Optional[str] = None
                      ) -> Tuple[str, Dict[str, Any], List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Parse an export (parquet / csv / pkl): ``(signature, evaluation, records, layer_stats)``."""
    path = Path(path)
    if not path.is_file():
        raise SensitivityError(f"import file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path, trust_pickle, model)
    if suffix not in (".parquet", ".pq", ".csv"):
        raise SensitivityError(f"{path}: unknown import format {suffix!r} (.parquet, .csv or .pkl)")
    import pandas as pd

    meta: Dict[str, Any] = {}
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype={"config": str, "metrics": str, "timings": str, "signature": str,
                                          "config_hash": str, "run_id": str, "evaluation": str})
            if "evaluation" in df and len(df):
                meta["evaluation"] = json.loads(df["evaluation"].iloc[0])
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(b"sensitivity.cache")
            meta = json.loads(raw) if raw else {}
            df = table.to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise CorruptFileError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    need = {"config", "metrics", "signature"}
    if not need <= set(df.columns):
        raise CorruptFileError(f"{path}: not a sensitivity cache export (missing columns {sorted(need - set(df.columns))})")
    sigs = set(df["signature"].dropna().astype(str))
    if len(sigs) > 1:
        raise SignatureMismatchError(f"{path}: holds records of {len(sigs)} signatures; a cache holds one")
    signature = sigs.pop() if sigs else meta.get("signature")
    if not signature:
        raise CorruptFileError(f"{path}: records without a signature")
    recs = []
    for i, row in enumerate(df.to_dict("records")):
        try:
            rec = {
                "config": json.loads(row["config"]), "metrics": json.loads(row["metrics"]),
                "timings": json.loads(row["timings"]) if isinstance(row.get("timings"), str) else {},
                "config_hash": row.get("config_hash"), "avg_bits": _finite(row.get("avg_bits")),
                "quantized_bytes": _finite(row.get("quantized_bytes")), "summed_error": _finite(row.get("summed_error")),
                "host": row.get("host") if isinstance(row.get("host"), str) else None,
                "created_at": row.get("created_at") if isinstance(row.get("created_at"), str) else None,
                "run_id": row.get("run_id") if isinstance(row.get("run_id"), str) else None,
                "index": None if pd.isna(row.get("index")) else int(row.get("index")),
            }
        except (TypeError, ValueError, json.JSONDecodeError):
            raise CorruptFileError(f"{path}: row {i} is damaged (config/metrics are not valid JSON)") from None
        if not isinstance(rec["config"], dict) or not isinstance(rec["metrics"], dict):
            raise CorruptFileError(f"{path}: row {i} is damaged (config and metrics must be JSON objects)")
        rec["config"] = canonical_options(rec["config"], source=f"{path}: row {i}")  # unknown options fail here
        recs.append(rec)
    return signature, meta.get("evaluation") or {}, recs, {}


def _read_pickle(path: Path, trust_pickle: bool, model: Optional[str]):
    if not trust_pickle:
        raise SensitivityError(f"{path}: refusing to unpickle (it can run arbitrary code); pass --trust-pickle if you trust it")
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CorruptFileError(f"{path}: cannot read pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise CorruptFileError(f"{path}: expected a list of dicts (the reference's quant_cache.pkl layout)")
    signature: Optional[str] = None
    evaluation: Dict[str, Any] = {}
    recs: List[Dict[str, Any]] = []
    stats: Dict[str, Dict[str, Any]] = {}
    for i, d in enumerate(data):
        ours = d.get("sensitivity") if isinstance(d.get("sensitivity"), Mapping) else None
        cfg_raw = d.get("config")
        if not isinstance(cfg_raw, Mapping):
            raise CorruptFileError(f"{path}: entry {i} has no 'config' dict")
        names = from_reference_names(cfg_raw)
        config: Dict[str, str] = {}
        for ref, v in cfg_raw.items():
            layer = names[str(ref)]
            where = f"{path}: entry {i}, layer {layer!r}"
            entry = list(v) if isinstance(v, (list, tuple)) else [v]
            if not entry or len(entry) not in (1, 4) or not isinstance(entry[0], str):
                raise CorruptFileError(f"{where}: expected [option, fp16 bytes, quantized bytes, error] or an "
                                       f"option name, got {_short(v)}")
            try:
                opt = QuantOption.parse(entry[0]).name
            except SensitivityError as exc:
                raise CorruptFileError(f"{where}: {exc}") from None
            if opt != FP16:
                config[layer] = opt
            if len(entry) == 4:
                fp = _entry_number(where, "fp16 bytes", entry[1], integer=True)
                nb = _entry_number(where, "quantized bytes", entry[2], integer=True)
                err = _entry_number(where, "error", entry[3])
                s = stats.setdefault(layer, {"fp16_bytes": fp, "options": {}})
                if opt != FP16:
                    s["options"].setdefault(opt, [nb, err])
        for field, integer in (("quantized_size", True), ("avg_bits", False), ("quantized_error", False),
                               (REFERENCE_METRIC, False)):
            _entry_number(f"{path}: entry {i}", field, d.get(field), integer=integer, optional=True)
        if ours is not None:
            sig_i = str(ours.get("signature"))
            evaluation = dict(ours.get("evaluation") or evaluation)
            rec = {"config": config, "metrics": dict(ours.get("metrics") or {}),
                   "timings": dict(ours.get("timings") or {}), "config_hash": ours.get("config_hash"),
                   "host": ours.get("host"), "created_at": ours.get("created_at"),
                   "run_id": ours.get("run_id"), "index": ours.get("index")}
        else:
            if model is None:
                raise SensitivityError(f"{path}: a reference pickle has no signature; pass --model to name the model "
                                       "its FIDs were measured on")
            evaluation = {"source": "reference quant_cache.pkl", "model": model, "metric": REFERENCE_METRIC}
            sig_i = evaluation_signature(evaluation)
            metrics = {"fid": _finite(d.get(REFERENCE_METRIC))}
            for k, v in d.items():
                if k not in ("config", "quantized_size", "avg_bits", "quantized_error", REFERENCE_METRIC, "bops") \
                        and isinstance(v, (int, float)):
                    metrics[str(k)] = float(v)
            rec = {"config": config, "metrics": metrics, "timings": {}, "host": None, "created_at": None,
                   "run_id": None, "index": None}
        if signature is not None and sig_i != signature:
            raise SignatureMismatchError(f"{path}: holds records of more than one signature; a cache holds one")
        signature = sig_i
        rec.update({"avg_bits": _finite(d.get("avg_bits")), "quantized_bytes": _finite(d.get("quantized_size")),
                    "summed_error": _finite(d.get("quantized_error"))})
        recs.append(rec)
    if signature is None:
        raise CorruptFileError(f"{path}: the pickle holds no records")
    return signature, evaluation, recs, stats


def _short(v: Any, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _entry_number(where: str, field: str, value: Any, integer: bool = False, optional: bool = False) -> Any:
    """A pickle entry's number: finite, and for byte counts a non-negative integer (``None`` if optional)."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # numpy scalars too
    if ok and integer:
        ok = value >= 0 and float(value).is_integer()
    if not ok:
        kind = "a non-negative integer" if integer else "a finite number"
        raise CorruptFileError(f"{where}: {field} is {_short(value)}, expected {kind}")
    return int(value) if integer else float(value)

