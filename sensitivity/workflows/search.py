"""The ``search`` command's work as one call: configs at exact budgets, sweeps with their Pareto tables, baselines.

```python
from sensitivity.workflows.search import search_configs
run = search_configs("quant_configs/x.json", predictor="predictors/x", target_bits=3.9)
run.configs[0].result.avg_bits, run.configs[0].path
search_configs("quant_configs/x/", predictor="predictors/x", sweep="3.2:4.0:0.1")  # + sweep.csv, pareto.csv, plots
search_configs("x.json", multiquantizer="mq.safetensors", baseline="error-ilp", target_bits=3.9)
search_configs("x.json", predictor="predictors/x", target_latency=2.5)  # ms: summed layer times of a cost table
```
One target writes one config ``.json``; a sweep (``sweep`` / ``latency_sweep``) writes a folder that
appears whole, with a config per feasible target, ``sweep.csv`` and the Pareto table and plots.
Every input is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]

#: ``SearchResult.details`` keys copied into a config's summary row (``--json``, ``sweep.csv``)
REPORT_DETAILS = ("metric", "metric_value", "candidates", "error", "level", "target_memory", "memory_bytes",
                  "memory_model", "unquantized_bytes", "component_bytes", "threshold", "lam", "configs_evaluated",
                  "cpu_seconds", "mode", "moves", "gain", "knapsack_rating")

#: ``whole_predictor`` modes: the additive knapsack alone, its candidates re-rated, then local moves
WHOLE_PREDICTOR = ("off", "rerank", "refine")

#: ``baseline`` names that are not allocators of :data:`sensitivity.allocators.ALLOCATORS`
SEARCH_BASELINES = ("uniform", "cache", "error-ilp")


class SearchedConfig(NamedTuple):
    """One written config: the search result, the config's path (in ``out`` for a sweep) and its summary row."""

    result: Any
    path: Path
    report: Dict[str, Any]


class SearchRun(NamedTuple):
    """What :func:`search_configs` wrote: the configs, ``out``, whether it was a sweep (a folder), whether the
    budget was latency, the skipped targets ``(target, reason)``, the plots written, and (latency sweeps)
    the bits-budget searches at each latency config's bits."""

    configs: List[SearchedConfig]
    out: Path
    sweep: bool
    latency: bool
    skipped: List[Tuple[float, str]]
    plots: List[Path]
    bits_results: List[Any]


def search_report(res: Any, path: PathLike) -> Dict[str, Any]:
    """The summary row of one written config (``--json``; a sweep's ``sweep.csv`` less ``option_mix``)."""
    d = {"method": res.method, "target_bits": res.target_bits, "avg_bits": round(res.avg_bits, 6),
         "quantized_bytes": res.quantized_bytes, "budget_bytes": res.budget_bytes, "objective": res.objective,
         "predicted": res.predicted, "option_mix": res.option_mix, "solve_seconds": round(res.seconds, 4),
         "config": str(path)}
    d.update({k: v for k, v in res.details.items()
              if k in REPORT_DETAILS and not isinstance(v, (list, tuple))})  # refined_search's candidate list stays out
    return d


