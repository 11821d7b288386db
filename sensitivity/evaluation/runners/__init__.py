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

from .base import SLOTS_PER_WORKER, WORKER_ENV, EvaluateFn, Event, Factory, LocalRunner, Runner
from .job import JobPlan, JobSummary, PipelinedFactory, layer_stats_from_multiquantizer, run_job
from .process import ProcessRunner
from .ray_runner import RayRunner, connect_ray, ray_available, ray_connection
from .thread import ThreadRunner

__all__ = ["EvaluateFn", "Event", "Factory", "JobPlan", "JobSummary", "LocalRunner", "PipelinedFactory", "ProcessRunner",
           "RayRunner", "Runner", "SLOTS_PER_WORKER", "ThreadRunner", "WORKER_ENV", "layer_stats_from_multiquantizer",
           "connect_ray", "ray_available", "ray_connection", "run_job"]
