"""Whole cache files: read the records of any cache or export, remove a cache a failed command made."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Union

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
