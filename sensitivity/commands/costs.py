"""``sensitivity costs MODEL``: measure each option's forward time and run-time bytes per layer, on this device.

```
sensitivity costs digits-dit --weights shipped --multiquantizer multiquantizers/digits-dit.safetensors --threads 1
sensitivity search --scores s.csv --multiquantizer multiquantizers/digits-dit.safetensors --target-latency 2.5 --out x.json
```
The table (:mod:`sensitivity.costs`) is written beside the multiquantizer, in ``<stem>.costs/``, keyed by
device, torch version, multiquantizer hash, dtype, batch, threads and run-time module; a rerun resumes,
``--remeasure`` starts over. ``search --target-latency`` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_model_arguments, add_multiquantizer_argument, add_progress_argument

    p = sub.add_parser("costs", help="measure the forward time and run-time bytes of every option of every layer",
                       description="Time each layer's run-time module at every option of the multiquantizer (and in "
                       "float) on its real input shape, on this device; the table drives search --target-latency.")
    add_model_arguments(p)
    add_multiquantizer_argument(p)
    p.add_argument("--options", help="comma list of options to time (default: all of the multiquantizer)")
    p.add_argument("--batch", type=int, default=1, help="samples per forward of the example inputs (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per option; the median is kept (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while timing (default: torch's current number; part of the table's key)")
    p.add_argument("--out", default=None, help="cost table .json (default: <multiquantizer stem>.costs/<device>-<key>.json)")
    p.add_argument("--remeasure", action="store_true", help="ignore a saved table with the same key and measure again")
    add_progress_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.costs import measure_model_costs

    options = [o.strip() for o in args.options.split(",") if o.strip()] if args.options else None
    table, summary = measure_model_costs(args.model, args.multiquantizer, out=args.out, options=options,
                                         batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                                         threads=args.threads, remeasure=args.remeasure, weights=args.weights,
                                         pipeline_class=args.pipeline_class, device=args.device, dtype=args.dtype,
                                         seed=args.seed, progress=not args.no_progress)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    cal = summary["calibrator"] or {}
    print(f"cost table of {len(table.layers)} layers x {len(table.options) + 1} options (fp16 included) on "
          f"{summary['key']['device']}, {summary['key']['threads']} thread(s): {table.meta['path']}")
    print(f"  summed layer latency: fp16 {table.config_latency_ms({}):.3f} ms; "
          + ", ".join(f"{o} {v:.3f} ms" for o, v in summary["uniform_ms"].items()))
    print(f"  calibrator sum(range(10**7)) {cal.get('sum_range_1e7_s')} s, load {cal.get('loadavg_1m')}; "
          f"{summary['seconds']} s")
    return 0
