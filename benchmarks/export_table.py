"""Markdown tables of ``bench_export.py`` results (the JSON it writes), every number a ratio to fp32's row.

    python benchmarks/export_table.py benchmarks/results/export/digits-dit.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

KERNELS = ("on_the_fly", "cached", "int8_dynamic")


def _configs(result: dict) -> dict:
    """``{name: meta}`` of the run's configs (one-config JSON without ``configs``: the flat keys)."""
    if result.get("configs"):
        return result["configs"]
    return {None: {"path": result.get("config"), "avg_bits": result.get("avg_bits"),
                   "quantized_bytes": result.get("quantized_bytes"),
                   "unquantized_fp32_bytes": result.get("unquantized_fp32_bytes", 0)}}


def table(result: dict) -> str:
    rows = result["rows"]
    ref = next(r for r in rows if r["kind"] == "fp32")
    onnx_ref = next((r for r in rows if r["kind"] == "onnx-fp32"), None)  # the forward of the same runtime
    configs = _configs(result)
    best = all("forward_min_s" in r for r in rows)
    first = all("first_forward_s" in r for r in rows)
    rounds = int(result.get("rounds", 1))
    head = (f"**{result['model']}** ({result['weights']}); {result['threads']} threads, median of "
            f"{result['repeats']} forwards after a warm-up"
            + (f" in each of {rounds} rounds (a fresh process per row and round, rows in alternating order; "
               f"peak RSS: the largest of the rounds)" if rounds > 1 else "") + f"; calibrator `sum(range(10**7))` {result['calibrator_s']:.2f} s, "
            f"load average {' / '.join(f'{x:.1f}' for x in result['loadavg'])} (at the end); torch {result['torch']}.")
    lines = [head, ""]
    for name, c in configs.items():
        mix = ", ".join(f"{o} x{n}" for o, n in (c.get("options") or {}).items())
        act = f", activations {c['act_bits']}-bit" if c.get("act_bits") else ""
        bits = f"{c['avg_bits']:.3f} avg bits" if c.get("avg_bits") is not None else "avg bits n/a"
        lines.append(f"- config {'`' + name + '`: ' if name else ''}`{c.get('path')}`: {bits}{act}"
                     f"{' (' + mix + ')' if mix else ''}")
    lines += ["", f"fp32: {ref['bytes_on_disk'] / 2**20:.2f} MiB on disk, load {ref['load_s']:.2f} s, "
              f"peak RSS {ref['rss_load_mib']:.0f} / {ref['rss_forward_mib']:.0f} MiB (load / forward), "
              f"forward {ref['forward_s']:.4f} s" + (f" (best {ref['forward_min_s']:.4f} s)." if best else "."), "",
              "| config | row | bytes on disk | x (quantized + unquantized fp32) | load time | peak RSS load | "
              "peak RSS forward | forward time | " + ("best forward | " if best else "")
              + ("first forward | " if first else "")
              + "forward vs onnx-fp32 | output error vs fp32 | kernels (on the fly / cached / int8) |",
              "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if best else "") + ("---:|" if first else "")
              + "---:|---:|---|"]
    for r in rows:
        c = configs.get(r.get("config"), {}) if r.get("config") in configs else {}
        target = (c.get("quantized_bytes") or 0) + c.get("unquantized_fp32_bytes", 0)
        k = r.get("kernels")
        kern = " / ".join(str(k.get(x, 0)) for x in KERNELS) if k else ""
        if k and r.get("tiled_shapes") and r["tiled_shapes"][1]:
            kern += f"; blocks in {r['tiled_shapes'][0]} of {r['tiled_shapes'][1]} layer shapes tried"
        vs_onnx = f"{r['forward_s'] / onnx_ref['forward_s']:.2f}" if onnx_ref and r["kind"].startswith("onnx") else ""
        err = f"{r['output_err_vs_fp32']:.2e}" if r.get("output_err_vs_fp32") is not None and r["kind"] != "fp32" else ""
        disk = f"{r['bytes_on_disk'] / target:.2f}" if target and r["kind"] not in ("fp32", "onnx-fp32") else ""
        lines.append(f"| {r.get('config') or ''} | {r['kind']} | {r['bytes_on_disk'] / ref['bytes_on_disk']:.3f} | {disk} "
                     f"| {r['load_s'] / ref['load_s']:.2f} | {r['rss_load_mib'] / ref['rss_load_mib']:.2f} "
                     f"| {r['rss_forward_mib'] / ref['rss_forward_mib']:.2f} | {r['forward_s'] / ref['forward_s']:.2f} | "
                     + (f"{r['forward_min_s'] / ref['forward_min_s']:.2f} | " if best else "")
                     + (f"{r['first_forward_s'] / ref['first_forward_s']:.2f} | " if first else "")
                     + f"{vs_onnx} | {err} | {kern} |")
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(paths) -> None:
    for p in paths:
        with open(p) as fh:
            print(table(json.load(fh)))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
