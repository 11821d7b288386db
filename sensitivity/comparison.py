"""Search vs baselines, measured for real: the comparison of ``sensitivity demo``, as a library function.

At each bit target, :func:`compare_at_targets` finds the predictor's searched config and the baselines
under the same budget — the best random config of the cache at the same or fewer bits (chosen by the
cache's own metric), the best uniform config, and the error ILP — and measures every one of them with
a *held-out* evaluator (images of other seeds than the cache's: the best random config was selected
on the cache's images, so judged on those it would win by selection luck). With ``job_evaluator`` each
config is also measured on the job's own images (column ``job_<metric>``).

Other allocators (SDNQ's rule, HAWQ, MixDQ, the reference's top-1 rule: :mod:`sensitivity.allocators`,
e.g. through :func:`sensitivity.allocators.allocate_at_targets`) come in as ordinary configs
(``allocated``), so this module needs none of them. Every row carries the labelling cost its
config needed (``configs_labelled``, ``label_cpu_s``) and is checked against the target's exact byte
budget. With ``repeat_evaluator`` (a second held-out seed set) the searched configs — or all of them —
are measured twice (columns ``<metric>_2``): the spread shows which gaps are larger than the
images' noise.

Noise: with an evaluator that has ``bootstrap`` replicates (:class:`~sensitivity.evaluation.evaluator.Evaluator`),
every measured metric gets its bootstrap standard error over the images (``<metric>_se``), and each
target's rows are marked by a *paired* bootstrap on the comparison metric — every config is measured on
the same images, and the replicates resample the same indices, so a difference carries only its own
noise: ``verdict`` is ``best`` / ``tie`` (the 95 % interval of the difference to the best row holds 0) /
``worse``, and ``vs_search`` is ``better`` / ``tie`` / ``worse`` against the searched config.

Stage order: this module uses search; predictors and evaluators come in as objects; workflows and commands import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import SensitivityError
from .evaluation.metric_specs import metric_spec
from .search import InfeasibleTargetError, budget_bytes, cache_best, error_ilp, search, uniform_configs
from .sizes import SizeTable

METRIC_KEYS = ("fid", "kid", "accuracy", "psnr")
COST_KEYS = ("configs_labelled", "label_cpu_s")
TIE_LEVEL = 0.95  # two-sided level of the paired bootstrap interval that decides a tie


def paired_marks(values: Sequence[float], replicates: Sequence[Optional[Sequence[float]]], sign: float,
                 reference: int, level: float = TIE_LEVEL) -> List[Optional[str]]:
    """``better`` / ``tie`` / ``worse`` of each entry against entry ``reference`` (itself: ``None``).

    ``values``: point estimates; ``replicates``: paired bootstrap replicates of each (same resampled
    images; ``None``: not measured so, mark ``None``); ``sign``: +1 if higher is better, -1 if lower.
    A tie: the ``level`` percentile interval of ``sign * (replicate_i - replicate_ref)`` holds 0.
    """
    ref = replicates[reference]
    out: List[Optional[str]] = []
    for i, (v, rep) in enumerate(zip(values, replicates)):
        if i == reference or rep is None or ref is None or v is None:
            out.append(None)
            continue
        d = sign * (np.asarray(rep, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        lo, hi = np.quantile(d, [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0])
        out.append("better" if lo > 0 else "worse" if hi < 0 else "tie")
    return out


def mark_rows(rows: List[Dict[str, Any]], replicates: Sequence[Optional[Sequence[float]]], metric: str,
              sign: float, level: float = TIE_LEVEL) -> None:
    """Set ``verdict`` (best / tie / worse vs the best row by ``metric``) and ``vs_search`` of one
    target's ``rows`` in place (see :func:`paired_marks`); rows without replicates get neither."""
    idx = [i for i, r in enumerate(rows) if r.get(metric) is not None]
    if not idx:
        return
    vals = [float(rows[i][metric]) for i in idx]
    reps = [replicates[i] for i in idx]
    best = int(np.argmax(sign * np.asarray(vals)))
    for i, m in zip(idx, paired_marks(vals, reps, sign, best, level)):
        if reps[idx.index(i)] is not None:
            rows[i]["verdict"] = "best" if i == idx[best] else m
    srch = [k for k, i in enumerate(idx) if rows[i].get("source") == "search"]
    if srch:
        for i, m in zip(idx, paired_marks(vals, reps, sign, srch[0], level)):
            if m is not None:
                rows[i]["vs_search"] = m


