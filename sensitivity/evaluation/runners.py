"""Evaluation jobs: label ``N`` random configs of a run, resumable, on one or many workers.

The driver (:func:`run_job`) is the only writer of the cache. It walks the sampler indices
``0..N-1`` of the run, skips those already in the cache, *claims* each index in the cache before
handing it out (so several jobs on one cache never evaluate the same index twice), links an index
whose config was evaluated before to the existing record, and writes each result in one transaction.
Workers never touch the cache; they get ``(index, {layer: option})`` and return metrics.

A worker is built from a *factory*: a picklable zero-argument callable that loads the pipeline,
the multiquantizer and the feature network once and returns ``evaluate(index, options) -> metrics``
(a dict of floats; an optional ``"timings"`` dict of seconds is moved to the record's timings).
Runners:

* :class:`LocalRunner` — ``workers=1``: one worker thread in this process (the driver thread keeps
  writing, renewing claims and drawing the progress bar while it computes); ``workers=K``: K
  spawned processes, each with ``threads`` torch threads.
* :class:`RayRunner` — one Ray actor per GPU (or per ``cpus_per_worker`` CPUs without GPUs), on a
  cluster at ``address`` or a local instance. Needs ``pip install sensitivity[ray]``.

Every worker keeps two configs queued, so it starts the next one as soon as it finishes one while
the driver writes the last result. A worker that dies (process killed, actor lost) has its configs
handed to the others (a lost process is restarted up to ``max_restarts`` times); a config whose
evaluation raises is retried ``max_retries`` times, then reported as failed (its claim is released,
so a rerun tries it again). Results do not depend on the runner or the number of workers: config
``i`` is a function of ``(seed, i)`` and the evaluation is seeded.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from multiprocessing.connection import wait as mp_wait
from queue import Empty, Queue
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from tqdm.auto import tqdm

from ..errors import SensitivityError
from ..options import FP16
from ..threads import threads_per_worker
from .cache import ConfigCache, config_hash, normalize_config, process_owner, run_id_for
from .sampler import SamplerSpec

EvaluateFn = Callable[[int, Dict[str, str]], Mapping[str, Any]]
Factory = Callable[[], EvaluateFn]
SLOTS_PER_WORKER = 2


# ------------------------------------------------------------------------------------ plan & stats
def layer_stats_from_multiquantizer(mq) -> Dict[str, Dict[str, Any]]:
    """``{layer: {"fp16_bytes": int, "options": {option: [nbytes, error]}}}`` of a multiquantizer."""
    out = {}
    for spec in mq.layers:
        opts = {}
        for opt in mq.options:
            s = mq.stats(spec.name, opt)
            opts[opt] = [int(s["nbytes"]), float(s["error"])]
        out[spec.name] = {"fp16_bytes": int(mq.fp16_bytes(spec.name)), "options": opts}
    return out


def config_stats(options: Mapping[str, str], layer_stats: Mapping[str, Mapping[str, Any]]) -> Tuple[float, int, float]:
    """``(avg_bits, quantized_bytes, summed_error)`` of a config, as ``Multiquantizer`` computes them.

    avg bits = ``16 * Σ bytes / Σ fp16 bytes`` over all layers (absent layers at fp16); summed error =
    Σ relative squared error over the quantized layers.
    """
    qbytes = fp = 0
    err = 0.0
    for layer, st in layer_stats.items():
        fp16 = int(st["fp16_bytes"])
        fp += fp16
        opt = options.get(layer, FP16)
        if opt == FP16:
            qbytes += fp16
        else:
            try:
                nbytes, e = st["options"][opt]
            except KeyError:
                raise SensitivityError(f"layer {layer!r}: option {opt!r} is not in the multiquantizer") from None
            qbytes += int(nbytes)
            err += float(e)
    unknown = set(options) - set(layer_stats)
    if unknown:
        raise SensitivityError(f"layer {sorted(unknown)[0]!r} is not in the multiquantizer")
    return 16.0 * qbytes / fp, qbytes, err


@dataclass
class JobPlan:
    """What a job evaluates: configs ``0..num_configs-1`` of ``sampler`` over ``layers``.

    ``layer_stats``: as :func:`layer_stats_from_multiquantizer` (for avg bits, bytes and error of
    each record, and the reference pkl export).
    """

    layers: List[str]
    sampler: SamplerSpec
    num_configs: int
    layer_stats: Dict[str, Dict[str, Any]]

    @classmethod
    def from_multiquantizer(cls, mq, sampler: SamplerSpec, num_configs: int) -> "JobPlan":
        sampler.check_layers(mq.layer_names)
        return cls(list(mq.layer_names), sampler, int(num_configs), layer_stats_from_multiquantizer(mq))

    def config(self, index: int) -> Dict[str, str]:
        return normalize_config(self.sampler.sample(self.layers, index))


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
        _set_threads(threads)
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
    """Workers on this machine: a thread (``workers=1``) or ``workers`` spawned processes.

    ``threads``: torch and numba threads per worker (default: :func:`sensitivity.threads.threads_per_worker`,
    the free cores shared out among the workers, at least 1 each). ``max_restarts``: restarts of lost worker processes.
    ``start_method``: ``spawn`` (default) or ``forkserver`` (faster restarts; both are CUDA-safe).
    """

    def __init__(self, factory: Factory, workers: int = 1, threads: Optional[int] = None, max_restarts: int = 3,
                 start_method: str = "spawn"):
        self.start_method = start_method
        if workers < 1:
            raise SensitivityError(f"--workers must be at least 1, got {workers}")
        self.factory, self.workers, self.max_restarts = factory, int(workers), int(max_restarts)
        # the cores free now (affinity minus load) shared out: on a shared machine a busy core is not
        # given a thread, so no OpenMP team waits on a descheduled member (benchmarks/bench_contention.py)
        self.threads = int(threads) if threads is not None else threads_per_worker(self.workers)
        self.name = "local" if workers == 1 else f"local x{workers} processes"
        self._inflight: Dict[int, List[int]] = {}  # worker id -> indices in flight
        self._ready: Dict[int, bool] = {}
        self._pending_events: List[Event] = []
        self._restarts = 0

    # -- in-process thread worker --
    def _thread_main(self) -> None:
        _set_threads(self.threads)
        try:
            evaluate = self.factory()
        except BaseException as exc:  # noqa: BLE001
            self._results.put(Event("fatal", message=_error_message(exc), user_error=isinstance(exc, SensitivityError),
                                    exc=_user_exc(exc)))
            return
        self._results.put(Event("ready"))
        host = socket.gethostname()

        def consume() -> None:
            _set_threads(self.threads)
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

        for k in range(1, _concurrency(evaluate)):
            threading.Thread(target=consume, daemon=True, name=f"sensitivity-eval-{k}").start()
        consume()

    def start(self) -> None:
        if self.workers == 1:
            self._tasks: "Queue[Optional[Tuple[int, Dict[str, str]]]]" = Queue()
            self._results: "Queue[Event]" = Queue()
            self._thread = threading.Thread(target=self._thread_main, daemon=True, name="sensitivity-eval")
            self._thread.start()
            self._inflight[0] = []
            ev = self._results.get()
            if ev.kind == "fatal":
                _raise_fatal(ev)
            self._ready[0] = True
            return
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
        p = self._ctx.Process(target=_process_worker, args=(child, self.factory, self.threads, os.getpid()), daemon=True,
                              name=f"sensitivity-eval-{w}")
        added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        os.environ.update(added)  # inherited by the spawned process
        try:
            p.start()
        finally:
            for k in added:
                os.environ.pop(k, None)
        child.close()
        self._procs[w], self._conns[w] = p, parent
        self._inflight[w] = []
        self._ready[w] = False

    def capacity(self) -> int:
        return sum(SLOTS_PER_WORKER - len(v) for w, v in self._inflight.items())

    def submit(self, index: int, options: Dict[str, str]) -> None:
        w = min((w for w in self._inflight if len(self._inflight[w]) < SLOTS_PER_WORKER),
                key=lambda w: len(self._inflight[w]), default=None)
        if w is None:
            raise RuntimeError("submit() without capacity")
        self._inflight[w].append(index)
        if self.workers == 1:
            self._tasks.put((index, options))
        else:
            try:
                self._conns[w].send((index, options))
            except (BrokenPipeError, OSError):
                pass  # the worker is dead; poll() reports its configs as lost

    def poll(self, timeout: float) -> List[Event]:
        if self.workers == 1:
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
        if self.workers == 1:
            if hasattr(self, "_tasks"):
                self._tasks.put(None)
            return
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


class _RayActorBody:
    """The Ray actor: built once per GPU/CPU slot, holds the factory's evaluate function."""

    def __init__(self, factory: Factory, threads: Optional[int]):
        _set_threads(threads)
        self.host = socket.gethostname()
        self.evaluate_fn = factory()
        # the actor runs with max_concurrency=SLOTS_PER_WORKER; a plain evaluate function runs one at a time
        self._slots = threading.Semaphore(_concurrency(self.evaluate_fn))

    def ready(self) -> str:
        return self.host

    def evaluate(self, index: int, options: Dict[str, str]):
        with self._slots:
            metrics, timings = _call(self.evaluate_fn, index, options)
        return metrics, timings, self.host


