"""Benchmark the exact knapsack search on an SDXL-size instance (803 layers x 6 options).

Layer shapes are drawn from the shapes of SDXL's UNet (Linear and Conv2d weights, realistic byte
sizes from :mod:`sensitivity.options`); scores are synthetic and seeded. Prints the solve time per
target and per score model, and checks every result against the budget.

    PYTHONPATH=. python benchmarks/bench_search.py [--layers 803] [--seed 0] [--milp-check]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm import tqdm

from sensitivity.options import OPTION_NAMES
from sensitivity.search import (
    budget_bytes, build_groups, fp16_total, layer_groups, parse_sweep, size_table, solve_groups, solve_mckp,
)

# (shape, relative frequency) of SDXL UNet weight layers (attention / FF linears, resnet convs, 1x1 projections)
SDXL_SHAPES = [
    ((640, 640), 20), ((1280, 1280), 40), ((640, 2048), 4), ((1280, 2048), 8),
    ((5120, 640), 3), ((640, 2560), 3), ((10240, 1280), 6), ((1280, 5120), 6),
    ((320, 320, 3, 3), 2), ((640, 640, 3, 3), 3), ((1280, 1280, 3, 3), 3), ((1280, 2560, 3, 3), 1),
    ((640, 1280), 2), ((1280, 1280, 1, 1), 1), ((320, 1280), 1), ((640, 320, 3, 3), 1),
]


def sdxl_like_shapes(n_layers: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes, p = zip(*SDXL_SHAPES)
    p = np.asarray(p, dtype=float) / sum(p)
    idx = rng.choice(len(shapes), size=n_layers, p=p)
    return {f"layer.{i:04d}": shapes[k] for i, k in enumerate(idx)}


def synthetic_scores(sizes, seed: int, model: str):
    """Per-(layer, option) scores, higher = better. ``correlated``: score tracks bytes (harder)."""
    rng = np.random.default_rng(seed)
    bits = sizes["option"].str[-1].astype(int).to_numpy()
    sens = {l: rng.lognormal(0, 1) for l in dict.fromkeys(sizes["layer"])}
    s = np.array([sens[l] for l in sizes["layer"]])
    if model == "correlated":
        score = -s * (2.0 ** -bits) * 16 + 1e-3 * rng.normal(size=len(sizes))
    else:
        score = -s * (2.0 ** -bits) * 16 * rng.uniform(0.5, 1.5, size=len(sizes))
    return sizes[["layer", "option"]].assign(score=score)


def synthetic_modules(sizes, scores, n_modules: int, seed: int):
    """Module scores: groups of 4 consecutive layers, all 6**4 combinations, sum of layer scores + noise."""
    import itertools

    import pandas as pd

    rng = np.random.default_rng(seed)
    lut = {(l, o): s for l, o, s in zip(scores["layer"], scores["option"], scores["score"])}
    layers = list(dict.fromkeys(sizes["layer"]))
    combos = list(itertools.product(OPTION_NAMES, repeat=4))
    frames = []
    for m in range(min(n_modules, len(layers) // 4)):
        ls = tuple(layers[4 * m: 4 * m + 4])
        base = np.array([sum(lut[(l, o)] for l, o in zip(ls, c)) for c in combos])
        frames.append(pd.DataFrame({"module": f"module{m}", "layers": [ls] * len(combos), "options": combos,
                                    "score": base + 0.05 * rng.normal(size=len(combos))}))
    return pd.concat(frames, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=803)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="3.1:4.1:0.1")
    ap.add_argument("--modules", type=int, default=150,
                    help="module-level instance: this many modules of 4 layers x 1296 combinations (0: skip)")
    ap.add_argument("--milp-check", action="store_true",
                    help="also solve with method='milp' (HiGHS on the reduced core) and compare values and times")
    ap.add_argument("--json", default=None, help="also write the results (with the run's provenance) as JSON here")
    args = ap.parse_args(argv)
    from sensitivity.provenance import run_provenance

    started = run_provenance()

    sizes = size_table(sdxl_like_shapes(args.layers, args.seed), OPTION_NAMES)
    targets = parse_sweep(args.targets)
    print(f"instance: {args.layers} layers x {len(OPTION_NAMES)} options, {fp16_total(sizes) / 2**30:.2f} GiB fp16")
    worst = 0.0
    rows = []
    for model in ("independent", "correlated"):
        groups = layer_groups(synthetic_scores(sizes, args.seed, model), sizes)
        for t in tqdm(targets, desc=f"targets ({model})", leave=False):
            try:
                res = solve_groups(groups, sizes, t)
            except Exception as exc:  # infeasible low targets are reported, not fatal
                rows.append((model, t, None, None, str(exc)[:60]))
                continue
            assert res.quantized_bytes <= budget_bytes(t, fp16_total(sizes))
            note = ""
            if args.milp_check:
                t0 = time.perf_counter()
                sol = solve_mckp([g.costs for g in groups], [g.values for g in groups], res.budget_bytes, method="milp")
                note = f"| milp {1e3 * (time.perf_counter() - t0):7.1f} ms, value diff {sol.value - res.objective:+.2e}"
            worst = max(worst, res.seconds)
            rows.append((model, t, res.seconds, res.avg_bits, note))
    if args.modules:
        scores = synthetic_scores(sizes, args.seed, "independent")
        mods = synthetic_modules(sizes, scores, args.modules, args.seed)
        t0 = time.perf_counter()
        groups = build_groups(scores, sizes, mods)
        build = time.perf_counter() - t0
        n_choices = sum(len(g.costs) for g in groups)
        for t in tqdm(targets, desc="targets (modules)", leave=False):
            try:
                res = solve_groups(groups, sizes, t)
            except Exception as exc:
                rows.append(("modules", t, None, None, str(exc)[:60]))
                continue
            note = f"| {len(groups)} groups, {n_choices} choices, groups built in {build:.2f} s"
            if args.milp_check:
                t0 = time.perf_counter()
                sol = solve_mckp([g.costs for g in groups], [g.values for g in groups], res.budget_bytes, method="milp")
                note += f" | milp {1e3 * (time.perf_counter() - t0):7.1f} ms, value diff {sol.value - res.objective:+.2e}"
            worst = max(worst, res.seconds)
            rows.append(("modules", t, res.seconds, res.avg_bits, note))
    for model, t, sec, ab, note in rows:
        if sec is None:
            print(f"{model:12s} target {t:4.2f}: {note}")
        else:
            print(f"{model:12s} target {t:4.2f}: solve {sec * 1e3:7.1f} ms, avg bits {ab:.4f} {note}")
    print(f"summary: {sum(r[2] is not None for r in rows)} solves, slowest {worst * 1e3:.1f} ms (goal <= 1000 ms)")
    if args.json:
        import json

        from sensitivity.io import atomic_write_text

        out = {"layers": args.layers, "options": len(OPTION_NAMES), "seed": args.seed, "targets": args.targets,
               "modules": args.modules, "solves": [{"scores": m, "target": t, "seconds": sec, "avg_bits": ab,
                                                    "note": note.strip("| ")} for m, t, sec, ab, note in rows],
               "slowest_seconds": worst, "provenance": run_provenance(started)}
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