def cache_cost(records: Sequence[Mapping[str, Any]]) -> Tuple[int, float]:
    """``(configs, seconds)`` the cache's evaluation job spent: Σ of each record's ``timings["evaluate"]``."""
    secs = 0.0
    for r in records:
        t = r.get("timings") or {}
        if isinstance(t, Mapping):
            secs += float(t.get("evaluate", 0.0) or 0.0)
    return len(records), secs


@dataclass
class Comparison:
    """What :func:`compare_at_targets` measured.

    ``rows``: one dict per (target, method) with ``target, method, source, avg_bits, predicted_<metric>,
    job_<metric>``, the held-out ``fid, kid, accuracy, psnr`` (and ``<metric>_2`` on the second seed
    set where measured) and ``configs_labelled, label_cpu_s``; ``points``: the measured configs for
    :func:`sensitivity.insights.pareto_table` (``source, label, avg_bits[, predicted], <metrics>``;
    ``predicted`` in the predictor's target units, e.g. ``-log(fid)``, as ``sensitivity insights`` has it);
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
                       log: Optional[Callable[[str], None]] = None,
                       allocated: Sequence[Mapping[str, Any]] = (),
                       costs: Optional[Mapping[str, Tuple[int, float]]] = None,
                       repeat_evaluator: Any = None, repeat: str = "search",
                       search_fn: Optional[Callable[[float], Any]] = None) -> Comparison:
    """Search at each of ``targets`` (avg bits) and measure it next to the baselines (module docstring).

    ``evaluator``: the held-out :class:`~sensitivity.evaluation.evaluator.Evaluator` (its
    ``evaluate(options)`` gives the metrics); ``job_evaluator``: the cache's protocol (optional);
    ``records``: the cache's records (for the best random config); ``config_dir``: where to save each
    searched config as ``search-<target>.json`` (with ``config_provenance``); ``log``: a progress
    printer. Targets below the smallest reachable average bits are skipped (listed in ``skipped``).

    ``allocated``: other allocators' configs, dicts ``target, method, options[, source,
    configs_labelled, label_cpu_s, note]`` (``options=None``: that allocator has no config at the
    target, ``note`` says why; they are not measured on the job's images); ``costs``: ``{"search" | "best random" | "uniform" | "error ILP": (configs, cpu seconds)}``
    (defaults: the cache's job for the first two — add the predictor's training to ``search`` —,
    the uniform configs' held-out measurements, 0 for the error ILP); ``repeat_evaluator``: a second
    held-out seed set, measuring the searched configs (``repeat="search"``) or every row (``"all"``);
    ``search_fn(target)``: the searched config (default :func:`sensitivity.search.search` of
    ``predictor``). Raises :class:`SensitivityError` if any row's config is over its target's budget.
    """
    if repeat not in ("search", "all"):
        raise SensitivityError(f"compare_at_targets: repeat must be 'search' or 'all', got {repeat!r}")
    sizes = sizes if sizes is not None else SizeTable.from_multiquantizer(mq)
    sign = metric_spec(metric).sign()
    say = log or (lambda text: None)
    measured: Dict[str, Dict[str, Any]] = {}
    replicates: Dict[int, Optional[Sequence[float]]] = {}  # id(row) -> its metric's bootstrap replicates
    measured_2: Dict[str, Dict[str, Any]] = {}
    job_measured: Dict[str, Optional[float]] = {}
    job_cost = cache_cost(records)
    uniforms = uniform_configs(sizes)
    cost = {"search": job_cost, "best random": job_cost, "error ILP": (0, 0.0), "uniform": None}
    cost.update(costs or {})

    def measured_of(options: Mapping[str, str], ev: Any = evaluator, memo: Dict = measured) -> Dict[str, Any]:
        k = _key(options)
        if k not in memo:
            r = ev.evaluate(dict(options))
            r.pop("timings", None)
            memo[k] = r
        return memo[k]

    def job_value_of(options: Mapping[str, str]) -> Optional[float]:
        """The metric on the job's own images (the protocol the cache and the predictor saw)."""
        if job_evaluator is None:
            return None
        k = _key(options)
        if k not in job_measured:
            job_measured[k] = job_evaluator.evaluate(dict(options)).get(metric)
        return job_measured[k]

    target = getattr(predictor, "target", None)

    def as_metric(y: float, options: Mapping[str, str]) -> float:
        """A prediction (the predictor's target, higher = better) in the metric's units."""
        if target is not None and target.metric == metric:  # its transform and bit penalty undone
            return float(target.metric_of(y, sizes.avg_bits(options)))
        return sign * y

    out = Comparison(metric)

    def add(t: float, method: str, source: str, options: Mapping[str, str], label_cost, pred: Optional[float] = None,
            job: Any = "measure", point_label: Optional[str] = None) -> Dict[str, Any]:
        """One row; ``pred``: the predictor's own prediction of ``options`` (target units) if already known."""
        q, fp = sizes.config_bytes(options)
        if q > budget_bytes(t, fp):
            raise SensitivityError(f"{method} at target {t:g}: {q} bytes ({16.0 * q / fp:.4f} avg bits) is over "
                                   f"the budget of {budget_bytes(t, fp)} bytes")
        m = measured_of(options)
        y = float(predictor.predict([dict(options)])[0]) if pred is None else float(pred)
        row = {"target": t, "method": method, "source": source, "avg_bits": 16.0 * q / fp,
               f"predicted_{metric}": as_metric(y, options),
               job_col: job_value_of(options) if job == "measure" else job, **{k: m.get(k) for k in METRIC_KEYS}}
        boot = m.get("bootstrap") or {}
        row.update({f"{k}_se": float(np.std(boot[k], ddof=1)) for k in METRIC_KEYS if len(boot.get(k) or ()) > 1})
        replicates[id(row)] = boot.get(metric)
        if repeat_evaluator is not None and (repeat == "all" or source == "search"):
            m2 = measured_of(options, repeat_evaluator, measured_2)
            row.update({f"{k}_2": m2.get(k) for k in METRIC_KEYS})
        n, secs = label_cost if label_cost is not None else (None, None)
        row.update(configs_labelled=n, label_cpu_s=None if secs is None else round(float(secs), 1))
        out.rows.append(row)
        out.points.append({"source": source, "label": point_label or f"{source}@{t:g}", "avg_bits": row["avg_bits"],
                           # the predictor's own target (higher = better), as `sensitivity insights` plots it
                           **({"predicted": y} if source == "search" else {}),
                           **{k: m.get(k) for k in METRIC_KEYS}})
        return row

    out.full_precision = fp = {k: v for k, v in measured_of({}).items() if k != "bootstrap"}
    say(f"full precision on them: FID {_fmt(fp.get('fid'))}, accuracy {_fmt(fp.get('accuracy'))}")
    job_col = f"job_{metric}"
    for u in uniforms:
        u.predicted = float(predictor.predict([u.options])[0])
    floor = sizes.min_avg_bits()
    by_target: Dict[float, List[Mapping[str, Any]]] = {}
    for a in allocated:
        by_target.setdefault(float(a["target"]), []).append(a)
    for t in targets:
        first = len(out.rows)
        if t < floor:
            out.skipped.append(t)
            say(f"target {t:g}: below the smallest possible {floor:.4f} avg bits; skipped")
            continue
        res = search_fn(t) if search_fn is not None else search(predictor, mq, t, sizes=sizes)
        out.results[t] = res
        if config_dir is not None:
            cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash, **dict(config_provenance or {}))
            cfg.save(Path(config_dir) / f"search-{t:.2f}.json")
        r = add(t, "search", "search", res.options, cost["search"], pred=res.predicted)
        say(f"target {t:g}: searched {r['avg_bits']:.3f} bits, {metric} {_fmt(r.get(metric))} "
            f"(predicted {_fmt(r[f'predicted_{metric}'])}), FID {_fmt(r.get('fid'))}")
        try:  # the best random config of the cache at the same or fewer bits (its own measurement)
            best = cache_best(records, sizes, t, metric=metric)
            rec = next(x for x in records if x.get("config_hash") == best.details.get("config_hash"))
            add(t, f"best of {best.details['candidates']} random", "best random", best.options, cost["best random"],
                job=(rec.get("metrics") or {}).get(metric), point_label=f"random@{t:g}")
        except InfeasibleTargetError:
            out.rows.append({"target": t, "method": "best random (none at these bits)", "source": "best random"})
        ok = [u for u in uniforms if u.quantized_bytes <= budget_bytes(t, u.fp16_bytes)]
        if ok:  # chosen by the held-out measurement itself: an advantage for this baseline, not for the search
            ums = [(u, measured_of(u.options)) for u in ok]
            u, um = max(ums, key=lambda x: sign * float(x[1][metric]))
            add(t, f"best uniform ({u.method.replace('uniform-', '')})", "uniform", u.options,
                      cost["uniform"] if cost["uniform"] is not None else (len(ok), None),
                      pred=u.predicted, point_label=u.method)
            out.points.pop()  # uniform points are added once each, below
        ilp = error_ilp(sizes, t)
        add(t, "error ILP", "error-ilp", ilp.options, cost["error ILP"], point_label=f"ilp@{t:g}")
        for a in by_target.get(float(t), []):
            if a.get("options") is None:
                out.rows.append({"target": t, "method": f"{a['method']} (no config: {a.get('note', '')})",
                                 "source": a["method"]})
                continue
            add(t, a["method"], a.get("source", a["method"]), a["options"],
                (a.get("configs_labelled"), a.get("label_cpu_s")), job=a.get(job_col))
        here = out.rows[first:]
        mark_rows(here, [replicates.get(id(r)) for r in here], metric, sign)
    for u in uniforms:
        um = measured.get(_key(u.options))
        if um is not None:
            out.points.append({"source": "uniform", "label": u.method, "avg_bits": u.avg_bits,
                               "predicted": u.predicted, **{k: um.get(k) for k in METRIC_KEYS}})
    return out


def reranked_search(predictor: Any, mq: Any, target_bits: float, sizes: Optional[SizeTable] = None,
                    offsets: Sequence[float] = (0.0, 0.02, 0.05, 0.1), levels: Sequence[str] = ("layer", "module"),
                    kappa: float = 0.0) -> Any:
    """The search's knapsack solves an *additive* proxy of the predictor (its layer / module scores);
    this solves it at ``target_bits − offset`` for each offset and level, then keeps the candidate the
    whole predictor rates best: the fold ensemble's mean minus ``kappa`` × the folds' standard
    deviation (``predictor.models``; without them, ``predict``). Every candidate fits the target.
    Uses no measurement: the held-out images choose nothing. ``details["rerank"]`` lists the candidates.
    :func:`sensitivity.search.refined_search` goes on from the best candidates with local moves.
    """
    from .search.refine import knapsack_candidates, rate

    sizes = sizes if sizes is not None else SizeTable.from_multiquantizer(mq)
    cands = knapsack_candidates(predictor, mq, target_bits, sizes, offsets, levels)
    models = getattr(predictor, "models", None)
    if models and hasattr(predictor, "encode"):
        per = np.array([m.predict_codes(predictor.encode([c.options for c in cands])) for m in models])
        mean, std = per.mean(axis=0), per.std(axis=0)
    else:
        mean, std = rate(predictor, [c.options for c in cands]), np.zeros(len(cands))
    score = mean - float(kappa) * std
    best = int(np.argmax(score))
    res = cands[best]
    res.target_bits = float(target_bits)
    res.method = "search-reranked"
    res.details["rerank"] = [{"level": c.details["level"], "offset": c.details["offset"], "avg_bits": c.avg_bits,
                              "mean": float(m), "std": float(sd)} for c, m, sd in zip(cands, mean, std)]
    res.details["rerank_choice"] = best
    return res


class StoredEvaluator:
    """An evaluator whose measurements are kept in a JSON-lines file, so a comparison resumes.

    ``path`` holds one ``{"key", "metrics"}`` line per measured config, after a first line naming the
    protocol (``protocol``: any JSON-able dict, e.g. ``EvalProtocol.to_dict()``); a file made under
    another protocol raises :class:`SensitivityError`. Only ``evaluate(options)`` is wrapped.
    """

    def __init__(self, evaluator: Any, path: Path, protocol: Mapping[str, Any]) -> None:
        self.evaluator, self.path = evaluator, Path(path)
        self.protocol = json.loads(json.dumps(dict(protocol), sort_keys=True, default=str))
        self.store: Dict[str, Dict[str, Any]] = {}
        self.reused = self.measured = 0
        if self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            head = json.loads(lines[0]) if lines else {}
            if head.get("protocol") != self.protocol:
                raise SensitivityError(f"{self.path}: measurements of another protocol (delete it or use another --out)")
            for ln in lines[1:]:
                try:
                    d = json.loads(ln)
                except json.JSONDecodeError:  # a line cut by a kill: measured again
                    continue
                self.store[d["key"]] = d["metrics"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"protocol": self.protocol}) + "\n")

    def evaluate(self, options: Mapping[str, str]) -> Dict[str, Any]:
        k = _key(options)
        if k in self.store:
            self.reused += 1
            return dict(self.store[k])
        r = self.evaluator.evaluate(dict(options))
        r.pop("timings", None)
        r.pop("images", None)
        r = {m: (float(v) if isinstance(v, (int, float)) else v) for m, v in r.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": k, "metrics": r}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.store[k] = r
        self.measured += 1
        return dict(r)


def comparison_frame(comp: Comparison):
    """``comp.rows`` as a pandas DataFrame (one row per target and method)."""
    import pandas as pd

    return pd.DataFrame(comp.rows)


def plot_comparison(comp: Comparison, y: str = "fid", title: Optional[str] = None, y_label: Optional[str] = None):
    """``y`` vs average bits, one marker series per allocator (``source``); the searched configs on a
    solid line, the full-precision value dashed. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    order: Dict[str, List[Tuple[float, float]]] = {}
    for r in comp.rows:
        if r.get(y) is None or r.get("avg_bits") is None:
            continue
        order.setdefault(r.get("source", r["method"]), []).append((float(r["avg_bits"]), float(r[y])))
    markers = "osD^v<>pPX*h"
    for i, (src, pts) in enumerate(order.items()):
        pts = sorted(set(pts))
        xs, ys = zip(*pts)
        main = src == "search"
        ax.plot(xs, ys, marker=markers[i % len(markers)], ms=6 if main else 4, lw=2 if main else 0.8,
                ls="-" if main else ":", color="black" if main else None, label=src, zorder=3 if main else 2)
    if comp.full_precision.get(y) is not None:
        ax.axhline(float(comp.full_precision[y]), color="grey", lw=0.8, ls="--", label="full precision")
    ax.set_xlabel("average bits")
    ax.set_ylabel(y_label or y)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def markdown_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], digits: int = 3) -> str:
    """A Markdown table of ``rows`` (numbers right-aligned with ``digits`` decimals, ``–`` where missing;
    a value whose row has ``<col>_se`` is written ``value ± se``)."""
    num = {c: any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) for c in cols}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if num[c] else "---" for c in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                cells.append("–" if v is None else str(v))
            elif isinstance(v, int) or c == "configs_labelled":
                cells.append(f"{int(v):,}")
            elif c == "label_cpu_s":
                cells.append(f"{v:,.0f}")
            elif isinstance(r.get(f"{c}_se"), (int, float)):
                cells.append(f"{_fmt(v, digits)} ± {_fmt(r[f'{c}_se'], digits)}")
            else:
                cells.append(_fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)
