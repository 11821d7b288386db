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
    full: Any = None  # multi-fidelity: the full labels' job summary (``summary`` is then the cheap labels')


def check_sample_numbers(*, strategy: str = "random", num_configs: Optional[int] = None, workers: int = 1,
                         threads: Optional[int] = None, ray: Optional[str] = None,
                         full_configs: Optional[int] = None, full_images: Optional[Mapping[str, Any]] = None) -> None:
    """The job's own numbers at the door (the protocol's: :func:`~sensitivity.evaluation.protocol.check_protocol_numbers`)."""
    from ..checks import check_values

    if strategy not in STRATEGIES:
        raise SensitivityError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if num_configs is None and strategy != "single-layer":
        raise SensitivityError(f"--strategy {strategy} needs --num-configs")
    check_values(num_configs=num_configs, workers=workers, threads=threads, full_configs=full_configs)
    given = {k: v for k, v in dict(full_images or {}).items() if v is not None}
    if full_configs is None and given:
        raise SensitivityError(f"--full-{next(iter(given)).replace('_', '-')} needs --full-configs")
    if full_configs is not None:
        if strategy != "random":
            raise SensitivityError("--full-configs labels configs 0..N-1 of the random run; use --strategy random")
        if not given:
            raise SensitivityError("--full-configs needs --full-images-per-class or --full-num-images (the full "
                                   "labels' image count)")
        if num_configs is not None and full_configs > num_configs:
            raise SensitivityError(f"--full-configs {full_configs}: more than --num-configs {num_configs} (the full "
                                   "labels are a subset of the cheap ones)")
    if strategy == "active" and ray:
        raise SensitivityError("--strategy active runs local workers only; drop --ray")


