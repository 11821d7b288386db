"""Allocators people use today, re-implemented as baselines of the exact search (issue 14).

Each allocator turns some per-layer measurement into a config at or under a bit target, in the
same :class:`sensitivity.search.SearchResult` format as the search:

==============  =====================================================================  ==============
name            per-(layer, option) quantity                                           under budget by
==============  =====================================================================  ==============
``sdnq``        SDNQ's dynamic mode: cheapest option whose weight MSE / Var(W) is at    threshold swept
                most a threshold (:mod:`.sdnq_rule`)
``hawq``        HAWQ-V3: Hessian trace / n × ‖W − Ŵ‖² (Hutchinson) or Σ Fisher ⊙ ΔW²     exact ILP
                of a denoising loss on calibration inputs (:mod:`.hawq`)
``mixdq``       MixDQ: the measured damage of quantizing one layer alone, read from     exact ILP
                ordinary evaluation-cache records (:mod:`.mixdq`)
``reference``   Qua2SeDiMo: each module's top-1 variant by predicted score − λ·bits     λ swept
                (:mod:`.reference_rule`)
==============  =====================================================================  ==============

The ILPs go through the search's exact knapsack (:func:`sensitivity.search.search_scores`), the
threshold rules through :func:`sweep_to_target` (bisection on a monotone knob). Every result's
``details`` carries the labelling cost the allocator needed (``configs_evaluated``, ``cpu_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import SensitivityError
from ..registry import Registry

if TYPE_CHECKING:  # numpy and pandas are imported where used, so `sensitivity search --help` stays light
    import numpy as np
    import pandas as pd

#: allocator name -> ``f(sizes, target_bits, **kw) -> SearchResult``; each module registers its own
#: (imported on first use: ``hawq`` imports torch). ``sensitivity search --baseline`` offers these names.
ALLOCATORS: Registry = Registry("allocator", unknown="unknown allocator {name!r} (use {known})", lazy={
    "sdnq": f"{__name__}.sdnq_rule",
    "hawq": f"{__name__}.hawq",
    "mixdq": f"{__name__}.mixdq",
    "reference": f"{__name__}.reference_rule",
})


def as_frame(sizes) -> pd.DataFrame:
    """The allocators' (layer, option) rows: a :class:`~sensitivity.sizes.SizeTable`'s ``frame()``, or a frame as is."""
    import pandas as pd

    if isinstance(sizes, pd.DataFrame):
        return sizes
    from ..sizes import SizeTable

    return SizeTable.of(sizes).frame()


def with_fp16(sizes: pd.DataFrame) -> pd.DataFrame:
    """``sizes`` plus one ``fp16`` row per layer (nbytes = fp16_bytes, error = sse = 0) if missing."""
    import pandas as pd

    sizes = as_frame(sizes)
    if (sizes["option"] == "fp16").any():
        return sizes
    fp = sizes.drop_duplicates("layer")[["layer", "fp16_bytes"]].copy()
    fp["option"] = "fp16"
    fp["nbytes"] = fp["fp16_bytes"]
    for col in ("error", "sse"):
        if col in sizes.columns:
            fp[col] = 0.0
    return pd.concat([sizes, fp], ignore_index=True)


def sizes_for(name: str, sizes) -> pd.DataFrame:
    """The (layer, option) rows allocator ``name`` chooses from: ``sizes`` plus fp16 rows (:func:`with_fp16`)
    when the allocator declares ``may_keep_fp16`` (SDNQ's rule keeps a layer fp16 when no option passes)."""
    frame = as_frame(sizes)
    return with_fp16(frame) if getattr(ALLOCATORS.get(name), "may_keep_fp16", False) else frame


def result_from_options(options: Mapping[str, str], sizes: pd.DataFrame, method: str, **kw):
    """A :class:`SearchResult` for ``options`` (fp16 layers dropped from the mapping)."""
    from ..search import SearchResult, config_bytes

    opts = {l: o for l, o in options.items() if o != "fp16"}
    q, fp = config_bytes(opts, sizes)
    return SearchResult(options=opts, method=method, avg_bits=16.0 * q / fp, quantized_bytes=q, fp16_bytes=fp, **kw)


def min_cost_allocation(cost: pd.DataFrame, column: str, sizes: pd.DataFrame, target_bits: Optional[float],
                        name: str, method: str = "auto", what: str = "this multiquantizer"):
    """Minimise ``Σ cost[column]`` over the chosen (layer, option) pairs under the target's byte budget
    (the exact knapsack of :func:`sensitivity.search.search_scores`); the core of ``hawq`` and ``mixdq``.
    Returns a :class:`SearchResult` named ``name`` whose ``objective`` is the summed cost."""
    from ..search import search_scores

    if target_bits is None:
        raise SensitivityError(f"{name} allocator needs a bit target")
    scores = cost[["layer", "option"]].assign(score=-cost[column].astype(float))
    res = search_scores(scores, sizes, target_bits, method=method, what=what)
    res.method = name
    res.objective = -float(res.objective)
    return res


def sweep_to_target(
    choose: Callable[[float], Dict[str, str]], sizes: pd.DataFrame, target_bits: float, lo: float, hi: float,
    increasing_bits: bool, iters: int = 60, log: bool = True, candidates: Optional[np.ndarray] = None,
) -> Tuple[float, Dict[str, str], int]:
    """Bisection on a knob ``x`` in [lo, hi] whose config's bytes move monotonically with ``x``.

    ``choose(x)`` -> config; ``increasing_bits``: the config gets larger as ``x`` grows. With
    ``candidates`` (sorted knob values where the config can change) the bisection runs over them
    exactly. Returns ``(x, config, budget)`` of the config with the most bytes at or under the
    target's budget. Raises :class:`SensitivityError` when even the cheapest end exceeds the budget.
    """
    import numpy as np

    from ..search import budget_bytes, fp16_total

    fp_total = fp16_total(sizes)
    budget = budget_bytes(target_bits, fp_total)
    lut = {(l, o): int(b) for l, o, b in zip(sizes["layer"], sizes["option"], sizes["nbytes"])}
    fp = dict(zip(sizes["layer"], sizes["fp16_bytes"]))

    def cost(x: float) -> int:
        cfg = choose(x)
        return sum(int(f) if cfg.get(l, "fp16") == "fp16" else lut[(l, cfg[l])] for l, f in fp.items())

    cheap, rich = (lo, hi) if increasing_bits else (hi, lo)
    if cost(cheap) > budget:
        raise SensitivityError(f"target {target_bits:g} avg bits: even the cheapest setting of the rule "
                               f"({cheap:g}) gives {16.0 * cost(cheap) / fp_total:.4f} bits")
    if cost(rich) <= budget:
        return rich, choose(rich), budget
    if candidates is not None:
        xs = np.unique(np.concatenate([[lo, hi], np.asarray(candidates, dtype=np.float64)]))
        xs = xs[(xs >= lo) & (xs <= hi)]
        if not increasing_bits:
            xs = xs[::-1]
        # xs from cheap to rich: find the last index whose cost fits
        a, b = 0, xs.size - 1  # cost(xs[a]) <= budget < cost(xs[b])
        while b - a > 1:
            m = (a + b) // 2
            if cost(float(xs[m])) <= budget:
                a = m
            else:
                b = m
        return float(xs[a]), choose(float(xs[a])), budget
    a, b = cheap, rich  # cost(a) <= budget < cost(b)
    for _ in range(iters):
        m = float(np.sqrt(a * b)) if log and a > 0 and b > 0 else 0.5 * (a + b)
        if m in (a, b):
            break
        if cost(m) <= budget:
            a = m
        else:
            b = m
    return a, choose(a), budget


def allocate(name: str, sizes: pd.DataFrame, target_bits: float, **kw):
    """Dispatch to the allocator ``name`` (one of :data:`ALLOCATORS`); ``kw`` as that function takes."""
    return ALLOCATORS.get(name)(as_frame(sizes), target_bits, **kw)


@dataclass
class AllocatorSpec:
    """One allocator of a comparison: ``label`` (its row name), ``name`` (one of :data:`ALLOCATORS`),
    ``inputs`` (its keyword inputs, e.g. ``{"sensitivity": table}``) and the labelling cost of those
    inputs (``configs_labelled``, ``label_cpu_s``; ``None``: read from the result's ``details``)."""

    label: str
    name: str
    inputs: Dict[str, Any] = field(default_factory=dict)
    configs_labelled: Optional[int] = None
    label_cpu_s: Optional[float] = None
    source: Optional[str] = None  # the allocator's name in plots (default: ``label`` without its ``{...}`` fields)

    def source_name(self) -> str:
        if self.source:
            return self.source
        return self.label.split(" (")[0] if "{" in self.label else self.label


def allocate_at_targets(specs: Sequence[AllocatorSpec], sizes, targets: Sequence[float],
                        what: str = "this multiquantizer") -> List[Dict[str, Any]]:
    """Every allocator's config at every target, as ordinary configs for
    :func:`sensitivity.comparison.compare_at_targets`: dicts ``target, method, source, options, avg_bits,
    quantized_bytes, configs_labelled, label_cpu_s[, note]``. A target an allocator cannot reach gets
    ``options=None`` and the one-line reason in ``note``. ``label`` may hold ``{lam}`` / ``{threshold}``
    (the reference's λ, SDNQ's threshold at that target). SDNQ's rule may keep layers fp16 (its
    size table gets fp16 rows)."""
    frame = as_frame(sizes)
    rows: Dict[str, pd.DataFrame] = {}
    out: List[Dict[str, Any]] = []
    for t in targets:
        for spec in specs:
            try:
                if spec.name not in rows:
                    rows[spec.name] = sizes_for(spec.name, frame)
                res = allocate(spec.name, rows[spec.name], float(t), what=what, **spec.inputs)
            except SensitivityError as e:
                out.append({"target": float(t), "method": spec.label.split(" (")[0], "source": spec.source_name(),
                            "options": None, "note": str(e)})
                continue
            d = res.details
            n = spec.configs_labelled if spec.configs_labelled is not None else int(d.get("configs_evaluated", 0))
            secs = spec.label_cpu_s if spec.label_cpu_s is not None else float(d.get("cpu_seconds", res.seconds))
            label = spec.label.format(lam=d.get("lam", float("nan")), threshold=d.get("threshold", float("nan")))
            out.append({"target": float(t), "method": label, "source": spec.source_name(), "options": dict(res.options), "avg_bits": res.avg_bits,
                        "quantized_bytes": res.quantized_bytes, "configs_labelled": n, "label_cpu_s": secs})
    return out


__all__ = ["ALLOCATORS", "AllocatorSpec", "allocate", "allocate_at_targets", "result_from_options", "sizes_for",
           "sweep_to_target", "with_fp16"]