def _ray_cause(exc: BaseException) -> BaseException:
    """The user exception inside a Ray error (task error, or an actor that died in ``__init__``)."""
    if isinstance(exc, SensitivityError):
        return SensitivityError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) if "\n" in str(exc).strip() else exc
    for attr in ("cause", "error"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return _ray_cause(inner)
    info = getattr(exc, "creation_task_error", None) or getattr(exc, "_creation_task_error", None)
    if isinstance(info, BaseException):
        return _ray_cause(info)
    return exc


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class RayRunner(Runner):
    """One Ray actor per GPU of the cluster (or per ``cpus_per_worker`` CPUs when it has none).

    ``address``: a Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``) or ``local``
    (start a local instance; ``init_kwargs`` go to ``ray.init``). ``num_workers`` caps the actor
    count. Actors are restarted by Ray (``max_restarts``); configs of a lost actor go to the others.
    """

    def __init__(self, factory: Factory, address: Optional[str] = "local", num_workers: Optional[int] = None,
                 gpus_per_worker: Optional[float] = None, cpus_per_worker: float = 1, threads: Optional[int] = None,
                 max_restarts: int = 2, init_kwargs: Optional[Dict[str, Any]] = None):
        if not ray_available():
            raise SensitivityError("--ray needs Ray: pip install 'sensitivity[ray]'")
        self.factory, self.address, self.num_workers = factory, address, num_workers
        self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker, cpus_per_worker
        self.threads = threads if threads is not None else max(1, int(cpus_per_worker))
        self.max_restarts, self.init_kwargs = max_restarts, dict(init_kwargs or {})
        self.name = "ray"
        self._futures: Dict[Any, Tuple[int, int]] = {}  # future -> (worker, index)
        self._inflight: Dict[int, List[int]] = {}
        self._losses: Dict[int, int] = {}
        self._probes: Dict[Any, int] = {}  # ready() future -> worker, for actors that lost a task
        self._started_ray = False

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("logging_level", "warning")
            kwargs.setdefault("log_to_driver", True)
            if self.address not in (None, "", "local"):
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise SensitivityError(f"--ray {self.address}: cannot connect to the Ray cluster ({exc})") from None
            self._started_ray = True
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        gpw = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if gpus else 0)
        if gpw:
            n = int(gpus // gpw)
        else:
            n = int(res.get("CPU", 1) // max(self.cpus_per_worker, 1e-9))
        if self.num_workers:
            n = min(n, int(self.num_workers)) if n else int(self.num_workers)
        n = max(1, n)
        actor_cls = ray.remote(num_gpus=gpw, num_cpus=self.cpus_per_worker, max_restarts=self.max_restarts,
                               max_task_retries=0, max_concurrency=SLOTS_PER_WORKER)(_RayActorBody)
        self._actors = [actor_cls.remote(self.factory, self.threads) for _ in range(n)]
        for w in range(n):
            self._inflight[w] = []
            self._losses[w] = 0
        self.name = f"ray x{n} actors ({'GPU' if gpw else 'CPU'})"
        # fail early (one clear line) if the factory cannot build a worker
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except Exception as exc:  # noqa: BLE001
            self.close()
            cause = _ray_cause(exc)
            if isinstance(cause, SensitivityError):
                raise (_user_exc(cause) or SensitivityError(str(cause))) from None
            raise RuntimeError(f"a Ray worker failed to start: {str(exc).strip().splitlines()[-1]}") from None

    def _usable(self, w: int) -> bool:
        """Alive as far as we know, and not being probed after a loss (a restarting actor gets no work)."""
        return self._losses.get(w, 0) <= self.max_restarts and w not in self._probes.values()

    def capacity(self) -> int:
        return sum(SLOTS_PER_WORKER - len(v) for w, v in self._inflight.items() if self._usable(w))

    def submit(self, index: int, options: Dict[str, str]) -> None:
        live = [w for w in self._inflight if self._usable(w) and len(self._inflight[w]) < SLOTS_PER_WORKER]
        w = min(live, key=lambda w: len(self._inflight[w]))
        fut = self._actors[w].evaluate.remote(index, options)
        self._futures[fut] = (w, index)
        self._inflight[w].append(index)

    def poll(self, timeout: float) -> List[Event]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not self._futures and not self._probes:
            time.sleep(min(timeout, 0.05))
            return []
        futs = list(self._futures) + list(self._probes)
        ready, rest = ray.wait(futs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        events = []
        for fut in ready:
            if fut in self._probes:  # a restarted actor answered (or died again)
                w = self._probes.pop(fut)
                try:
                    ray.get(fut)
                    self._losses[w] = 0
                except RayActorError:
                    self._losses[w] += 1
                    if self._losses[w] <= self.max_restarts:
                        self._probes[self._actors[w].ready.remote()] = w
                continue
            w, index = self._futures.pop(fut)
            self._inflight[w].remove(index)
            try:
                metrics, timings, host = ray.get(fut)
                events.append(Event("done", index, metrics, timings, host))
                self._losses[w] = 0
            except RayActorError as exc:
                # ActorUnavailableError: the actor is restarting; ActorDiedError: it is gone (or restarting
                # after a crash). Only deaths count against max_restarts.
                if type(exc).__name__ != "ActorUnavailableError":
                    self._losses[w] += 1
                if w not in self._probes.values() and self._losses[w] <= self.max_restarts:
                    self._probes[self._actors[w].ready.remote()] = w  # no new work until it answers
                events.append(Event("lost", index, message=f"Ray actor {w} died ({type(exc).__name__})"))
            except RayTaskError as exc:
                cause = _ray_cause(exc)
                user = isinstance(cause, SensitivityError)
                events.append(Event("error", index, message=str(cause) if user else _error_message(cause),
                                    user_error=user))
        if self.capacity() == 0 and not self._futures and not self._probes:
            events.append(Event("fatal", message="every Ray actor died more often than max_restarts allows"))
        return events

    def close(self) -> None:
        import ray

        for a in getattr(self, "_actors", []):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if self._started_ray:
            ray.shutdown()


# ------------------------------------------------------------------------------------ pipelining
class StagedEvaluate:
    """``evaluate(index, options)`` of an :class:`~sensitivity.evaluation.evaluator.Evaluator`, in two
    stages: the *device stage* (apply the config, generate, restore; one config at a time) and the
    *scoring stage* (feature network + metric math). With ``concurrency=2`` a worker runs two configs
    at once, so the scoring of one (on the CPU: Fréchet distance, KID) overlaps the generation of the
    next. Results are those of ``Evaluator.evaluate`` (same calls, same order per config).
    """

    def __init__(self, evaluator, concurrency: int = 2):
        self.ev = evaluator
        self.concurrency = int(concurrency)
        self._device_stage = threading.Lock()

    def __call__(self, index: int, options: Dict[str, str]) -> Dict[str, Any]:
        from ..multiquantizer import apply, restore

        ev = self.ev
        with self._device_stage:
            ev.reference_images()  # full-precision images (once), before any config is applied
            t0 = time.perf_counter()
            try:
                if options:
                    apply(ev.denoiser, ev.mq, options)
                t1 = time.perf_counter()
                images = ev.generate()
            finally:
                restore(ev.denoiser)
            t2 = time.perf_counter()
        out: Dict[str, Any] = dict(ev.score(images))
        t3 = time.perf_counter()
        out["timings"] = {"apply": t1 - t0, "generate": t2 - t1, "score": t3 - t2}
        return out


@dataclass
class PipelinedFactory:
    """Wraps an ``EvaluatorFactory``: the worker evaluates with :class:`StagedEvaluate`.

    ``pipeline``: ``"auto"`` (two configs at once on CUDA, where scoring on the CPU overlaps
    generation on the GPU; one at a time on CPU devices, where both would share the same cores),
    ``"on"`` or ``"off"``.
    """

    base: Any
    pipeline: str = "auto"

    def __call__(self) -> EvaluateFn:
        ev = self.base.build()
        if self.pipeline == "on" or (self.pipeline == "auto" and getattr(ev.device, "type", "cpu") == "cuda"):
            return StagedEvaluate(ev, concurrency=2)
        return ev.worker()


# ------------------------------------------------------------------------------------ driver
@dataclass
class JobSummary:
    """Outcome of :func:`run_job` (``str()`` gives the one-line summary)."""

    run_id: str
    planned: int
    done_before: int
    evaluated: int
    reused: int
    failed: Dict[int, str]
    by_others: int
    elapsed_s: float
    eval_seconds: List[float] = field(default_factory=list)
    runner: str = ""
    cache: str = ""
    lost: int = 0
    startup_s: float = 0.0

    @property
    def done(self) -> int:
        return self.done_before + self.evaluated + self.reused + self.by_others

    @property
    def configs_per_hour(self) -> float:
        return 3600.0 * self.evaluated / self.elapsed_s if self.evaluated and self.elapsed_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.done >= self.planned and not self.failed

    def __str__(self) -> str:
        mean = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else float("nan")
        parts = [f"{self.done}/{self.planned} configs of run {self.run_id} in {self.cache}",
                 f"{self.evaluated} evaluated now ({self.runner}), {self.done_before} before, {self.reused} reused"]
        if self.by_others:
            parts.append(f"{self.by_others} by other jobs")
        if self.lost:
            parts.append(f"{self.lost} reassigned from lost workers")
        if self.failed:
            parts.append(f"{len(self.failed)} FAILED (indices {sorted(self.failed)[:10]})")
        rate = f"{self.configs_per_hour:.0f} configs/hour, {mean:.2f} s/config per worker" if self.evaluated else "nothing to evaluate"
        return "; ".join(parts) + f"; {self.elapsed_s:.1f} s, {rate}"


def run_job(
    cache: "ConfigCache | str | os.PathLike",
    plan: JobPlan,
    runner: Runner,
    *,
    signature: Optional[str] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    lease_s: float = 600.0,
    max_retries: int = 1,
    poll_s: float = 0.5,
    desc: str = "sample",
    max_configs: Optional[int] = None,
) -> JobSummary:
    """Evaluate the configs of ``plan`` that are not in ``cache`` yet (see the module docstring).

    ``cache``: a path (created when the workers are up) or an open :class:`ConfigCache`.
    ``signature``/``evaluation``: the evaluation signature and its description (default: the open
    cache's). Nothing is written before every worker has built its evaluator, so bad inputs (a
    missing prompt file, a multiquantizer of another model) and a signature mismatch leave the cache
    untouched. ``max_configs``: stop after evaluating this many (benchmarks). Returns a
    :class:`JobSummary`; failed configs are listed there and retried by the next run.
    """
    own = not isinstance(cache, ConfigCache)
    if own:
        path = Path(cache)
        cache = ConfigCache(path) if path.exists() else None
    else:
        path = cache.path
    try:
        return _run_job(cache, path, plan, runner, signature, evaluation, progress, lease_s, max_retries,
                        poll_s, desc, max_configs)
    finally:
        if own and cache is not None:
            cache.close()


def _run_job(cache, path, plan, runner, signature, evaluation, progress, lease_s, max_retries, poll_s, desc,
             max_configs) -> JobSummary:
    N = int(plan.num_configs)
    if signature is None:
        if cache is None or cache.signature is None:
            raise SensitivityError("run_job: no evaluation signature given")
        signature, evaluation = cache.signature, cache.evaluation
    if cache is not None:
        cache.check_signature(signature, evaluation)
    run_id = run_id_for(signature, plan.sampler.to_dict())
    done0 = {i for i in cache.done_indices(run_id) if i < N} if cache is not None else set()
    todo: Deque[int] = collections.deque(i for i in range(N) if i not in done0)
    summary = JobSummary(run_id, N, len(done0), 0, 0, {}, 0, 0.0, runner=runner.describe(), cache=str(path))
    if not todo:
        return summary
    owner = process_owner()
    t_start = time.perf_counter()
    try:
        runner.start()  # raises (and writes nothing) when a worker cannot load the model / inputs
    except BaseException:
        runner.close()
        raise
    summary.runner = runner.describe()
    summary.startup_s = time.perf_counter() - t_start
    created = None
    try:
        if cache is None:
            cache = created = ConfigCache(path, create=True)
        cache.ensure_signature(signature, evaluation)
        cache.register_run(plan.sampler.to_dict(), N)
        cache.set_layer_stats(plan.layer_stats)
    except BaseException:
        runner.close()
        if created is not None:
            created.close()
        raise
    try:
        return _drive(cache, plan, runner, summary, todo, run_id, owner, progress, lease_s, max_retries, poll_s,
                      desc, max_configs, len(done0))
    finally:
        if created is not None:
            created.close()


def _drive(cache, plan, runner, summary, todo, run_id, owner, progress, lease_s, max_retries, poll_s, desc,
           max_configs, n_done0) -> JobSummary:
    N = plan.num_configs
    bar = tqdm(total=N, initial=n_done0, unit="cfg", desc=desc, disable=not progress, dynamic_ncols=True)
    inflight: Dict[int, Dict[str, str]] = {}
    attempts: Dict[int, int] = collections.defaultdict(int)
    last_renew = last_sync = time.time()
    try:
        t_start = time.perf_counter()
        while True:
            # hand out work
            while todo and runner.capacity() > 0:
                i = cache.claim(run_id, todo, owner, lease_s)
                if i is None:
                    break
                todo.remove(i)
                options = plan.config(i)
                rid = cache.lookup(config_hash(options))
                if rid is not None:  # evaluated before (another run or an earlier index)
                    cache.link(run_id, i, rid)
                    summary.reused += 1
                    bar.update(1)
                    continue
                inflight[i] = options
                runner.submit(i, options)
            if not inflight:
                if todo:  # the rest is claimed by other live jobs: wait for them (or their death)
                    done_now = cache.done_indices(run_id)
                    todo = collections.deque(i for i in todo if i not in done_now)
                    if todo:
                        _sync_bar(bar, cache, run_id, N)
                        time.sleep(max(poll_s, 1.0))
                        continue
                break
            for ev in runner.poll(poll_s):
                if ev.kind == "fatal":
                    _raise_fatal(ev)
                if ev.kind == "ready" or ev.index is None:
                    continue
                i = ev.index
                if ev.kind == "done":
                    options = inflight.pop(i)
                    avg_bits, qbytes, err = config_stats(options, plan.layer_stats)
                    record = {"config": options, "avg_bits": avg_bits, "quantized_bytes": qbytes,
                              "summed_error": err, "metrics": ev.metrics, "timings": ev.timings, "host": ev.host}
                    cache.add(record, run_id, i)
                    summary.evaluated += 1
                    summary.eval_seconds.append(float((ev.timings or {}).get("evaluate", float("nan"))))
                    bar.update(1)
                    rate = 3600.0 * summary.evaluated / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix_str(f"{rate:.0f} cfg/h", refresh=False)
                elif ev.kind == "lost":
                    summary.lost += 1
                    inflight.pop(i, None)
                    todo.appendleft(i)  # still claimed by us
                    tqdm.write(f"{desc}: config {i} reassigned ({ev.message})")
                elif ev.kind == "error":
                    options = inflight.pop(i)
                    attempts[i] += 1
                    if ev.user_error or attempts[i] > max_retries:
                        summary.failed[i] = ev.message.splitlines()[0] if ev.message else "error"
                        cache.release(owner, run_id, [i])
                        tqdm.write(f"{desc}: config {i} failed: {ev.message.strip()}")
                    else:
                        todo.appendleft(i)
            now = time.time()
            if now - last_renew > lease_s / 4:
                cache.renew(owner, lease_s)
                last_renew = now
            if now - last_sync > 10.0:
                _sync_bar(bar, cache, run_id, N)
                last_sync = now
            if max_configs is not None and summary.evaluated >= max_configs and not inflight:
                break
            if max_configs is not None and summary.evaluated + len(inflight) >= max_configs:
                todo.clear()
    finally:
        try:
            runner.close()
        finally:
            try:
                cache.release(owner, run_id)
            except SensitivityError:
                pass
            bar.close()
    summary.elapsed_s = time.perf_counter() - t_start
    done_all = {i for i in cache.done_indices(run_id) if i < N}
    summary.by_others = len(done_all) - summary.done_before - summary.evaluated - summary.reused
    return summary


def _sync_bar(bar, cache: ConfigCache, run_id: str, N: int) -> None:
    n = sum(1 for i in cache.done_indices(run_id) if i < N)
    if n > bar.n:
        bar.update(n - bar.n)
