"""``sensitivity cache info|export|import``: inspect, export and import an evaluation cache."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="inspect, export or import an evaluation cache (SQLite)",
                       description="Inspect, export or import the SQLite cache written by `sensitivity sample`.")
    s = p.add_subparsers(dest="cache_command", metavar="ACTION")

    info = s.add_parser("info", help="signature, runs, record count, metric ranges, damaged records")
    info.add_argument("cache", help="cache file (.sqlite)")
    info.add_argument("--json", action="store_true", help="print everything as JSON")
    info.set_defaults(func=run_info)

    ex = s.add_parser("export", help="write all records as Parquet, CSV or the reference's quant_cache.pkl layout")
    ex.add_argument("cache", help="cache file (.sqlite)")
    ex.add_argument("--format", choices=("parquet", "csv", "pkl"), default=None,
                    help="output format (default: from the --out suffix)")
    ex.add_argument("--out", required=True, help="output file")
    ex.add_argument("--fidelity", default=None, help="a multi-fidelity cache (sample --full-configs): which "
                    "fidelity's records to write, full (default) or cheap; an export holds one signature")
    ex.add_argument("--our-names", action="store_true",
                    help="pkl: keep our layer/option names instead of the reference's "
                         "(model.<path>.weight_quantizer, mse/kmeans/kmeans_all)")
    ex.set_defaults(func=run_export)

    im = s.add_parser("import", help="add records from an export (.parquet/.csv) or a reference quant_cache.pkl",
                      description="Add the records of FILE to CACHE (created if missing). The file's evaluation "
                                  "signature must match the cache's. Pickles are read only with --trust-pickle.")
    im.add_argument("cache", help="cache file (.sqlite), created if missing")
    im.add_argument("file", help=".parquet / .csv written by `cache export`, or a .pkl (ours or the reference's)")
    im.add_argument("--trust-pickle", action="store_true",
                    help="allow reading a .pkl (unpickling can run arbitrary code: only for files you trust)")
    im.add_argument("--model", default=None,
                    help="reference pickles: the model their FIDs were measured on (part of their signature)")
    im.set_defaults(func=run_import)
    rb = s.add_parser("rebind", help="point a cache at a rebuilt multiquantizer with the same tensors",
                      description="Records name the multiquantizer they were made with by its hash. A multiquantizer "
                                  "rebuilt from the same weights (another machine, or a file written before the hash "
                                  "left out the float statistics) holds the same codes but may hash differently: "
                                  "this checks that its layers, bytes and errors match the cache's and renames the hash.")
    rb.add_argument("cache", help="cache file (.sqlite)")
    rb.add_argument("--multiquantizer", required=True, help="the rebuilt multiquantizer .safetensors")
    rb.set_defaults(func=run_rebind)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_info(args: argparse.Namespace) -> int:
    from ..evaluation.cache import ConfigCache

    with ConfigCache(args.cache) as cache:
        info = cache.info()
    if args.json:
        json.dump(info, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"{info['path']}: {info['records']} records, {info['size_bytes'] / 2**20:.2f} MiB, format {info['format']}")
    print(f"signature {info['signature']}")
    for name, f in (info.get("fidelities") or {}).items():
        print(f"fidelity {name}: {f['records']} records, signature {f['signature'][:12]}")
    for k, v in sorted((info["evaluation"] or {}).items()):
        text = json.dumps(v, default=str)
        print(f"  {k}: {text if len(text) < 100 else text[:97] + '...'}")
    for r in info["runs"]:
        smp = r["sampler"]
        extra = ", ".join(f"{k} {smp[k]}" for k in ("bits", "methods", "fixed") if smp.get(k))
        print(f"run {r['run_id']}: seed {smp.get('seed')}{', ' + extra if extra else ''}: "
              f"{r['done']}/{r['planned']} done, {r['claimed']} claimed now")
    for name, s in (info.get("ranges") or {}).items():
        print(f"  {name:>16}: min {s['min']:.4g}  median {s['median']:.4g}  max {s['max']:.4g}")
    if "mean_seconds_per_config" in info:
        print(f"mean evaluation time {info['mean_seconds_per_config']:.2f} s/config")
    bad = info.get("damaged_records") or []
    print(f"damaged records: {len(bad)}" + (f" (ids {bad[:10]})" if bad else " (all checksums verified)"))
    return 1 if bad else 0


def run_export(args: argparse.Namespace) -> int:
    from ..evaluation.cache import ConfigCache
    from ..io import check_writable

    check_writable(args.out, "--out")  # a folder there, or a read-only folder: refuse before reading
    with ConfigCache(args.cache, fidelity=args.fidelity) as cache:
        fids = cache.fidelities()
        if cache.fidelity not in fids and cache.signature is None and fids:
            from ..errors import SensitivityError

            raise SensitivityError(f"{args.cache}: no fidelity {cache.fidelity!r} (it has {', '.join(fids)})")
        out, n = cache.export(args.out, args.format, reference_names=not args.our_names)
        others = [f for f in fids if f != cache.fidelity]
    print(f"wrote {n} records to {out}" + (f" (fidelity {cache.fidelity}; not exported: {', '.join(others)}, "
                                            "--fidelity NAME writes one)" if others else ""))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..evaluation.cache import import_records

    read, inserted, total = import_records(args.cache, args.file, trust_pickle=args.trust_pickle, model=args.model)
    print(f"imported {inserted} of {read} records from {args.file} into {args.cache} "
          f"({read - inserted} already there; {total} records now)")
    return 0


def run_rebind(args: argparse.Namespace) -> int:
    from ..evaluation.cache import rebind_multiquantizer

    old, new, sig, n = rebind_multiquantizer(args.cache, args.multiquantizer)
    if sig is None:
        print(f"{args.cache}: already names multiquantizer {old[:12]}")
        return 0
    print(f"{args.cache}: {n} records now name multiquantizer {new[:12]} (was {str(old)[:12]}); signature {sig[:12]}")
    return 0
