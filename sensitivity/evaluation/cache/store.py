"""The SQLite store: schema, opening / checking a cache file, signatures, runs, records."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set

from ...config import config_hash, normalize_config  # noqa: F401 - re-exported (one config hash)
from ...errors import ConfigError, CorruptFileError, SensitivityError

from .claims import ClaimsMixin
from .formats import FormatsMixin
from .records import (_BUSY_TIMEOUT_S, FORMAT, SignatureMismatchError, _checksum, _json, _num, describe_difference, now_iso,
                      run_id_for)


#: the fidelity of a cache's own signature (meta keys ``signature`` / ``evaluation``); another fidelity
#: NAME keeps its signature under ``signature:NAME`` (``sensitivity sample --full-configs``: ``cheap``)
FULL = "full"
#: the fidelity ``sensitivity sample --full-configs`` writes its cheap labels to
CHEAP = "cheap"
_FIDELITY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

_CREATE_WAIT_S = 5.0      # how long an opener waits for a file another process is creating in place
_CREATING_AGE_S = 60.0    # ... when the file was modified this recently (an older empty file is an error at once)


class _NotCreatedYet(CorruptFileError):
    """An empty file, or an SQLite file without tables: maybe another process is creating it in place."""


def _is_busy(exc: BaseException) -> bool:
    msg = str(exc)
    return "locked" in msg or "busy" in msg


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, signature TEXT NOT NULL, sampler TEXT NOT NULL,
    planned INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records(
    id INTEGER PRIMARY KEY, run_id TEXT, idx INTEGER,
    signature TEXT NOT NULL, config_hash TEXT NOT NULL, config TEXT NOT NULL,
    avg_bits REAL, quantized_bytes INTEGER, summed_error REAL,
    metrics TEXT NOT NULL, timings TEXT NOT NULL DEFAULT '{}', host TEXT, created_at TEXT NOT NULL,
    checksum TEXT NOT NULL,
    UNIQUE(signature, config_hash));
CREATE TABLE IF NOT EXISTS run_configs(
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, record_id INTEGER NOT NULL REFERENCES records(id),
    PRIMARY KEY(run_id, idx));
CREATE TABLE IF NOT EXISTS claims(
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY(run_id, idx));
CREATE INDEX IF NOT EXISTS claims_owner ON claims(owner);
"""


# -------------------------------------------------------------------------------------- the cache
@dataclass
class AddResult:
    record_id: int
    inserted: bool  # False: the config was already in the cache (record kept, index linked)


