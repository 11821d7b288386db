"""``sensitivity search``: the best predicted config at an exact average-bit target, and baselines.

    sensitivity search --predictor predictors/NAME --target-bits 3.9 [--multiquantizer FILE] --out quant_configs/NAME.json
    sensitivity search --predictor predictors/NAME --sweep 3.2:4.0:0.1 --out quant_configs/NAME/   # + Pareto plot
    sensitivity search --scores scores.csv --multiquantizer FILE --target-bits 3.9 --out X.json    # any (layer, option, score) table
    sensitivity search --baseline uniform --option uaq-4 --multiquantizer FILE --out X.json
    sensitivity search --baseline error-ilp --target-bits 3.9 --multiquantizer FILE --out X.json   # MixDQ / HAWQ style
    sensitivity search --baseline cache --cache evals/x.sqlite --target-bits 3.9 --multiquantizer FILE --out X.json
    sensitivity search --baseline sdnq --target-bits 3.9 --multiquantizer FILE --out X.json        # SDNQ's dynamic rule
    sensitivity search --baseline hawq --target-bits 3.9 --multiquantizer FILE --out X.json        # Hessian trace ILP
    sensitivity search --baseline mixdq --cache single.sqlite --target-bits 3.9 --multiquantizer FILE --out X.json
    sensitivity search --baseline reference --predictor predictors/NAME --target-bits 3.9 --out X.json  # top-1 + lambda
    sensitivity search --predictor predictors/NAME --target-latency 2.5 --out X.json   # summed layer ms (`sensitivity costs`)
    sensitivity search --predictor predictors/NAME --latency-sweep 2:4:0.5 --out DIR/  # + predicted vs latency plot
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_multiquantizer_argument, add_weights_argument

    p = sub.add_parser(
        "search",
        help="find the best predicted config at an average-bit target (exact knapsack), or a baseline config",
        description="Exact multiple-choice knapsack over layers (or modules): average bits <= target, best "
        "predicted quality. Baselines (--baseline) write uniform, best-cached or error-ILP configs in the same format.",
    )
    src = p.add_argument_group("scores")
    src.add_argument("--predictor", help="trained predictor folder (predictors/NAME)")
    src.add_argument("--scores", help="CSV with columns layer, option, score (higher = better) instead of a predictor")
    add_multiquantizer_argument(p, required=False, help="multiquantizer .safetensors (default: the predictor's)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--target-bits", type=float, help="average bits to reach or stay below, e.g. 3.9")
    tgt.add_argument("--target-memory", metavar="SIZE",
                     help="bytes of the whole pipeline's weights in memory to stay below, e.g. 4.5GB (10^9), 4GiB, "
                     "800MB: every layer as --memory-model holds it plus the unquantized tensors (and components "
                     "not in the multiquantizer) at fp16; with the predictor search or --baseline error-ilp")
    tgt.add_argument("--sweep", help="START:STOP:STEP (e.g. 3.2:4.0:0.1) or a comma list; --out is then a folder")
    tgt.add_argument("--target-latency", type=float, metavar="MS",
                     help="milliseconds: the SUM of the layers' measured forward times (table of `sensitivity costs`; "
                     "the ops between weight layers are not in it) to stay within")
    tgt.add_argument("--latency-sweep", metavar="START:STOP:STEP",
                     help="--target-latency at each value (ms); --out is a folder with the configs, the bits-budget "
                     "search at each found config's bits, and pareto_latency.png (predicted quality vs latency)")
    p.add_argument("--costs", help="cost table .json of `sensitivity costs` (default: the one beside the multiquantizer "
                   "measured on this machine with this torch)")
    p.add_argument("--memory-model", default="stored",
                   help="with --target-memory: how the run-time holds a layer (default 'stored': the stored bytes; "
                   "'runtime': the bytes its run-time module was measured to hold, from the cost table of `sensitivity "
                   "costs` (--costs); others registered with sensitivity.sizes.register_memory_model)")
    p.add_argument("--out", required=True, help="config .json to write (a folder with --sweep)")
    p.add_argument("--act-bits", type=int, choices=(8, 6), default=None,
                   help="activation bits written into the configs (default: those of the predictor's evaluations)")
    p.add_argument("--level", choices=("layer", "module"), default="layer",
                   help="knapsack groups: single layers (op level) or the predictor's modules (option combinations)")
    p.add_argument("--options", help="comma list of allowed options (default: all of the multiquantizer)")
    p.add_argument("--max-combinations", type=int, default=1296,
                   help="modules with more scored combinations fall back to per-layer groups (default 1296 = 6^4)")
    from ..workflows.search import WHOLE_PREDICTOR

    p.add_argument("--whole-predictor", choices=WHOLE_PREDICTOR, default="off",
                   help="bits budgets: re-rate the knapsack's configs at a few sub-targets and both levels with the "
                        "whole predictor (rerank), then improve the best by local moves under the same byte budget "
                        "(refine); default off: the knapsack on the additive scores")
    p.add_argument("--solver", choices=("auto", "milp", "dp"), default="auto",
                   help="auto: LP-bound reduction + exact bounded DP (HiGHS fallback); milp: HiGHS on the reduced core; "
                   "dp: plain frontier DP (small instances)")
    b = p.add_argument_group("baselines")
    from ..allocators import ALLOCATORS  # torch-free: the allocator modules are imported on use
    from ..workflows.search import SEARCH_BASELINES

    b.add_argument("--baseline", choices=SEARCH_BASELINES + ALLOCATORS.names(),
                   help="write a baseline config instead of the predictor's search (sdnq, hawq, mixdq, reference: "
                        "the allocators of sensitivity.allocators)")
    b.add_argument("--hawq-mode", choices=("trace", "fisher"), default="trace",
                   help="--baseline hawq: Hutchinson Hessian trace x ||dW||^2 (default) or empirical Fisher-weighted dW^2")
    b.add_argument("--calibration-samples", type=int, default=64,
                   help="--baseline hawq: calibration items (and Hutchinson probes) of the denoising loss (default 64)")
    add_weights_argument(b, help="--baseline hawq: the model's weights (default: the multiquantizer's)")
    b.add_argument("--mixdq-metric", default="mse",
                   help="--baseline mixdq: metric of the single-layer records in --cache (default mse vs full precision)")
    b.add_argument("--seed", type=int, default=0, help="--baseline hawq: seed of the calibration items and probes")
    b.add_argument("--option", help="--baseline uniform: the option of every layer (e.g. uaq-4)")
    b.add_argument("--cache", help="evaluation cache (.sqlite, or an export .parquet/.csv) for --baseline cache "
                   "and for the Pareto plot of --sweep")
    b.add_argument("--metric", default="fid", help="cache metric for --baseline cache and the Pareto plot (default fid)")
    b.add_argument("--error", default="error", choices=("error", "sse"),
                   help="--baseline error-ilp: relative error ||W-Q(W)||^2/||W||^2 (default) or absolute sse")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.search import search_configs

    done = search_configs(
        args.out, predictor=args.predictor, scores=args.scores, multiquantizer=args.multiquantizer,
        target_bits=args.target_bits, target_memory=args.target_memory, sweep=args.sweep,
        target_latency=args.target_latency, latency_sweep=args.latency_sweep, costs=args.costs,
        memory_model=args.memory_model, act_bits=args.act_bits, level=args.level, options=args.options,
        max_combinations=args.max_combinations, solver=args.solver, baseline=args.baseline,
        hawq_mode=args.hawq_mode, calibration_samples=args.calibration_samples, weights=args.weights,
        mixdq_metric=args.mixdq_metric, seed=args.seed, option=args.option, cache=args.cache, metric=args.metric,
        error=args.error, whole_predictor=args.whole_predictor, log=lambda text: print(text, file=sys.stderr))
    if args.json:
        reports = [c.report for c in done.configs]
        json.dump(reports if done.sweep else reports[0], sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
        return 0
    for c in done.configs:
        (_print_latency if done.latency else _print)(c.result, c.path)
    out = done.out
    if done.sweep and done.latency:
        print(f"latency sweep: {len(done.configs)} configs + {len(done.bits_results)} bits-budget configs, table "
              f"{out / 'sweep.csv'}, plot {out / 'pareto_latency.png'}")
    elif done.sweep:
        print(f"sweep: {len(done.configs)} configs, table {out / 'sweep.csv'}"
              + (f", plots {', '.join(map(str, done.plots))}" if done.plots else ""))
    return 0


def _print(res, path) -> None:
    head = f"{res.method}: avg bits {res.avg_bits:.4f}"
    if res.target_bits is not None:
        head += f" (target {res.target_bits:g}, {res.quantized_bytes} of {res.budget_bytes} bytes)"
    print(head)
    scores = []
    if res.predicted is not None:
        scores.append(f"predicted score {res.predicted:.4f}")
    if res.objective is not None:
        what = "summed error" if res.method.startswith("error-ilp") else "summed layer score"
        scores.append(f"{what} {res.objective:.6g}")
    if res.details.get("metric"):
        scores.append(f"{res.details['metric']} {res.details['metric_value']:.4f} (best of {res.details['candidates']} cached)")
    if scores:
        print("  " + ", ".join(scores) + (f"; solved in {res.seconds * 1e3:.0f} ms" if res.seconds else ""))
    print(f"  option mix: {res.mix_text()}")
    if "memory_bytes" in res.details:
        from ..sizes import format_bytes

        d = res.details
        print(f"  memory ({d['memory_model']}): {format_bytes(d['memory_bytes'])} of {format_bytes(d['target_memory'])}"
              f" ({format_bytes(d['unquantized_bytes'])} unquantized); "
              + ", ".join(f"{c} {format_bytes(b)}" for c, b in d["component_bytes"].items()))
    print(f"  wrote {path}")


def _print_latency(res, path) -> None:
    d = res.details
    print(f"{res.method}: summed layer latency {d['latency_ms']:.4f} ms (target {d['target']:g} ms, "
          f"{d['cost_units']} of {d['budget_units']} ns), avg bits {res.avg_bits:.4f}")
    if res.predicted is not None:
        print(f"  predicted score {res.predicted:.4f}; solved in {res.seconds * 1e3:.0f} ms")
    print(f"  option mix: {res.mix_text()}")
    print(f"  wrote {path}")
