"""The cost table's summed layer latency vs a measured whole-model forward, and a latency-budget search.

```bash
python benchmarks/bench_latency.py --model digits-dit --weights shipped --threads 1 --out /tmp/bench_latency.json
python benchmarks/bench_latency.py --table /tmp/bench_latency.json      # the markdown table of a saved run
```
Builds (or takes, ``--multiquantizer``) a multiquantizer, measures its cost table
(``sensitivity.export.costs.measure_costs``, cached beside it), then for full precision, every uniform
option and the ``search_cost`` config at a latency budget 30% of the way from the fastest to the slowest config (scores: minus each option's
relative weight error) exports the packed model, reloads it and times whole forwards on the seeded
example inputs (warm-up, then ``--repeats`` rounds in which the models take turns; median). Every row: the table's summed layer latency, the
measured forward and their ratio (the part of a forward spent outside the weight layers, plus the
error of the additive model). The calibrator (``sum(range(10**7))`` seconds) and load average are
recorded beside the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def forward_seconds(models: dict, inputs, repeats: int) -> dict:
    """Median seconds of one forward per model; the models take turns in every round (a burst of load
    on a shared machine hits all of them alike)."""
    import torch

    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                m(**inputs)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**inputs)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args) -> dict:
    import pandas as pd
    import torch

    from sensitivity.export import export, load_quantized
    from sensitivity.export.costs import calibrator, measure_costs
    from sensitivity.graph.inputs import example_inputs
    from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer
    from sensitivity.search import AdditiveScorer, search_cost
    from sensitivity.threads import using_threads
    from sensitivity.zoo import get_family

    fam = get_family(args.model)
    den = fam.load_denoiser(args.weights)
    work = Path(tempfile.mkdtemp(prefix="bench_latency-"))
    if args.multiquantizer:
        mq = load_multiquantizer(args.multiquantizer)
    else:
        mq = build_multiquantizer(den, work / f"{args.model}.safetensors", fam.find_layers(den),
                                  model_id=fam.model_id(args.weights), options=tuple(args.options), progress=False)
    cal_before = calibrator()
    t0 = time.time()
    table = measure_costs(den, mq, repeats=args.repeats, threads=args.threads, seed=args.seed, progress=True)
    measure_s = time.time() - t0
    scores = AdditiveScorer(pd.DataFrame([(s.name, o, -mq.stats(s.name, o)["error"]) for s in mq.layers
                                          for o in mq.options], columns=["layer", "option", "score"]))
    units = table.unit_table("latency")
    target = round((0.7 * units.min_bytes() + 0.3 * units.max_bytes()) / 1e6, 4)  # a budget that binds
    searched = search_cost(scores, mq, table, target)
    configs = {"fp32": {}}
    configs.update({f"uniform {o}": {l: o for l in mq.layer_names} for o in mq.options})
    configs[f"search-latency @ {target} ms"] = searched.options
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() and k != "timestep" else v)
              for k, v in example_inputs(den, batch=1, device="cpu", dtype=torch.float32).items()}
    source = {"family": fam.name, "weights": args.weights, "seed": 0, "model_id": fam.model_id(args.weights)}
    models = {}
    for name, cfg in configs.items():
        if cfg:
            folder = work / name.replace(" ", "_").replace("@", "at")
            export(den, mq, cfg, folder, format="packed", source=source)
            models[name] = load_quantized(folder)
        else:
            models[name] = den
    with using_threads(table.meta["key"]["threads"]):
        whole = forward_seconds(models, inputs, args.repeats)
    rows = []
    for name, cfg in configs.items():
        summed = table.config_latency_ms(cfg)
        rows.append({"config": name, "avg_bits": round(mq.avg_bits(cfg), 4) if cfg else 16.0,
                     "summed_layers_ms": round(summed, 4), "forward_ms": round(1e3 * whole[name], 4),
                     "summed_over_forward": round(summed / (1e3 * whole[name]), 3)})
    return {"command": " ".join(sys.argv), "model": fam.model_id(args.weights), "multiquantizer": mq.hash,
            "options": list(mq.options), "threads": table.meta["key"]["threads"], "device": table.meta["key"]["device"],
            "torch": torch.__version__, "repeats": args.repeats, "cost_table_seconds": round(measure_s, 1),
            "target_latency_ms": target, "searched_latency_ms": round(searched.details["latency_ms"], 4),
            "calibrator_before": cal_before, "calibrator_after": calibrator(), "rows": rows}


def markdown(result: dict) -> str:
    cal = result["calibrator_before"]
    lines = [f"`{result['command']}` ({result['device']}, {result['threads']} thread(s), torch {result['torch']}; "
             f"`sum(range(10**7))` {cal['sum_range_1e7_s']} s, load average {cal['loadavg_1m']}):", "",
             "| config | avg bits | summed layer latency (table) ms | whole forward ms | summed / forward |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['avg_bits']} | {r['summed_layers_ms']} | {r['forward_ms']} | "
                     f"{r['summed_over_forward']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-dit")
    p.add_argument("--weights", default="shipped")
    p.add_argument("--multiquantizer", default=None, help="default: build one with --options in a temporary folder")
    p.add_argument("--options", nargs="+", default=["uaq-4", "uaq-3", "kmeans_c-3"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON of the run")
    p.add_argument("--table", default=None, help="print the markdown table of a saved run and exit")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
