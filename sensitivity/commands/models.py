"""``sensitivity models``: the registered model families and their reference generation settings."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model families",
                       description="List the model families: conditioning, official weights, denoiser and the "
                       "reference's default generation settings (every command that takes MODEL accepts --weights).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..zoo import family_cards  # torch-free: the built-in families' cards (sensitivity/zoo/catalog.py)

    rows = family_cards()
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sw = max(len(r["defaults"].get("scheduler") or "-") for r in rows)
    print(f"{'model':<13} {'cond':<5} {'denoiser':<11} {'steps':>5} {'cfg':>5} {'size':>9}  {'scheduler':<{sw}}  weights")
    for r in rows:
        d = r["defaults"]
        size = f"{d['height']}x{d['width']}" if d.get("height") else "-"
        sched = d.get("scheduler") or "-"
        print(f"{r['name']:<13} {r['conditioning']:<5} {r['denoiser']:<11} {d['steps']:>5} {d['guidance']:>5g} "
              f"{size:>9}  {sched:<{sw}}  {r['default_weights']}")
    print(f"{len(rows)} models; --weights also takes: " + ", ".join(sorted({w for r in rows for w in r["weights"]})))
    return 0
