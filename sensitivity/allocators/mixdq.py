"""MixDQ-style allocation: measured single-layer sensitivity, then an exact ILP.

MixDQ quantizes one layer at a time (every other layer in full precision), scores the images, and
takes the score drop as that layer's sensitivity for that option; an ILP then picks the options
under the bit budget (it reports W3.66A16 on SDXL-Turbo this way). Here the single-layer configs
are ordinary evaluation jobs: :class:`SingleLayerSampler` numbers them ``index = layer · K + option``
(``K`` options) so ``sensitivity sample --strategy single-layer`` labels them into an ordinary
cache, resumable and reusable like any run; :func:`single_layer_table` reads them back and
:func:`mixdq_allocate` solves ``min Σ damage`` under the budget. Default metric: ``mse`` against
the full-precision images of the same seeds (MixDQ's metric-decoupled SQNR is this up to scale;
FID of one quantized layer sits inside FID's noise on few images).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

from ..errors import SensitivityError
from ..options import FP16, canonical
from . import ALLOCATORS

@dataclass(frozen=True)
class SingleLayerSampler:
    """Config ``i``: layer ``layers[i // K]`` at ``options[i % K]``, every other layer fp16.

    Duck-types :class:`sensitivity.evaluation.sampler.SamplerSpec` for
    :class:`sensitivity.evaluation.runners.JobPlan` (``sample``, ``to_dict``, ``check_layers``).
    """

    layers: Tuple[str, ...]
    options: Tuple[str, ...]
    seed: int = 0  # no randomness; kept for the run record

    def __post_init__(self) -> None:
        opts = tuple(dict.fromkeys(canonical(o) for o in self.options if canonical(o) != FP16))
        if not opts or not self.layers:
            raise SensitivityError("single-layer sampler: no layers or no quantized options")
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def num_configs(self) -> int:
        return len(self.layers) * len(self.options)

    def check_layers(self, layers: Iterable) -> None:
        names = {l if isinstance(l, str) else l.name for l in layers}
        missing = [l for l in self.layers if l not in names]
        if missing:
            raise SensitivityError(f"single-layer sampler: layer {missing[0]!r} is not in the multiquantizer")

    def sample(self, layers: Iterable, index: int) -> Dict[str, str]:
        k = len(self.options)
        if not 0 <= index < self.num_configs:
            raise SensitivityError(f"single-layer sampler: index {index} outside 0..{self.num_configs - 1}")
        return {self.layers[index // k]: self.options[index % k]}

    def to_dict(self) -> dict:
        h = hashlib.blake2b(json.dumps(list(self.layers)).encode(), digest_size=8).hexdigest()
        return {"algorithm": "single-layer/v1", "options": list(self.options), "layers": len(self.layers),
                "layers_hash": h}


def single_layer_table(records: Iterable[Mapping[str, Any]], metric: str = "mse",
                       full_precision: Optional[float] = None) -> pd.DataFrame:
    """DataFrame(layer, option, value, damage, seconds) from the cache records that quantize exactly
    one layer. ``damage`` = metric change towards worse vs ``full_precision`` (default: 0 for mse/kid,
    the metric's best single-layer value otherwise — differences within a layer are what the ILP uses)."""
    from ..evaluation.metric_specs import lower_is_better, record_metric as metric_value

    lower = lower_is_better(metric)
    rows = []
    for rec in records:
        cfg = {l: o for l, o in (rec.get("config") or {}).items() if canonical(o) != FP16}
        if len(cfg) != 1:
            continue
        v = metric_value(rec, metric)
        if v is None or not np.isfinite(v):
            continue
        (layer, opt), = cfg.items()
        t = rec.get("timings") or {}
        rows.append({"layer": layer, "option": canonical(opt), "value": float(v),
                     "seconds": float(t.get("evaluate", 0.0)) if isinstance(t, Mapping) else 0.0})
    df = pd.DataFrame(rows, columns=["layer", "option", "value", "seconds"])
    if df.empty:
        raise SensitivityError(f"no single-layer records with '{metric}' in the cache "
                               "(label them with `sensitivity sample --strategy single-layer`)")
    df = df.drop_duplicates(["layer", "option"], keep="last")
    ref = full_precision if full_precision is not None else (
        0.0 if metric.lower() in ("mse", "kid") else (df["value"].min() if lower else df["value"].max()))
    df["damage"] = (df["value"] - ref) if lower else (ref - df["value"])
    return df


@ALLOCATORS.register("mixdq")
def mixdq_allocate(sizes: pd.DataFrame, target_bits: float, table: pd.DataFrame = None, method: str = "auto",
                   what: str = "this multiquantizer", **_):
    """Minimise the summed single-layer damage under the target's byte budget (exact knapsack)."""
    from . import min_cost_allocation

    if table is None:
        raise SensitivityError("mixdq allocator needs the single-layer table (mixdq.single_layer_table)")
    have = set(zip(table["layer"], table["option"]))
    need = [(l, o) for l, o in zip(sizes["layer"], sizes["option"]) if o != FP16]
    missing = [x for x in need if x not in have]
    if missing:
        raise SensitivityError(f"mixdq: no single-layer record for layer {missing[0][0]!r} option {missing[0][1]!r} "
                               f"({len(missing)} of {len(need)} missing; finish `sensitivity sample --strategy single-layer`)")
    res = min_cost_allocation(table, "damage", sizes, target_bits, "mixdq", method=method, what=what)
    res.details.update(configs_evaluated=int(len(table)), cpu_seconds=float(table["seconds"].sum()))
    return res
