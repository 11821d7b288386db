"""Search vs baselines, measured for real: the comparison of ``sensitivity demo``, as a library function.

At each bit target, :func:`compare_at_targets` finds the predictor's searched config and the baselines
under the same budget — the best random config of the cache at the same or fewer bits (chosen by the
cache's own metric), the best uniform config, and the error ILP — and measures every one of them with
a *held-out* evaluator (images of other seeds than the cache's: the best random config was selected
on the cache's images, so judged on those it would win by selection luck). With ``job_evaluator`` each
config is also measured on the job's own images (column ``job_<metric>``).

Stage order: this module uses search (and so predictors) and evaluation; only commands import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .evaluation.metric_specs import metric_spec
from .search import InfeasibleTargetError, cache_best, error_ilp, search, uniform_baselines
from .sizes import SizeTable

METRIC_KEYS = ("fid", "kid", "accuracy", "psnr")


@dataclass
class Comparison:
    """What :func:`compare_at_targets` measured.

    ``rows``: one dict per (target, method) with ``target, method, avg_bits, predicted_<metric>,
    job_<metric>`` and the held-out ``fid, kid, accuracy, psnr``; ``points``: the measured configs for
    :func:`sensitivity.insights.pareto_table` (``source, label, avg_bits[, predicted], <metrics>``);
    ``full_precision``: the held-out metrics of the unquantized model; ``results``: the searched
    :class:`~sensitivity.search.SearchResult` per target.
    """

    metric: str
    rows: List[Dict[str, Any]] = field(default_factory=list)
    points: List[Dict[str, Any]] = field(default_factory=list)
    full_precision: Dict[str, Any] = field(default_factory=dict)
    results: Dict[float, Any] = field(default_factory=dict)
    skipped: List[float] = field(default_factory=list)


def _key(options: Mapping[str, str]) -> str:
    return json.dumps(sorted(options.items()))


def compare_at_targets(predictor: Any, mq: Any, evaluator: Any, targets: Sequence[float],
                       records: Sequence[Mapping[str, Any]], metric: str = "fid",
                       job_evaluator: Any = None, sizes: Optional[SizeTable] = None,
                       config_dir: Optional[Path] = None, config_provenance: Optional[Mapping[str, Any]] = None,
                       log: Optional[Callable[[str], None]] = None) -> Comparison:
    """Search at each of ``targets`` (avg bits) and measure it next to the baselines (module docstring).

    ``evaluator``: the held-out :class:`~sensitivity.evaluation.evaluator.Evaluator` (its
    ``evaluate(options)`` gives the metrics); ``job_evaluator``: the cache's protocol (optional);
    ``records``: the cache's records (for the best random config); ``config_dir``: where to save each
    searched config as ``search-<target>.json`` (with ``config_provenance``); ``log``: a progress
    printer. Targets below the smallest reachable average bits are skipped (listed in ``skipped``).
    """
    sizes = sizes if sizes is not None else SizeTable.from_multiquantizer(mq)
    sign = metric_spec(metric).sign()
    say = log or (lambda text: None)
    measured: Dict[str, Dict[str, Any]] = {}
    job_measured: Dict[str, Optional[float]] = {}

    def measured_of(options: Mapping[str, str]) -> Dict[str, Any]:
        k = _key(options)
        if k not in measured:
            r = evaluator.evaluate(dict(options))
            r.pop("timings", None)
            measured[k] = r
        return measured[k]

    def job_value_of(options: Mapping[str, str]) -> Optional[float]:
        """The metric on the job's own images (the protocol the cache and the predictor saw)."""
        if job_evaluator is None:
            return None
        k = _key(options)
        if k not in job_measured:
            job_measured[k] = job_evaluator.evaluate(dict(options)).get(metric)
        return job_measured[k]

    def predicted(options: Mapping[str, str]) -> float:
        return sign * float(predictor.predict([dict(options)])[0])

    out = Comparison(metric)
    out.full_precision = fp = measured_of({})
    say(f"full precision on them: FID {_fmt(fp.get('fid'))}, accuracy {_fmt(fp.get('accuracy'))}")
    job_col = f"job_{metric}"
    uniforms = uniform_baselines(sizes)
    for u in uniforms:
        u.predicted = float(predictor.predict([u.options])[0])
    floor = sizes.min_avg_bits()
    for t in targets:
        if t < floor:
            out.skipped.append(t)
            say(f"target {t:g}: below the smallest possible {floor:.4f} avg bits; skipped")
            continue
        res = search(predictor, mq, t, sizes=sizes)
        out.results[t] = res
        if config_dir is not None:
            cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, **dict(config_provenance or {}))
            cfg.save(Path(config_dir) / f"search-{t:.2f}.json")
        m = measured_of(res.options)
        out.rows.append({"target": t, "method": "search", "avg_bits": res.avg_bits,
                         f"predicted_{metric}": sign * res.predicted, job_col: job_value_of(res.options),
                         **{k: m.get(k) for k in METRIC_KEYS}})
        out.points.append({"source": "search", "label": f"search@{t:g}", "avg_bits": res.avg_bits,
                           "predicted": res.predicted, **{k: m.get(k) for k in METRIC_KEYS}})
        try:  # the best random config of the cache at the same or fewer bits (its own measurement)
            best = cache_best(records, sizes, t, metric=metric)
            rec = next(r for r in records if r.get("config_hash") == best.details.get("config_hash"))
            bm = measured_of(best.options)
            out.rows.append({"target": t, "method": f"best of {best.details['candidates']} random",
                             "avg_bits": best.avg_bits, f"predicted_{metric}": predicted(best.options),
                             job_col: (rec.get("metrics") or {}).get(metric), **{k: bm.get(k) for k in METRIC_KEYS}})
            out.points.append({"source": "best random", "label": f"random@{t:g}", "avg_bits": best.avg_bits,
                               **{k: bm.get(k) for k in METRIC_KEYS}})
        except InfeasibleTargetError:
            out.rows.append({"target": t, "method": "best random (none at these bits)"})
        ok = [u for u in uniforms if u.avg_bits <= t + 1e-9]
        if ok:
            ums = [(u, measured_of(u.options)) for u in ok]
            u, um = max(ums, key=lambda x: sign * float(x[1][metric]))
            out.rows.append({"target": t, "method": f"best uniform ({u.method.replace('uniform-', '')})",
                             "avg_bits": u.avg_bits, f"predicted_{metric}": sign * u.predicted,
                             job_col: job_value_of(u.options), **{k: um.get(k) for k in METRIC_KEYS}})
        ilp = error_ilp(sizes, t)
        im = measured_of(ilp.options)
        out.rows.append({"target": t, "method": "error ILP", "avg_bits": ilp.avg_bits,
                         f"predicted_{metric}": predicted(ilp.options), job_col: job_value_of(ilp.options),
                         **{k: im.get(k) for k in METRIC_KEYS}})
        out.points.append({"source": "error-ilp", "label": f"ilp@{t:g}", "avg_bits": ilp.avg_bits,
                           **{k: im.get(k) for k in METRIC_KEYS}})
        say(f"target {t:g}: searched {res.avg_bits:.3f} bits, {metric} {_fmt(m.get(metric))} "
            f"(predicted {_fmt(sign * res.predicted)}), FID {_fmt(m.get('fid'))}")
    for u in uniforms:
        um = measured.get(_key(u.options))
        if um is not None:
            out.points.append({"source": "uniform", "label": u.method, "avg_bits": u.avg_bits,
                               "predicted": u.predicted, **{k: um.get(k) for k in METRIC_KEYS}})
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)
