"""What every runner shares: the worker-side event, calling ``evaluate``, errors, threads, the Runner interface."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ...errors import SensitivityError
from ...threads import threads_per_worker

EvaluateFn = Callable[[int, Dict[str, str]], Mapping[str, Any]]
Factory = Callable[[], EvaluateFn]
SLOTS_PER_WORKER = 2


# ------------------------------------------------------------------------------------ worker side
@dataclass
class Event:
    kind: str  # "ready" | "done" | "error" | "lost" | "fatal"
    index: Optional[int] = None
    metrics: Optional[Dict[str, Any]] = None
    timings: Optional[Dict[str, float]] = None
    host: Optional[str] = None
    message: str = ""
    user_error: bool = False
    exc: Optional[BaseException] = None  # the worker's SensitivityError, re-raised as is


def _call(evaluate: EvaluateFn, index: int, options: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    t0 = time.perf_counter()
    out = dict(evaluate(index, options))
    dt = time.perf_counter() - t0
    timings = dict(out.pop("timings", None) or {})
    if isinstance(out.get("seconds"), (int, float)):  # the Evaluator's wall time: a timing, not a metric
        timings["evaluator"] = float(out.pop("seconds"))
    timings["evaluate"] = dt
    return out, timings


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, SensitivityError):
        return str(exc)
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n" + "".join(tb[-6:])


def _set_threads(threads: Optional[int]) -> None:
    """torch's threads (process-wide) and numba's (for the calling thread: numba's count is per thread)."""
    if threads:
        import numba
        import torch

        torch.set_num_threads(int(threads))
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


# Worker processes get this environment unless the user set it. OpenMP threads that spin-wait after each
# parallel region (GNU OpenMP's default) make K worker processes on K cores fight for them: on 2 cores,
# 2 digits-dit workers ran at 862 configs/hour spinning, 3,329 configs/hour passive (16 configs, 100 images).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux: /proc; elsewhere: signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _die_with_parent(parent: int) -> None:
    """Make this worker process exit when the driver ``parent`` dies (even by SIGKILL, even before now).

    With ``spawn`` the driver is this process's parent; with ``forkserver`` the parent is the fork
    server, so the driver's pid is watched instead.
    """
    direct = os.getppid() == parent
    if direct and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort; the watchdog below still works
            pass

    def gone() -> bool:
        return os.getppid() != parent if direct else not _pid_alive(parent)

    if gone():  # the driver died while this process was starting
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if gone():
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _user_exc(exc: BaseException) -> Optional[SensitivityError]:
    """``exc`` if it is a (picklable) SensitivityError, else None."""
    if not isinstance(exc, SensitivityError):
        return None
    try:
        import pickle

        pickle.loads(pickle.dumps(exc))
        return exc.with_traceback(None)
    except Exception:  # noqa: BLE001
        return SensitivityError(str(exc))


def _concurrency(evaluate: EvaluateFn) -> int:
    """How many configs a worker may evaluate at once (``evaluate.concurrency``, default 1)."""
    return max(1, min(SLOTS_PER_WORKER, int(getattr(evaluate, "concurrency", 1) or 1)))


def _raise_fatal(ev: Event) -> None:
    if isinstance(ev.exc, SensitivityError):
        raise ev.exc
    if ev.user_error:
        raise SensitivityError(ev.message)
    raise RuntimeError(f"evaluation worker failed: {ev.message}")


# ------------------------------------------------------------------------------------ runners
class Runner:
    """Interface of a pool of workers driven by :func:`run_job`."""

    name = "runner"

    def start(self) -> None: ...
    def capacity(self) -> int: ...
    def submit(self, index: int, options: Dict[str, str]) -> None: ...
    def poll(self, timeout: float) -> List[Event]: ...
    def close(self) -> None: ...
    def describe(self) -> str:
        return self.name


class LocalRunner(Runner):
    """Workers on this machine: ``LocalRunner(factory, workers=1)`` is a :class:`ThreadRunner` (one
    worker thread in this process), ``workers=K`` a :class:`ProcessRunner` (K spawned processes).

    ``threads``: torch and numba threads per worker (default: :func:`sensitivity.threads.threads_per_worker`,
    the free cores shared out among the workers, at least 1 each). ``max_restarts``: restarts of lost worker processes.
    ``start_method``: ``spawn`` (default) or ``forkserver`` (faster restarts; both are CUDA-safe).
    ``devices``: one worker per entry (:func:`~sensitivity.evaluation.runners.devices.parse_devices`), each
    built with ``factory.with_device(device)``; a worker process on ``cuda:i`` sees only that GPU
    (``CUDA_VISIBLE_DEVICES``).
    """

    def __new__(cls, factory: Factory = None, workers: int = 1, *args: Any, **kwargs: Any):
        if cls is LocalRunner:
            from .process import ProcessRunner
            from .thread import ThreadRunner

            devices = kwargs.get("devices") if "devices" in kwargs else (args[3] if len(args) > 3 else None)
            n = max(int(workers), len(devices) if devices else 1)
            cls = ThreadRunner if n == 1 else ProcessRunner
        return super().__new__(cls)

    def __init__(self, factory: Factory, workers: int = 1, threads: Optional[int] = None, max_restarts: int = 3,
                 start_method: str = "spawn", devices: Optional[Sequence[str]] = None):
        self.start_method = start_method
        if workers < 1:
            raise SensitivityError(f"--workers must be at least 1, got {workers}")
        if devices:  # one worker per device (or workers shared round-robin over the devices)
            workers = max(int(workers), len(devices))
            from .devices import assign_devices

            self.devices: Optional[List[str]] = assign_devices(list(devices), workers)
        else:
            self.devices = None
        self.factory, self.workers, self.max_restarts = factory, int(workers), int(max_restarts)
        # the cores free now (affinity minus load) shared out: on a shared machine a busy core is not
        # given a thread, so no OpenMP team waits on a descheduled member (benchmarks/bench_contention.py)
        self.threads = int(threads) if threads is not None else threads_per_worker(self.workers)
        self.name = "local" if workers == 1 else f"local x{workers} processes"
        if self.devices:
            self.name += f" on {','.join(self.devices)}"
        self._inflight: Dict[int, List[int]] = {}  # worker id -> indices in flight
        self._ready: Dict[int, bool] = {}
        self._pending_events: List[Event] = []
        self._restarts = 0

    def capacity(self) -> int:
        return sum(SLOTS_PER_WORKER - len(v) for w, v in self._inflight.items())

    def _pick(self, index: int) -> int:
        w = min((w for w in self._inflight if len(self._inflight[w]) < SLOTS_PER_WORKER),
                key=lambda w: len(self._inflight[w]), default=None)
        if w is None:
            raise RuntimeError("submit() without capacity")
        self._inflight[w].append(index)
        return w