def search_configs(out: PathLike, *, predictor: Any = None, scores: Optional[PathLike] = None,
                   multiquantizer: Optional[PathLike] = None, target_bits: Optional[float] = None,
                   target_memory: Union[str, int, None] = None, sweep: Optional[str] = None,
                   target_latency: Optional[float] = None, latency_sweep: Optional[str] = None,
                   costs: Optional[PathLike] = None, memory_model: str = "stored", act_bits: Optional[int] = None,
                   level: str = "layer", options: Union[str, Sequence[str], None] = None,
                   max_combinations: int = 1296, solver: str = "auto", baseline: Optional[str] = None,
                   hawq_mode: str = "trace", calibration_samples: int = 64, weights: Optional[str] = None,
                   mixdq_metric: str = "mse", seed: int = 0, option: Optional[str] = None,
                   cache: Optional[PathLike] = None, metric: str = "fid", error: str = "error",
                   whole_predictor: str = "off", log: Optional[Callable[[str], None]] = None) -> SearchRun:
    """Search (or allocate with ``baseline``) and write the configs; see the module docstring.

    Scores: ``predictor`` (a predictor folder or a loaded predictor) or ``scores`` (a CSV of layer, option,
    score); ``multiquantizer`` defaults to the predictor's. One budget: ``target_bits`` (average bits),
    ``target_memory`` (bytes of the whole pipeline in memory, e.g. ``"4.5GB"``, as ``memory_model`` holds
    it), ``sweep`` (``"3.2:4.0:0.1"`` or a comma list of bits), ``target_latency`` (ms of summed layer times
    of the ``costs`` table) or ``latency_sweep``. ``options`` restricts the allowed options; ``level``:
    ``"layer"`` or ``"module"`` groups (up to ``max_combinations``); ``solver``: auto / milp / dp.
    ``baseline``: uniform (``option``), cache (best of ``cache`` by ``metric``), error-ilp (``error``) or an
    allocator (hawq: ``hawq_mode``, ``calibration_samples``, ``weights``, ``seed``; mixdq: ``cache``,
    ``mixdq_metric``; reference, sdnq). ``act_bits``: the configs' activation bits (default: the
    predictor's evaluations'). ``whole_predictor`` (bits budgets, predictor search): ``off`` (the knapsack on
    the additive scores), ``rerank`` (the knapsack's configs at a few sub-targets and both levels, re-rated
    by the whole predictor) or ``refine`` (then local moves under the same byte budget):
    :func:`sensitivity.search.refined_search`. ``log`` gets a line per skipped sweep target.
    """
    from ..checks import check_values

    targets = {"target_bits": target_bits, "target_memory": target_memory, "sweep": sweep,
               "target_latency": target_latency, "latency_sweep": latency_sweep}
    given = [k for k, v in targets.items() if v is not None]
    if len(given) > 1:
        raise SensitivityError(f"--{given[0].replace('_', '-')} and --{given[1].replace('_', '-')} are two "
                               "budgets: give one")
    check_values("search", max_combinations=max_combinations, calibration_samples=calibration_samples, seed=seed,
                 act_bits=act_bits)
    if whole_predictor not in WHOLE_PREDICTOR:
        raise SensitivityError(f"unknown --whole-predictor {whole_predictor!r}; use {', '.join(WHOLE_PREDICTOR)}")
    if whole_predictor != "off":
        what = f"--whole-predictor {whole_predictor}"
        if baseline is not None or scores:
            raise SensitivityError(f"{what} re-rates with a --predictor DIR; it takes no --baseline or --scores")
        if target_latency is not None or latency_sweep or target_memory is not None:
            raise SensitivityError(f"{what} searches bits budgets (--target-bits, --sweep), not --target-latency "
                                   "or --target-memory")
    if isinstance(options, (list, tuple)):
        options = ",".join(options)
    common = dict(predictor=predictor, scores=scores, multiquantizer=multiquantizer, act_bits=act_bits,
                  level=level, options=options, max_combinations=max_combinations, solver=solver,
                  baseline=baseline, metric=metric, log=log or (lambda text: None))
    if target_latency is not None or latency_sweep:
        return _search_latency(out, target_latency=target_latency, latency_sweep=latency_sweep, costs=costs,
                               **common)
    from ..costs import RUNTIME_MEMORY_MODEL

    if costs and not (target_memory is not None and memory_model == RUNTIME_MEMORY_MODEL):
        raise SensitivityError("--costs is read by --target-latency / --latency-sweep and --target-memory with "
                               f"--memory-model {RUNTIME_MEMORY_MODEL} only")
    return _search_bits(out, target_bits=target_bits, target_memory=target_memory, sweep=sweep, costs=costs,
                        memory_model=memory_model, hawq_mode=hawq_mode, calibration_samples=calibration_samples,
                        weights=weights, mixdq_metric=mixdq_metric, seed=seed, option=option, cache=cache,
                        error=error, whole_predictor=whole_predictor, **common)


