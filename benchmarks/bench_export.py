"""Export benchmark: bytes on disk, load time, peak RSS and forward time of each export, as ratios to fp32.

    python benchmarks/bench_export.py --model digits-dit --weights shipped \
        --multiquantizer runs/exp_dd/mq.safetensors --config uaq=runs/exp_dd/uaq.json   # from export_configs.py
    python benchmarks/bench_export.py --model sd15 --weights random --multiquantizer MQ --config CFG --repeats 1
    python benchmarks/export_table.py benchmarks/results/export/*.json     # the README tables

Rows (every one measured in this run, fp32 included): ``fp32`` (``save_pretrained`` folder reloaded with
``from_pretrained``), ``packed:<policy>`` for each run-time policy (``recorded``: the export's automatic
choice; ``on_the_fly``; ``cached``; ``int8_dynamic`` when ``--w8a8``: the automatic policy with 8-bit
activations, so ``int8_dynamic`` on every linear layer with an affine-per-row option), ``sdnq``,
``onnx-fp32`` (the float model through the same ONNX writer), ``onnx`` (quantized; weights folded at
session creation, :func:`sensitivity.export.onnx_format.session_options`, except in a W8A8 export, whose QDQ
nodes onnxruntime fuses into its integer kernels) and ``onnx:per_call`` (the
quantized graph's dequantization run on every call). Each load and
forward runs in a fresh subprocess, so its peak RSS (``VmHWM``) is its own: ``rss_load`` is the peak
after loading, ``rss_forward`` the peak after the forwards (batch 1, native size, seeded inputs).
Forward time: median of ``--repeats`` forwards after one warm-up, on ``--threads`` threads. The JSON goes to
``--out-dir/<model>.json`` with the calibrator (seconds for ``sum(range(10**7))``) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def calibrator() -> float:
    """Seconds for ``sum(range(10**7))`` in a fresh interpreter (this machine's speed now)."""
    out = subprocess.run([sys.executable, "-c", "import time;t=time.perf_counter();sum(range(10**7));"
                          "print(time.perf_counter()-t)"], capture_output=True, text=True).stdout
    return float(out.strip())


def measure(kind: str, folder: str, repeats: int, threads: int, output: str = "") -> dict:
    """Load ``folder`` as ``kind`` and time its forwards (run in a fresh subprocess); ``output``: save the
    first forward's output there (``.npy``; PyTorch rows, whose seeded inputs are the same for every row)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import importlib.util

    import diffusers  # imports are not load time

    import sensitivity.export  # noqa: F401

    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime  # noqa: F401

    base = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    rec = json.loads((Path(folder) / "sensitivity_export.json").read_text()) \
        if (Path(folder) / "sensitivity_export.json").is_file() else None
    if kind == "fp32":
        cfg = json.loads((Path(folder) / "config.json").read_text())
        den = getattr(diffusers, cfg["_class_name"]).from_pretrained(folder).eval()
    elif kind.startswith("packed") or kind == "sdnq":
        from sensitivity.export import load_quantized

        policy = kind.partition(":")[2] or None
        if policy == "int8_dynamic":  # W8A8: the automatic policy with 8-bit activations
            den = load_quantized(folder, runtime="auto", act_bits=8)
        else:
            den = load_quantized(folder, runtime=None if policy in (None, "recorded") else policy)
    elif kind.startswith("onnx"):
        from sensitivity.export.onnx_format import inference_session

        # a W8A8 export keeps its QDQ nodes for onnxruntime's integer kernels (QLinearConv, MatMulIntegerToFloat)
        sess = inference_session(Path(folder) / "model.onnx", fold_weights=not kind.endswith(":per_call"),
                                 threads=threads, w8a8=bool((rec or {}).get("w8a8")))
    else:
        raise SystemExit(f"unknown kind {kind}")
    load_s = time.perf_counter() - t0
    rss_load = _rss_mib("VmHWM")
    if kind.startswith("onnx"):
        from sensitivity.export.onnx_format import random_inputs
        from sensitivity.graph.inputs import example_inputs

        gen = np.random.default_rng(0)
        feeds = {}
        for i in rec["inputs"]:
            dt = getattr(np, i["dtype"])
            if i["dtype"].startswith("float") and "timestep" not in i["name"]:
                feeds[i["name"]] = gen.standard_normal(i["shape"]).astype(dt)
            else:
                feeds[i["name"]] = np.full(i["shape"], 500 if "timestep" in i["name"] else 0, dtype=dt)
        del random_inputs, example_inputs

        def run():
            sess.run(None, feeds)
    else:
        from sensitivity.export.onnx_format import random_inputs
        from sensitivity.graph.inputs import example_inputs

        kw = random_inputs(example_inputs(den, device="cpu", dtype=torch.float32), 0)

        def run():
            with torch.no_grad():
                return den(**kw, return_dict=False)[0]

    t = time.perf_counter()
    first = run()
    first_s = time.perf_counter() - t  # includes one-off work: onnxruntime's or the tiling tuner's first call
    if output and isinstance(first, torch.Tensor):
        np.save(output, first.detach().to(torch.float32).numpy())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    out = {"kind": kind, "load_s": load_s, "rss_base_mib": base, "rss_load_mib": rss_load,
           "rss_forward_mib": _rss_mib("VmHWM"), "forward_s": statistics.median(times), "forward_min_s": min(times),
           "forward_all_s": times, "first_forward_s": first_s}
    if kind.startswith("packed"):
        from sensitivity.export.runtime import tile_choices

        out["kernels"] = {k: sum(1 for v in den.sensitivity_export["runtime_kernels"].values() if v == k)
                          for k in ("on_the_fly", "cached", "int8_dynamic")}
        choices = tile_choices()
        out["tiled_shapes"] = [sum(1 for v in choices.values() if v), len(choices)]
    return out


def _merge_rounds(rows: list) -> list:
    """One row per (config, kind) from ``--rounds`` measurements: forward = median of all forwards, best =
    the fastest, first forward and load = medians, peak RSS = the largest; each round's row in ``rounds``."""
    merged: dict = {}
    for r in rows:
        merged.setdefault((r["config"], r["kind"]), []).append(r)
    out = []
    for (config, kind), rs in merged.items():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        row = dict(rs[0])
        row["forward_all_s"] = [t for r in rs for t in r["forward_all_s"]]
        row["forward_s"] = statistics.median(row["forward_all_s"])
        row["forward_min_s"] = min(row["forward_all_s"])
        for key in ("load_s", "first_forward_s"):
            if all(key in r for r in rs):
                row[key] = statistics.median(r[key] for r in rs)
        for key in ("rss_load_mib", "rss_forward_mib"):
            row[key] = max(r[key] for r in rs)
        row["rounds"] = [{k: r.get(k) for k in ("forward_s", "forward_min_s", "rss_forward_mib", "first_forward_s",
                                                 "tiled_shapes")} for r in rs]
        out.append(row)
    return out


def _output_errors(rows: list) -> None:
    """``output_err_vs_fp32`` of each PyTorch row: max |y - y_fp32| / max |y_fp32| on the same seeded inputs."""
    import numpy as np

    ref = next((r for r in rows if r["kind"] == "fp32" and r.get("output_path")), None)
    if ref is None:
        return
    y0 = np.load(ref["output_path"])
    for r in rows:
        if r.get("output_path"):
            y = np.load(r["output_path"])
            r["output_err_vs_fp32"] = float(np.abs(y - y0).max() / max(float(np.abs(y0).max()), 1e-30))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "README.md")