class ConfigCache(ClaimsMixin, FormatsMixin):
    """An open cache file. See the module docstring.

    ``ConfigCache(path)`` opens an existing cache (any signature) for reading, exporting and importing;
    ``ConfigCache(path, signature=..., evaluation=..., create=True)`` creates it if needed and checks
    (or sets) its signature. ``evaluation`` is the JSON-able description the signature was hashed
    from; it is stored once and used to explain mismatches. A corrupt or foreign file raises
    :class:`CorruptFileError` (one line) without being modified.

    ``fidelity``: one file may hold labels of several evaluations of the same configs (multi-fidelity:
    many cheap labels, a few full ones). The cache's own signature is fidelity ``"full"``; another
    fidelity NAME has a signature of its own, and an object opened with ``fidelity=NAME`` reads and
    writes that fidelity's records only (every method below). :meth:`fidelities` lists them.
    """

    def __init__(self, path: str | os.PathLike, signature: Optional[str] = None,
                 evaluation: Optional[Mapping[str, Any]] = None, *, create: bool = False,
                 check: bool = True, fidelity: Optional[str] = None):
        self.path = Path(path)
        self.fidelity = fidelity or FULL
        if not _FIDELITY_NAME.match(self.fidelity):
            raise SensitivityError(f"cache {self.path}: fidelity {self.fidelity!r} is not a name "
                                   "(lower-case letters, digits, - and _)")
        self._sig_key = "signature" if self.fidelity == FULL else f"signature:{self.fidelity}"
        self._eval_key = "evaluation" if self.fidelity == FULL else f"evaluation:{self.fidelity}"
        existed = self.path.exists()
        if not existed and not create:
            raise SensitivityError(f"cache file {str(self.path)!r} does not exist")
        if existed and self.path.is_dir():
            raise SensitivityError(f"cache {str(self.path)!r} is a directory, not a cache file")
        if not existed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A new cache appears whole: built beside the path, then hard-linked into place (which fails
            # if another process linked its own first; then that one is opened). So no process ever
            # opens a cache file without its schema. Without hard links, it is created in place.
            existed = self._create_file()
        # Two processes opening a new file at once can deadlock on the switch to WAL; SQLite then
        # answers "database is locked" at once, without waiting. Opening is idempotent: retry it.
        # A file created in place by another process (no hard links, an older version) may still be
        # empty or without tables: wait for its meta table.
        start = time.monotonic()
        while True:
            self._con = None
            try:
                if existed:
                    self._check_header(create)
                self._con = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
                self._open(create, existed, check)
                break
            except _NotCreatedYet:
                if self._con is not None:
                    self._con.close()
                if time.monotonic() - start > _CREATE_WAIT_S or not self._modified_recently():
                    raise
                time.sleep(random.uniform(0.01, 0.05))
            except sqlite3.DatabaseError as exc:
                if self._con is not None:
                    self._con.close()
                if not _is_busy(exc) or time.monotonic() - start > _BUSY_TIMEOUT_S:
                    with self._errors():
                        raise
                time.sleep(random.uniform(0.005, 0.05))
            except BaseException:
                if self._con is not None:
                    self._con.close()
                raise
        try:
            if signature is not None:
                self.ensure_signature(signature, evaluation)
        except BaseException:
            self._con.close()
            raise

    # ---- plumbing --------------------------------------------------------------------------------
    def _create_file(self) -> bool:
        """Build an empty cache (schema, format) in a temporary file and hard-link it to ``self.path``.

        Returns True when ``self.path`` now exists (ours or another process's), False where the file
        system has no hard links (the caller then creates the file in place, under SQLite's lock).
        """
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with self._errors():
                con = sqlite3.connect(str(tmp), isolation_level=None)
                try:
                    con.execute("PRAGMA journal_mode=WAL")  # set in the header: openers need not switch
                    con.execute("BEGIN IMMEDIATE")
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        con.execute(stmt)
                    con.execute("INSERT INTO meta(key, value) VALUES ('format', ?)", (FORMAT,))
                    con.execute("INSERT INTO meta(key, value) VALUES ('created_at', ?)", (now_iso(),))
                    con.execute("COMMIT")
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
                finally:
                    con.close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process created it first: open theirs
            except OSError:
                return False
            return True
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{tmp}{suffix}")

    def _modified_recently(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < _CREATING_AGE_S
        except OSError:
            return False

    def _open(self, create: bool, existed: bool, check: bool) -> None:
        """Set up the fresh connection ``self._con``; raises sqlite3 errors as they come (see __init__)."""
        self._con.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        if not create:
            self._check_format(check)
        mode = self._con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SensitivityError(f"{self.path}: cannot switch the cache to WAL mode (got {mode})")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.execute("PRAGMA foreign_keys=ON")
        if create:
            # another process may be creating the same file right now: create-if-missing under the lock
            cur = self._con.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "meta" not in tables:
                    if tables:
                        raise CorruptFileError(f"{self.path}: an SQLite database but not a sensitivity cache "
                                               f"(it has tables {', '.join(sorted(tables)[:3])})")
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        cur.execute(stmt)
                    cur.execute("INSERT INTO meta(key, value) VALUES ('format', ?)", (FORMAT,))
                    cur.execute("INSERT INTO meta(key, value) VALUES ('created_at', ?)", (now_iso(),))
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            if existed:
                self._check_format(check)

    def _check_header(self, create: bool) -> None:
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise SensitivityError(f"cannot read cache {self.path}: {exc.strerror}") from None
        if head and head != b"SQLite format 3\x00":
            raise CorruptFileError(f"{self.path}: not a sensitivity cache (not an SQLite database)")
        if not head and not create:
            raise _NotCreatedYet(f"{self.path}: empty file, not a sensitivity cache (delete it to start a new one)")

    def _check_format(self, check: bool) -> None:
        if not self._has_table("meta"):
            empty = self._con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            raise (_NotCreatedYet if empty else CorruptFileError)(
                f"{self.path}: an SQLite database but not a sensitivity cache (no meta table)")
        row = self._con.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if row is None or row[0] != FORMAT:
            raise CorruptFileError(f"{self.path}: unsupported cache format {row[0] if row else None!r} (expected {FORMAT})")
        if check:
            res = [r[0] for r in self._con.execute("PRAGMA quick_check(3)").fetchall()]
            if res != ["ok"]:
                raise CorruptFileError(f"{self.path}: the SQLite file is damaged ({'; '.join(res)})")

    def _has_table(self, name: str) -> bool:
        return self._con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if _is_busy(exc):
                raise SensitivityError(f"{self.path}: the cache stayed locked by another process for "
                                       f"{_BUSY_TIMEOUT_S:.0f} s ({msg})") from None
            if any(k in msg for k in ("disk is full", "disk I/O", "readonly", "unable to open", "out of memory")):
                raise SensitivityError(f"{self.path}: cannot write the cache ({msg}); nothing was lost, rerun "
                                       "when it is fixed") from None
            raise CorruptFileError(f"{self.path}: not a readable sensitivity cache ({msg})") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One ``BEGIN IMMEDIATE`` transaction (rolled back on any error)."""
        with self._errors():
            cur = self._con.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _q(self, sql: str, args: Sequence = ()) -> List[tuple]:
        with self._errors():
            return self._con.execute(sql, args).fetchall()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ConfigCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- meta ------------------------------------------------------------------------------------
    def _meta(self, key: str) -> Optional[str]:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    @property
    def signature(self) -> Optional[str]:
        """The signature of this object's fidelity (None while it has none)."""
        return self._meta(self._sig_key)

    @property
    def evaluation(self) -> Optional[Dict[str, Any]]:
        raw = self._meta(self._eval_key)
        return json.loads(raw) if raw else None

    def fidelities(self) -> Dict[str, str]:
        """``{fidelity: signature}`` of every fidelity with a signature, ``"full"`` first."""
        out = {}
        for key, value in self._q("SELECT key, value FROM meta WHERE key='signature' OR key LIKE 'signature:%' "
                                  "ORDER BY key"):
            out[FULL if key == "signature" else key.split(":", 1)[1]] = value
        return out

    def fidelity_records(self) -> Dict[str, List[Dict[str, Any]]]:
        """``{fidelity: records}`` of every fidelity (each list as :meth:`records` gives it)."""
        out = {}
        for name, sig in self.fidelities().items():
            rows = self._q(self._SELECT + " WHERE r.signature=? ORDER BY r.id", (sig,))
            out[name] = self._with_components([self._decode(r) for r in rows])
        return out

    def check_signature(self, signature: str, evaluation: Optional[Mapping[str, Any]] = None) -> None:
        """Raise :class:`SignatureMismatchError` if the cache has another signature (writes nothing)."""
        current = self.signature
        if current is not None and current != signature:
            what = "" if self.fidelity == FULL else f" at fidelity {self.fidelity!r}"
            raise SignatureMismatchError(
                f"{self.path} holds records of another evaluation{what} (signature {current[:12]}, this one {signature[:12]}: "
                f"{describe_difference(self.evaluation or {}, evaluation or {})}); use another --cache file"
            )

    def ensure_signature(self, signature: str, evaluation: Optional[Mapping[str, Any]] = None) -> None:
        """Set the cache's signature if it has none; raise :class:`SignatureMismatchError` if it differs."""
        with self._write() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key=?", (self._sig_key,)).fetchone()
            if row is None:
                others = {v for k, v in cur.execute("SELECT key, value FROM meta WHERE key='signature' OR "
                                                    "key LIKE 'signature:%'").fetchall()}
                if signature in others:
                    raise SignatureMismatchError(f"{self.path}: fidelity {self.fidelity!r} would have the signature "
                                                 f"of another fidelity ({signature[:12]}): give it other images")
                cur.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (self._sig_key, signature))
                cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            (self._eval_key, _json(dict(evaluation or {}))))
                return
        self.check_signature(signature, evaluation)

    @property
    def layer_stats(self) -> Dict[str, Dict[str, Any]]:
        """``{layer: {"fp16_bytes": int, "options": {option: [nbytes, error]}}}`` (for the pkl export)."""
        raw = self._meta("layer_stats")
        return json.loads(raw) if raw else {}

    def set_layer_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge per-layer stats into the cache (existing entries are kept)."""
        with self._write() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key='layer_stats'").fetchone()
            merged = json.loads(row[0]) if row else {}
            changed = False
            for layer, s in stats.items():
                entry = merged.setdefault(layer, {"fp16_bytes": s.get("fp16_bytes"), "options": {}})
                for opt, v in (s.get("options") or {}).items():
                    if opt not in entry["options"]:
                        entry["options"][opt] = list(v)
                        changed = True
                if entry.get("fp16_bytes") is None and s.get("fp16_bytes") is not None:
                    entry["fp16_bytes"] = s["fp16_bytes"]
                    changed = True
            if changed or row is None:
                cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('layer_stats', ?)", (_json(merged),))

    def rebind_multiquantizer(self, new_hash: str) -> str:
        """Name another multiquantizer hash in this cache's evaluation (same quantized tensors, new identity).

        Rewrites the signature, the run ids derived from it and every record's checksum in one
        transaction; returns the new signature. The caller checks that the multiquantizer holds the
        same layers, bytes and errors (``sensitivity cache rebind`` does).
        """
        from .records import evaluation_signature, run_id_for

        if len(self.fidelities()) > 1 or self.fidelity != FULL:
            raise SensitivityError(f"{self.path}: holds labels of several fidelities ({', '.join(self.fidelities())}); "
                                   "rebinding those is not supported: label again with the new multiquantizer")
        ev = self.evaluation
        if not ev or "multiquantizer_hash" not in ev:
            raise SensitivityError(f"{self.path}: its evaluation names no multiquantizer hash")
        old_sig = self._require_signature()
        ev2 = dict(ev, multiquantizer_hash=str(new_hash))
        new_sig = evaluation_signature(ev2)
        if new_sig == old_sig:
            return old_sig
        with self._write() as cur:
            cur.execute("UPDATE meta SET value=? WHERE key='signature'", (new_sig,))
            cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('evaluation', ?)", (_json(ev2),))
            for run_id, sampler in cur.execute("SELECT run_id, sampler FROM runs WHERE signature=?", (old_sig,)).fetchall():
                new_run = run_id_for(new_sig, json.loads(sampler))
                cur.execute("UPDATE runs SET run_id=?, signature=? WHERE run_id=?", (new_run, new_sig, run_id))
                cur.execute("UPDATE records SET run_id=? WHERE run_id=?", (new_run, run_id))
                cur.execute("UPDATE run_configs SET run_id=? WHERE run_id=?", (new_run, run_id))
                cur.execute("DELETE FROM claims WHERE run_id=?", (run_id,))
            rows = cur.execute("SELECT id, config_hash, config, avg_bits, quantized_bytes, summed_error, metrics "
                               "FROM records WHERE signature=?", (old_sig,)).fetchall()
            for rid, chash, cfg, avg, qb, err, met in rows:
                cur.execute("UPDATE records SET signature=?, checksum=? WHERE id=?",
                            (new_sig, _checksum(new_sig, chash, cfg, avg, qb, err, met), rid))
        return new_sig

    # ---- runs ------------------------------------------------------------------------------------
    def register_run(self, sampler: Mapping[str, Any], planned: int = 0) -> str:
        """Record a run (one sampler setting) and return its id; ``planned`` only ever grows."""
        sig = self._require_signature()
        run_id = run_id_for(sig, sampler)
        with self._write() as cur:
            cur.execute("INSERT OR IGNORE INTO runs(run_id, signature, sampler, planned, created_at) VALUES (?,?,?,?,?)",
                        (run_id, sig, _json(dict(sampler)), int(planned), now_iso()))
            cur.execute("UPDATE runs SET planned = MAX(planned, ?) WHERE run_id=?", (int(planned), run_id))
        return run_id

    def runs(self) -> List[Dict[str, Any]]:
        rows = self._q(
            "SELECT r.run_id, r.sampler, r.planned, r.created_at, "
            "(SELECT COUNT(*) FROM run_configs c WHERE c.run_id=r.run_id), "
            "(SELECT COUNT(*) FROM claims k WHERE k.run_id=r.run_id) FROM runs r ORDER BY r.created_at")
        return [{"run_id": a, "sampler": json.loads(b), "planned": c, "created_at": d, "done": e, "claimed": f}
                for a, b, c, d, e, f in rows]

    def _require_signature(self) -> str:
        sig = self.signature
        if sig is None:
            raise SensitivityError(f"{self.path}: the cache has no evaluation signature yet")
        return sig

    def done_indices(self, run_id: str) -> Set[int]:
        return {r[0] for r in self._q("SELECT idx FROM run_configs WHERE run_id=?", (run_id,))}

    def lookup(self, chash: str) -> Optional[int]:
        """Id of the record of config hash ``chash`` (this cache's signature), or None."""
        rows = self._q("SELECT id FROM records WHERE signature=? AND config_hash=?", (self.signature, chash))
        return rows[0][0] if rows else None

    # ---- claims ----------------------------------------------------------------------------------

    def link(self, run_id: str, index: int, record_id: int, owner: Optional[str] = None) -> None:
        """Mark ``index`` of ``run_id`` done with the existing record ``record_id``."""
        with self._write() as cur:
            cur.execute("INSERT OR IGNORE INTO run_configs(run_id, idx, record_id) VALUES (?,?,?)",
                        (run_id, int(index), int(record_id)))
            self._lowest_index(cur, int(record_id), run_id, int(index))
            cur.execute("DELETE FROM claims WHERE run_id=? AND idx=?", (run_id, int(index)))

    @staticmethod
    def _lowest_index(cur: sqlite3.Cursor, record_id: int, run_id: str, index: int) -> None:
        """A config drawn twice in a run keeps its lowest index, whichever draw finished first (so the
        record is the same whatever the worker count and timing; the checksum does not cover the index)."""
        cur.execute("UPDATE records SET idx=? WHERE id=? AND run_id=? AND idx > ?", (index, record_id, run_id, index))

    def add(self, record: Mapping[str, Any], run_id: Optional[str] = None, index: Optional[int] = None,
            signature: Optional[str] = None) -> AddResult:
        """Write one record (fields as in :data:`RECORD_FIELDS`; ``config`` = ``{layer: option}``).

        Atomic: inserts the record unless its config is already there, links ``(run_id, index)`` to it
        and drops the claim, in one transaction. The signature is the cache's.
        """
        sig = signature or self._require_signature()
        if sig != self.signature:
            raise SignatureMismatchError(f"{self.path}: refusing a record of signature {sig[:12]} "
                                         f"in a cache of signature {str(self.signature)[:12]}")
        row = self._row(record, sig)
        with self._write() as cur:
            cur.execute(
                "INSERT INTO records(run_id, idx, signature, config_hash, config, avg_bits, quantized_bytes, "
                "summed_error, metrics, timings, host, created_at, checksum) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(signature, config_hash) DO NOTHING",
                (run_id, None if index is None else int(index), *row),
            )
            inserted = cur.rowcount == 1
            rid = cur.execute("SELECT id FROM records WHERE signature=? AND config_hash=?", (sig, row[1])).fetchone()[0]
            if run_id is not None and index is not None:
                cur.execute("INSERT OR IGNORE INTO run_configs(run_id, idx, record_id) VALUES (?,?,?)",
                            (run_id, int(index), rid))
                if not inserted:
                    self._lowest_index(cur, rid, run_id, int(index))
                cur.execute("DELETE FROM claims WHERE run_id=? AND idx=?", (run_id, int(index)))
        return AddResult(rid, inserted)

    @staticmethod
    def _row(record: Mapping[str, Any], sig: str) -> tuple:
        if "config" not in record or not isinstance(record["config"], Mapping):
            raise ConfigError("cache record: 'config' must be a {layer: option} mapping")
        metrics = record.get("metrics")
        if not isinstance(metrics, Mapping):
            raise ConfigError("cache record: 'metrics' must be a mapping")
        cfg = normalize_config(record["config"])
        chash = config_hash(cfg)
        if record.get("config_hash") not in (None, chash):
            raise CorruptFileError(f"cache record: config_hash {record['config_hash']} does not match its config ({chash})")
        cfg_s, met_s = _json(cfg), _json(dict(metrics))
        qb = record.get("quantized_bytes")
        qb = None if qb is None or (isinstance(qb, float) and math.isnan(qb)) else int(qb)
        avg, err = _num(record.get("avg_bits")), _num(record.get("summed_error"))
        return (sig, chash, cfg_s, avg, qb, err, met_s, _json(dict(record.get("timings") or {})),
                record.get("host") or socket.gethostname(), record.get("created_at") or now_iso(),
                _checksum(sig, chash, cfg_s, avg, qb, err, met_s))

    _SELECT = ("SELECT r.id, r.run_id, r.idx, r.config_hash, r.config, r.avg_bits, r.quantized_bytes, r.summed_error, "
               "r.metrics, r.signature, r.timings, r.host, r.created_at, r.checksum FROM records r")

    def _decode(self, row: tuple) -> Dict[str, Any]:
        rid, run_id, idx, chash, cfg, avg, qb, err, met, sig, tim, host, created, _ = row
        try:
            return {"id": rid, "run_id": run_id, "index": idx, "config_hash": chash, "config": json.loads(cfg),
                    "avg_bits": avg, "quantized_bytes": qb, "summed_error": err, "metrics": json.loads(met),
                    "signature": sig, "timings": json.loads(tim), "host": host, "created_at": created}
        except (json.JSONDecodeError, TypeError):
            raise CorruptFileError(f"{self.path}: record {rid} is damaged (unreadable JSON); "
                                   f"`sensitivity cache info` lists damaged records") from None

    def records(self, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Records as dicts (fields of :data:`RECORD_FIELDS` plus ``id``), oldest first.

        With ``run_id``: one entry per done index of that run, ordered by index, ``index``/``run_id``
        being that run's (a config drawn twice appears twice).
        """
        if run_id is None:
            sig = self.signature
            if sig is None:
                return []
            rows = self._q(self._SELECT + " WHERE r.signature=? ORDER BY r.id", (sig,))
            return self._with_components([self._decode(r) for r in rows])
        rows = self._q(
            "SELECT r.id, c.run_id, c.idx, r.config_hash, r.config, r.avg_bits, r.quantized_bytes, r.summed_error, "
            "r.metrics, r.signature, r.timings, r.host, r.created_at, r.checksum "
            "FROM run_configs c JOIN records r ON r.id = c.record_id WHERE c.run_id=? ORDER BY c.idx", (run_id,))
        return self._with_components([self._decode(r) for r in rows])

    def _with_components(self, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """A pipeline multiquantizer's records get ``component_bytes`` ({component: bytes of its layers},
        :meth:`sensitivity.sizes.SizeTable.component_bytes`), derived from the layer stats."""
        from ...mqfile import COMPONENT_NAMES

        stats = self.layer_stats if records else {}
        if not stats or not all(l.split(".", 1)[0] in COMPONENT_NAMES and "." in l for l in stats):
            return records
        from ...sizes import SizeTable

        table = SizeTable.from_layer_stats(stats)
        for rec in records:
            try:
                rec["component_bytes"] = table.component_bytes(rec["config"])
            except SensitivityError:  # a record of layers the stats lack: no breakdown
                pass
        return records

    def __len__(self) -> int:
        return self._q("SELECT COUNT(*) FROM records")[0][0]

    def verify(self) -> List[int]:
        """Ids of records whose checksum or config hash does not match their content."""
        bad = []
        for row in self._q("SELECT id, signature, config_hash, config, avg_bits, quantized_bytes, summed_error, "
                           "metrics, checksum FROM records"):
            rid, sig, chash, cfg, avg, qb, err, met, ck = row
            try:
                ok = (_checksum(sig, chash, cfg, avg, qb, err, met) == ck
                      and config_hash(json.loads(cfg)) == chash and isinstance(json.loads(met), dict))
            except (ValueError, TypeError, SensitivityError):
                ok = False
            if not ok:
                bad.append(rid)
        return bad

    # ---- views and exports ----------------------------------------------------------------------

    def info(self, verify: bool = True) -> Dict[str, Any]:
        """Summary: signature, evaluation, record count, runs, metric ranges, damaged records."""
        n = len(self)
        out: Dict[str, Any] = {
            "path": str(self.path), "format": FORMAT, "size_bytes": self.path.stat().st_size,
            "signature": self.signature, "evaluation": self.evaluation, "records": n, "runs": self.runs(),
            "layers_with_stats": len(self.layer_stats),
        }
        fids = self.fidelities()
        if len(fids) > 1:
            out["fidelities"] = {name: {"signature": sig, "records": self._q(
                "SELECT COUNT(*) FROM records WHERE signature=?", (sig,))[0][0]} for name, sig in fids.items()}
        if n:
            df = self.to_frame()
            ranges = {}
            for col in df.columns:
                if col in ("index", "quantized_bytes", "run_id") or df[col].dtype.kind not in "fi":
                    continue
                s = df[col].dropna()
                if len(s):
                    ranges[col] = {"min": float(s.min()), "median": float(s.median()), "max": float(s.max())}
            out["ranges"] = ranges
            tot = [json.loads(t).get("total") for t in df["timings"]]
            tot = [t for t in tot if isinstance(t, (int, float))]
            if tot:
                out["mean_seconds_per_config"] = sum(tot) / len(tot)
        if verify:
            out["damaged_records"] = self.verify()
        return out
