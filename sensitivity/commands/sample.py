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
    from ..zoo.cli_args import add_pipeline_class_argument

    p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    p.add_argument("--weights", default=None, help="hub id or local diffusers folder (default: the model's "
                   "official weights; digits models: the shipped ones), or 'random'/'tiny'")
    add_pipeline_class_argument(p)
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
    c.add_argument("--inception", default=None, metavar="PATH",
                   help="real models: local FID Inception file in clean-fid's format (inception-2015-12-05.pt; "
                        "default: clean-fid's copy in /tmp if present; never downloaded)")
    c.add_argument("--clip-model", default=None, metavar="PATH",
                   help="text models: add the CLIP score, with this local transformers CLIP folder")
    c.add_argument("--lpips", nargs="?", const="alex", default=None, metavar="NET",
                   help="add LPIPS to the full-precision images (alex|vgg|squeeze; needs sensitivity[lpips])")
    c.add_argument("--act-bits", type=int, choices=(8, 6), default=None,
                   help="quantize activations to 8 or 6 bits: online token-wise min/max, or static with "
                        "--act-calibration (default: full-precision activations)")
    c.add_argument("--act-calibration", default=None, metavar="FILE",
                   help="with --act-bits: static ranges observed (min/max) per config on this calibration set "
                        "(`sensitivity calibrate-data`)")
    c.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    c.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="other pipeline setting (JSON value if it parses), e.g. --set clean_caption=false")
    p.add_argument("--batch-size", default=None, metavar="N|auto",
                   help="images per generation batch (default: the model's); 'auto': the largest power of two "
                        "(<= 64) that fits the GPU (on CPU: the model's default). Does not change the images")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the denoiser (optionally with this backend, e.g. eager); not part of the "
                        "protocol: it changes the speed, not the images beyond float noise")


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
    from ..evaluation.evaluator import EvalProtocol, EvaluatorFactory
    from ..zoo.base import DIGITS_CLASSIFIER
    from ..multiquantizer import load_multiquantizer
    from ..zoo import get_family

    check_protocol_numbers(args)
    check_device(device or args.device)
    from ..zoo.cli_args import family_name

    fam = get_family(family_name(args))
    weights = fam.resolve_weights(args.weights)
    conditions: Optional[List[Any]] = None
    if fam.conditioning == "class":
        if args.prompts:
            raise SensitivityError(f"model {fam.name!r} is class-conditional: use --class-ids, not --prompts")
        per_class = args.images_per_class if args.images_per_class is not None else (50 if fam.feature_network == DIGITS_CLASSIFIER else 1)
        if per_class < 1:
            raise SensitivityError(f"--images-per-class must be >= 1, got {per_class}")
        ids = parse_class_ids(args.class_ids) if args.class_ids else list(range(int(fam.num_classes or 0)))
        conditions = fam.check_conditions([c for c in ids for _ in range(per_class)])
    else:
        if args.class_ids:
            raise SensitivityError(f"model {fam.name!r} is text-conditional: use --prompts, not --class-ids")
        prompts = args.prompts or getattr(fam, "eval_prompts", None)  # digits-sd ships its own
        if not prompts:
            raise SensitivityError(f"model {fam.name!r} needs --prompts (e.g. captions_val2017.json)")
        n = args.num_images if args.num_images is not None or args.prompts else 500
        conditions = fam.check_conditions(read_prompts(str(prompts), n))
    if args.reference_dir:
        check_reference_dir(args.reference_dir)
    elif fam.feature_network != DIGITS_CLASSIFIER:
        print(f"note: no --reference-dir: FID/KID are not computed for {fam.name}, only PSNR/MSE against full precision")
    metric_kwargs = check_metric_requirements(args, fam)  # every metric's dependencies, before any image
    overrides = protocol_generation_overrides(args, fam)
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
    ref_features = None
    if args.reference_dir and fam.feature_network != DIGITS_CLASSIFIER:  # computed once per job, cached by content
        from ..evaluation.metrics import CleanFIDInception, reference_folder_features

        ext = CleanFIDInception(device=dev if dev_type == "cuda" else "cpu", model=metric_kwargs["inception"])
        ref_features = reference_folder_features(args.reference_dir, args.reference_cache, ext)
    protocol = EvalProtocol.for_family(
        fam, weights, conditions=conditions, seed=args.image_seed, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, dtype=dtype, multiquantizer_hash=mq.hash,
        reference_dir=args.reference_dir, kid_subsets=args.kid_subsets, act_bits=args.act_bits,
        act_calibration=metric_kwargs["act_calibration_id"], inception=metric_kwargs["inception"],
        reference_features=ref_features, clip_model=metric_kwargs["clip_id"], lpips_net=metric_kwargs["lpips_id"],
        **overrides)
    factory = EvaluatorFactory(
        family=fam.name, multiquantizer=str(Path(args.multiquantizer).resolve()), protocol=protocol.to_dict(),
        weights=str(Path(weights).resolve()) if Path(weights).expanduser().is_dir() else weights,
        device=dev, dtype=dtype, batch_size=args.batch_size,
        reference_dir=str(Path(args.reference_dir).resolve()) if args.reference_dir else None,
        cache_dir=str(Path(args.reference_cache).resolve()), inception=metric_kwargs["inception"],
        clip_model=args.clip_model, lpips_net=args.lpips, act_calibration=metric_kwargs["act_calibration"],
        compile=_compile_setting(getattr(args, "compile", False)))
    return fam, weights, factory, protocol, mq


