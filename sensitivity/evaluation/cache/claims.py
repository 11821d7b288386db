"""Claims: which process owns a sampler index of a run (owner names, liveness, claim / renew / release)."""

from __future__ import annotations

import os
import socket
import time
from typing import Dict, Iterable, Optional, Tuple





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


class ClaimsMixin:
    """Claim methods of :class:`~sensitivity.evaluation.cache.ConfigCache` (needs its ``_q`` / ``_write``)."""

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
