"""``sensitivity info FILE``: what a multiquantizer file holds."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a multiquantizer's layers, per-option error and bytes")
    p.add_argument("file", help="multiquantizer .safetensors file")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--limit", type=int, default=None, help="print at most this many layers in the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..mqfile import read_manifest  # numpy only: no torch for a manifest

    m = read_manifest(args.file)
    if args.json:
        json.dump(m, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    opts = m["options"]
    print(f"{args.file}: {m['model_id']} ({m['model_class']}), {len(m['layers'])} layers, "
          f"fp16 weights {m['fp16_bytes'] / 2**20:.2f} MiB, built in {m['build_seconds']:.1f} s")
    print("relative squared error ||W-Q(W)||^2/||W||^2 per option, bits per weight incl. overhead in the last columns")
    name_w = min(60, max(len(d["name"]) for d in m["layers"]))
    print(f"{'layer':<{name_w}} {'shape':>18} " + " ".join(f"{o:>11}" for o in opts) + "  " + " ".join(f"{o:>10}" for o in opts))
    rows = m["layers"] if args.limit is None else m["layers"][: args.limit]
    for d in rows:
        shape = "x".join(map(str, d["shape"]))
        errs = " ".join(f"{d['options'][o]['error']:11.3e}" for o in opts)
        bits = " ".join(f"{16 * d['options'][o]['nbytes'] / d['fp16_bytes']:10.3f}" for o in opts)
        print(f"{d['name'][-name_w:]:<{name_w}} {shape:>18} {errs}  {bits}")
    if args.limit is not None and len(m["layers"]) > args.limit:
        print(f"... {len(m['layers']) - args.limit} more layers (--limit)")
    fp = m["fp16_bytes"]
    tot = {o: sum(d["options"][o]["nbytes"] for d in m["layers"]) for o in opts}
    print("all layers at one option: " + ", ".join(f"{o} {16 * tot[o] / fp:.3f} bits" for o in opts))
    methods = (m.get("settings") or {}).get("methods") or {}
    if methods:
        print("method settings: " + "; ".join(f"{name} ({_describe(st)})" for name, st in methods.items()))
    return 0


def _describe(settings: dict) -> str:
    """``UniformAffine v1, clip_ratios=[70 values], least_squares_refit=False``."""
    cls = str(settings.get("class", "?")).rsplit(".", 1)[-1]
    parts = [f"{cls} v{settings.get('version', '?')}"]
    for k, v in (settings.get("config") or {}).items():
        parts.append(f"{k}=[{len(v)} values]" if isinstance(v, list) and len(v) > 4 else f"{k}={v}")
    return ", ".join(parts)