def _compile_setting(value) -> Any:
    """``--compile`` -> ``False`` / ``True`` / a backend name (checked against torch's list)."""
    if not value:
        return False
    if value is True:
        return True
    import torch

    backends = torch._dynamo.list_backends(exclude_tags=()) if hasattr(torch, "_dynamo") else []
    if backends and value not in backends:
        raise SensitivityError(f"--compile {value}: not a torch.compile backend ({', '.join(sorted(backends))})")
    return str(value)


def check_metric_requirements(args: argparse.Namespace, fam) -> Dict[str, Any]:
    """Check every metric's dependencies (packages, weight files) before any model is loaded or image made.

    Returns resolved paths and identities: ``inception`` (path or None), ``clip_id``, ``lpips_id``,
    ``act_calibration`` (path) and ``act_calibration_id``. Raises a one-line :class:`SensitivityError`.
    """
    from ..zoo.base import DIGITS_CLASSIFIER

    out: Dict[str, Any] = {"inception": None, "clip_id": "", "lpips_id": "", "act_calibration": None,
                           "act_calibration_id": None}
    digits = fam.feature_network == DIGITS_CLASSIFIER
    if args.inception and digits:
        raise SensitivityError(f"--inception: model {fam.name!r} scores FID with its shipped digits classifier")
    if args.reference_dir and not digits:
        from ..evaluation import metrics as M

        M.cleanfid_resizer()  # clean-fid itself (its "clean" resize)
        path = M.resolve_inception(args.inception)
        M.load_inception(path, "cpu")  # a loadable TorchScript file
        out["inception"] = str(path.resolve())
    elif args.inception:
        raise SensitivityError("--inception needs --reference-dir (the real images FID compares against)")
    if args.clip_model:
        from ..evaluation.extra_metrics import check_clip

        if fam.conditioning != "text":
            raise SensitivityError(f"--clip-model: model {fam.name!r} is not text-conditional")
        out["clip_id"] = check_clip(args.clip_model)
    if args.lpips:
        from ..evaluation.extra_metrics import check_lpips

        out["lpips_id"] = check_lpips(args.lpips)
    if args.act_calibration:
        if args.act_bits is None:
            raise SensitivityError("--act-calibration needs --act-bits")
        if not Path(args.act_calibration).is_file():
            raise SensitivityError(f"--act-calibration {args.act_calibration!r} does not exist")
        from ..evaluation.evaluator import calibration_identity

        out["act_calibration"] = str(Path(args.act_calibration).resolve())
        out["act_calibration_id"] = calibration_identity(args.act_calibration)
    return out


def protocol_generation_overrides(args: argparse.Namespace, fam) -> Dict[str, Any]:
    """``height`` / ``width`` / ``extra`` of the protocol from --height, --width, --set (checked against the family)."""
    from ..zoo.cli_args import generation_overrides

    over = generation_overrides(argparse.Namespace(height=args.height, width=args.width,
                                                   set=getattr(args, "set", None)))
    out: Dict[str, Any] = {"height": over.pop("height", None), "width": over.pop("width", None)}
    from ..captions import resolve_clean_caption

    over.update(resolve_clean_caption(over, fam.settings(None).extra, fam.name))  # what is really done, in the protocol
    fam.settings(None, **over)  # unknown settings: one-line error naming the known ones
    if over:
        out["extra"] = over
    return out