# ---------------------------------------------------------------------------------------------
# bits and memory budgets, baselines
# ---------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    predictor: Any
    predictor_name: Optional[str]
    mq: Any
    mq_path: str
    sizes: Any


def _inputs(predictor: Any, scores: Optional[PathLike], multiquantizer: Optional[PathLike],
            options: Optional[str]) -> _Inputs:
    """The scorer (a loaded predictor, or the scores CSV as an additive scorer), the multiquantizer and its size
    table restricted to ``options``."""
    from ..predictors import load_predictor
    from ..search import AdditiveScorer, load_scores_csv, multiquantizer_for
    from ..sizes import SizeTable

    name = None
    if isinstance(predictor, (str, os.PathLike)):
        name = str(predictor)
        predictor = load_predictor(predictor)
    elif predictor is not None and getattr(predictor, "path", None) is not None:
        name = str(predictor.path)
    mq, mq_path = multiquantizer_for(multiquantizer, predictor)
    if scores:
        predictor = AdditiveScorer(load_scores_csv(scores), name=str(scores))
    opts = [o.strip() for o in options.split(",") if o.strip()] if options else None
    return _Inputs(predictor, name, mq, mq_path, SizeTable.of(mq, opts))


def _check_scorer(predictor: Any, scores: Optional[PathLike], baseline: Optional[str]) -> None:
    if baseline is None and not (predictor is not None or scores):
        raise SensitivityError("pass --predictor DIR (or --scores CSV), or choose a --baseline")
    if predictor is not None and scores:
        raise SensitivityError("pass either --predictor or --scores, not both")


def _check_level(level: str, predictor: Any, baseline: Optional[str]) -> None:
    if level == "module" and predictor is None and baseline is None:
        raise SensitivityError("--level module needs a --predictor with module scores (--scores has layer scores only)")


