"""Cache records: the record fields, building one record, hashes and signatures, JSON helpers."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any, Dict, Mapping, Optional

from ...config import config_hash, normalize_config  # noqa: F401 - re-exported (one config hash)
from ...errors import SensitivityError
from ...quantizers.base import METHOD_ALIASES

FORMAT = "sensitivity.cache/1"
REFERENCE_METRIC = "FID-GT-1k"
_REF_METHOD = {v: k for k, v in METHOD_ALIASES.items()}  # uaq -> mse, kmeans_c -> kmeans, kmeans_a -> kmeans_all
RECORD_FIELDS = ("run_id", "index", "config_hash", "config", "avg_bits", "quantized_bytes", "summed_error",
                 "metrics", "signature", "timings", "host", "created_at")

_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's lock



class SignatureMismatchError(SensitivityError):
    """The cache holds records of another evaluation protocol."""


# ------------------------------------------------------------------------------------------ helpers
def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    for cast in (float, int):  # numpy / torch scalars
        try:
            return cast(obj)
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_record(config: Mapping[str, str], sizes: Any, metrics: Mapping[str, Any],
                 timings: Optional[Mapping[str, Any]] = None, host: Optional[str] = None,
                 signature: Optional[str] = None, run_id: Optional[str] = None, index: Optional[int] = None,
                 created_at: Optional[str] = None) -> Dict[str, Any]:
    """A cache record (fields of :data:`RECORD_FIELDS`) of one evaluated config: the one place records are made.

    ``sizes``: a :class:`~sensitivity.sizes.SizeTable` (or what :meth:`SizeTable.of` takes, e.g. the
    cache's layer stats) for ``avg_bits``, ``quantized_bytes`` and ``summed_error``.
    """
    from ...sizes import SizeTable

    options = normalize_config(config)
    avg_bits, qbytes, err = SizeTable.of(sizes).config_stats(options)
    return {"run_id": run_id, "index": index, "config_hash": config_hash(options), "config": options,
            "avg_bits": avg_bits, "quantized_bytes": qbytes, "summed_error": err, "metrics": dict(metrics),
            "signature": signature, "timings": dict(timings or {}), "host": host or socket.gethostname(),
            "created_at": created_at or now_iso()}


def evaluation_signature(evaluation: Mapping[str, Any]) -> str:
    """Hex hash of an evaluation description (any JSON-able mapping)."""
    return hashlib.blake2b(_json(evaluation).encode(), digest_size=16).hexdigest()


def _checksum(sig: str, chash: str, config: str, avg_bits, qbytes, err, metrics: str) -> str:
    blob = _json([sig, chash, config, _num(avg_bits), qbytes, _num(err), metrics]).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def _num(x) -> Optional[float]:
    return None if x is None else float(x)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_difference(old: Mapping, new: Mapping, limit: int = 4) -> str:
    """``"steps 10 -> 20, seeds ..."``: the keys of two evaluation descriptions that differ."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = (repr(x)[:40] for x in (a.get(k, "<absent>"), b.get(k, "<absent>")))
            diffs.append(f"{k} {va} -> {vb}")
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more if diffs else "the descriptions are equal but hash differently"


def run_id_for(signature: str, sampler: Mapping[str, Any]) -> str:
    """Id of the run with ``sampler`` settings (:meth:`SamplerSpec.to_dict`) under ``signature``."""
    return hashlib.blake2b(_json([signature, dict(sampler)]).encode(), digest_size=8).hexdigest()