def check_protocol_numbers(args: argparse.Namespace) -> None:
    """The protocol's numbers at the door (before any file is read or model loaded)."""
    from ..checks import at_least, finite

    at_least("--steps", args.steps, 1)
    finite("--guidance", args.guidance)
    at_least("--kid-subsets", args.kid_subsets, 1)
    from ..evaluation.batching import parse_batch_size

    args.batch_size = parse_batch_size(args.batch_size)
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
    from ..evaluation.cache import ConfigCache
    from ..evaluation.runners import JobPlan, LocalRunner, PipelinedFactory, RayRunner, run_job
    from ..evaluation.sampler import SamplerSpec

    from ..checks import at_least
    from ..io import check_writable

    if args.num_configs is None and args.strategy != "single-layer":
        raise SensitivityError(f"--strategy {args.strategy} needs --num-configs")
    if args.num_configs is not None and args.num_configs < 1:
        raise SensitivityError(f"--num-configs must be >= 1, got {args.num_configs}")
    if args.strategy == "active" and args.ray:
        raise SensitivityError("--strategy active runs local workers only; drop --ray")
    at_least("--workers", args.workers, 1)
    at_least("--threads", args.threads, 1)
    check_protocol_numbers(args)
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
    started_ray = False
    if args.ray:
        device, started_ray = _connect_ray(args.ray, args.device)
    try:
        fam, weights, base_factory, protocol, mq = protocol_from_args(args, device)
        from dataclasses import replace as _replace

        from ..evaluation.fp_reference import job_fp_images_dir

        base_factory = _replace(base_factory, fp_images_dir=str(job_fp_images_dir(cache_path)))
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
                summary = _active_rounds(args, mq, spec, plan, cache_path, factory, signature, evaluation, summary)
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
                          "configs_per_hour": summary.configs_per_hour, "complete": summary.complete,
                          "runner": summary.runner}))
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


def _active_rounds(args, mq, spec, plan, cache_path, factory, signature, evaluation, first):
    """Rounds of ``--strategy active`` after the random start (see :mod:`sensitivity.active`)."""
    import numpy as np

    from ..active import POOL_OFFSET, ListSampler, choose_batch
    from ..evaluation.cache import ConfigCache, config_hash
    from ..evaluation.metric_specs import lower_is_better
    from ..evaluation.runners import JobPlan, LocalRunner, run_job
    from ..sizes import SizeTable

    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    layers = list(mq.layer_names)
    selected = [plan.config(i) for i in range(plan.num_configs)]
    pool = [plan.sampler.sample(layers, POOL_OFFSET + i) for i in range(args.pool)]
    pool = [dict(c) for c in pool]
    sizes = SizeTable.from_layer_stats(plan.layer_stats, layers)
    pool_bits = np.array([sizes.avg_bits(c) for c in pool])
    lower = lower_is_better(args.metric)
    rounds, summary = 0, first
    while len(selected) < args.num_configs:
        with ConfigCache(cache_path) as c:
            by_hash = {r["config_hash"]: r for r in c.records()}
        ys = []
        for cfg in selected:
            rec = by_hash.get(config_hash(cfg))
            v = None if rec is None else (rec.get("metrics") or {}).get(args.metric)
            if v is None:
                raise SensitivityError(f"active sampling: a labelled config has no '{args.metric}' in {cache_path}; "
                                       "rerun to finish the failed configs")
            ys.append(-float(v) if lower else float(v))
        taken = {config_hash(c) for c in selected}
        free = [i for i, c in enumerate(pool) if config_hash(c) not in taken]
        n = min(args.batch, args.num_configs - len(selected))
        picks = choose_batch(selected, np.asarray(ys), [pool[i] for i in free], pool_bits[free], layers,
                             list(mq.options), targets, n, window=args.window, seed=args.seed + rounds)
        new = [pool[free[i]] for i in picks]
        rounds += 1
        sampler = ListSampler.from_configs(new, seed=args.seed, round=rounds, metric=args.metric,
                                           targets=",".join(f"{t:g}" for t in targets), initial=plan.num_configs,
                                           initial_run=first.run_id, batch=args.batch, pool=args.pool, window=args.window)
        rplan = JobPlan(layers, sampler, len(new), plan.layer_stats)
        runner = LocalRunner(factory, workers=args.workers, threads=args.threads,
                             devices=_devices_of(args))
        summary = run_job(cache_path, rplan, runner, signature=signature, evaluation=evaluation,
                          progress=not args.no_progress, desc=f"active round {rounds}")
        if summary.failed:
            break
        selected.extend(new)
    _write_active_order(cache_path, selected, args, targets)
    print(f"active: {len(selected)} configs labelled ({plan.num_configs} random + {rounds} rounds), "
          f"order in {cache_path}.active.json")
    return summary


def _devices_of(args) -> Optional[List[str]]:
    from ..evaluation.runners.devices import parse_devices

    return parse_devices(getattr(args, "devices", None))


def _write_active_order(cache_path, selected, args, targets) -> None:
    import os

    from ..evaluation.cache import config_hash

    out = Path(str(cache_path) + ".active.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"seed": args.seed, "initial": args.initial, "batch": args.batch, "pool": args.pool,
                               "targets": targets, "window": args.window, "metric": args.metric,
                               "order": [config_hash(c) for c in selected]}, indent=1))
    os.replace(tmp, out)


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
