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
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import List, Optional


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_weights_argument

    p = sub.add_parser(
        "search",
        help="find the best predicted config at an average-bit target (exact knapsack), or a baseline config",
        description="Exact multiple-choice knapsack over layers (or modules): average bits <= target, best "
        "predicted quality. Baselines (--baseline) write uniform, best-cached or error-ILP configs in the same format.",
    )
    src = p.add_argument_group("scores")
    src.add_argument("--predictor", help="trained predictor folder (predictors/NAME)")
    src.add_argument("--scores", help="CSV with columns layer, option, score (higher = better) instead of a predictor")
    p.add_argument("--multiquantizer", help="multiquantizer .safetensors (default: the predictor's)")
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
    p.add_argument("--solver", choices=("auto", "milp", "dp"), default="auto",
                   help="auto: LP-bound reduction + exact bounded DP (HiGHS fallback); milp: HiGHS on the reduced core; "
                   "dp: plain frontier DP (small instances)")
    b = p.add_argument_group("baselines")
    from ..allocators import ALLOCATORS  # torch-free: the allocator modules are imported on use

    b.add_argument("--baseline", choices=("uniform", "cache", "error-ilp") + ALLOCATORS.names(),
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


def _sizes(mq, options: Optional[str]):
    from ..sizes import SizeTable

    opts = [o.strip() for o in options.split(",") if o.strip()] if options else None
    return SizeTable.of(mq, opts)


def _allocator_inputs(args, predictor, mq, records, memo: dict) -> dict:
    """Keyword inputs of the allocator ``args.baseline``, computed once per command (memo)."""
    from ..errors import SensitivityError

    if "kw" in memo:
        return memo["kw"]
    kw: dict = {}
    if args.baseline == "hawq":
        from ..allocators.hawq import sensitivity_table
        from ..zoo import get_family

        fam_name, _, mq_weights = str(mq.model_id).partition(":")
        fam = get_family(fam_name)
        den = fam.load_denoiser(args.weights if args.weights is not None else (mq_weights or None))
        kw["sensitivity"] = sensitivity_table(mq, den, mode=args.hawq_mode, family=fam_name,
                                              num_samples=args.calibration_samples, seed=args.seed, progress=True)
    elif args.baseline == "mixdq":
        from ..allocators.mixdq import single_layer_table

        if not records:
            raise SensitivityError("--baseline mixdq needs --cache FILE with single-layer records "
                                   "(sensitivity sample --strategy single-layer)")
        kw["table"] = single_layer_table(records, args.mixdq_metric)
    elif args.baseline == "reference":
        if predictor is None:
            raise SensitivityError("--baseline reference needs --predictor DIR (its subgraph scores)")
        kw["layer_scores"] = predictor.layer_scores(mq)
        if args.level == "module":
            kw["module_scores"] = predictor.module_scores(mq, max_combinations=args.max_combinations)
    memo["kw"] = kw
    return kw


def _search_one(args, target, predictor, mq, mq_path, sizes, records, memo=None):
    from ..search import cache_best, error_ilp, search, uniform_config
    from ..sizes import SizeTable

    what = f"multiquantizer {mq_path}"
    if getattr(args, "target_memory", None) is not None:
        from ..search import memory_budget
        from ..search.memory import memory_result

        mb = memory_budget(mq, target, sizes, args.memory_model, what=what)
        if args.baseline == "error-ilp":
            res = error_ilp(mb.table, None, error=args.error, method=args.solver, what=what, budget=mb.budget)
        else:
            res = search(predictor, mq, None, level=args.level, max_combinations=args.max_combinations,
                         method=args.solver, sizes=mb.table, what=what, budget=mb.budget)
        return memory_result(res, mq, sizes, mb)
    from ..allocators import ALLOCATORS

    if args.baseline in ALLOCATORS:
        from ..allocators import allocate, sizes_for

        kw = _allocator_inputs(args, predictor, mq, records, {} if memo is None else memo)
        use = sizes_for(args.baseline, sizes)
        return allocate(args.baseline, use, target, what=what, method=args.solver, **kw)
    if args.baseline == "uniform":
        return uniform_config(SizeTable.from_multiquantizer(mq), args.option)
    if args.baseline == "error-ilp":
        return error_ilp(sizes, target, error=args.error, method=args.solver, what=what)
    if args.baseline == "cache":  # cached configs may use any option of the multiquantizer
        return cache_best(records, SizeTable.from_multiquantizer(mq), target, metric=args.metric)
    return search(predictor, mq, target, level=args.level, max_combinations=args.max_combinations,
                  method=args.solver, sizes=sizes, what=what)


def _report(res, args, path: Path) -> dict:
    d = {"method": res.method, "target_bits": res.target_bits, "avg_bits": round(res.avg_bits, 6),
         "quantized_bytes": res.quantized_bytes, "budget_bytes": res.budget_bytes, "objective": res.objective,
         "predicted": res.predicted, "option_mix": res.option_mix, "solve_seconds": round(res.seconds, 4),
         "config": str(path)}
    d.update({k: v for k, v in res.details.items() if k in ("metric", "metric_value", "candidates", "error", "level",
                                                          "target_memory", "memory_bytes", "memory_model",
                                                          "unquantized_bytes", "component_bytes",
                                                          "threshold", "lam", "configs_evaluated", "cpu_seconds", "mode")})
    return d


def _print(res, path: Path) -> None:
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


def _write_csv(df, path: Path) -> Path:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def run(args: argparse.Namespace) -> int:
    from ..checks import constraint_for
    from ..errors import SensitivityError
    from ..evaluation.cache import read_records
    from ..io import atomic_dir
    from ..predictors import load_predictor
    from ..costs import RUNTIME_MEMORY_MODEL
    from ..search import AdditiveScorer, bits_range, load_scores_csv, multiquantizer_for, parse_sweep

    if args.target_latency is not None or args.latency_sweep:
        return run_latency(args)
    runtime_memory = args.target_memory is not None and args.memory_model == RUNTIME_MEMORY_MODEL
    if args.costs and not runtime_memory:
        raise SensitivityError("--costs is read by --target-latency / --latency-sweep and --target-memory with "
                               f"--memory-model {RUNTIME_MEMORY_MODEL} only")
    if args.baseline is None and not (args.predictor or args.scores):
        raise SensitivityError("pass --predictor DIR (or --scores CSV), or choose a --baseline")
    if args.predictor and args.scores:
        raise SensitivityError("pass either --predictor or --scores, not both")
    if args.baseline == "uniform":
        if not args.option:
            raise SensitivityError("--baseline uniform needs --option (e.g. --option uaq-4)")
        if args.sweep:
            raise SensitivityError("--baseline uniform has no target; drop --sweep")
    elif args.target_bits is None and not args.sweep and args.target_memory is None:
        raise SensitivityError("pass --target-bits B, --target-memory SIZE or --sweep START:STOP:STEP")
    if args.target_memory is not None:
        from ..sizes import memory_model, memory_model_names, parse_bytes

        _register_runtime_memory_models()
        if not runtime_memory and args.memory_model not in memory_model_names():
            memory_model(args.memory_model)  # the one-line error naming the known models
        if args.baseline not in (None, "error-ilp"):
            raise SensitivityError(f"--target-memory works with the predictor search and --baseline error-ilp, "
                                   f"not --baseline {args.baseline}")
        args.target_memory_bytes = parse_bytes(args.target_memory)
    if args.baseline in ("cache", "mixdq") and not args.cache:
        raise SensitivityError(f"--baseline {args.baseline} needs --cache FILE")
    if args.baseline == "reference" and not args.predictor:
        raise SensitivityError("--baseline reference needs --predictor DIR (its subgraph scores)")
    if args.level == "module" and args.predictor is None and args.baseline is None:
        raise SensitivityError("--level module needs a --predictor with module scores (--scores has layer scores only)")

    predictor = load_predictor(args.predictor) if args.predictor else None
    mq, mq_path = multiquantizer_for(args.multiquantizer, predictor)
    if args.scores:
        predictor = AdditiveScorer(load_scores_csv(args.scores), name=args.scores)
    sizes = _sizes(mq, args.options)
    if runtime_memory:  # the layers' run-time bytes measured by `sensitivity costs`, the same --target-memory
        from ..costs import register_runtime_memory_model
        from ..export.costs import cost_table_for

        register_runtime_memory_model(cost_table_for(mq, args.costs), sizes.layers)
    records = read_records(args.cache) if args.cache else None

    targets: List[Optional[float]] = (parse_sweep(args.sweep) if args.sweep else
                                      [args.target_memory_bytes] if args.target_memory is not None else [args.target_bits])
    lo, hi = bits_range(sizes)
    span = f"the options of {mq_path}{' (--options)' if args.options else ''} span {lo:.4f}..{hi:.4f} avg bits"
    if args.baseline != "uniform" and args.target_memory is None:
        name = f"--sweep {args.sweep}: target" if args.sweep else "--target-bits"
        for t in targets:
            constraint_for("target_bits").check(name, t)
        if not args.sweep and args.target_bits > _ceil4(hi):
            raise SensitivityError(f"--target-bits {args.target_bits:g} is above {hi:.4f}, every layer at its "
                                   f"largest option; {span}")
    out = _checked_out(args.out, "--sweep" if args.sweep else None)
    with contextlib.ExitStack() as stack:
        # a sweep's folder appears with everything in it, or not at all
        folder = stack.enter_context(atomic_dir(out, "--out")) if args.sweep else None
        return _run_targets(args, targets, predictor, mq, mq_path, sizes, records, out, folder, hi)


def _checked_out(path: str, sweep: Optional[str]) -> Path:
    """``--out``: a folder for a sweep (``sweep`` names its flag), else a .json file; writable."""
    from ..errors import SensitivityError
    from ..io import check_writable

    out = Path(path)
    if sweep:
        if out.suffix == ".json":
            raise SensitivityError(f"{sweep} writes one config per target: --out must be a folder, not {out}")
        check_writable(out, "--out", directory=True)
    elif out.suffix != ".json":
        raise SensitivityError(f"--out must be a .json config file, got {out}")
    else:
        check_writable(out, "--out")
    return out


def _register_runtime_memory_models() -> None:
    """Import the export package so the run-time policies it defines register their memory models."""
    try:
        import sensitivity.export  # noqa: F401
    except ImportError:  # pragma: no cover - export is part of the package
        pass


def _ceil4(x: float) -> float:
    return math.ceil(x * 1e4 - 1e-9) / 1e4


def _run_targets(args, targets, predictor, mq, mq_path, sizes, records, out: Path, folder: Optional[Path],
                 hi: float) -> int:
    """Search every target; write into ``folder`` (the sweep's temporary folder) or ``out`` (one config)."""
    from ..errors import SensitivityError
    from ..search import predict_results, uniform_configs
    from ..sizes import SizeTable

    provenance = {"command": "search", "multiquantizer": mq_path, "predictor": args.predictor, "scores": args.scores,
                  "baseline": args.baseline, "level": args.level, "solver": args.solver,
                  "options": args.options, "cache": args.cache, "metric": args.metric if args.cache else None}
    act_bits = _act_bits(args, predictor)
    results, reports, memo = [], [], {}
    for t in targets:
        try:
            if args.sweep and t > _ceil4(hi):
                raise SensitivityError(f"above {hi:.4f} bits, every layer at its largest option")
            res = _search_one(args, t, predictor, mq, mq_path, sizes, records, memo)
        except SensitivityError as exc:
            if not args.sweep:
                raise
            print(f"target {t:g}: skipped ({exc})", file=sys.stderr)
            continue
        if predictor is not None and res.predicted is None:
            predict_results(predictor, [res])
        mq.validate(res.options)
        cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash,
                            **{k: v for k, v in provenance.items() if v is not None})
        cfg.act_bits = act_bits
        if "component_bytes" in res.details:
            cfg.provenance["component_bytes"] = dict(res.details["component_bytes"])
            cfg.provenance["target_memory"] = args.target_memory
        path = out / f"{res.method}-{t:.2f}.json" if args.sweep else out
        cfg.save(folder / path.name if args.sweep else path)
        results.append(res)
        reports.append(_report(res, args, path))
        if not args.json:
            _print(res, path)
    if not results:
        raise SensitivityError(f"no target of --sweep {args.sweep} is feasible")

    if args.sweep:
        import pandas as pd

        from .. import insights

        _write_csv(pd.DataFrame(reports).drop(columns=["option_mix"]), folder / "sweep.csv")
        full = SizeTable.from_multiquantizer(mq)
        extra = uniform_configs(full)
        if predictor is not None:
            predict_results(predictor, extra)
        if records and predictor is not None:
            preds = predictor.predict([r["config"] for r in records])
            records = [dict(r, predicted=float(p)) for r, p in zip(records, preds)]
        pt = insights.pareto_table(records, results + extra, metric=args.metric, sizes=full)
        _write_csv(pt, folder / "pareto.csv")
        written = []
        for y in ("predicted", args.metric):
            if y in pt and pt[y].notna().any():
                fig = insights.pareto_plot(pt, y=y)
                insights.save_figure(fig, folder / f"pareto_{y}.png")
                written.append(str(out / f"pareto_{y}.png"))
        if not args.json:
            print(f"sweep: {len(results)} configs, table {out / 'sweep.csv'}" + (f", plots {', '.join(written)}" if written else ""))
    if args.json:
        json.dump(reports if args.sweep else reports[0], sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
    return 0


def _act_bits(args, predictor) -> Optional[int]:
    """Activation bits of the written configs: those of the evaluations the predictor learned from
    (its cache's protocol), or --act-bits; a disagreement is refused."""
    from ..errors import SensitivityError

    learned = (getattr(predictor, "meta", None) or {}).get("act_bits") if predictor is not None else None
    given = getattr(args, "act_bits", None)
    if given is not None and learned is not None and int(given) != int(learned):
        raise SensitivityError(f"--act-bits {given}: predictor {args.predictor} learned from W·A{learned} evaluations")
    return given if given is not None else learned


# ---------------------------------------------------------------------------------------------
# latency budget
# ---------------------------------------------------------------------------------------------


def run_latency(args: argparse.Namespace) -> int:
    """``--target-latency`` / ``--latency-sweep``: the exact knapsack on the cost table's summed layer times."""
    from ..checks import check_values
    from ..errors import SensitivityError
    from ..export.costs import cost_table_for
    from ..io import atomic_dir
    from ..predictors import load_predictor
    from ..search import AdditiveScorer, load_scores_csv, multiquantizer_for, parse_sweep

    if args.baseline is not None:
        raise SensitivityError(f"--baseline {args.baseline} has a bit target; --target-latency searches with --predictor or --scores")
    if not (args.predictor or args.scores):
        raise SensitivityError("--target-latency needs --predictor DIR (or --scores CSV)")
    if args.predictor and args.scores:
        raise SensitivityError("pass either --predictor or --scores, not both")
    if args.level == "module" and args.predictor is None:
        raise SensitivityError("--level module needs a --predictor with module scores (--scores has layer scores only)")
    if args.latency_sweep:
        targets = parse_sweep(args.latency_sweep)
        name = f"--latency-sweep {args.latency_sweep}: target"
    else:
        targets, name = [args.target_latency], "--target-latency"
    for t in targets:
        if name == "--target-latency":
            check_values(target_latency=t)
        elif not t > 0:
            raise SensitivityError(f"{name} {t:g} ms: latency targets must be positive")
    out = _checked_out(args.out, "--latency-sweep" if args.latency_sweep else None)
    predictor = load_predictor(args.predictor) if args.predictor else None
    mq, mq_path = multiquantizer_for(args.multiquantizer, predictor)
    if args.scores:
        predictor = AdditiveScorer(load_scores_csv(args.scores), name=args.scores)
    costs = cost_table_for(mq, args.costs)
    sizes = _sizes(mq, args.options)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(atomic_dir(out, "--out")) if args.latency_sweep else None
        return _run_latency_targets(args, targets, predictor, mq, mq_path, sizes, costs, out, folder)


def _run_latency_targets(args, targets, predictor, mq, mq_path, sizes, costs, out: Path, folder: Optional[Path]) -> int:
    from ..errors import SensitivityError
    from ..search import predict_results, search, search_cost, uniform_configs
    from ..sizes import SizeTable

    provenance = {"command": "search", "multiquantizer": mq_path, "predictor": args.predictor, "scores": args.scores,
                  "level": args.level, "solver": args.solver, "options": args.options,
                  "costs": costs.meta.get("path"), "costs_device": (costs.meta.get("key") or {}).get("device")}
    provenance = {k: v for k, v in provenance.items() if v is not None}
    act_bits = _act_bits(args, predictor)
    what = f"multiquantizer {mq_path} with cost table {costs.meta.get('path')}"
    results, bits_results, reports = [], [], []
    for t in targets:
        try:
            res = search_cost(predictor, mq, costs, t, "latency", level=args.level, max_combinations=args.max_combinations,
                              method=args.solver, sizes=sizes, what=what)
        except SensitivityError as exc:
            if not args.latency_sweep:
                raise
            print(f"target {t:g} ms: skipped ({exc})", file=sys.stderr)
            continue
        mq.validate(res.options)
        cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, target_latency_ms=t, **provenance)
        cfg.act_bits = act_bits
        path = out / f"search-latency-{t:g}ms.json" if folder is not None else out
        cfg.save(folder / path.name if folder is not None else path)
        results.append(res)
        rep = _report(res, args, path)
        rep.update(target_latency_ms=t, latency_ms=round(res.details["latency_ms"], 6))
        reports.append(rep)
        if not args.json:
            print(f"{res.method}: summed layer latency {res.details['latency_ms']:.4f} ms (target {t:g} ms, "
                  f"{res.details['cost_units']} of {res.details['budget_units']} ns), avg bits {res.avg_bits:.4f}")
            if res.predicted is not None:
                print(f"  predicted score {res.predicted:.4f}; solved in {res.seconds * 1e3:.0f} ms")
            print(f"  option mix: {res.mix_text()}")
            print(f"  wrote {path}")
    if not results:
        raise SensitivityError(f"no target of --latency-sweep {args.latency_sweep} is feasible")
    if folder is not None:
        import pandas as pd

        from .. import insights

        # the bits-budget search at each latency config's bits: same predictor, other budget
        for res in results:
            b = _ceil4(res.avg_bits)
            r = search(predictor, mq, b, level=args.level, max_combinations=args.max_combinations, method=args.solver,
                       sizes=sizes, what=what)
            r.details["latency_ms"] = costs.config_latency_ms(r.options)
            cfg = r.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, **provenance)
            cfg.act_bits = act_bits
            cfg.save(folder / f"{r.method}-{b:.4f}.json")
            bits_results.append(r)
        extra = uniform_configs(SizeTable.from_multiquantizer(mq))
        predict_results(predictor, extra)
        _write_csv(pd.DataFrame(reports).drop(columns=["option_mix"]), folder / "sweep.csv")
        pt = insights.pareto_table(None, results + bits_results + extra, metric=args.metric,
                                   sizes=SizeTable.from_multiquantizer(mq), costs=costs)
        _write_csv(pt, folder / "pareto_latency.csv")
        fig = insights.pareto_plot(pt, y="predicted", x="latency_ms",
                                   title="predicted quality vs summed layer latency (measured)")
        insights.save_figure(fig, folder / "pareto_latency.png")
        if not args.json:
            print(f"latency sweep: {len(results)} configs + {len(bits_results)} bits-budget configs, table "
                  f"{out / 'sweep.csv'}, plot {out / 'pareto_latency.png'}")
    if args.json:
        json.dump(reports if folder is not None else reports[0], sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
    return 0
