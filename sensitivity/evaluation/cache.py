"""The evaluation cache: one SQLite row per evaluated config, safe to kill, resume and share.

One cache file holds the records of ONE evaluation signature (model, multiquantizer hash, prompts or
classes, seeds, steps, guidance, metric versions — whatever the evaluator puts in it). Opening it with
another signature raises :class:`SignatureMismatchError` naming what differs, before anything is
written, so records of two protocols are never mixed. Use one cache file per protocol.

Tables (``sqlite3 FILE .schema`` shows them)::

    meta(key, value)              format, signature, evaluation (JSON), layer_stats (JSON), created_at
    runs(run_id, signature, sampler, planned, created_at)
                                  a run = one sampler setting (seed, bits, methods, fixed layers);
                                  config i of a run is always the same config
    records(id, run_id, idx, signature, config_hash, config, avg_bits, quantized_bytes, summed_error,
            metrics, timings, host, created_at, checksum)      UNIQUE(signature, config_hash)
    run_configs(run_id, idx, record_id)                        PRIMARY KEY(run_id, idx)
    claims(run_id, idx, owner, expires)                        PRIMARY KEY(run_id, idx)

A record is written once per (signature, config hash): a sampler index whose config was already
evaluated (by another run, or an earlier index) is linked to the existing record in ``run_configs``
and not evaluated again. ``run_id``/``idx`` of a record are those of the run that first evaluated it
(null for configs evaluated outside a run). ``checksum`` (BLAKE2b of the record's content) lets
:meth:`ConfigCache.verify` find a damaged or hand-edited row.

Concurrency: WAL journal, ``synchronous=FULL``, every write in a ``BEGIN IMMEDIATE`` transaction, a
60 s busy timeout. Several processes on one machine may run jobs on one cache: each *claims* a
sampler index before evaluating it (``claims``); a claim of a dead process on this host is taken over
at once, a claim of another host when its lease expires (owners renew their leases while alive).
SQLite over a network file system is not safe: for many machines, use the Ray runner, whose driver is
the only writer.

A SIGKILL at any moment leaves either the committed record or nothing; a rerun evaluates what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import pickle
import random
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ..io import atomic_path
from ..config import canonical_options
from ..errors import ConfigError, CorruptFileError, SensitivityError
from ..options import FP16, METHOD_ALIASES, QuantOption

FORMAT = "sensitivity.cache/1"
REFERENCE_METRIC = "FID-GT-1k"
_REF_METHOD = {v: k for k, v in METHOD_ALIASES.items()}  # uaq -> mse, kmeans_c -> kmeans, kmeans_a -> kmeans_all
RECORD_FIELDS = ("run_id", "index", "config_hash", "config", "avg_bits", "quantized_bytes", "summed_error",
                 "metrics", "signature", "timings", "host", "created_at")

_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's lock


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


def config_hash(options: Mapping[str, str]) -> str:
    """Hash of a ``{layer: option}`` config, the same as :attr:`QuantConfig.config_hash`.

    fp16 entries are dropped first (absent = full precision), so spelling does not change it.
    """
    from ..config import options_hash

    return options_hash(normalize_config(options))


def normalize_config(options: Mapping[str, str]) -> Dict[str, str]:
    """Canonical option names, fp16 entries removed, keys sorted."""
    out = {}
    for layer, opt in options.items():
        name = QuantOption.parse(opt).name
        if name != FP16:
            out[str(layer)] = name
    return dict(sorted(out.items()))


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


# ----------------------------------------------------------------------------------- claim owners
_START_TIME: Optional[str] = None


def _proc_start(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return None


def process_owner() -> str:
    """``host|pid|start`` of this process: the owner name of its claims."""
    global _START_TIME
    if _START_TIME is None:
        _START_TIME = _proc_start(os.getpid()) or "?"
    return f"{socket.gethostname()}|{os.getpid()}|{_START_TIME}"


def _owner_alive(owner: str) -> bool:
    """False only when ``owner`` is a process of this host that no longer runs (or whose pid was reused)."""
    try:
        host, pid_s, start = owner.split("|")
        pid = int(pid_s)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start != "?":
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


# -------------------------------------------------------------------------------------- the cache
@dataclass
class AddResult:
    record_id: int
    inserted: bool  # False: the config was already in the cache (record kept, index linked)


class ConfigCache:
    """An open cache file. See the module docstring.

    ``ConfigCache(path)`` opens an existing cache (any signature) for reading, exporting and importing;
    ``ConfigCache(path, signature=..., evaluation=..., create=True)`` creates it if needed and checks
    (or sets) its signature. ``evaluation`` is the JSON-able description the signature was hashed
    from; it is stored once and used to explain mismatches. A corrupt or foreign file raises
    :class:`CorruptFileError` (one line) without being modified.
    """

    def __init__(self, path: str | os.PathLike, signature: Optional[str] = None,
                 evaluation: Optional[Mapping[str, Any]] = None, *, create: bool = False,
                 check: bool = True):
        self.path = Path(path)
        existed = self.path.exists()
        if not existed and not create:
            raise SensitivityError(f"cache file {str(self.path)!r} does not exist")
        if existed and self.path.is_dir():
            raise SensitivityError(f"cache {str(self.path)!r} is a directory, not a cache file")
        if existed:
            self._check_header(create)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two processes opening a new file at once can deadlock on the switch to WAL; SQLite then
        # answers "database is locked" at once, without waiting. Opening is idempotent: retry it.
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            self._con = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                self._open(create, existed, check)
                break
            except sqlite3.DatabaseError as exc:
                self._con.close()
                if not _is_busy(exc) or time.monotonic() > deadline:
                    with self._errors():
                        raise
                time.sleep(random.uniform(0.005, 0.05))
            except BaseException:
                self._con.close()
                raise
        try:
            if signature is not None:
                self.ensure_signature(signature, evaluation)
        except BaseException:
            self._con.close()
            raise

    # ---- plumbing --------------------------------------------------------------------------------
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
            raise CorruptFileError(f"{self.path}: empty file, not a sensitivity cache (delete it to start a new one)")

    def _check_format(self, check: bool) -> None:
        if not self._has_table("meta"):
            raise CorruptFileError(f"{self.path}: an SQLite database but not a sensitivity cache (no meta table)")
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
        return self._meta("signature")

    @property
    def evaluation(self) -> Optional[Dict[str, Any]]:
        raw = self._meta("evaluation")
        return json.loads(raw) if raw else None

    def check_signature(self, signature: str, evaluation: Optional[Mapping[str, Any]] = None) -> None:
        """Raise :class:`SignatureMismatchError` if the cache has another signature (writes nothing)."""
        current = self.signature
        if current is not None and current != signature:
            raise SignatureMismatchError(
                f"{self.path} holds records of another evaluation (signature {current[:12]}, this one {signature[:12]}: "
                f"{describe_difference(self.evaluation or {}, evaluation or {})}); use another --cache file"
            )

    def ensure_signature(self, signature: str, evaluation: Optional[Mapping[str, Any]] = None) -> None:
        """Set the cache's signature if it has none; raise :class:`SignatureMismatchError` if it differs."""
        with self._write() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key='signature'").fetchone()
            if row is None:
                cur.execute("INSERT INTO meta(key, value) VALUES ('signature', ?)", (signature,))
                cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('evaluation', ?)",
                            (_json(dict(evaluation or {})),))
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
    def claim(self, run_id: str, candidates: Iterable[int], owner: str, lease_s: float = 600.0) -> Optional[int]:
        """Claim the first of ``candidates`` that is neither done nor claimed by a live owner.

        Claims of dead processes on this host and expired claims are dropped first. Returns the index,
        or None when every candidate is done or held by someone else.
        """
        now = time.time()
        with self._write() as cur:
            done = {r[0] for r in cur.execute("SELECT idx FROM run_configs WHERE run_id=?", (run_id,))}
            held: Dict[int, Tuple[str, float]] = {
                i: (o, e) for i, o, e in cur.execute("SELECT idx, owner, expires FROM claims WHERE run_id=?", (run_id,))
            }
            alive: Dict[str, bool] = {}
            for i in candidates:
                if i in done:
                    continue
                if i in held:
                    o, e = held[i]
                    if o == owner:
                        return i  # already ours
                    if o not in alive:
                        alive[o] = _owner_alive(o)
                    if e >= now and alive[o]:
                        continue
                cur.execute("INSERT OR REPLACE INTO claims(run_id, idx, owner, expires) VALUES (?,?,?,?)",
                            (run_id, int(i), owner, now + lease_s))
                return int(i)
        return None

    def foreign_claims(self, run_id: str, owner: str) -> int:
        """How many live claims of ``run_id`` other owners hold (claims not done yet)."""
        now = time.time()
        rows = self._q("SELECT owner, expires FROM claims WHERE run_id=? AND owner<>?", (run_id, owner))
        alive: Dict[str, bool] = {}
        n = 0
        for o, e in rows:
            if o not in alive:
                alive[o] = _owner_alive(o)
            n += e >= now and alive[o]
        return n

    def renew(self, owner: str, lease_s: float = 600.0) -> None:
        with self._write() as cur:
            cur.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease_s, owner))

    def release(self, owner: str, run_id: Optional[str] = None, indices: Optional[Iterable[int]] = None) -> None:
        """Drop claims of ``owner`` (all, those of ``run_id``, or only ``indices`` of it)."""
        with self._write() as cur:
            if indices is not None and run_id is not None:
                cur.executemany("DELETE FROM claims WHERE owner=? AND run_id=? AND idx=?",
                                [(owner, run_id, int(i)) for i in indices])
            elif run_id is not None:
                cur.execute("DELETE FROM claims WHERE owner=? AND run_id=?", (owner, run_id))
            else:
                cur.execute("DELETE FROM claims WHERE owner=?", (owner,))

    # ---- records ---------------------------------------------------------------------------------
    def link(self, run_id: str, index: int, record_id: int, owner: Optional[str] = None) -> None:
        """Mark ``index`` of ``run_id`` done with the existing record ``record_id``."""
        with self._write() as cur:
            cur.execute("INSERT OR IGNORE INTO run_configs(run_id, idx, record_id) VALUES (?,?,?)",
                        (run_id, int(index), int(record_id)))
            cur.execute("DELETE FROM claims WHERE run_id=? AND idx=?", (run_id, int(index)))

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
            return [self._decode(r) for r in self._q(self._SELECT + " ORDER BY r.id")]
        rows = self._q(
            "SELECT r.id, c.run_id, c.idx, r.config_hash, r.config, r.avg_bits, r.quantized_bytes, r.summed_error, "
            "r.metrics, r.signature, r.timings, r.host, r.created_at, r.checksum "
            "FROM run_configs c JOIN records r ON r.id = c.record_id WHERE c.run_id=? ORDER BY c.idx", (run_id,))
        return [self._decode(r) for r in rows]

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
        """The reference's ``quant_cache.pkl`` layout (method.md §3): a list of dicts with ``config``
        (``{layer: [method-bits, fp_bytes, q_bytes, error]}``), ``quantized_size``, ``avg_bits``,
        ``quantized_error``, ``FID-GT-1k`` and ``bops`` (not computed: None), plus ``sensitivity``
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
                "bops": None,
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

    def info(self, verify: bool = True) -> Dict[str, Any]:
        """Summary: signature, evaluation, record count, runs, metric ranges, damaged records."""
        n = len(self)
        out: Dict[str, Any] = {
            "path": str(self.path), "format": FORMAT, "size_bytes": self.path.stat().st_size,
            "signature": self.signature, "evaluation": self.evaluation, "records": n, "runs": self.runs(),
            "layers_with_stats": len(self.layer_stats),
        }
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


def _int(x) -> Optional[int]:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None
