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
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SensitivityError


# ------------------------------------------------------------------------ shared with `evaluate`
def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --weights, --device, --dtype, --multiquantizer, conditions, generation settings."""
    p.add_argument("model", help="model family (see `sensitivity models`)")
    p.add_argument("--weights", default=None, help="hub id or local diffusers folder (default: the model's "
                   "official weights; digits models: the shipped ones), or 'random'/'tiny'")
    p.add_argument("--multiquantizer", required=True, help="multiquantizer .safetensors file of MODEL")
    p.add_argument("--device", default=None, help="torch device of each worker (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="weights dtype (default: fp16 on cuda, fp32 on cpu)")
    c = p.add_argument_group("evaluation protocol (part of the cache's signature)")
    cond = c.add_mutually_exclusive_group()
    cond.add_argument("--prompts", default=None, metavar="FILE",
                      help="text models: COCO captions JSON (captions_val2017.json: the first --num-images "
                           "captions) or a text file with one prompt per line")
    cond.add_argument("--class-ids", default=None, metavar="IDS",
                      help="class models: class ids, e.g. '0-999' or '1,7,9' (default: all classes)")
    c.add_argument("--num-images", type=int, default=None,
                   help="text models: number of prompts used (default 1000, as the reference)")
    c.add_argument("--images-per-class", type=int, default=None,
                   help="class models: images per class id (default: digits 50, others 1)")
    c.add_argument("--image-seed", type=int, default=0, help="image i is drawn from seed IMAGE_SEED + i (default 0)")
    c.add_argument("--reference-dir", default=None, metavar="DIR",
                   help="real images for FID/KID (COCO val2017 / ImageNet val folder); digits models need none")
    c.add_argument("--reference-cache", default=".sensitivity-cache", metavar="DIR",
                   help="where the reference folder's features are cached (computed once)")
    c.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    c.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    c.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the model's)")
    c.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100, as clean-fid)")
    p.add_argument("--batch-size", type=int, default=None, help="images per generation batch (default: the model's; "
                   "does not change the images)")


def parse_class_ids(text: str) -> List[int]:
    ids: List[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            ids.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        except ValueError:
            raise SensitivityError(f"--class-ids {text!r}: expected ids like '0-999' or '1,7,9'") from None
    if not ids:
        raise SensitivityError(f"--class-ids {text!r}: no class id given")
    return ids


def read_prompts(path: str, n: Optional[int]) -> List[str]:
    """The first ``n`` captions of a COCO captions JSON, or the first ``n`` lines of a text file."""
    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"--prompts file {path!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    prompts: List[str]
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SensitivityError(f"--prompts {path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            prompts = [str(a.get("caption", "")).strip() for a in data["annotations"] if isinstance(a, dict)]
        elif isinstance(data, list) and all(isinstance(x, str) for x in data):
            prompts = [x.strip() for x in data]
        else:
            raise SensitivityError(f"--prompts {path}: expected COCO captions ({{'annotations': [{{'caption': ...}}]}}) "
                                   "or a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise SensitivityError(f"--prompts {path}: holds no prompts")
    n = 1000 if n is None else n
    if n < 2:
        raise SensitivityError(f"--num-images must be at least 2, got {n}")
    if len(prompts) < n:
        raise SensitivityError(f"--prompts {path}: holds {len(prompts)} prompts, fewer than --num-images {n}")
    return prompts[:n]


def check_reference_dir(path: str) -> None:
    from ..evaluation.metrics import IMAGE_EXTENSIONS

    p = Path(path)
    if not p.is_dir():
        raise SensitivityError(f"--reference-dir {path!r} is not a folder")
    n = 0
    for f in p.rglob("*"):
        if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            n += 1
            if n >= 2:
                return
    raise SensitivityError(f"--reference-dir {path!r} holds {n} images (.{', .'.join(IMAGE_EXTENSIONS)}); FID needs a folder of real images")


def protocol_from_args(args: argparse.Namespace, device: Optional[str] = None):
    """``(family, weights, EvaluatorFactory, EvalProtocol, multiquantizer)`` from the arguments.

    Cheap: checks every file and the multiquantizer's model *before* any model is loaded.
    """
    import torch

    from ..checks import check_device
    from ..evaluation.evaluator import EvalProtocol, EvaluatorFactory, is_digits_family
    from ..multiquantizer import load_multiquantizer
    from ..zoo import get_family

    check_protocol_numbers(args)
    check_device(device or args.device)
    fam = get_family(args.model)
    weights = fam.resolve_weights(args.weights)
    conditions: Optional[List[Any]] = None
    if fam.conditioning == "class":
        if args.prompts:
            raise SensitivityError(f"model {fam.name!r} is class-conditional: use --class-ids, not --prompts")
        per_class = args.images_per_class if args.images_per_class is not None else (50 if is_digits_family(fam) else 1)
        if per_class < 1:
            raise SensitivityError(f"--images-per-class must be >= 1, got {per_class}")
        ids = parse_class_ids(args.class_ids) if args.class_ids else list(range(int(fam.num_classes or 0)))
        conditions = fam.check_conditions([c for c in ids for _ in range(per_class)])
    else:
        if args.class_ids:
            raise SensitivityError(f"model {fam.name!r} is text-conditional: use --prompts, not --class-ids")
        if not args.prompts:
            raise SensitivityError(f"model {fam.name!r} needs --prompts (e.g. captions_val2017.json)")
        conditions = read_prompts(args.prompts, args.num_images)
    if args.reference_dir:
        check_reference_dir(args.reference_dir)
    elif not is_digits_family(fam):
        print(f"note: no --reference-dir: FID/KID are not computed for {fam.name}, only PSNR/MSE against full precision")
    if not Path(args.multiquantizer).is_file():
        what = "is not a file" if Path(args.multiquantizer).exists() else "does not exist"
        raise SensitivityError(f"--multiquantizer {args.multiquantizer!r} {what}")
    mq = load_multiquantizer(args.multiquantizer)
    mq_family = str(mq.model_id).split(":", 1)[0]
    if mq_family != fam.name:
        raise SensitivityError(f"multiquantizer {Path(args.multiquantizer).name} was built for {mq.model_id}, "
                               f"not for model {fam.name!r}")
    dev = device or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev_type = torch.device(dev).type
    except (RuntimeError, TypeError):
        raise SensitivityError(f"--device {dev!r} is not a torch device") from None
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(args.dtype or "", None)
    if dtype is None:
        dtype = "float16" if dev_type == "cuda" else "float32"
    protocol = EvalProtocol.for_family(
        fam, weights, conditions=conditions, seed=args.image_seed, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, dtype=dtype, multiquantizer_hash=mq.hash,
        reference_dir=args.reference_dir, kid_subsets=args.kid_subsets)
    factory = EvaluatorFactory(
        family=fam.name, multiquantizer=str(Path(args.multiquantizer).resolve()), protocol=protocol.to_dict(),
        weights=str(Path(weights).resolve()) if Path(weights).expanduser().is_dir() else weights,
        device=dev, dtype=dtype, batch_size=args.batch_size,
        reference_dir=str(Path(args.reference_dir).resolve()) if args.reference_dir else None,
        cache_dir=str(Path(args.reference_cache).resolve()))
    return fam, weights, factory, protocol, mq


def check_protocol_numbers(args: argparse.Namespace) -> None:
    """The protocol's numbers at the door (before any file is read or model loaded)."""
    from ..checks import at_least, finite

    at_least("--steps", args.steps, 1)
    finite("--guidance", args.guidance)
    at_least("--kid-subsets", args.kid_subsets, 1)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--num-images", args.num_images, 2)
    at_least("--images-per-class", args.images_per_class, 1)


