"""The process runner: ``workers`` spawned processes on this machine, restarted when lost."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
from multiprocessing.connection import wait as mp_wait
from queue import Queue
from typing import Any, Dict, List, Optional, Tuple

from .devices import factory_for_device, worker_env
from .base import (WORKER_ENV, Event, Factory, LocalRunner, _call, _concurrency, _die_with_parent, _error_message,
                   _raise_fatal, _set_threads, _user_exc)


def _process_worker(conn, factory: Factory, threads: Optional[int], parent: int) -> None:
    """Body of a :class:`LocalRunner` worker process (``parent``: the driver's pid)."""
    _die_with_parent(parent)
    _set_threads(threads)
    host = socket.gethostname()
    try:
        evaluate = factory()
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        conn.send(("fatal", None, _error_message(exc), _user_exc(exc)))
        return
    conn.send(("ready", None, None, None))
    tasks: "Queue[Optional[Tuple[int, Dict[str, str]]]]" = Queue()
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def consume() -> None:
        _set_threads(threads)  # numba's thread count is per thread
        while True:
            task = tasks.get()
            if task is None:
                return
            index, options = task
            try:
                metrics, timings = _call(evaluate, index, options)
                send(("done", index, (metrics, timings, host), None))
            except BaseException as exc:  # noqa: BLE001 - reported to the driver
                send(("error", index, _error_message(exc), _user_exc(exc)))

    n = _concurrency(evaluate)
    consumers = [threading.Thread(target=consume, daemon=True, name=f"eval-{k}") for k in range(n)]
    for t in consumers:
        t.start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        tasks.put(msg)
    for _ in consumers:
        tasks.put(None)
    for t in consumers:
        t.join()


class ProcessRunner(LocalRunner):
    """``workers`` spawned worker processes (``LocalRunner(factory, workers=K)``, K > 1)."""

    def start(self) -> None:
        self._ctx = mp.get_context(self.start_method)
        self._procs: Dict[int, Any] = {}
        self._conns: Dict[int, Any] = {}
        for w in range(self.workers):
            self._spawn(w)
        # wait until every worker has built its evaluator (or one fails: raise before any work)
        while not all(self._ready.values()):
            for ev in self.poll(1.0):
                if ev.kind == "fatal":
                    self.close()
                    _raise_fatal(ev)

    def _spawn(self, w: int) -> None:
        parent, child = self._ctx.Pipe()
        factory, pinned = self.factory, {}
        if self.devices:  # pinned to its device: a CUDA worker sees only its GPU, as cuda:0
            pinned, inside = worker_env(self.devices[w])
            factory = factory_for_device(self.factory, inside)
        p = self._ctx.Process(target=_process_worker, args=(child, factory, self.threads, os.getpid()), daemon=True,
                              name=f"sensitivity-eval-{w}")
        added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        saved = {k: os.environ.get(k) for k in pinned}
        os.environ.update(added)  # inherited by the spawned process
        os.environ.update(pinned)
        try:
            p.start()
        finally:
            for k in added:
                os.environ.pop(k, None)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._procs[w], self._conns[w] = p, parent
        self._inflight[w] = []
        self._ready[w] = False

    def submit(self, index: int, options: Dict[str, str]) -> None:
        w = self._pick(index)
        try:
            self._conns[w].send((index, options))
        except (BrokenPipeError, OSError):
            pass  # the worker is dead; poll() reports its configs as lost

    def poll(self, timeout: float) -> List[Event]:
        events: List[Event] = []
        by_obj = {}
        for w, c in self._conns.items():
            by_obj[c] = ("conn", w)
            by_obj[self._procs[w].sentinel] = ("dead", w)
        ready = mp_wait(list(by_obj), timeout=timeout)
        dead = set()
        for obj in ready:
            kind, w = by_obj[obj]
            if kind == "dead":
                dead.add(w)
                continue
            conn = self._conns[w]
            try:
                while conn.poll():
                    tag, index, payload, user = conn.recv()
                    if tag == "ready":
                        self._ready[w] = True
                    elif tag == "fatal":
                        events.append(Event("fatal", message=payload, user_error=user is not None, exc=user))
                    elif tag == "done":
                        metrics, timings, host = payload
                        self._inflight[w].remove(index)
                        events.append(Event("done", index, metrics, timings, host))
                    else:
                        self._inflight[w].remove(index)
                        events.append(Event("error", index, message=payload, user_error=user is not None, exc=user))
            except (EOFError, OSError):
                dead.add(w)
        for w in dead:
            if not self._ready.get(w, False):
                self._procs[w].join(timeout=1.0)
                events.append(Event("fatal", message=f"worker {w} died while loading the model "
                                                      f"(exit code {self._procs[w].exitcode})"))
                continue
            lost = self._inflight.pop(w, [])
            self._procs[w].join(timeout=1.0)
            code = self._procs[w].exitcode
            self._conns.pop(w).close()
            self._procs.pop(w)
            self._ready.pop(w, None)
            events.extend(Event("lost", i, message=f"worker {w} exited with code {code}") for i in lost)
            if self._restarts < self.max_restarts:
                self._restarts += 1
                self._spawn(w)
            elif not self._procs:
                events.append(Event("fatal", message=f"all {self.workers} worker processes died "
                                                      f"(last exit code {code}); see the messages above"))
        return events

    def close(self) -> None:
        for w, c in list(getattr(self, "_conns", {}).items()):
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w, p in list(getattr(self, "_procs", {}).items()):
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
