"""Export benchmark: bytes on disk per format, load time, peak RSS, forward time vs the float model.

    python benchmarks/bench_export.py --model digits-dit --weights shipped \
        --multiquantizer multiquantizers/digits-dit.safetensors --config quant_configs/digits-dit-w36.json
    python benchmarks/bench_export.py --model sd15 --weights random \
        --multiquantizer multiquantizers/sd15-uaq.safetensors --config quant_configs/sd15-w39.json --formats packed

Each load / forward runs in a fresh subprocess (``--measure``), so its peak RSS (``VmHWM``) is its own:
``rss_load`` is the peak after loading, ``rss_forward`` the peak after one more forward (batch 1, native
size, seeded inputs). Forward time: median of ``--repeats`` forwards after one warm-up. The table goes to
stdout (markdown) and ``--out-dir``/``<model>.json``.
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


def measure(kind: str, folder: str, model: str, weights: str, seed: int, repeats: int) -> dict:
    import torch

    from sensitivity.zoo import get_family

    fam = get_family(model)
    base = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    if kind == "fp32":
        den = fam.load_denoiser(weights, seed=seed)
    elif kind == "fp16":
        den = fam.load_denoiser(weights, seed=seed, dtype="fp16")
    elif kind in ("packed", "packed-materialize", "sdnq"):
        from sensitivity.export import load_quantized

        den = load_quantized(folder, materialize=kind == "packed-materialize")
    elif kind == "onnx":
        import onnxruntime as ort

        rec = json.loads((Path(folder) / "sensitivity_export.json").read_text())
        sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    rss_load = _rss_mib("VmHWM")
    if kind == "onnx":
        import numpy as np

        from sensitivity.export.onnx_format import random_inputs  # noqa: F401

        gen = np.random.default_rng(0)
        feeds = {i["name"]: (gen.standard_normal(i["shape"]).astype(np.float32) if i["dtype"].startswith("float")
                             and "timestep" not in i["name"] else np.full(i["shape"], 500 if "timestep" in i["name"] else 0,
                                                                          dtype=getattr(np, i["dtype"])))
                 for i in rec["inputs"]}

        def run():
            sess.run(None, feeds)
    else:
        from sensitivity.export.onnx_format import random_inputs
        from sensitivity.graph.inputs import example_inputs

        kw = random_inputs(example_inputs(den, device="cpu", dtype=torch.float32), 0)
        if kind == "fp16":
            kw = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}

        def run():
            with torch.no_grad():
                den(**kw, return_dict=False)

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"kind": kind, "load_s": load_s, "rss_base_mib": base, "rss_load_mib": rss_load,
            "rss_forward_mib": _rss_mib("VmHWM"), "forward_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multiquantizer")
    ap.add_argument("--config")
    ap.add_argument("--formats", default="packed,sdnq,onnx")
    ap.add_argument("--baselines", default="fp32,fp16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default="benchmarks/results/export")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.model, args.weights, args.seed, args.repeats)))
        return

    from sensitivity.export import export
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family(args.model)
    weights = fam.resolve_weights(args.weights)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mq = load_multiquantizer(args.multiquantizer)
    formats = [f for f in args.formats.split(",") if f]
    rows = []
    den = fam.load_denoiser(weights, seed=args.seed)
    pipe = None
    exports = {}
    for fmt in formats:
        folder = out_dir / f"{args.model}-{fmt}"
        t = time.perf_counter()
        rec = export(den, mq, args.config, folder, format=fmt, overwrite=True,
                     source={"family": fam.name, "weights": weights, "seed": args.seed, "model_id": fam.model_id(weights)})
        exports[fmt] = (folder, rec, time.perf_counter() - t)
        print(f"exported {fmt} in {exports[fmt][2]:.1f} s", file=sys.stderr)
    del den, pipe
    kinds = [k for k in args.baselines.split(",") if k] + [k for f in formats
                                                            for k in ([f, "packed-materialize"] if f == "packed" else [f])]
    quantized = fp16 = None
    for kind in kinds:
        fmt = "packed" if kind.startswith("packed") else kind
        folder = str(exports[fmt][0]) if fmt in exports else ""
        env = dict(os.environ, PYTHONPATH=str(ROOT), SDNQ_USE_TORCH_COMPILE="0")
        cmd = [sys.executable, __file__, "--measure", kind, "--dir", folder, "--model", args.model,
               "--seed", str(args.seed), "--repeats", str(args.repeats)] + (["--weights", weights] if weights else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"measure {kind} failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        if fmt in exports:
            rec = exports[fmt][1]
            quantized, fp16 = rec["quantized_bytes"], rec["fp16_bytes"]
            row.update(bytes_on_disk=rec["bytes_on_disk"], export_s=exports[fmt][2], avg_bits=rec["avg_bits"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    speed = subprocess.run([sys.executable, "-c", "import time;t=time.time();sum(range(10**7));print(time.time()-t)"],
                           capture_output=True, text=True).stdout.strip()
    ref = next((r for r in rows if r["kind"] == "fp32"), None)
    lines = [f"{args.model} ({weights}), config {args.config}: {rows[-1].get('avg_bits', float('nan')):.3f} avg bits, "
             f"quantized bytes {quantized / 2**20:.2f} MiB, fp16 {fp16 / 2**20:.2f} MiB; machine speed {speed} s",
             "", "| model | MiB on disk | x quantized bytes | x fp16 | load s | peak RSS load MiB | peak RSS forward MiB "
             "| forward s | x fp32 forward |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r.get("bytes_on_disk")
        disk = f"{b / 2**20:.2f} | {b / quantized:.3f} | {b / fp16:.3f}" if b else "– | – | –"
        rel = f"{r['forward_s'] / ref['forward_s']:.2f}" if ref else "–"
        lines.append(f"| {r['kind']} | {disk} | {r['load_s']:.2f} | {r['rss_load_mib']:.0f} | {r['rss_forward_mib']:.0f} "
                     f"| {r['forward_s']:.4f} | {rel} |")
    table = "\n".join(lines)
    print(table)
    (out_dir / f"{args.model}.json").write_text(json.dumps({"rows": rows, "speed_s": speed, "table": table}, indent=1))


if __name__ == "__main__":
    main()
