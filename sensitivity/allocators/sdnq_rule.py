"""SDNQ's dynamic-quantization rule, re-implemented from its documented behaviour (SDNQ is GPL-3.0;
no code is taken from it).

SDNQ (``use_dynamic_quantization=True``) quantizes every layer with the lowest-bit dtype whose
quantization loss ``MSE(W, Ŵ) / Var(W)`` is at most ``dynamic_loss_threshold``, trying dtypes from
the minimum (``weights_dtype``) upward; a layer that no dtype satisfies stays unquantized. The
default threshold is ``10 ** (-b / 2)`` for a minimum dtype of ``b`` bits (3 bits: 0.0316).

Here the dtypes are the multiquantizer's options, tried by (bits, bytes) ascending, and the loss is
``sse / (n · Var(W))`` (``weight_variance`` given) or the stored relative error
``‖W − Ŵ‖² / ‖W‖²`` (Var replaced by the mean square, equal for zero-mean weights). The rule has no
bit budget: :func:`sdnq_allocate` sweeps the threshold so the config lands at or under a target.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import numpy as np
import pandas as pd

from ..errors import SensitivityError
from ..options import QuantOption
from . import ALLOCATORS, result_from_options, sweep_to_target


def default_threshold(sizes: pd.DataFrame) -> float:
    """``10 ** (-b / 2)`` for ``b`` = the fewest bits among the quantized options of ``sizes``."""
    bits = [QuantOption.parse(o).bits for o in set(sizes["option"]) if o != "fp16"]
    if not bits:
        raise SensitivityError("sdnq: the size table holds no quantized option")
    return 10.0 ** (-min(bits) / 2.0)


def sdnq_losses(sizes: pd.DataFrame, weight_variance: Optional[Mapping[str, float]] = None) -> pd.DataFrame:
    """``sizes`` (quantized options only) with a ``loss`` column and a try ``order`` per layer."""
    df = sizes[sizes["option"] != "fp16"].copy()
    if weight_variance is not None:
        if "sse" not in df.columns:
            raise SensitivityError("sdnq: weight_variance needs the multiquantizer's 'sse' column")
        numel = df["fp16_bytes"].to_numpy() / 2.0
        var = np.array([float(weight_variance[l]) for l in df["layer"]])
        df["loss"] = df["sse"].to_numpy() / (numel * np.maximum(var, 1e-30))
    else:
        if "error" not in df.columns:
            raise SensitivityError("sdnq: the size table has no 'error' column (multiquantizer stats)")
        df["loss"] = df["error"].astype(float)
    df["bits"] = [QuantOption.parse(o).bits for o in df["option"]]
    df = df.sort_values(["layer", "bits", "nbytes", "option"], kind="stable")
    return df


def sdnq_choose(losses: pd.DataFrame, threshold: float) -> Dict[str, str]:
    """The rule: per layer the first option (bits, bytes ascending) with loss ≤ threshold, else fp16."""
    out: Dict[str, str] = {}
    for layer, opts, loss in _tries(losses):
        ok = np.flatnonzero(loss <= threshold)
        out[layer] = opts[int(ok[0])] if ok.size else "fp16"
    return out


def _tries(losses: pd.DataFrame):
    cached = losses.attrs.get("_tries")
    if cached is None:
        cached = [(layer, [str(o) for o in g["option"]], g["loss"].to_numpy(dtype=np.float64))
                  for layer, g in losses.groupby("layer", sort=False)]
        losses.attrs["_tries"] = cached
    return cached


@ALLOCATORS.register("sdnq")
def sdnq_allocate(sizes: pd.DataFrame, target_bits: Optional[float], threshold: Optional[float] = None,
                  weight_variance: Optional[Mapping[str, float]] = None, **_):
    """SDNQ's config at ``threshold`` (default: SDNQ's) or, with ``target_bits``, at the smallest
    threshold whose config fits (the most accurate one SDNQ's rule gives at that size)."""
    import time

    t0 = time.process_time()
    losses = sdnq_losses(sizes, weight_variance)
    lo = max(float(losses["loss"].min()) * 0.5, 1e-12)
    hi = float(losses["loss"].max()) * 2.0 + 1e-12
    if target_bits is None:
        th = default_threshold(sizes) if threshold is None else float(threshold)
        opts = sdnq_choose(losses, th)
        budget = None
    else:
        # a larger threshold admits cheaper options: bytes decrease with the threshold
        th, opts, budget = sweep_to_target(lambda x: sdnq_choose(losses, x), sizes, target_bits, lo, hi,
                                           increasing_bits=False, candidates=losses["loss"].to_numpy())
    res = result_from_options(opts, sizes, "sdnq", target_bits=None if target_bits is None else float(target_bits),
                              budget_bytes=budget)
    res.seconds = time.process_time() - t0
    res.details.update(threshold=float(th), default_threshold=default_threshold(sizes),
                       loss="mse/var" if weight_variance is not None else "relative error",
                       fp16_layers=sum(1 for o in opts.values() if o == "fp16"),
                       configs_evaluated=0, cpu_seconds=res.seconds)
    if not math.isfinite(res.avg_bits):
        raise SensitivityError("sdnq: no config")
    return res


sdnq_allocate.may_keep_fp16 = True  # a layer no option passes stays fp16: its size rows need fp16