def _search_bits(out: PathLike, *, predictor, scores, multiquantizer, target_bits, target_memory, sweep, costs,
                 memory_model, act_bits, level, options, max_combinations, solver, baseline, hawq_mode,
                 calibration_samples, weights, mixdq_metric, seed, option, cache, metric, error, whole_predictor,
                 log) -> SearchRun:
    from ..allocators import ALLOCATORS
    from ..checks import constraint_for
    from ..evaluation.cache import read_records
    from ..io import atomic_dir
    from ..search import bits_range, parse_sweep

    if baseline is not None and baseline not in SEARCH_BASELINES and baseline not in ALLOCATORS:
        raise SensitivityError(f"unknown --baseline {baseline!r}; known: "
                               f"{', '.join(SEARCH_BASELINES + tuple(ALLOCATORS.names()))}")
    _check_scorer(predictor, scores, baseline)
    if baseline == "uniform":
        if not option:
            raise SensitivityError("--baseline uniform needs --option (e.g. --option uaq-4)")
        if sweep:
            raise SensitivityError("--baseline uniform has no target; drop --sweep")
    elif target_bits is None and not sweep and target_memory is None:
        raise SensitivityError("pass --target-bits B, --target-memory SIZE or --sweep START:STOP:STEP")
    from ..costs import RUNTIME_MEMORY_MODEL

    runtime_memory = target_memory is not None and memory_model == RUNTIME_MEMORY_MODEL
    memory_bytes = None
    if target_memory is not None:
        from ..sizes import memory_model as get_memory_model, memory_model_names, parse_bytes

        _register_runtime_memory_models()
        if not runtime_memory and memory_model not in memory_model_names():
            get_memory_model(memory_model)  # the one-line error naming the known models
        if baseline not in (None, "error-ilp"):
            raise SensitivityError(f"--target-memory works with the predictor search and --baseline error-ilp, "
                                   f"not --baseline {baseline}")
        memory_bytes = parse_bytes(target_memory)
    if baseline in ("cache", "mixdq") and not cache:
        raise SensitivityError(f"--baseline {baseline} needs --cache FILE")
    if baseline == "reference" and predictor is None:
        raise SensitivityError("--baseline reference needs --predictor DIR (its subgraph scores)")
    _check_level(level, predictor, baseline)

    inp = _inputs(predictor, scores, multiquantizer, options)
    if runtime_memory:  # the layers' run-time bytes measured by `sensitivity costs`, the same --target-memory
        from ..costs import register_runtime_memory_model
        from ..export.costs import cost_table_for

        register_runtime_memory_model(cost_table_for(inp.mq, costs), inp.sizes.layers)
    records = read_records(cache) if cache else None
    targets: List[Optional[float]] = (parse_sweep(sweep) if sweep else
                                      [memory_bytes] if target_memory is not None else [target_bits])
    lo, hi = bits_range(inp.sizes)
    span = f"the options of {inp.mq_path}{' (--options)' if options else ''} span {lo:.4f}..{hi:.4f} avg bits"
    if baseline != "uniform" and target_memory is None:
        name = f"--sweep {sweep}: target" if sweep else "--target-bits"
        for t in targets:
            constraint_for("target_bits").check(name, t)
        if not sweep and target_bits > _ceil4(hi):
            raise SensitivityError(f"--target-bits {target_bits:g} is above {hi:.4f}, every layer at its "
                                   f"largest option; {span}")
    out = checked_out(out, "--sweep" if sweep else None)
    act = _act_bits(act_bits, inp.predictor, inp.predictor_name)
    provenance = {"command": "search", "multiquantizer": inp.mq_path, "predictor": inp.predictor_name,
                  "scores": None if scores is None else str(scores), "baseline": baseline, "level": level,
                  "solver": solver, "options": options, "cache": None if cache is None else str(cache),
                  "metric": metric if cache else None,
                  "whole_predictor": whole_predictor if whole_predictor != "off" else None}
    provenance = {k: v for k, v in provenance.items() if v is not None}
    settings = dict(level=level, max_combinations=max_combinations, solver=solver, baseline=baseline,
                    memory_model=memory_model, target_memory=target_memory, hawq_mode=hawq_mode,
                    calibration_samples=calibration_samples, weights=weights, mixdq_metric=mixdq_metric, seed=seed,
                    option=option, metric=metric, error=error, whole_predictor=whole_predictor)
    with contextlib.ExitStack() as stack:
        # a sweep's folder appears with everything in it, or not at all
        folder = stack.enter_context(atomic_dir(out, "--out")) if sweep else None
        configs, skipped, memo = [], [], {}

        def find(t):
            if sweep and t > _ceil4(hi):
                raise SensitivityError(f"above {hi:.4f} bits, every layer at its largest option")
            return _search_one(t, inp, records, memo, **settings)

        for t, res in _each_target(targets, find, bool(sweep), skipped, log):
            if inp.predictor is not None and res.predicted is None:
                from ..search import predict_results

                predict_results(inp.predictor, [res])
            inp.mq.validate(res.options)
            cfg = res.to_config(model=inp.mq.model_id, multiquantizer_hash=inp.mq.hash, **provenance)
            cfg.act_bits = act
            if "component_bytes" in res.details:
                cfg.provenance["component_bytes"] = dict(res.details["component_bytes"])
                cfg.provenance["target_memory"] = target_memory
            path = out / f"{res.method}-{t:.2f}.json" if sweep else out
            cfg.save(folder / path.name if sweep else path)
            configs.append(SearchedConfig(res, path, search_report(res, path)))
        if not configs:
            raise SensitivityError(f"no target of --sweep {sweep} is feasible")
        plots = _pareto(folder, out, configs, inp, records, metric) if sweep else []
    return SearchRun(configs, out, bool(sweep), False, skipped, plots, [])


