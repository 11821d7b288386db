"""``sensitivity evaluate MODEL --multiquantizer FILE --config FILE``: score one config.

Same protocol options and metrics as ``sensitivity sample`` (so its record is comparable with a
cache's), for checking a searched config. With ``--cache``, the record is looked up there first
(same signature) and stored there after evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SensitivityError


def register(sub: argparse._SubParsersAction) -> None:
    from .sample import add_protocol_arguments

    p = sub.add_parser("evaluate", help="evaluate one config with the sample protocol and print its record",
                       description="Apply one quantization config, generate the protocol's images, and print the "
                                   "record a `sensitivity sample` job would store (avg bits, bytes, summed error, "
                                   "FID/KID/accuracy/PSNR, timings).")
    add_protocol_arguments(p)
    p.add_argument("--config", default=None, help="quantization config (.json; a reference .pkl needs --trust-pickle; a calibrated folder of `sensitivity calibrate`)")
    p.add_argument("--finetuned", default=None, metavar="DIR",
                   help="evaluate a fine-tuned artifact (`sensitivity finetune --out DIR`, made from --multiquantizer): "
                        "its weights, and its config unless --config is given")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading a reference .pkl config")
    p.add_argument("--cache", default=None, help="look the config up in this cache first, and store the result there")
    p.add_argument("--force", action="store_true", help="with --cache: evaluate even if the config is cached")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import QuantConfig
    from ..evaluation.cache import ConfigCache, build_record, config_hash, normalize_config
    from ..evaluation.runners import layer_stats_from_multiquantizer
    from ..sizes import SizeTable
    from .sample import protocol_from_args

    if args.cache and not Path(args.cache).exists():
        from ..io import check_writable

        check_writable(args.cache, "--cache")
    if not args.config and not args.finetuned:
        raise SensitivityError("give --config X.json (or --finetuned DIR)")
    ft = calibrated = None
    source = args.config or args.finetuned
    if args.finetuned:
        from ..finetune import load_finetuned

        ft = load_finetuned(args.finetuned)
        cfg = QuantConfig.load(args.config, trust_pickle=args.trust_pickle) if args.config else ft.config
    else:
        from ..calibration.artifact import load_config_or_calibrated

        cfg, calibrated = load_config_or_calibrated(args.config, trust_pickle=args.trust_pickle)
    if cfg.act_bits is not None and calibrated is None:  # a searched W·A config: its protocol's activations
        if args.act_bits is not None and args.act_bits != cfg.act_bits:
            raise SensitivityError(f"{args.config}: chosen for A{cfg.act_bits}, but --act-bits {args.act_bits}")
        args.act_bits = cfg.act_bits
    fam, weights, factory, protocol, mq = protocol_from_args(args)
    cfg.check_model(mq.model_id, str(source))
    if ft is not None:
        if ft.base_multiquantizer_hash != mq.hash:
            raise SensitivityError(f"--finetuned {args.finetuned} was made from multiquantizer "
                                   f"{ft.base_multiquantizer_hash[:12]}, not {Path(args.multiquantizer).name}")
        mq, protocol = ft, protocol.with_multiquantizer(ft.hash)  # its own signature: not mixed with the base's
    if calibrated is not None and args.cache:
        raise SensitivityError(f"{args.config}: a calibrated config is not stored in caches (its config hash is the "
                               "uncalibrated one's); drop --cache")
    try:
        mq.validate(cfg.options)
    except SensitivityError as exc:
        raise SensitivityError(f"{source}: {exc}") from None
    options = normalize_config(cfg.options)
    stats = ft.layer_stats() if ft is not None else layer_stats_from_multiquantizer(mq)
    sizes = SizeTable.from_layer_stats(stats)
    signature, evaluation = protocol.signature(), protocol.to_dict()
    chash = config_hash(options)
    record = None
    cache = None
    if args.cache:
        if Path(args.cache).exists():
            cache = ConfigCache(args.cache)
            try:
                cache.check_signature(signature, evaluation)
            except BaseException:
                cache.close()  # closed, SQLite leaves no -wal / -shm files beside it
                raise
            rid = cache.lookup(chash) if cache.signature else None
            if rid is not None and not args.force:
                record = next(r for r in cache.records() if r["id"] == rid)
                record["from_cache"] = True
    if record is None:
        if ft is None:
            if args.cache:  # the full-precision images of the cache's jobs (shared with `sample` on it)
                from dataclasses import replace

                from ..evaluation.fp_reference import job_fp_images_dir

                factory = replace(factory, fp_images_dir=str(job_fp_images_dir(args.cache)))
            ev = factory.build()  # loads the model; checks the multiquantizer against it
        else:
            from ..evaluation.evaluator import Evaluator

            pipe = fam.load_pipeline(factory.weights, device=factory.device, dtype=factory.dtype)
            ev = Evaluator(fam, pipe, ft, protocol, batch_size=factory.batch_size,
                           reference_dir=factory.reference_dir, cache_dir=factory.cache_dir)
        metrics = dict(ev.evaluate(calibrated if calibrated is not None else options))
        timings = dict(metrics.pop("timings", None) or {})
        if "seconds" in metrics:
            timings["evaluate"] = metrics.pop("seconds")
        record = build_record(options, sizes, metrics, timings, signature=signature)
        if calibrated is not None:
            record["calibration"] = {"path": str(args.config), "calibration_hash": calibrated.calibration_hash,
                                     "weights_method": calibrated.manifest.get("weights_method"),
                                     "activations": (calibrated.manifest.get("activations") or {}).get("bits")}
        if args.cache:
            cache = cache or ConfigCache(args.cache, create=True)
            cache.ensure_signature(signature, evaluation)
            cache.set_layer_stats(stats)
            cache.add(record)
    if cache is not None:
        cache.close()
    if args.json:
        json.dump(record, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    src = " (from cache)" if record.get("from_cache") else ""
    print(f"{source}: {fam.name} ({protocol.model_id}), {len(record['config'])} quantized layers of {len(mq)}{src}")
    print(f"  avg bits {record['avg_bits']:.4f}, quantized bytes {record['quantized_bytes']}, "
          f"summed error {record['summed_error']:.4g}")
    print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record["metrics"].items()))
    if record.get("timings"):
        print("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in record["timings"].items()
                                             if isinstance(v, (int, float))))
    print(f"  signature {signature[:12]} ({protocol.num_images} images, {protocol.steps} steps, "
          f"guidance {protocol.guidance}), config hash {chash}")
    return 0
