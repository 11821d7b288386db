"""``sensitivity layers MODEL``: the quantizable layers of a model's denoiser under its family's rules."""

from __future__ import annotations

import argparse
import fnmatch
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


def add_ops(fam, denoiser, rep: dict) -> None:
    """``block`` / ``op_type`` / ``op_group`` in every row of ``rep["table"]`` (a generic family traces ``denoiser``)."""
    from ..insights import family_naming

    if getattr(fam, "needs_graph_naming", False):
        from ..graph import build_graph

        fam.use_graph(build_graph(denoiser, fam.find_layers(denoiser)))
    naming = family_naming(fam)
    for r in rep["table"]:
        i = naming.describe(r["name"])
        r.update(block=i.block, op_type=i.op_type, op_group=i.op_group)


def layer_report(fam, denoiser, weights: str) -> dict:
    """Everything ``sensitivity layers --json`` prints (see the keys)."""

    from ..layers import LAYER_TYPES, architecture_hash, layer_table

    layers = fam.find_layers(denoiser)
    rules = fam.layer_rules(denoiser)
    modules = [(p, m) for p, m in denoiser.named_modules() if isinstance(m, LAYER_TYPES)]
    excluded = [p for p, _ in modules if any(fnmatch.fnmatchcase(p, pat) for pat in rules.exclude)]
    tied_params = sum(m.weight.numel() for p, m in modules for s in layers if p in s.tied)
    return {
        "model": fam.name,
        "model_id": fam.model_id(weights),
        "weights": weights,
        "denoiser_class": type(denoiser).__name__,
        "architecture_hash": architecture_hash(layers),
        "conv_linear_modules": len(modules),
        "layers": len(layers),
        "reference_layers": fam.reference_layer_count,
        "split_modules": len(rules.splits),
        "excluded": excluded,
        "tied_copies": sum(len(s.tied) for s in layers if s.in_slice is None or s.name.endswith("#main")),
        "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
        "layer_params": sum(s.numel for s in layers),
        "tied_copy_params": tied_params,
        "fp16_bytes": sum(s.fp16_bytes for s in layers),
        "splits": {k: int(v) for k, v in rules.splits.items()},
        "table": layer_table(layers),
    }


def run(args: argparse.Namespace) -> int:
    from .arguments import model_from_args

    fam, weights, device, dtype = model_from_args(args)
    denoiser = fam.load_denoiser(weights, device="cpu" if weights == "meta" else device, dtype=dtype, seed=args.seed)
    rep = layer_report(fam, denoiser, weights)
    if args.ops:
        add_ops(fam, denoiser, rep)
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