def _search_one(target, inp: _Inputs, records, memo: dict, *, level, max_combinations, solver, baseline,
                memory_model, target_memory, hawq_mode, calibration_samples, weights, mixdq_metric, seed, option,
                metric, error, whole_predictor="off"):
    """The config at one target: the predictor search, a search baseline or an allocator."""
    from ..allocators import ALLOCATORS
    from ..search import cache_best, error_ilp, search, uniform_config
    from ..sizes import SizeTable

    predictor, mq, sizes = inp.predictor, inp.mq, inp.sizes
    what = f"multiquantizer {inp.mq_path}"
    if target_memory is not None:
        from ..search import memory_budget
        from ..search.memory import memory_result

        mb = memory_budget(mq, target, sizes, memory_model, what=what)
        if baseline == "error-ilp":
            res = error_ilp(mb.table, None, error=error, method=solver, what=what, budget=mb.budget)
        else:
            res = search(predictor, mq, None, level=level, max_combinations=max_combinations,
                         method=solver, sizes=mb.table, what=what, budget=mb.budget)
        return memory_result(res, mq, sizes, mb)
    if baseline in ALLOCATORS:
        from ..allocators import allocate, sizes_for

        if "kw" not in memo:  # the allocator's inputs, computed once per call
            memo["kw"] = _allocator_inputs(baseline, predictor, mq, records, level=level,
                                           max_combinations=max_combinations, hawq_mode=hawq_mode,
                                           calibration_samples=calibration_samples, weights=weights,
                                           mixdq_metric=mixdq_metric, seed=seed)
        return allocate(baseline, sizes_for(baseline, sizes), target, what=what, method=solver, **memo["kw"])
    if baseline == "uniform":
        return uniform_config(SizeTable.from_multiquantizer(mq), option)
    if baseline == "error-ilp":
        return error_ilp(sizes, target, error=error, method=solver, what=what)
    if baseline == "cache":  # cached configs may use any option of the multiquantizer
        return cache_best(records, SizeTable.from_multiquantizer(mq), target, metric=metric)
    if whole_predictor != "off":
        from ..search import refined_search

        return refined_search(predictor, mq, target, sizes=sizes, local=whole_predictor == "refine")
    return search(predictor, mq, target, level=level, max_combinations=max_combinations, method=solver,
                  sizes=sizes, what=what)


def _allocator_inputs(baseline: str, predictor, mq, records, *, level, max_combinations, hawq_mode,
                      calibration_samples, weights, mixdq_metric, seed) -> dict:
    """Keyword inputs of the allocator ``baseline``."""
    kw: dict = {}
    if baseline == "hawq":
        from ..allocators.hawq import sensitivity_table
        from ..zoo import get_family

        fam_name, _, mq_weights = str(mq.model_id).partition(":")
        fam = get_family(fam_name)
        den = fam.load_denoiser(weights if weights is not None else (mq_weights or None))
        kw["sensitivity"] = sensitivity_table(mq, den, mode=hawq_mode, family=fam_name,
                                              num_samples=calibration_samples, seed=seed, progress=True)
    elif baseline == "mixdq":
        from ..allocators.mixdq import single_layer_table

        if not records:
            raise SensitivityError("--baseline mixdq needs --cache FILE with single-layer records "
                                   "(sensitivity sample --strategy single-layer)")
        kw["table"] = single_layer_table(records, mixdq_metric)
    elif baseline == "reference":
        if predictor is None:
            raise SensitivityError("--baseline reference needs --predictor DIR (its subgraph scores)")
        kw["layer_scores"] = predictor.layer_scores(mq)
        if level == "module":
            kw["module_scores"] = predictor.module_scores(mq, max_combinations=max_combinations)
    return kw


