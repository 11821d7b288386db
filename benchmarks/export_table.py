"""Markdown tables of ``bench_export.py`` results (the JSON it writes), every number a ratio to fp32's row.

    python benchmarks/export_table.py benchmarks/results/export/digits-dit.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def table(result: dict) -> str:
    rows = result["rows"]
    ref = next(r for r in rows if r["kind"] == "fp32")
    onnx_ref = next((r for r in rows if r["kind"] == "onnx-fp32"), None)  # the forward of the same runtime
    target = (result.get("quantized_bytes") or 0) + result.get("unquantized_fp32_bytes", 0)
    head = (f"**{result['model']}** ({result['weights']}), config `{result['config']}`: {result['avg_bits']:.3f} avg bits; "
            f"{result['threads']} threads, median of {result['repeats']} forwards; calibrator "
            f"`sum(range(10**7))` {result['calibrator_s']:.2f} s, load average "
            f"{' / '.join(f'{x:.1f}' for x in result['loadavg'])}; torch {result['torch']}.")
    lines = [head, "", f"fp32: {ref['bytes_on_disk'] / 2**20:.2f} MiB on disk, load {ref['load_s']:.2f} s, "
             f"peak RSS {ref['rss_load_mib']:.0f} / {ref['rss_forward_mib']:.0f} MiB (load / forward), "
             f"forward {ref['forward_s']:.4f} s.", "",
             "| row | bytes on disk | x (quantized + unquantized fp32) | load time | peak RSS load | peak RSS forward "
             "| forward time | forward vs onnx-fp32 | kernels (on the fly / cached / int8) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        k = r.get("kernels")
        kern = f"{k['on_the_fly']} / {k['cached']} / {k['int8_dynamic']}" if k else ""
        vs_onnx = f"{r['forward_s'] / onnx_ref['forward_s']:.2f}" if onnx_ref and r["kind"].startswith("onnx") else ""
        disk = f"{r['bytes_on_disk'] / target:.2f}" if target and r["kind"] not in ("fp32", "onnx-fp32") else ""
        lines.append(f"| {r['kind']} | {r['bytes_on_disk'] / ref['bytes_on_disk']:.3f} | {disk} "
                     f"| {r['load_s'] / ref['load_s']:.2f} | {r['rss_load_mib'] / ref['rss_load_mib']:.2f} "
                     f"| {r['rss_forward_mib'] / ref['rss_forward_mib']:.2f} | {r['forward_s'] / ref['forward_s']:.2f} "
                     f"| {vs_onnx} | {kern} |")
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(paths) -> None:
    for p in paths:
        with open(p) as fh:
            print(table(json.load(fh)))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
