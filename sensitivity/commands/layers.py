"""``sensitivity layers MODEL``: the quantizable layers of a model's denoiser under its family's rules."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_model_arguments

    p = sub.add_parser("layers", help="list the quantizable layers of a model",
                       description="List the quantizable Conv/Linear layers of MODEL's denoiser: names, shapes, "
                       "skip-connection split points, tied copies, parameter counts and fp16 bytes. "
                       "`--weights meta` needs no memory and no download.")
    add_model_arguments(p)
    p.add_argument("--ops", action="store_true",
                   help="add each layer's block and op type (generic diffusers families: read off the traced graph)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.layers import layer_report

    rep = layer_report(args.model, weights=args.weights, pipeline_class=args.pipeline_class, device=args.device,
                       dtype=args.dtype, seed=args.seed, ops=args.ops)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    rows = rep["table"]
    w = min(64, max(len(r["name"]) for r in rows))
    ops = f" {'block':>22} {'op type':>14}" if args.ops else ""
    print(f"{'layer':<{w}} {'kind':<7} {'shape':>20} {'split':>12} {'tied':>5} {'params':>12} {'fp16 MiB':>9}{ops}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        split = "{}:{}".format(*r["split"]) if r["split"] else ""
        ops = f" {r['block'][-22:]:>22} {r['op_type'][-14:]:>14}" if args.ops else ""
        print(f"{r['name'][-w:]:<{w}} {r['kind']:<7} {shape:>20} {split:>12} {r['tied_copies'] or '':>5} "
              f"{r['params']:>12,} {r['fp16_bytes'] / 2**20:>9.3f}{ops}")
    ref = f", reference {rep['reference_layers']}" if rep["reference_layers"] else ""
    print(f"total: {rep['layers']} layers{ref} ({rep['conv_linear_modules']} Conv/Linear modules, "
          f"{rep['split_modules']} split, {len(rep['excluded'])} excluded, {rep['tied_copies']} tied copies); "
          f"{rep['layer_params'] / 1e6:,.1f} M quantizable weights = {rep['fp16_bytes'] / 2**20:,.1f} MiB fp16; "
          f"denoiser {rep['denoiser_params'] / 1e6:,.1f} M parameters")
    return 0