def _pareto(folder: Path, out: Path, configs: List[SearchedConfig], inp: _Inputs, records, metric: str) -> List[Path]:
    """A bits sweep's ``sweep.csv``, ``pareto.csv`` and Pareto plots (predicted quality, and ``metric`` of the
    cache's records) in ``folder``; returns the plots' final paths (in ``out``)."""
    import pandas as pd

    from .. import insights
    from ..search import predict_results, uniform_configs
    from ..sizes import SizeTable

    predictor = inp.predictor
    _write_csv(pd.DataFrame([c.report for c in configs]).drop(columns=["option_mix"]), folder / "sweep.csv")
    full = SizeTable.from_multiquantizer(inp.mq)
    extra = uniform_configs(full)
    if predictor is not None:
        predict_results(predictor, extra)
    if records and predictor is not None:
        preds = predictor.predict([r["config"] for r in records])
        records = [dict(r, predicted=float(p)) for r, p in zip(records, preds)]
    pt = insights.pareto_table(records, [c.result for c in configs] + extra, metric=metric, sizes=full)
    _write_csv(pt, folder / "pareto.csv")
    written = []
    for y in ("predicted", metric):
        if y in pt and pt[y].notna().any():
            fig = insights.pareto_plot(pt, y=y)
            insights.save_figure(fig, folder / f"pareto_{y}.png")
            written.append(out / f"pareto_{y}.png")
    return written


# ---------------------------------------------------------------------------------------------
# latency budget
# ---------------------------------------------------------------------------------------------


def _search_latency(out: PathLike, *, predictor, scores, multiquantizer, target_latency, latency_sweep, costs,
                    act_bits, level, options, max_combinations, solver, baseline, metric, log) -> SearchRun:
    """``target_latency`` / ``latency_sweep``: the exact knapsack on the cost table's summed layer times."""
    from ..checks import check_values
    from ..export.costs import cost_table_for
    from ..io import atomic_dir
    from ..search import parse_sweep

    if baseline is not None:
        raise SensitivityError(f"--baseline {baseline} has a bit target; --target-latency searches with --predictor or --scores")
    if not (predictor is not None or scores):
        raise SensitivityError("--target-latency needs --predictor DIR (or --scores CSV)")
    _check_scorer(predictor, scores, baseline)
    _check_level(level, predictor, baseline)
    if latency_sweep:
        targets = parse_sweep(latency_sweep)
        for t in targets:
            if not t > 0:
                raise SensitivityError(f"--latency-sweep {latency_sweep}: target {t:g} ms: latency targets must be positive")
    else:
        targets = [target_latency]
        check_values(target_latency=target_latency)
    out = checked_out(out, "--latency-sweep" if latency_sweep else None)
    inp = _inputs(predictor, scores, multiquantizer, options)
    table = cost_table_for(inp.mq, costs)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(atomic_dir(out, "--out")) if latency_sweep else None
        return _latency_targets(targets, inp, table, out, folder, act_bits=act_bits,
                                level=level, options=options, max_combinations=max_combinations, solver=solver,
                                scores=scores, metric=metric, latency_sweep=latency_sweep, log=log)


