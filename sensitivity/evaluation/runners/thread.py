"""The in-process runner: one worker thread (the driver thread keeps writing, renewing claims, drawing)."""

from __future__ import annotations

import socket
import threading
from queue import Empty, Queue
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import SensitivityError

from .devices import factory_for_device
from .base import Event, Factory, LocalRunner, _call, _concurrency, _error_message, _raise_fatal, _set_threads, _user_exc


class ThreadRunner(LocalRunner):
    """One worker thread in this process (``LocalRunner(factory, workers=1)``)."""

    def __init__(self, factory: Factory, workers: int = 1, threads: Optional[int] = None, max_restarts: int = 3,
                 start_method: str = "spawn", devices: Optional[Sequence[str]] = None):
        if devices and len(devices) > 1:
            raise SensitivityError(f"the in-process runner holds one worker, got {len(devices)} devices")
        super().__init__(factory, 1, threads, max_restarts, start_method, devices)

    def _thread_main(self) -> None:
        _set_threads(self.threads)
        try:
            factory = factory_for_device(self.factory, self.devices[0]) if self.devices else self.factory
            evaluate = factory()
        except BaseException as exc:  # noqa: BLE001
            self._results.put(Event("fatal", message=_error_message(exc), user_error=isinstance(exc, SensitivityError),
                                    exc=_user_exc(exc)))
            return
        self._results.put(Event("ready"))
        host = socket.gethostname()

        def consume() -> None:
            _set_threads(self.threads)  # numba's thread count is per thread
            while True:
                task = self._tasks.get()
                if task is None:
                    self._tasks.put(None)  # let the other consumers see it too
                    return
                index, options = task
                try:
                    metrics, timings = _call(evaluate, index, options)
                    self._results.put(Event("done", index, metrics, timings, host))
                except BaseException as exc:  # noqa: BLE001
                    self._results.put(Event("error", index, message=_error_message(exc),
                                            user_error=isinstance(exc, SensitivityError), exc=_user_exc(exc)))

        self._consumers = [threading.Thread(target=consume, daemon=True, name=f"sensitivity-eval-{k}")
                           for k in range(1, _concurrency(evaluate))]
        for t in self._consumers:
            t.start()
        consume()
        for t in self._consumers:
            t.join()

    def start(self) -> None:
        self._tasks: "Queue[Optional[Tuple[int, Dict[str, str]]]]" = Queue()
        self._results: "Queue[Event]" = Queue()
        self._thread = threading.Thread(target=self._thread_main, daemon=True, name="sensitivity-eval")
        self._thread.start()
        self._inflight[0] = []
        ev = self._results.get()
        if ev.kind == "fatal":
            _raise_fatal(ev)
        self._ready[0] = True

    def submit(self, index: int, options: Dict[str, str]) -> None:
        self._pick(index)
        self._tasks.put((index, options))

    def poll(self, timeout: float) -> List[Event]:
        events = []
        try:
            events.append(self._results.get(timeout=timeout))
            while True:
                events.append(self._results.get_nowait())
        except Empty:
            pass
        for ev in events:
            if ev.index is not None and ev.index in self._inflight[0]:
                self._inflight[0].remove(ev.index)
        return events

    def close(self) -> None:
        if hasattr(self, "_tasks"):
            self._tasks.put(None)
            # wait for the worker threads: a thread still inside torch / OpenMP when the interpreter
            # exits aborts the process ("terminate called without an active exception", exit 134)
            thread = getattr(self, "_thread", None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=60)
