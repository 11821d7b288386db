"""Whole cache files: read the records of any cache or export, import an export, rebind a cache to a
rebuilt multiquantizer, remove a cache a failed command made."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .formats import read_records_file
from .store import ConfigCache

#: suffixes of the export files :func:`read_records` reads (others are SQLite caches)
EXPORT_SUFFIXES = (".parquet", ".pq", ".csv", ".pkl", ".pickle")


def read_records(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Cache records from a cache file (.sqlite/.db) or an export (.parquet/.csv)."""
    if Path(path).suffix.lower() in EXPORT_SUFFIXES:
        return read_records_file(path)[2]
    with ConfigCache(path) as cache:
        return cache.records()


def remove_if_empty(cache_path: Union[str, os.PathLike]) -> None:
    """Delete a cache file (and its SQLite journal files) that holds no record; keep any with records."""
    try:
        with ConfigCache(cache_path) as c:
            if len(c):
                return
    except Exception:  # noqa: BLE001 - unreadable: this command made it, and it stored nothing
        pass
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(cache_path) + suffix).unlink(missing_ok=True)


def import_records(cache_path: Union[str, os.PathLike], file: Union[str, os.PathLike], trust_pickle: bool = False,
                   model: Optional[str] = None) -> Tuple[int, int, int]:
    """Import an export (parquet / csv / the reference's pkl with ``trust_pickle``) into ``cache_path``;
    returns ``(read, inserted, total records now)``. The file is parsed and checked before the cache is
    opened; a new cache is built beside its path and renamed, so a failed import leaves no file."""
    from ...io import atomic_path, check_writable

    read_records_file(file, trust_pickle=trust_pickle, model=model)
    target = Path(cache_path)
    if target.exists():
        with ConfigCache(target) as cache:
            read, inserted = cache.import_file(file, trust_pickle=trust_pickle, model=model)
            return read, inserted, len(cache)
    check_writable(target, "cache")
    with atomic_path(target, "cache") as tmp:
        with ConfigCache(tmp, create=True) as cache:
            read, inserted = cache.import_file(file, trust_pickle=trust_pickle, model=model)
            total = len(cache)
    return read, inserted, total


def rebind_multiquantizer(cache_path: Union[str, os.PathLike], multiquantizer: Union[str, os.PathLike]
                          ) -> Tuple[Optional[str], str, Optional[str], int]:
    """Make the records of ``cache_path`` name ``multiquantizer`` (a rebuild of the same layers, options,
    sizes and errors, e.g. after a format change); refused when anything differs. Returns
    ``(old hash, new hash, new signature or None when it already named it, records)``."""
    import math

    from ...errors import SensitivityError
    from ...multiquantizer import read_manifest
    from ...options import canonical

    m = read_manifest(multiquantizer)
    if not Path(cache_path).is_file():
        raise SensitivityError(f"cache {str(cache_path)!r} does not exist")
    with ConfigCache(cache_path) as cache:
        ev = cache.evaluation or {}
        old = ev.get("multiquantizer_hash")
        if ev.get("model_id") not in (None, m.get("model_id")):
            raise SensitivityError(f"{multiquantizer}: built for {m.get('model_id')}, the cache is of {ev.get('model_id')}")
        stats = cache.layer_stats
        layers = {d["name"]: d for d in m["layers"]}
        if set(stats) != set(layers):
            extra = sorted(set(stats) ^ set(layers))
            raise SensitivityError(f"{multiquantizer}: layer {extra[0]!r} is in only one of the cache and the multiquantizer")
        cached_opts = {canonical(o) for st in stats.values() for o in (st.get("options") or {})}
        if cached_opts != {canonical(o) for o in m["options"]}:
            raise SensitivityError(f"{multiquantizer}: holds options {', '.join(m['options'])}, the cache's records "
                                   f"were made with {', '.join(sorted(cached_opts))}")
        for name, st in stats.items():
            for opt, (nbytes, err) in ((canonical(o), v) for o, v in (st.get("options") or {}).items()):
                mine = layers[name]["options"].get(opt)
                if mine is None or int(mine["nbytes"]) != int(nbytes) or (
                        err is not None and not math.isclose(float(mine["error"]), float(err), rel_tol=1e-9, abs_tol=1e-15)):
                    raise SensitivityError(f"{multiquantizer}: layer {name!r} option {opt!r} differs from the cache's "
                                           "(another build or weights); not rebinding")
        if old == m["hash"]:
            return old, m["hash"], None, len(cache)
        sig = cache.rebind_multiquantizer(m["hash"])
        return old, m["hash"], sig, len(cache)
