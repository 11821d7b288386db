"""The Ray runner: one actor per GPU (or per ``cpus_per_worker`` CPUs) of a cluster or a local instance."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...errors import SensitivityError

from .base import SLOTS_PER_WORKER, Event, Factory, Runner, _call, _concurrency, _error_message, _set_threads, _user_exc


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


def connect_ray(address: str, device: Optional[str] = None) -> Tuple[Optional[str], bool]:
    """Connect to the Ray cluster at ``address`` ('auto', 'host:6379', 'ray://…') or start one here
    ('local'); returns ``(device, started)``: the workers' device (default cuda when the cluster has GPUs)
    and whether this call initialised Ray (then :func:`ray_connection` shuts it down)."""
    if not ray_available():
        raise SensitivityError("--ray needs Ray: pip install 'sensitivity[ray]'")
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: Dict[str, Any] = {"include_dashboard": False, "logging_level": "warning"}
        if address not in ("local", ""):
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise SensitivityError(f"--ray {address}: cannot connect to the Ray cluster ({exc})") from None
        started = True
    if device is None:
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return device, started


@contextlib.contextmanager
def ray_connection(address: Optional[str], device: Optional[str] = None) -> Iterator[Optional[str]]:
    """``with ray_connection(address, device) as device:`` Ray connected (or started) inside, shut down
    after if this call started it; ``address`` None: no Ray, ``device`` passes through."""
    if not address:
        yield device
        return
    device, started = connect_ray(address, device)
    try:
        yield device
    finally:
        if started:
            import ray

            ray.shutdown()
