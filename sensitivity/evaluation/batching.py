"""Generation batch size: ``--batch-size N`` or ``auto`` (the largest power of two that fits the card).

Images never depend on the batch size (beyond float noise): every image has its own seed and its
own generator, so ``auto`` is a throughput setting, not part of the evaluation protocol.

``auto`` on a CUDA device tries ``min(AUTO_MAX_BATCH, images)`` rounded down to a power of two, with the
protocol's prompts, size and pipeline settings but :data:`PROBE_STEPS` steps (a step's memory does not
depend on the step count; the VAE decode at the end is included), and halves on
``torch.OutOfMemoryError`` or when the peak memory leaves less than :data:`HEADROOM` of the card free
(the feature network and the next config's scoring share it). On other devices it is the model's
default batch size (a fixed value per family: 500 for the digits models, 1 for the real ones on CPU).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from ..errors import SensitivityError

#: the largest batch ``auto`` tries
AUTO_MAX_BATCH = 64
#: denoising steps of one ``auto`` trial
PROBE_STEPS = 2
#: fraction of the card's memory a trial's peak may leave unused at least
HEADROOM = 0.10

BatchSize = Union[None, int, str]


def parse_batch_size(value: BatchSize, name: str = "--batch-size") -> BatchSize:
    """``None`` (the model's default), ``"auto"`` or an int >= 1; one-line error otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value < 1:
            raise SensitivityError(f"{name} must be >= 1, got {value}")
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise SensitivityError(f"{name} {value!r}: give a number of images or 'auto'") from None
    if n < 1:
        raise SensitivityError(f"{name} must be >= 1, got {n}")
    return n


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's out-of-memory error (CUDA, or an allocator's message saying so)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def largest_fitting_batch(trial: Callable[[int], Optional[float]], start: int,
                          limit_bytes: Optional[float] = None, on_oom: Optional[Callable[[], None]] = None) -> int:
    """The first of ``start, start/2, ..., 1`` for which ``trial(bs)`` runs without running out of memory.

    ``trial`` returns the peak bytes it used (or ``None``); a peak above ``limit_bytes`` counts as not
    fitting. ``on_oom`` runs after each failure (free the cached blocks). Other errors propagate.
    """
    bs = max(1, int(start))
    while True:
        try:
            peak = trial(bs)
            if limit_bytes is None or peak is None or peak <= limit_bytes or bs == 1:
                return bs
        except BaseException as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_out_of_memory(exc):
                raise
            if bs == 1:
                raise SensitivityError("--batch-size auto: even one image runs out of device memory") from None
        if on_oom is not None:
            on_oom()
        bs //= 2


def power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def auto_batch_size(family, pipe, conditions: Sequence, seeds: Sequence[int], device,
                    max_batch: int = AUTO_MAX_BATCH, **overrides) -> int:
    """The batch size ``auto`` means for ``pipe`` on ``device`` (see the module docstring).

    ``overrides``: the protocol's generation settings (:meth:`EvalProtocol.generation_overrides`).
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return max(1, int(family.settings(pipe, **{k: v for k, v in overrides.items() if k != "steps"}).batch_size))
    start = power_of_two_at_most(min(int(max_batch), len(seeds)))
    total = torch.cuda.get_device_properties(dev).total_memory
    probe = dict(overrides, steps=min(int(overrides.get("steps") or PROBE_STEPS), PROBE_STEPS))

    def trial(bs: int) -> float:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        family.generate(pipe, list(conditions[:bs]), list(seeds[:bs]), batch_size=bs, **probe)
        torch.cuda.synchronize(dev)
        return float(torch.cuda.max_memory_allocated(dev))

    return largest_fitting_batch(trial, start, limit_bytes=(1.0 - HEADROOM) * total,
                                 on_oom=torch.cuda.empty_cache)
