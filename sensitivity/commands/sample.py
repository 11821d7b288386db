"""``sensitivity sample MODEL``: label N random configs with FID & co., resumable, on many workers.

```
sensitivity sample digits-dit --multiquantizer multiquantizers/digits-dit-shipped.safetensors \
    --cache caches/digits-dit.sqlite --num-configs 200 --seed 0
sensitivity sample pixart-alpha --multiquantizer mq/alpha.safetensors --cache caches/alpha.sqlite \
    --num-configs 500 --seed 0 --prompts captions_val2017.json --reference-dir coco/val2017 --ray auto
```
Config ``i`` of a run is drawn from ``(seed, i)`` (:mod:`sensitivity.evaluation.sampler`); configs
already in the cache are skipped, so rerunning the same command resumes a killed job, and several
commands (or ``--workers K``, or ``--ray``) can share the work. Every input is checked before the
cache is created or written. See :mod:`sensitivity.evaluation.runners`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..errors import SensitivityError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="evaluate N random configs into a cache (resumable, parallel)",
        description="Draw configs 0..N-1 of a run (seed S: per config p ~ U(0,1), each layer low-bit with "
                    "probability p, method uniform), evaluate those not yet in --cache with the protocol "
                    "(FID, KID, accuracy / PSNR...), one SQLite record each. Kill it any time; rerun the same "
                    "command to resume. Several commands, --workers K or --ray share the work.")
    from .arguments import add_protocol_arguments

    add_protocol_arguments(p)
    p.add_argument("--cache", required=True, help="SQLite cache file (created if missing)")
    p.add_argument("--num-configs", type=int, default=None,
                   help="configs 0..N-1 of the run (random), or labelled configs in all (active); required "
                        "except for --strategy single-layer (default: every layer x option)")
    st = p.add_argument_group("strategy")
    st.add_argument("--strategy", choices=("random", "active", "single-layer"), default="random",
                    help="random: the reference's random configs; active: random start, then the configs the "
                         "fold ensemble disagrees on most near --targets (sensitivity.active); single-layer: one "
                         "layer quantized at a time with each option (MixDQ's measurements, --baseline mixdq)")
    st.add_argument("--initial", type=int, default=40, help="active: random configs to start from (default 40)")
    st.add_argument("--batch", type=int, default=40, help="active: configs labelled per round (default 40)")
    st.add_argument("--pool", type=int, default=2000, help="active: random candidates scored per round (default 2000)")
    st.add_argument("--targets", default="3.4,3.6,3.8,4.0", help="active: bit targets to sample near (default 3.4,3.6,3.8,4.0)")
    st.add_argument("--window", type=float, default=0.15, help="active: candidates within this many bits of a target")
    st.add_argument("--metric", default="fid", help="active: metric the ensemble learns (default fid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run's configs (default 0)")
    s = p.add_argument_group("sampler options (part of the run's identity)")
    s.add_argument("--bits", default=None, help="allowed bit widths, e.g. '3-4' or '4' (default: all in the multiquantizer)")
    s.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="allowed methods: uaq kmeans_c kmeans_a (aliases mse kmeans kmeans_all)")
    s.add_argument("--fixed", action="append", default=[], metavar="LAYER=OPTION",
                   help="keep a layer (or glob pattern) at an option, e.g. 'proj_out*=fp16' (repeatable)")
    s.add_argument("--fixed-file", default=None, help="config JSON whose options are fixed in every sample")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--workers", type=int, default=1, help="local worker processes, all on --device (default 1: in "
                   "this process)")
    w.add_argument("--devices", default=None, metavar="LIST|all",
                   help="one worker process per device, each pinned to it: 'cuda:0,cuda:1', 'all' (every visible "
                        "GPU) or 'cpu,cpu'; the work is shared through the cache as with --workers")
    w.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run one worker per GPU (or CPU) of a Ray cluster: 'auto', 'host:6379', 'ray://…', or "
                        "'local' (start one here); needs pip install 'sensitivity[ray]'")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads per worker (default: the free cores / workers, at least 1)")
    p.add_argument("--pipeline", choices=("auto", "on", "off"), default="auto",
                   help="score one config while the next one generates (auto: on CUDA devices only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..active import run_active
    from ..checks import at_least
    from ..evaluation.cache import ConfigCache, remove_if_empty
    from ..evaluation.fp_reference import job_fp_images_dir
    from ..evaluation.runners import JobPlan, LocalRunner, PipelinedFactory, RayRunner, ray_connection, run_job
    from ..evaluation.sampler import SamplerSpec
    from ..io import check_writable
    from .arguments import check_protocol_arguments, parse_fixed, protocol_from_args

    if args.num_configs is None and args.strategy != "single-layer":
        raise SensitivityError(f"--strategy {args.strategy} needs --num-configs")
    if args.num_configs is not None and args.num_configs < 1:
        raise SensitivityError(f"--num-configs must be >= 1, got {args.num_configs}")
    if args.strategy == "active" and args.ray:
        raise SensitivityError("--strategy active runs local workers only; drop --ray")
    at_least("--workers", args.workers, 1)
    at_least("--threads", args.threads, 1)
    check_protocol_arguments(args)
    cache_path = Path(args.cache)
    if not cache_path.exists():
        check_writable(cache_path, "--cache")  # SQLite also writes its journal beside the file
    device = args.device
    devices = None
    if args.devices is not None:
        from ..evaluation.runners.devices import parse_devices

        if args.device is not None:
            raise SensitivityError("give --device (every worker on one device) or --devices (one worker per "
                                   "device), not both")
        devices = parse_devices(args.devices)
        device = devices[0]
    with ray_connection(args.ray, device) as device:
        fam, weights, base_factory, protocol, mq = protocol_from_args(args, device)
        base_factory = replace(base_factory, fp_images_dir=str(job_fp_images_dir(cache_path)))
        factory = PipelinedFactory(base_factory, pipeline=args.pipeline)
        spec = SamplerSpec(seed=args.seed, options=mq.options, bits=args.bits, methods=args.methods,
                           fixed=tuple(parse_fixed(args.fixed, args.fixed_file).items()))
        if args.strategy == "single-layer":
            from ..allocators.mixdq import SingleLayerSampler

            spec = SingleLayerSampler(tuple(mq.layer_names), tuple(mq.options))
            n = spec.num_configs if args.num_configs is None else min(args.num_configs, spec.num_configs)
            plan = JobPlan.from_multiquantizer(mq, spec, n)
        else:
            plan = JobPlan.from_multiquantizer(mq, spec, args.num_configs if args.strategy == "random" else
                                               min(args.initial, args.num_configs))
        signature, evaluation = protocol.signature(), protocol.to_dict()
        created = not cache_path.exists()
        if not created:  # corrupt file / other signature: refuse before loading any model
            with ConfigCache(cache_path) as c:
                c.check_signature(signature, evaluation)
        if args.ray:
            runner = RayRunner(factory, address=args.ray, threads=args.threads)
        else:
            runner = LocalRunner(factory, workers=args.workers, threads=args.threads, devices=devices)
        what = {"random": f"configs 0..{plan.num_configs - 1} of seed {args.seed}",
                "single-layer": f"{plan.num_configs} single-layer configs",
                "active": f"{args.num_configs} configs, {plan.num_configs} random of seed {args.seed} then active rounds"}
        print(f"sample {fam.name} ({protocol.model_id}): {what[args.strategy]}, "
              f"{protocol.num_images} images x {protocol.steps} steps each, signature {signature[:12]}, "
              f"cache {cache_path}")
        print(f"  workers: {runner.describe()}, batch size {base_factory.batch_size or 'the model default'}"
              f"{', torch.compile ' + (base_factory.compile if isinstance(base_factory.compile, str) else 'inductor') if base_factory.compile else ''}; "
              f"full-precision images shared in {base_factory.fp_images_dir}")
        try:
            summary = run_job(cache_path, plan, runner, signature=signature, evaluation=evaluation,
                              progress=not args.no_progress, desc=f"sample {fam.name}")
            if args.strategy == "active" and not summary.failed:
                targets = [float(t) for t in args.targets.split(",") if t.strip()]
                active = run_active(cache_path, mq, plan, factory, summary, num_configs=args.num_configs,
                                    signature=signature, evaluation=evaluation, seed=args.seed,
                                    initial=args.initial, batch=args.batch, pool=args.pool, targets=targets,
                                    window=args.window, metric=args.metric, workers=args.workers,
                                    threads=args.threads, devices=devices, progress=not args.no_progress)
                summary = active.summary
                print(f"active: {len(active.labelled)} configs labelled ({plan.num_configs} random + "
                      f"{active.rounds} rounds), order in {active.order_path}")
        except BaseException:
            if created:
                remove_if_empty(cache_path)  # a cache this command made holds nothing yet: leave no file
            raise
    if args.json:
        print(json.dumps({"run_id": summary.run_id, "planned": summary.planned, "done": summary.done,
                          "evaluated": summary.evaluated, "done_before": summary.done_before,
                          "reused": summary.reused, "by_others": summary.by_others, "failed": summary.failed,
                          "elapsed_s": summary.elapsed_s, "startup_s": summary.startup_s,
                          "configs_per_hour": summary.configs_per_hour, "complete": summary.complete,
                          "runner": summary.runner}))
    print(f"sample {fam.name}: {summary}")
    return 0 if not summary.failed else 1
