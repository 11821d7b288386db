"""The job driver: plan, run_job (claims, resume, retries, progress) and the pipelined worker factory."""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Mapping, Optional

from tqdm.auto import tqdm

from ...errors import SensitivityError
from ...sizes import SizeTable
from ..cache import ConfigCache, build_record, config_hash, normalize_config, process_owner, run_id_for
from ..sampler import SamplerSpec

from .base import EvaluateFn, Runner, _raise_fatal


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


# ------------------------------------------------------------------------------------ pipelining
@dataclass
class PipelinedFactory:
    """Wraps an ``EvaluatorFactory``: the worker is :meth:`Evaluator.worker` with ``concurrency=2`` when pipelined.

    ``pipeline``: ``"auto"`` (two configs at once on CUDA, where scoring on the CPU overlaps
    generation on the GPU; one at a time on CPU devices, where both would share the same cores),
    ``"on"`` or ``"off"``.
    """

    base: Any
    pipeline: str = "auto"

    def with_device(self, device: str) -> "PipelinedFactory":
        """This factory for a worker on ``device`` (see :func:`~sensitivity.evaluation.runners.devices.factory_for_device`)."""
        from .devices import factory_for_device

        return PipelinedFactory(factory_for_device(self.base, device), self.pipeline)

    def __call__(self) -> EvaluateFn:
        ev = self.base.build()
        if self.pipeline == "on" or (self.pipeline == "auto" and getattr(ev.device, "type", "cpu") == "cuda"):
            return ev.worker(concurrency=2)
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
    fidelity: Optional[str] = None,
) -> JobSummary:
    """Evaluate the configs of ``plan`` that are not in ``cache`` yet (see the module docstring).

    ``cache``: a path (created when the workers are up) or an open :class:`ConfigCache`.
    ``signature``/``evaluation``: the evaluation signature and its description (default: the open
    cache's). Nothing is written before every worker has built its evaluator, so bad inputs (a
    missing prompt file, a multiquantizer of another model) and a signature mismatch leave the cache
    untouched. ``max_configs``: stop after evaluating this many (benchmarks). ``fidelity``: the cache
    fidelity the records go to (a path's; default the cache's own, ``"full"``). Returns a
    :class:`JobSummary`; failed configs are listed there and retried by the next run.
    """
    own = not isinstance(cache, ConfigCache)
    if own:
        path = Path(cache)
        cache = ConfigCache(path, fidelity=fidelity) if path.exists() else None
    else:
        path = cache.path
    try:
        return _run_job(cache, path, plan, runner, signature, evaluation, progress, lease_s, max_retries,
                        poll_s, desc, max_configs, fidelity)
    finally:
        if own and cache is not None:
            cache.close()


def _run_job(cache, path, plan, runner, signature, evaluation, progress, lease_s, max_retries, poll_s, desc,
             max_configs, fidelity=None) -> JobSummary:
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
            cache = created = ConfigCache(path, create=True, fidelity=fidelity)
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
    sizes = SizeTable.from_layer_stats(plan.layer_stats)
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
                    record = build_record(options, sizes, ev.metrics, ev.timings, ev.host)
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
