"""``sensitivity evaluate MODEL --multiquantizer FILE --config FILE``: score one config.

Same protocol options and metrics as ``sensitivity sample`` (so its record is comparable with a
cache's), for checking a searched config. With ``--cache``, the record is looked up there first
(same signature) and stored there after evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys



def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_protocol_arguments

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
    from ..workflows.evaluate import evaluate_config
    from .arguments import protocol_kwargs

    res = evaluate_config(args.model, args.multiquantizer, config=args.config, finetuned=args.finetuned,
                          trust_pickle=args.trust_pickle, cache=args.cache, force=args.force, **protocol_kwargs(args))
    record, fam, protocol, mq, source, chash = res
    signature = protocol.signature()
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