def _named_configs(values) -> list:
    """``--config [NAME=]PATH`` values as ``[(name, path)]`` (name: the file's stem when not given)."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).stem, v
        out.append((name, path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multiquantizer", required=False)
    ap.add_argument("--config", action="append", default=[], metavar="[NAME=]PATH",
                    help="a config to export and measure (repeat for several, each against the same fp32 row)")
    ap.add_argument("--kinds", default="fp32,packed:recorded,packed:on_the_fly,packed:cached,sdnq,onnx-fp32,onnx,"
                    "onnx:per_call",
                    help="rows to measure (comma-separated), for every config; a W8A8 config (act_bits 8) skips "
                         "sdnq and onnx rows and on_the_fly (its recorded policy is W8A8 on int8 kernels)")
    ap.add_argument("--w8a8", action="store_true", help="also packed:int8_dynamic (8-bit activations, torch._int_mm)")
    ap.add_argument("--options-only", action="store_true",
                    help="use the config's options with this multiquantizer even if the config names another one")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every row this many times, in alternating order (a fresh process each time); "
                         "a row's forward time is the median of all its forwards, its peak RSS the largest")
    ap.add_argument("--out-dir", default="benchmarks/results/export")
    ap.add_argument("--name", default=None, help="the JSON's name (default: the model's): OUT_DIR/NAME.json")
    ap.add_argument("--work-dir", default=None, help="where the exports go (default: OUT_DIR/<model>-exports)")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.repeats, args.threads, args.output)))
        return

    import importlib.util

    import torch

    from sensitivity.config import QuantConfig
    from sensitivity.export import export
    from sensitivity.io import atomic_write_text
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.zoo import get_family

    from sensitivity.provenance import run_provenance

    torch.set_num_threads(args.threads)
    started = run_provenance()
    fam = get_family(args.model)
    weights = fam.resolve_weights(args.weights)
    out_dir = Path(args.out_dir)
    work = Path(args.work_dir) if args.work_dir else out_dir / f"{args.model}-exports"
    work.mkdir(parents=True, exist_ok=True)
    mq = load_multiquantizer(args.multiquantizer)
    configs = {}
    for name, path in _named_configs(args.config):
        cfg = QuantConfig.load(path)
        if args.options_only:
            cfg = QuantConfig(dict(cfg.options), model=cfg.model, act_bits=cfg.act_bits)
        configs[name] = (path, cfg)
    base_kinds = [k for k in args.kinds.split(",") if k] + (["packed:int8_dynamic"] if args.w8a8 else [])
    have = {"sdnq": importlib.util.find_spec("sdnq") is not None, "onnx": importlib.util.find_spec("onnxruntime") is not None}
    base_kinds = [k for k in base_kinds if not (k == "sdnq" and not have["sdnq"])
                  and not (k.startswith("onnx") and not have["onnx"])]
    den = fam.load_denoiser(weights, seed=args.seed)
    source = {"family": fam.name, "weights": weights, "seed": args.seed, "model_id": fam.model_id(weights)}
    # (config name or None, kind) in measuring order; fp32 and onnx-fp32 once
    plan = [(None, k) for k in base_kinds if k in ("fp32", "onnx-fp32")]
    for name, (_, cfg) in configs.items():
        w8a8 = cfg.act_bits == 8
        plan += [(name, k) for k in base_kinds if k not in ("fp32", "onnx-fp32")
                 and not (w8a8 and k in ("sdnq", "packed:on_the_fly", "onnx:per_call"))]
    folders, meta = {None: {}}, {}
    fp32_dir = work / "fp32"
    if not fp32_dir.exists():
        den.save_pretrained(str(fp32_dir), safe_serialization=True)
    folders[None]["fp32"] = fp32_dir
    if any(k == "onnx-fp32" for _, k in plan):
        folders[None]["onnx-fp32"] = work / "onnx-fp32"
        export(den, mq, {}, folders[None]["onnx-fp32"], format="onnx", overwrite=True, source=source)
    for name, (path, cfg) in configs.items():
        folders[name], rec_any, export_s = {}, None, {}
        for fmt in ("packed", "sdnq", "onnx"):
            if not any(c == name and (k == fmt or k.startswith(fmt + ":")) for c, k in plan):
                continue
            folder = work / f"{name}-{fmt}"
            t = time.perf_counter()
            rec = export(den, mq, cfg, folder, format=fmt, overwrite=True, source=source)
            export_s[fmt] = time.perf_counter() - t
            folders[name][fmt], rec_any = folder, rec_any or rec
            if fmt == "onnx":
                export_s["onnx_check"] = rec.get("onnx_check")
            print(f"exported {name} as {fmt} in {export_s[fmt]:.1f} s", file=sys.stderr)
        quantized_paths = {p for s in mq.layers if s.name in cfg.options for p in (s.module_path,) + tuple(s.tied)}
        meta[name] = {"path": path, "act_bits": cfg.act_bits, "export_s": export_s,
                      "avg_bits": rec_any["avg_bits"] if rec_any else None,
                      "quantized_bytes": rec_any["quantized_bytes"] if rec_any else None,
                      "options": {o: sum(1 for v in cfg.options.values() if v == o) for o in sorted(set(cfg.options.values()))},
                      "unquantized_fp32_bytes": sum(4 * v.numel() for k, v in den.state_dict().items()
                                                    if not (k.endswith(".weight") and k[: -len(".weight")] in quantized_paths))}
    del den
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), SDNQ_USE_TORCH_COMPILE="0")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be 1 or more")
    order = [item for r in range(args.rounds) for item in (plan if r % 2 == 0 else plan[::-1])]
    for name, kind in order:
        fmt = kind.partition(":")[0]
        folder = folders[name][fmt]
        out_npy = out_dir / "outputs" / f"{name or 'config'}-{kind.replace(':', '-')}.npy"
        out_npy.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--measure", kind, "--dir", str(folder), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--output", str(out_npy)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measure {name} {kind} failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["config"] = name
        row["bytes_on_disk"] = _folder_bytes(folder)
        row["output_path"] = str(out_npy) if out_npy.is_file() else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "forward_all_s"}), file=sys.stderr)
    rows = _merge_rounds(rows)
    _output_errors(rows)
    first = next(iter(meta.values()), {})
    result = {
        "model": args.model, "weights": weights, "multiquantizer": args.multiquantizer, "configs": meta,
        # one-config runs keep the flat keys export_table.py reads
        "config": next(iter(configs.values()))[0] if len(configs) == 1 else None,
        "avg_bits": first.get("avg_bits"), "quantized_bytes": first.get("quantized_bytes"),
        "unquantized_fp32_bytes": first.get("unquantized_fp32_bytes", 0), "threads": args.threads,
        "repeats": args.repeats, "rounds": args.rounds, "calibrator_s": calibrator(), "loadavg": list(os.getloadavg()),
        "provenance": run_provenance(started), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(), "rows": rows,
        "command": "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name or args.model}.json"
    result["json_path"] = str(path)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    from export_table import table  # noqa: E402 - the benchmarks folder is on sys.path when run as a script

    print(table(result))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
