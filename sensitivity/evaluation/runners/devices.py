"""Worker devices: ``--devices cuda:0,cuda:1`` / ``all`` parsed and checked, one worker per device.

``parse_devices(spec)`` turns the option into a list of torch device names, one per worker:
``"all"`` is every visible CUDA device, ``"cuda:0,cuda:1"`` those two, ``"cpu,cpu"`` two CPU workers
(tests, CPU-only machines), ``"cuda"`` alone the current CUDA device. A device may repeat (two workers
on one large GPU). All devices must be of one type: the protocol's dtype (fp16 on CUDA, fp32 on CPU)
is part of the cache signature, so a job cannot mix them.

A worker process on CUDA device ``cuda:i`` is pinned with ``CUDA_VISIBLE_DEVICES`` (:func:`worker_env`):
it sees only that GPU, as ``cuda:0``, so nothing in it (clean-fid, LPIPS, a library's default device)
can allocate on another worker's GPU.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import SensitivityError


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def parse_devices(spec: Optional[str], cuda_count: Optional[int] = None) -> Optional[List[str]]:
    """``--devices`` -> ``["cuda:0", "cuda:1"]`` (one entry per worker); ``None`` stays ``None``.

    ``cuda_count``: visible CUDA devices (default: asked from torch). Raises a one-line
    :class:`SensitivityError` for an unknown name, a CUDA index that is not visible, or mixed types.
    """
    if spec is None:
        return None
    import torch

    text = str(spec).replace(" ", "")
    n_cuda = cuda_device_count() if cuda_count is None else int(cuda_count)
    if text == "all":
        if n_cuda == 0:
            raise SensitivityError("--devices all: no CUDA device is visible here; give --devices cpu,cpu for "
                                   "CPU workers")
        return [f"cuda:{i}" for i in range(n_cuda)]
    out: List[str] = []
    for part in text.split(","):
        if not part:
            continue
        try:
            dev = torch.device(part)
        except (RuntimeError, TypeError):
            raise SensitivityError(f"--devices {spec}: {part!r} is not a torch device (e.g. cpu, cuda:0)") from None
        if dev.type == "cuda":
            if n_cuda == 0:
                raise SensitivityError(f"--devices {spec}: {part} asked for, but no CUDA device is visible here")
            index = 0 if dev.index is None else dev.index
            if index >= n_cuda:
                raise SensitivityError(f"--devices {spec}: {part} asked for, but only {n_cuda} CUDA device(s) "
                                       f"are visible (cuda:0..cuda:{n_cuda - 1})")
            out.append(f"cuda:{index}")
        elif dev.type == "cpu":
            out.append("cpu")
        else:
            raise SensitivityError(f"--devices {spec}: {part}: only cpu and cuda devices can hold workers")
    if not out:
        raise SensitivityError(f"--devices {spec!r}: no device given")
    kinds = sorted({d.split(":")[0] for d in out})
    if len(kinds) > 1:
        raise SensitivityError(f"--devices {spec}: mixes {' and '.join(kinds)}; a job's workers must be of one "
                               "device type (its dtype is part of the cache signature)")
    return out


def assign_devices(devices: Sequence[str], workers: int) -> List[str]:
    """The device of each of ``workers`` workers: worker ``w`` gets ``devices[w % len(devices)]``."""
    if not devices:
        raise SensitivityError("no device to assign workers to")
    return [devices[w % len(devices)] for w in range(int(workers))]


def worker_env(device: str, parent_visible: Optional[str] = None) -> Tuple[Dict[str, str], str]:
    """``(environment additions, device name inside the worker)`` for a worker process pinned to ``device``.

    ``cuda:i`` -> ``CUDA_VISIBLE_DEVICES`` = the physical id of the parent's ``cuda:i`` (the ``i``-th entry
    of the parent's own ``CUDA_VISIBLE_DEVICES`` when it has one), and the worker uses ``cuda:0``.
    Other devices: no addition, same name.
    """
    if not device.startswith("cuda"):
        return {}, device
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if parent_visible is None else parent_visible
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(ids):
            raise SensitivityError(f"device {device}: CUDA_VISIBLE_DEVICES={visible} lists {len(ids)} device(s)")
        physical = ids[index]
    else:
        physical = str(index)
    return {"CUDA_VISIBLE_DEVICES": physical}, "cuda:0"


def factory_for_device(factory, device: str):
    """``factory`` set to build its worker on ``device`` (``factory.with_device(device)``), or ``factory``
    unchanged if it has no device (a plain function)."""
    with_device = getattr(factory, "with_device", None)
    return with_device(device) if callable(with_device) else factory
