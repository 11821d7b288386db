"""An evaluation job as one call: ``sample(model, multiquantizer, cache, num_configs=N, ...)``.

```python
from sensitivity.workflows.sample import sample
res = sample("digits-dit", "mq.safetensors", "caches/digits-dit.sqlite", num_configs=20, images_per_class=2)
res.summary.complete, res.summary.evaluated
```
Config ``i`` of a run is drawn from ``(seed, i)`` (:mod:`sensitivity.evaluation.sampler`); configs
already in the cache are skipped, so calling it again resumes a killed job, and several processes
(or ``workers``, ``devices``, ``ray``) share the work. Every input is checked before the cache is
created or written; a cache this call created and left empty is removed on error.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

STRATEGIES = ("random", "active", "single-layer")


class SampleResult(NamedTuple):
    """What :func:`sample` did: the family, the protocol, the job's summary (``JobSummary``; after active
    rounds, the last round's) and the active result (or None)."""

    family: Any
    protocol: Any
    summary: Any
    active: Any = None


def check_sample_numbers(*, strategy: str = "random", num_configs: Optional[int] = None, workers: int = 1,
                         threads: Optional[int] = None, ray: Optional[str] = None) -> None:
    """The job's own numbers at the door (the protocol's: :func:`~sensitivity.evaluation.protocol.check_protocol_numbers`)."""
    from ..checks import at_least

    if strategy not in STRATEGIES:
        raise SensitivityError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if num_configs is None and strategy != "single-layer":
        raise SensitivityError(f"--strategy {strategy} needs --num-configs")
    if num_configs is not None and num_configs < 1:
        raise SensitivityError(f"--num-configs must be >= 1, got {num_configs}")
    if strategy == "active" and ray:
        raise SensitivityError("--strategy active runs local workers only; drop --ray")
    at_least("--workers", workers, 1)
    at_least("--threads", threads, 1)


