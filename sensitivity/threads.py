"""CPU threads on a shared machine: how many cores are free, and a context that uses that many.

On a 2-core machine with other jobs running, a parallel region of 2 threads on a small tensor waits
for a core that another process holds: building the digits-dit multiquantizer (46 small layers) took
33.5 s with 2 threads at load average 7 and 3.2 s with one thread under the same load
(``benchmarks/bench_build.py``). So small work runs on one thread, and large work on the cores that are
actually free (affinity minus load), never more than the machine has.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

#: tensors below this many elements are processed on one thread (parallel overhead > gain)
SMALL_WORK = 1 << 20


def usable_cores() -> int:
    """Cores this process may run on (``sched_getaffinity``), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def free_cores(load: Optional[float] = None) -> int:
    """Usable cores minus the 1-minute load average (rounded), at least 1."""
    n = usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover
            load = 0.0
    return max(1, min(n, int(math.floor(n - load + 0.5))))


def threads_for(numel: int, limit: Optional[int] = None) -> int:
    """Threads for work on ``numel`` elements: 1 for small work, else the free cores (``limit`` caps it)."""
    if numel < SMALL_WORK:
        return 1
    n = free_cores()
    return max(1, min(n, limit)) if limit else n


def threads_per_worker(workers: int = 1, load: Optional[float] = None) -> int:
    """Threads for each of ``workers`` CPU-bound workers: the free cores shared out, at least 1.

    Never more than ``usable_cores() // workers`` (so the workers' threads never outnumber the
    cores), and fewer when other processes keep cores busy (1-minute load average, read once:
    call it before starting the workers, whose own load would count).
    """
    return max(1, min(free_cores(load), usable_cores()) // max(1, int(workers)))


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Run torch's and numba's parallel regions on ``n`` threads inside the block, then restore."""
    import torch

    old_t = torch.get_num_threads()
    try:
        import numba

        old_n = numba.get_num_threads()
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover - numba is a core dependency
        numba, old_n = None, None
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        if numba is not None:
            numba.set_num_threads(old_n)