def _latency_targets(targets, inp: _Inputs, costs, out: Path, folder: Optional[Path], *, act_bits,
                     level, options, max_combinations, solver, scores, metric, latency_sweep, log) -> SearchRun:
    from ..search import predict_results, search, search_cost, uniform_configs
    from ..sizes import SizeTable

    predictor, mq, sizes = inp.predictor, inp.mq, inp.sizes
    provenance = {"command": "search", "multiquantizer": inp.mq_path, "predictor": inp.predictor_name,
                  "scores": None if scores is None else str(scores), "level": level, "solver": solver,
                  "options": options, "costs": costs.meta.get("path"),
                  "costs_device": (costs.meta.get("key") or {}).get("device")}
    provenance = {k: v for k, v in provenance.items() if v is not None}
    act = _act_bits(act_bits, predictor, inp.predictor_name)
    what = f"multiquantizer {inp.mq_path} with cost table {costs.meta.get('path')}"
    configs, bits_results, skipped = [], [], []

    def find(t):
        return search_cost(predictor, mq, costs, t, "latency", level=level, max_combinations=max_combinations,
                           method=solver, sizes=sizes, what=what)

    for t, res in _each_target(targets, find, bool(latency_sweep), skipped, log, " ms"):
        mq.validate(res.options)
        cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, target_latency_ms=t, **provenance)
        cfg.act_bits = act
        path = out / f"search-latency-{t:g}ms.json" if folder is not None else out
        cfg.save(folder / path.name if folder is not None else path)
        rep = search_report(res, path)
        rep.update(target_latency_ms=t, latency_ms=round(res.details["latency_ms"], 6))
        configs.append(SearchedConfig(res, path, rep))
    if not configs:
        raise SensitivityError(f"no target of --latency-sweep {latency_sweep} is feasible")
    plots = []
    if folder is not None:
        import pandas as pd

        from .. import insights

        # the bits-budget search at each latency config's bits: same predictor, other budget
        for c in configs:
            b = _ceil4(c.result.avg_bits)
            r = search(predictor, mq, b, level=level, max_combinations=max_combinations, method=solver,
                       sizes=sizes, what=what)
            r.details["latency_ms"] = costs.config_latency_ms(r.options)
            cfg = r.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, **provenance)
            cfg.act_bits = act
            cfg.save(folder / f"{r.method}-{b:.4f}.json")
            bits_results.append(r)
        extra = uniform_configs(SizeTable.from_multiquantizer(mq))
        predict_results(predictor, extra)
        _write_csv(pd.DataFrame([c.report for c in configs]).drop(columns=["option_mix"]), folder / "sweep.csv")
        pt = insights.pareto_table(None, [c.result for c in configs] + bits_results + extra, metric=metric,
                                   sizes=SizeTable.from_multiquantizer(mq), costs=costs)
        _write_csv(pt, folder / "pareto_latency.csv")
        fig = insights.pareto_plot(pt, y="predicted", x="latency_ms",
                                   title="predicted quality vs summed layer latency (measured)")
        insights.save_figure(fig, folder / "pareto_latency.png")
        plots.append(out / "pareto_latency.png")
    return SearchRun(configs, out, folder is not None, True, skipped, plots, bits_results)


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def _each_target(targets, find: Callable[[float], Any], sweep: bool, skipped: list, log: Callable[[str], None],
                 unit: str = ""):
    """``(target, find(target))`` for each target; in a sweep a target ``find`` refuses is skipped: appended to
    ``skipped`` and logged (``unit`` follows the number), else the refusal is raised."""
    for t in targets:
        try:
            res = find(t)
        except SensitivityError as exc:
            if not sweep:
                raise
            skipped.append((t, str(exc)))
            log(f"target {t:g}{unit}: skipped ({exc})")
            continue
        yield t, res


def checked_out(path: PathLike, sweep: Optional[str]) -> Path:
    """``out``: a folder for a sweep (``sweep`` names its flag), else a .json file; writable."""
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


def _act_bits(given: Optional[int], predictor: Any, name: Optional[str]) -> Optional[int]:
    """Activation bits of the written configs: those of the evaluations the predictor learned from
    (its cache's protocol), or ``given``; a disagreement is refused."""
    learned = (getattr(predictor, "meta", None) or {}).get("act_bits") if predictor is not None else None
    if given is not None and learned is not None and int(given) != int(learned):
        raise SensitivityError(f"--act-bits {given}: predictor {name} learned from W·A{learned} evaluations")
    return given if given is not None else learned


def _register_runtime_memory_models() -> None:
    """Import the export package so the run-time policies it defines register their memory models."""
    import sensitivity.export  # noqa: F401


def _ceil4(x: float) -> float:
    return math.ceil(x * 1e4 - 1e-9) / 1e4


def _write_csv(df, path: Path) -> Path:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path
