"""``calibrate(den, mq, config, data)``: data-aware weight rounding + static activation ranges.

Steps (the model is left restored to full precision at the end):

1. ``apply(den, mq, config)``: every layer at its option's round-to-nearest codes;
2. one pass over the calibration set per group of layers collects each layer's input moment
   ``H = E[x xᵀ]`` (inputs as the quantized model produces them; conv inputs unfolded, split halves
   sliced, tied copies pooled) on a *fit* part of the set and on a *held-out* part (``held_out``);
3. every layer's codes / table are recomputed with its rounding method (:data:`DEFAULT_ROUNDING`
   per method for ``weights_method="auto"``); the result is kept only if it lowers the layer's
   output error on the fit part, and both errors on the held-out part go into the report;
4. the overlay is written into the model and, with ``act_bits``, every activation point's range is
   observed on the whole set (:mod:`.observers`).

Rounding methods (``weights_method``): ``gptq`` (any table), ``adaround`` (uniform grids; other
layers get their method's default), ``refine`` (least-squares table refit, codes fixed),
``gptq+refine`` / ``adaround+refine`` (both in turn), ``none`` (activations only), ``auto``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_values
from ..config import QuantConfig, as_options
from ..errors import SensitivityError
from ..layers import LayerSpec, layer_weight
from ..options import QuantOption
from ..quantizers import QuantizedWeight, TableMethod, get_method
from ..quantizers.kmeans import KMeansPerChannel, KMeansPerTensor
from ..quantizers.uaq import UniformAffine, UniformAffinePerGroup
from ..registry import HandlerRegistry
from ..quantizers.activation import check_act_bits, disable_activation_quant, point_channel_dim, static_points
from .artifact import ActivationCalibration, CalibratedArtifact, write_overlay
from .data import CalibrationSet
from .observers import GRANULARITIES, OBSERVERS, RangeObserver
from .rounding import (TABLE_REFITS, adaround_codes, gptq_codes, lookup_codes, output_error, refit_table,
                       relative_output_error, uniform_grid)

from .names import WEIGHT_METHODS  # noqa: E402 (torch-free, re-exported)

#: the rounding ``auto`` uses per quantization method: measured on digits-dit / digits-unet
#: (benchmarks/bench_calibration.py): GPTQ then the
#: table refit has the highest held-out PSNR for uaq-4, kmeans_c-4 and kmeans_a-4 on both models
#: (digits-dit FID 1.316 / 1.296 / 1.345 vs GPTQ alone 1.326 / 1.290 / 1.365, round-to-nearest
#: 1.657 / 1.361 / 1.867; AdaRound 1.417 at uaq-4). Keyed by the quantization method's class; other
#: table methods use ``gptq`` (any table)
DEFAULT_ROUNDING = HandlerRegistry("calibrated rounding")
DEFAULT_ROUNDING.register(TableMethod, handler="gptq")
DEFAULT_ROUNDING.register(UniformAffine, KMeansPerChannel, KMeansPerTensor, handler="gptq+refine")
DEFAULT_ROUNDING.unsupported(UniformAffinePerGroup, "not a single-table method: GPTQ and AdaRound round on one value table per row")


def default_rounding(method: str) -> str:
    """The rounding ``weights_method="auto"`` uses for a layer of ``method`` (a registered name)."""
    from ..quantizers import get_method

    return DEFAULT_ROUNDING.lookup(get_method(method)) or "gptq"


def resolve_rounding(weights_method: str, method: str, table: torch.Tensor) -> str:
    """The rounding used for a layer of ``method`` under ``weights_method`` (see the module docstring)."""
    if weights_method not in WEIGHT_METHODS:
        raise SensitivityError(f"unknown --weights-method {weights_method!r}; use one of {', '.join(WEIGHT_METHODS)}")
    if weights_method == "auto":
        return default_rounding(method)
    steps = weights_method.split("+")
    if "adaround" in steps:
        try:
            uniform_grid(table)
        except SensitivityError:
            return default_rounding(method)
    if "refine" in steps and TABLE_REFITS.lookup(get_method(method)) is None:
        steps = [s for s in steps if s != "refine"] or ["gptq"]
    return "+".join(steps)


# ------------------------------------------------------------------------------ Hessians
def _input_rows(module: nn.Module, x: torch.Tensor, in_slice: Optional[Tuple[int, int]]) -> Optional[torch.Tensor]:
    """The layer's inputs as rows ``[n, K]`` matching ``weight.reshape(C, -1)`` (None: unsupported op)."""
    if isinstance(module, nn.Linear) or not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if in_slice is not None:
            x = x[..., in_slice[0]:in_slice[1]]
        return x.reshape(-1, x.shape[-1])
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    if in_slice is not None:
        x = x[:, in_slice[0]:in_slice[1]]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
        k, d, p, s = (module.kernel_size[0], 1), (module.dilation[0], 1), (module.padding[0], 0), (module.stride[0], 1)
    else:
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _device_dtype(den: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(den.parameters())
    return p.device, p.dtype


def _run(den: nn.Module, data: CalibrationSet, batch_size: int) -> None:
    device, dtype = _device_dtype(den)
    with torch.no_grad():
        for args, kwargs in data.batches(batch_size, device=device, dtype=dtype):
            den(*args, **kwargs)


def collect_hessians(den: nn.Module, layers: Sequence[LayerSpec], data: CalibrationSet, batch_size: int = 128,
                     max_bytes: int = 256 << 20, progress: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    """``{layer: H float64 [K, K]}`` (``None`` for unsupported ops) = E[x xᵀ] over the layer's input rows.

    Layers are grouped so that one pass over ``data`` holds at most ``max_bytes`` of Hessians."""
    modules = dict(den.named_modules())
    out: Dict[str, Optional[torch.Tensor]] = {}
    groups: List[List[LayerSpec]] = [[]]
    size = 0
    for spec in layers:
        k = int(math.prod(spec.shape[1:]))
        b = 8 * k * k
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += b
    for group in tqdm(groups, desc="hessians", unit="pass", disable=not progress, leave=False):
        acc: Dict[str, List] = {}
        handles = []
        for spec in group:
            k = int(math.prod(spec.shape[1:]))
            acc[spec.name] = [torch.zeros(k, k, dtype=torch.float64), 0, True]
            for path in (spec.module_path,) + tuple(spec.tied):
                mod = modules[path]

                def hook(m, args, spec=spec):
                    rows = _input_rows(m, args[0], spec.in_slice)
                    a = acc[spec.name]
                    if rows is None:
                        a[2] = False
                        return None
                    r = rows.detach().double().cpu()
                    a[0] += r.T @ r
                    a[1] += r.shape[0]
                    return None

                handles.append(mod.register_forward_pre_hook(hook))
        try:
            _run(den, data, batch_size)
        finally:
            for h in handles:
                h.remove()
        for name, (H, n, ok) in acc.items():
            out[name] = (H / max(1, n)) if ok and n > 0 else None
    return out


# ------------------------------------------------------------------------------ observers
def observe_ranges(den: nn.Module, layers: Sequence[LayerSpec], data: CalibrationSet, bits: int,
                   observer: str = "mse", granularity: str = "tensor", attention: bool = True,
                   percentile: float = 99.99, max_rows: int = 512, seed: int = 0,
                   batch_size: int = 128) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{point: (lo, hi)}`` observed on ``data`` at every static activation point of ``den``."""
    points = static_points(den, layers, attention=attention)
    modules = dict(den.named_modules())
    obs = {p: RangeObserver(observer, granularity, bits, percentile, max_rows, seed + i)
           for i, p in enumerate(points)}
    handles = []

    def feed(point: str, kind: str, sl, x: torch.Tensor) -> None:
        cd = point_channel_dim(kind, x.dim())
        if sl is not None:
            idx = [slice(None)] * x.dim()
            idx[cd] = slice(*sl)
            x = x[tuple(idx)]
        obs[point].update(x.movedim(cd, -1).reshape(-1, x.shape[cd]))

    for point, (path, kind, sl) in points.items():
        mod = modules[path]
        if kind == "out":
            handles.append(mod.register_forward_hook(
                lambda m, a, o, point=point: feed(point, "out", None, o) if isinstance(o, torch.Tensor) else None))
        else:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, point=point, kind=kind, sl=sl: feed(point, kind, sl, a[0]) if a else None))
    try:
        _run(den, data, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {p: o.range() for p, o in obs.items()}


# ------------------------------------------------------------------------------ calibrate
def _round_layer(rounding: str, method: str, W: torch.Tensor, H: torch.Tensor, q: QuantizedWeight,
                 seed: int, adaround_iters: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    codes, params = q.codes, dict(q.params)
    table = q.table()
    for step in rounding.split("+"):
        if step == "gptq":
            codes = gptq_codes(W, H, table)
        elif step == "adaround":
            codes = adaround_codes(W, H, table, iters=adaround_iters, seed=seed)
        elif step == "refine":
            params = refit_table(method, W, H, codes, params)
            table = get_method(method).table(params, q.bits)
        else:
            raise SensitivityError(f"unknown rounding step {step!r}")
    return codes, params


def calibrate(den: nn.Module, mq, config: QuantConfig | Mapping[str, str], data: CalibrationSet, *,
              weights_method: str = "auto", act_bits: Optional[int] = 8, observer: str = "mse",
              granularity: str = "tensor", attention: bool = True, percentile: float = 99.99,
              held_out: float = 0.25, seed: int = 0, batch_size: int = 128, adaround_iters: int = 1000,
              progress: bool = True, family: Optional[str] = None) -> CalibratedArtifact:
    """Calibrate ``config`` of ``mq`` on ``den`` with ``data``; returns the (unsaved) artifact.

    ``act_bits``: 2..16 or ``None`` (weights only); ``observer`` / ``granularity``: see
    :mod:`.observers`; ``held_out``: fraction of ``data`` kept out of the weight fit (seeded by
    ``seed``) to report held-out errors. ``data`` must come from ``mq.model_id`` (same family and weights).
    """
    from ..multiquantizer import apply, restore

    t0 = time.perf_counter()
    check_values(percentile=percentile, held_out=held_out, seed=seed, batch_size=batch_size,
                 adaround_iters=adaround_iters)
    if act_bits is not None:
        act_bits = check_act_bits(act_bits)
    if observer not in OBSERVERS:
        raise SensitivityError(f"unknown observer {observer!r}; use one of {', '.join(OBSERVERS)}")
    if granularity not in GRANULARITIES:
        raise SensitivityError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if weights_method not in WEIGHT_METHODS:
        raise SensitivityError(f"unknown --weights-method {weights_method!r}; use one of {', '.join(WEIGHT_METHODS)}")
    if weights_method == "none" and act_bits is None:
        raise SensitivityError("nothing to calibrate: --weights-method none and no --act-bits")
    if len(data) == 0:
        raise SensitivityError(f"{data.path or 'calibration set'}: the calibration set is empty")
    if isinstance(config, QuantConfig):
        config.check_model(mq.model_id)
    options = as_options(config)
    mq.validate(options)
    if not options:
        raise SensitivityError("the config quantizes no layer")
    data.check_model(mq.model_id)
    _check_inputs(den, data)

    specs = [s for s in mq.layers if s.name in options]
    restore(den)
    disable_activation_quant(den)
    W_fp = {s.name: layer_weight(den, s).detach().float().reshape(s.shape[0], -1).clone() for s in specs}
    weights: Dict[str, QuantizedWeight] = {}
    layer_report: Dict[str, Any] = {}
    t_w = 0.0
    try:
        apply(den, mq, options)
        if weights_method != "none":
            tw = time.perf_counter()
            fit, held = data.split(held_out, seed) if held_out > 0 and len(data) > 1 else (data, data)
            H_fit = collect_hessians(den, specs, fit, batch_size, progress=progress)
            H_held = collect_hessians(den, specs, held, batch_size, progress=progress)
            for spec in tqdm(specs, desc=f"round weights ({weights_method})", unit="layer", disable=not progress):
                opt = options[spec.name]
                q = mq.quantized_weight(spec.name, opt)
                method = QuantOption.parse(opt).method
                W = W_fp[spec.name]
                Hf, Hh = H_fit[spec.name], H_held[spec.name]
                if Hf is None:
                    layer_report[spec.name] = {"option": opt, "rounding": "unsupported op (kept)"}
                    continue
                rounding = resolve_rounding(weights_method, method, q.table())
                codes, params = _round_layer(rounding, method, W, Hf, q, seed, adaround_iters)
                rtn_hat = lookup_codes(q.table(), q.codes)
                new = QuantizedWeight(opt, q.shape, torch.float32, codes.to(torch.uint8).contiguous(),
                                      {k: v.to(q.params[k].dtype) for k, v in params.items()})
                new_hat = lookup_codes(new.table(), new.codes)
                fit_before, fit_after = output_error(W, rtn_hat, Hf), output_error(W, new_hat, Hf)
                kept = fit_after < fit_before
                rec = {"option": opt, "rounding": rounding, "kept": bool(kept),
                       "fit_rel_error_rtn": fit_before / max(1e-30, output_error(W, torch.zeros_like(W), Hf)),
                       "fit_rel_error": fit_after / max(1e-30, output_error(W, torch.zeros_like(W), Hf)),
                       "held_rel_error_rtn": relative_output_error(W, rtn_hat, Hh) if Hh is not None else None,
                       "held_rel_error": relative_output_error(W, new_hat, Hh) if Hh is not None else None,
                       "weight_error_rtn": float(q.error)}
                if kept:
                    sse = float(((new_hat - W) ** 2).sum(dtype=torch.float64))
                    norm = float((W ** 2).sum(dtype=torch.float64))
                    new.error, new.sse = (sse / norm if norm > 0 else 0.0), sse
                    rec["weight_error"] = new.error
                    weights[spec.name] = new
                layer_report[spec.name] = rec
            write_overlay(den, mq, weights)
            t_w = time.perf_counter() - tw
        acts = None
        t_a = 0.0
        if act_bits is not None:
            ta = time.perf_counter()
            ranges = observe_ranges(den, mq.layers, data, act_bits, observer, granularity, attention, percentile,
                                    seed=seed, batch_size=batch_size)
            acts = ActivationCalibration(act_bits, observer, granularity, ranges, attention,
                                         {"percentile": percentile} if observer == "percentile" else {})
            t_a = time.perf_counter() - ta
    finally:
        disable_activation_quant(den)
        restore(den)
    cfg = config if isinstance(config, QuantConfig) else QuantConfig(options)
    cfg = QuantConfig(dict(options), model=cfg.model or mq.model_id, multiquantizer_hash=mq.hash,
                      avg_bits=mq.avg_bits(options),
                      provenance={**cfg.provenance, "calibrated": {"command": "calibrate", "seed": seed}})
    seconds = time.perf_counter() - t0
    manifest = {
        "model_id": mq.model_id, "multiquantizer_hash": mq.hash, "config_hash": cfg.config_hash,
        "weights_method": weights_method, "seed": seed, "held_out": held_out,
        "calibration_set": {"path": str(data.path) if data.path else None, "samples": len(data),
                            **{k: data.meta.get(k) for k in ("model_id", "kind", "num", "timesteps", "seed")}},
        "layers": {n: {k: v for k, v in r.items()} for n, r in layer_report.items() if n in weights},
        "seconds": {"total": round(seconds, 3), "weights": round(t_w, 3), "activations": round(t_a, 3)},
    }
    report = {"layers": layer_report, "seconds": manifest["seconds"], "weights_method": weights_method,
              "act_bits": act_bits, "observer": observer, "granularity": granularity,
              "calibrated_layers": len(weights), "quantized_layers": len(options)}
    return CalibratedArtifact(cfg, weights, acts, manifest, None, report)


def _check_inputs(den: nn.Module, data: CalibrationSet) -> None:
    """Run one sample through ``den``: a set of another shape fails here with one line."""
    device, dtype = _device_dtype(den)
    args, kwargs = next(data.batches(1, device=device, dtype=dtype))
    try:
        with torch.no_grad():
            den(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means the inputs do not fit
        shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in data.tensors.items() if not k.startswith("_"))
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SensitivityError(f"{data.path or 'calibration set'}: its inputs ({shapes}) do not fit the model "
                               f"({type(exc).__name__}: {msg[:160]})") from None
