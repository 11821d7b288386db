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
import sys

from ..errors import SensitivityError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="evaluate N random configs into a cache (resumable, parallel)",
        description="Draw configs 0..N-1 of a run (seed S: per config p ~ U(0,1), each layer low-bit with "
                    "probability p, method uniform), evaluate those not yet in --cache with the protocol "
                    "(FID, KID, accuracy / PSNR...), one SQLite record each. Kill it any time; rerun the same "
                    "command to resume. Several commands, --workers K or --ray share the work.")
    from .arguments import add_progress_argument, add_protocol_arguments

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
    mf = p.add_argument_group("multi-fidelity (cheap labels for many configs, full labels for a few, one cache)")
    mf.add_argument("--full-configs", type=int, default=None, metavar="N",
                    help="after labelling the configs with the protocol above (the cache's 'cheap' fidelity), label "
                         "configs 0..N-1 again on more images (its 'full' fidelity); train learns from both")
    mf.add_argument("--full-images-per-class", type=int, default=None, help="class models: the full labels' images per class")
    mf.add_argument("--full-num-images", type=int, default=None, help="text models: the full labels' image count")
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
    add_progress_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.sample import sample
    from .arguments import parse_fixed, protocol_kwargs

    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise SensitivityError(f"--targets {args.targets!r}: expected a comma list of numbers, e.g. 3.4,3.8") from None
    res = sample(args.model, args.multiquantizer, args.cache, num_configs=args.num_configs, strategy=args.strategy,
                 seed=args.seed, bits=args.bits, methods=args.methods, fixed=parse_fixed(args.fixed, args.fixed_file),
                 workers=args.workers, devices=args.devices, ray=args.ray, threads=args.threads,
                 pipeline=args.pipeline, progress=not args.no_progress, initial=args.initial, batch=args.batch,
                 pool=args.pool, targets=targets, window=args.window, metric=args.metric,
                 full_configs=args.full_configs, full_images_per_class=args.full_images_per_class,
                 full_num_images=args.full_num_images, **protocol_kwargs(args))
    summary = res.summary
    if args.json:
        print(json.dumps({"run_id": summary.run_id, "planned": summary.planned, "done": summary.done,
                          "evaluated": summary.evaluated, "done_before": summary.done_before,
                          "reused": summary.reused, "by_others": summary.by_others, "failed": summary.failed,
                          "elapsed_s": summary.elapsed_s, "startup_s": summary.startup_s,
                          "configs_per_hour": summary.configs_per_hour, "complete": summary.complete,
                          "runner": summary.runner,
                          **({"full": {"run_id": res.full.run_id, "planned": res.full.planned, "done": res.full.done,
                                       "evaluated": res.full.evaluated, "complete": res.full.complete}}
                             if res.full is not None else {})}))
    print(f"sample {res.family.name}{' (cheap labels)' if res.full is not None else ''}: {summary}")
    if res.full is not None:
        print(f"sample {res.family.name} (full labels): {res.full}")
    for s in (summary, res.full):
        if s is not None and s.failed:
            first = min(s.failed)
            print(f"error: {len(s.failed)} of {s.planned} configs failed (config {first}: "
                  f"{s.failed[first]}); finished ones are in {args.cache}: rerun the command to retry the rest",
                  file=sys.stderr)
            return 1
    return 0