def sample(model: str, multiquantizer: str, cache: Union[str, Path], *, num_configs: Optional[int] = None,
           strategy: str = "random", seed: int = 0, bits: Optional[str] = None,
           methods: Optional[Sequence[str]] = None, fixed: Optional[Mapping[str, str]] = None,
           workers: int = 1, devices: Union[str, Sequence[str], None] = None, ray: Optional[str] = None,
           threads: Optional[int] = None, pipeline: str = "auto", progress: bool = True,
           initial: int = 40, batch: int = 40, pool: int = 2000, targets: Sequence[float] = (3.4, 3.6, 3.8, 4.0),
           window: float = 0.15, metric: str = "fid", log: Optional[Callable[[str], None]] = print,
           full_configs: Optional[int] = None, full_images_per_class: Optional[int] = None,
           full_num_images: Optional[int] = None, **protocol: Any) -> SampleResult:
    """Evaluate configs ``0..num_configs-1`` of run ``seed`` (``strategy`` random), or ``num_configs`` in all
    (active: ``initial`` random, then rounds of ``batch`` from a ``pool`` near ``targets`` +- ``window``
    bits, learning ``metric``), or every layer x option alone (single-layer), into ``cache``.

    Sampler: ``bits`` ('3-4'), ``methods``, ``fixed`` {layer or glob: option}. Workers: ``workers`` local
    processes on one device, or one per ``devices`` entry ('cuda:0,cuda:1' / 'all' / a list), or one per
    GPU of the Ray cluster at ``ray``; ``threads`` per worker; ``pipeline`` auto / on / off. ``protocol``:
    the keyword arguments of :func:`sensitivity.evaluation.protocol.protocol_for` (``device``,
    ``images_per_class``, ``steps``, ...). ``log`` gets the job's description lines.

    Multi-fidelity (``full_configs``): the configs are labelled with ``protocol`` as the *cheap* fidelity
    of the cache, then configs ``0..full_configs-1`` of the same run again with the same protocol on
    ``full_images_per_class`` / ``full_num_images`` images as its *full* fidelity (the cache's own
    signature); ``sensitivity train`` learns from both (:mod:`sensitivity.predictors.fidelity`).
    """
    from ..active import run_active
    from ..evaluation.cache import CHEAP, ConfigCache, remove_if_empty
    from ..evaluation.fp_reference import job_fp_images_dir
    from ..evaluation.protocol import check_protocol_numbers, protocol_for
    from ..evaluation.runners import JobPlan, LocalRunner, PipelinedFactory, RayRunner, ray_connection, run_job
    from ..evaluation.sampler import SamplerSpec
    from ..io import check_writable

    log = log or (lambda text: None)
    full_images = {"images_per_class": full_images_per_class, "num_images": full_num_images}
    check_sample_numbers(strategy=strategy, num_configs=num_configs, workers=workers, threads=threads, ray=ray,
                         full_configs=full_configs, full_images=full_images)
    protocol["batch_size"] = check_protocol_numbers(**{k: protocol[k] for k in (
        "steps", "guidance", "kid_subsets", "num_images", "images_per_class", "batch_size") if k in protocol})
    full_protocol = None
    if full_configs is not None:
        full_protocol = dict(protocol, **{k: v for k, v in full_images.items() if v is not None})
        check_protocol_numbers(**{k: full_protocol[k] for k in ("num_images", "images_per_class") if k in full_protocol})
    cheap = CHEAP if full_configs is not None else None
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
        full = None
        if full_protocol is not None:
            _, _, full_factory, full_prot, _ = protocol_for(
                model, multiquantizer, device=device, **{k: v for k, v in full_protocol.items() if k != "device"})
            full = (replace(full_factory, fp_images_dir=base_factory.fp_images_dir), full_prot)
            if full_prot.signature() == signature:
                raise SensitivityError(f"--full-configs: the full labels' protocol equals the cheap one ({prot.num_images} "
                                       "images): give --full-images-per-class / --full-num-images another count")
        created = not cache_path.exists()
        if not created:  # corrupt file / other signature: refuse before loading any model
            with ConfigCache(cache_path, fidelity=cheap) as c:
                c.check_signature(signature, evaluation)
            if full is not None:
                with ConfigCache(cache_path) as c:
                    c.check_signature(full[1].signature(), full[1].to_dict())
        if ray:
            runner = RayRunner(factory, address=ray, threads=threads)
        else:
            runner = LocalRunner(factory, workers=workers, threads=threads, devices=device_list)
        what = {"random": f"configs 0..{plan.num_configs - 1} of seed {seed}",
                "single-layer": f"{plan.num_configs} single-layer configs",
                "active": f"{num_configs} configs, {plan.num_configs} random of seed {seed} then active rounds"}
        log(f"sample {fam.name} ({prot.model_id}): {what[strategy]}, "
            f"{prot.num_images} images x {prot.steps} steps each, signature {signature[:12]}, cache {cache_path}"
            + (f" (fidelity cheap); then configs 0..{full_configs - 1} on {full[1].num_images} images (fidelity full, "
               f"signature {full[1].signature()[:12]})" if full is not None else ""))
        compiled = base_factory.compile
        log(f"  workers: {runner.describe()}, batch size {base_factory.batch_size or 'the model default'}"
            f"{', torch.compile ' + (compiled if isinstance(compiled, str) else 'inductor') if compiled else ''}; "
            f"full-precision images shared in {base_factory.fp_images_dir}")
        active = full_summary = None
        try:
            summary = run_job(cache_path, plan, runner, signature=signature, evaluation=evaluation,
                              progress=progress, desc=f"sample {fam.name}" + (" cheap" if cheap else ""),
                              fidelity=cheap)
            if full is not None and not summary.failed:
                full_plan = JobPlan.from_multiquantizer(mq, spec, full_configs)
                full_factory = PipelinedFactory(full[0], pipeline=pipeline)
                full_runner = (RayRunner(full_factory, address=ray, threads=threads) if ray else
                               LocalRunner(full_factory, workers=workers, threads=threads, devices=device_list))
                full_summary = run_job(cache_path, full_plan, full_runner, signature=full[1].signature(),
                                       evaluation=full[1].to_dict(), progress=progress, desc=f"sample {fam.name} full")
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
    return SampleResult(fam, prot, summary, active, full_summary)