def sample(model: str, multiquantizer: str, cache: Union[str, Path], *, num_configs: Optional[int] = None,
           strategy: str = "random", seed: int = 0, bits: Optional[str] = None,
           methods: Optional[Sequence[str]] = None, fixed: Optional[Mapping[str, str]] = None,
           workers: int = 1, devices: Union[str, Sequence[str], None] = None, ray: Optional[str] = None,
           threads: Optional[int] = None, pipeline: str = "auto", progress: bool = True,
           initial: int = 40, batch: int = 40, pool: int = 2000, targets: Sequence[float] = (3.4, 3.6, 3.8, 4.0),
           window: float = 0.15, metric: str = "fid", log: Optional[Callable[[str], None]] = print,
           **protocol: Any) -> SampleResult:
    """Evaluate configs ``0..num_configs-1`` of run ``seed`` (``strategy`` random), or ``num_configs`` in all
    (active: ``initial`` random, then rounds of ``batch`` from a ``pool`` near ``targets`` +- ``window``
    bits, learning ``metric``), or every layer x option alone (single-layer), into ``cache``.

    Sampler: ``bits`` ('3-4'), ``methods``, ``fixed`` {layer or glob: option}. Workers: ``workers`` local
    processes on one device, or one per ``devices`` entry ('cuda:0,cuda:1' / 'all' / a list), or one per
    GPU of the Ray cluster at ``ray``; ``threads`` per worker; ``pipeline`` auto / on / off. ``protocol``:
    the keyword arguments of :func:`sensitivity.evaluation.protocol.protocol_for` (``device``,
    ``images_per_class``, ``steps``, ...). ``log`` gets the job's description lines.
    """
    from ..active import run_active
    from ..evaluation.cache import ConfigCache, remove_if_empty
    from ..evaluation.fp_reference import job_fp_images_dir
    from ..evaluation.protocol import check_protocol_numbers, protocol_for
    from ..evaluation.runners import JobPlan, LocalRunner, PipelinedFactory, RayRunner, ray_connection, run_job
    from ..evaluation.sampler import SamplerSpec
    from ..io import check_writable

    log = log or (lambda text: None)
    check_sample_numbers(strategy=strategy, num_configs=num_configs, workers=workers, threads=threads, ray=ray)
    protocol["batch_size"] = check_protocol_numbers(**{k: protocol[k] for k in (
        "steps", "guidance", "kid_subsets", "num_images", "images_per_class", "batch_size") if k in protocol})
    cache_path = Path(cache)
    if not cache_path.exists():
        check_writable(cache_path, "--cache")  # SQLite also writes its journal beside the file
    device = protocol.pop("device", None)
    device_list = None
    if devices is not None:
        from ..evaluation.runners.devices import parse_devices

        if device is not None:
            raise SensitivityError("give --device (every worker on one device) or --devices (one worker per "
                                   "device), not both")
        device_list = parse_devices(devices if isinstance(devices, str) else ",".join(devices))
        device = device_list[0]
    with ray_connection(ray, device) as device:
        fam, weights, base_factory, prot, mq = protocol_for(model, multiquantizer, device=device, **protocol)
        base_factory = replace(base_factory, fp_images_dir=str(job_fp_images_dir(cache_path)))
        factory = PipelinedFactory(base_factory, pipeline=pipeline)
        spec = SamplerSpec(seed=seed, options=mq.options, bits=bits, methods=methods,
                           fixed=tuple(dict(fixed or {}).items()))
        if strategy == "single-layer":
            from ..allocators.mixdq import SingleLayerSampler

            spec = SingleLayerSampler(tuple(mq.layer_names), tuple(mq.options))
            n = spec.num_configs if num_configs is None else min(num_configs, spec.num_configs)
            plan = JobPlan.from_multiquantizer(mq, spec, n)
        else:
            plan = JobPlan.from_multiquantizer(mq, spec, num_configs if strategy == "random" else
                                               min(initial, num_configs))
        signature, evaluation = prot.signature(), prot.to_dict()
        created = not cache_path.exists()
        if not created:  # corrupt file / other signature: refuse before loading any model
            with ConfigCache(cache_path) as c:
                c.check_signature(signature, evaluation)
        if ray:
            runner = RayRunner(factory, address=ray, threads=threads)
        else:
            runner = LocalRunner(factory, workers=workers, threads=threads, devices=device_list)
        what = {"random": f"configs 0..{plan.num_configs - 1} of seed {seed}",
                "single-layer": f"{plan.num_configs} single-layer configs",
                "active": f"{num_configs} configs, {plan.num_configs} random of seed {seed} then active rounds"}
        log(f"sample {fam.name} ({prot.model_id}): {what[strategy]}, "
            f"{prot.num_images} images x {prot.steps} steps each, signature {signature[:12]}, cache {cache_path}")
        compiled = base_factory.compile
        log(f"  workers: {runner.describe()}, batch size {base_factory.batch_size or 'the model default'}"
            f"{', torch.compile ' + (compiled if isinstance(compiled, str) else 'inductor') if compiled else ''}; "
            f"full-precision images shared in {base_factory.fp_images_dir}")
        active = None
        try:
            summary = run_job(cache_path, plan, runner, signature=signature, evaluation=evaluation,
                              progress=progress, desc=f"sample {fam.name}")
            if strategy == "active" and not summary.failed:
                active = run_active(cache_path, mq, plan, factory, summary, num_configs=num_configs,
                                    signature=signature, evaluation=evaluation, seed=seed, initial=initial,
                                    batch=batch, pool=pool, targets=targets, window=window, metric=metric,
                                    workers=workers, threads=threads, devices=device_list, progress=progress)
                summary = active.summary
                log(f"active: {len(active.labelled)} configs labelled ({plan.num_configs} random + "
                    f"{active.rounds} rounds), order in {active.order_path}")
        except BaseException:
            if created:
                remove_if_empty(cache_path)  # a cache this call made holds nothing yet: leave no file
            raise
    return SampleResult(fam, prot, summary, active)