def parse_fixed(items: List[str], fixed_file: Optional[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    if fixed_file:
        p = Path(fixed_file)
        if not p.is_file():
            raise SensitivityError(f"--fixed-file {fixed_file!r} does not exist")
        from ..config import QuantConfig

        out.update(QuantConfig.load(p).options)
    for item in items or []:
        if "=" not in item:
            raise SensitivityError(f"--fixed {item!r}: expected LAYER=OPTION (LAYER may be a glob pattern)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ------------------------------------------------------------------------------------ command
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="evaluate N random configs into a cache (resumable, parallel)",
        description="Draw configs 0..N-1 of a run (seed S: per config p ~ U(0,1), each layer low-bit with "
                    "probability p, method uniform), evaluate those not yet in --cache with the protocol "
                    "(FID, KID, accuracy / PSNR...), one SQLite record each. Kill it any time; rerun the same "
                    "command to resume. Several commands, --workers K or --ray share the work.")
    add_protocol_arguments(p)
    p.add_argument("--cache", required=True, help="SQLite cache file (created if missing)")
    p.add_argument("--num-configs", type=int, required=True, help="configs 0..N-1 of the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the run's configs (default 0)")
    s = p.add_argument_group("sampler options (part of the run's identity)")
    s.add_argument("--bits", default=None, help="allowed bit widths, e.g. '3-4' or '4' (default: all in the multiquantizer)")
    s.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="allowed methods: uaq kmeans_c kmeans_a (aliases mse kmeans kmeans_all)")
    s.add_argument("--fixed", action="append", default=[], metavar="LAYER=OPTION",
                   help="keep a layer (or glob pattern) at an option, e.g. 'proj_out*=fp16' (repeatable)")
    s.add_argument("--fixed-file", default=None, help="config JSON whose options are fixed in every sample")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in this process)")
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
    from ..evaluation.cache import ConfigCache
    from ..evaluation.runners import JobPlan, LocalRunner, PipelinedFactory, RayRunner, run_job
    from ..evaluation.sampler import SamplerSpec

    from ..checks import at_least
    from ..io import check_writable

    if args.num_configs < 1:
        raise SensitivityError(f"--num-configs must be >= 1, got {args.num_configs}")
    at_least("--workers", args.workers, 1)
    at_least("--threads", args.threads, 1)
    check_protocol_numbers(args)
    cache_path = Path(args.cache)
    if not cache_path.exists():
        check_writable(cache_path, "--cache")  # SQLite also writes its journal beside the file
    device = args.device
    started_ray = False
    if args.ray:
        device, started_ray = _connect_ray(args.ray, args.device)
    try:
        fam, weights, base_factory, protocol, mq = protocol_from_args(args, device)
        factory = PipelinedFactory(base_factory, pipeline=args.pipeline)
        spec = SamplerSpec(seed=args.seed, options=mq.options, bits=args.bits, methods=args.methods,
                           fixed=tuple(parse_fixed(args.fixed, args.fixed_file).items()))
        plan = JobPlan.from_multiquantizer(mq, spec, args.num_configs)
        signature, evaluation = protocol.signature(), protocol.to_dict()
        created = not cache_path.exists()
        if not created:  # corrupt file / other signature: refuse before loading any model
            with ConfigCache(cache_path) as c:
                c.check_signature(signature, evaluation)
        if args.ray:
            runner = RayRunner(factory, address=args.ray, threads=args.threads)
        else:
            runner = LocalRunner(factory, workers=args.workers, threads=args.threads)
        print(f"sample {fam.name} ({protocol.model_id}): configs 0..{args.num_configs - 1} of seed {args.seed}, "
              f"{protocol.num_images} images x {protocol.steps} steps each, signature {signature[:12]}, "
              f"cache {cache_path}")
        try:
            summary = run_job(cache_path, plan, runner, signature=signature, evaluation=evaluation,
                              progress=not args.no_progress, desc=f"sample {fam.name}")
        except BaseException:
            if created:
                remove_if_empty(cache_path)  # a cache this command made holds nothing yet: leave no file
            raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if args.json:
        print(json.dumps({"run_id": summary.run_id, "planned": summary.planned, "done": summary.done,
                          "evaluated": summary.evaluated, "done_before": summary.done_before,
                          "reused": summary.reused, "by_others": summary.by_others, "failed": summary.failed,
                          "elapsed_s": summary.elapsed_s, "startup_s": summary.startup_s,
                          "configs_per_hour": summary.configs_per_hour, "complete": summary.complete}))
    print(f"sample {fam.name}: {summary}")
    return 0 if not summary.failed else 1


def remove_if_empty(cache_path: Path) -> None:
    """Delete a cache file (and its SQLite journal files) that holds no record; keep any with records."""
    from ..evaluation.cache import ConfigCache

    try:
        with ConfigCache(cache_path) as c:
            if len(c):
                return
    except Exception:  # noqa: BLE001 - unreadable: this command made it, and it stored nothing
        pass
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(cache_path) + suffix).unlink(missing_ok=True)


def _connect_ray(address: str, device: Optional[str]) -> Tuple[Optional[str], bool]:
    """Connect to (or start) Ray; the workers' device defaults to cuda when the cluster has GPUs."""
    from ..evaluation.runners import ray_available

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
