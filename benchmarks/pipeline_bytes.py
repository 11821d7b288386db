"""Bytes per pipeline component of the official configs (meta weights: shapes only, no memory).

For each model: every component's parameters and fp16 bytes, the bytes of its quantizable layers
(the layer rules of ``sensitivity.components``) and of the rest (unquantized: embeddings, norms,
biases, the VAE encoder), then the whole pipeline at every quantized layer ``uaq-4`` / ``uaq-3``
(stored bytes) and at a whole-pipeline memory budget (``--target-memory``; default ``mid``: per model, halfway
between all ``uaq-3`` and all ``uaq-4``) with the same exact solver as ``sensitivity search``. Without
weights there is no quality predictor, so that config is solved with the ``bits`` scorer (each layer
scores its option's bits: the most bits that fit); it shows where a whole-pipeline budget lands per
component, not which layers are sensitive.

    PYTHONPATH=. python benchmarks/pipeline_bytes.py --out pipeline_bytes.json
    python scripts/results_tables.py pipeline-bytes pipeline_bytes.json   # docs/results/pipeline-bytes.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = ("sd15", "sdxl", "pixart-alpha", "hunyuan-dit")
OPTIONS = ("uaq-4", "uaq-3")


def measure(model: str, target_bytes) -> dict:
    import pandas as pd

    from sensitivity.components import component_layers
    from sensitivity.pipeline_quant import _pipeline_names, load_component, prefixed_layers
    from sensitivity.search import memory_budget, search_scores
    from sensitivity.search.memory import component_bytes, fixed_bytes
    from sensitivity.sizes import SizeTable
    from sensitivity.zoo import get_family

    fam = get_family(model)
    comps, shapes = {}, {}
    for name in _pipeline_names(fam, "meta", 0):
        module = load_component(fam, "meta", name, materialize=False)
        layers = prefixed_layers(name, component_layers(fam, name, module))
        params = sum(p.numel() for p in module.parameters())
        layer_numel = sum(s.numel * (1 + len(s.tied)) for s in layers)
        comps[name] = {"class": type(module).__name__, "params": params, "fp16_bytes": 2 * params,
                       "layers": len(layers), "layer_fp16_bytes": 2 * layer_numel,
                       "unquantized_fp16_bytes": 2 * (params - layer_numel)}
        shapes.update({s.name: s.shape for s in layers})
        del module

    class _Sizes:  # what memory_budget reads of a multiquantizer: its components
        components = comps

    table = SizeTable.from_shapes(shapes, OPTIONS)
    out = {"model": model, "components": comps, "fp16_bytes": sum(c["fp16_bytes"] for c in comps.values())}
    for opt in OPTIONS:
        out[f"all_{opt}"] = component_bytes(_Sizes, {l: opt for l in table.layers}, table)
    lo, hi = table.min_bytes() + fixed_bytes(_Sizes), table.max_bytes() + fixed_bytes(_Sizes)
    if target_bytes is None:
        target_bytes = (lo + hi) // 2
    mb = memory_budget(_Sizes, target_bytes, table) if target_bytes >= lo else None
    if mb is not None:
        rows = [(l, o, float(table.nbytes[table.index[l], table.opt_index[o]])) for l, o, _ in table.entries()]
        scores = pd.DataFrame(rows, columns=["layer", "option", "score"])
        res = search_scores(scores, table, None, budget=mb.budget)
        out["target"] = {"bytes": target_bytes, "config_bytes": component_bytes(_Sizes, res.options, table),
                         "option_mix": res.option_mix}
    else:
        out["target"] = {"bytes": target_bytes, "infeasible": True,
                         "min_bytes": table.min_bytes() + fixed_bytes(_Sizes)}
    return out


def markdown(report: dict) -> str:
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    what = "halfway between all uaq-3 and all uaq-4" if report["target_bytes"] is None else \
        f"{report['target_bytes'] / 1e9:g} GB"
    lines = [f"Bytes per component (GB, 10^9), official configs on meta weights; the budget ({what}) solved with "
             f"the bits scorer (`{report['command']}`).", "",
             "| model | component | params (M) | fp16 | quantizable layers fp16 | all uaq-4 | all uaq-3 | at budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["models"]:
        tgt = r["target"]
        for name, c in r["components"].items():
            at = gb(tgt["config_bytes"][name]) if "config_bytes" in tgt else "infeasible"
            lines.append(f"| {r['model']} | {name} ({c['class']}) | {c['params'] / 1e6:.1f} | {gb(c['fp16_bytes'])} | "
                         f"{gb(c['layer_fp16_bytes'])} | {gb(r['all_uaq-4'][name])} | {gb(r['all_uaq-3'][name])} | {at} |")
        total = (f"{gb(sum(tgt['config_bytes'].values()))} (budget {gb(tgt['bytes'])})" if "config_bytes" in tgt
                 else f"min {gb(tgt['min_bytes'])}")
        lines.append(f"| {r['model']} | **pipeline** | {sum(c['params'] for c in r['components'].values()) / 1e6:.1f} | "
                     f"{gb(r['fp16_bytes'])} | {gb(sum(c['layer_fp16_bytes'] for c in r['components'].values()))} | "
                     f"{gb(sum(r['all_uaq-4'].values()))} | {gb(sum(r['all_uaq-3'].values()))} | {total} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--target-memory", default="mid", help="a size (4.5GB) or 'mid' (per model, see above)")
    ap.add_argument("--out", default="pipeline_bytes.json")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a result file and exit")
    args = ap.parse_args(argv)
    if args.table:
        sys.stdout.write(markdown(json.loads(Path(args.table).read_text())))
        return 0
    from sensitivity.io import atomic_write_text
    from sensitivity.provenance import run_provenance
    from sensitivity.sizes import parse_bytes

    started = run_provenance()

    target = None if args.target_memory == "mid" else parse_bytes(args.target_memory)
    t0 = time.time()
    report = {"command": "PYTHONPATH=. python benchmarks/pipeline_bytes.py " + " ".join(argv or sys.argv[1:]),
              "target_bytes": target, "options": list(OPTIONS),
              "models": [measure(m, target) for m in args.models.split(",")], "seconds": round(time.time() - t0, 1)}
    report["provenance"] = run_provenance(started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
