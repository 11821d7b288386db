"""HAWQ-V3-style allocation: second-order sensitivity of a denoising loss, then an exact ILP.

Per layer ``l`` and option ``o`` the sensitivity is (HAWQ-V2/V3)

    Ω(l, o) = Tr(H_l) / n_l · ‖W_l − Q_o(W_l)‖²          (``mode="trace"``)

with ``H_l`` the Hessian of the loss with respect to the layer's weight (``n_l`` entries), estimated
by Hutchinson's method: ``Tr(H) = E[vᵀ H v]`` for Rademacher ``v``, one Hessian-vector product
(double backward) per probe for all layers at once (``vₗᵀ (H v)ₗ`` estimates ``Tr(H_ll)``). Or, with
``mode="fisher"``, the empirical-Fisher diagonal ``F = mean_i g_i²`` of per-sample gradients:
``Ω(l, o) = Σ F ⊙ (W − Q_o(W))²``. The ILP minimises ``Σ Ω`` under the byte budget through the
search's exact knapsack.

The loss is the model's own training loss on calibration inputs: for the digits models the
v-prediction MSE on scikit-learn digits at random timesteps (as ``scripts/train_digits.py``); other
families need a ``loss_fn`` (e.g. output matching against the full-precision outputs).
Tied layers (copies of one weight) share one probe and their Hessian blocks are summed; a split
half (``in_slice``) only probes its input-channel range.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from ..errors import SensitivityError
from . import ALLOCATORS


def hutchinson_trace(hvp: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], n_samples: int = 64,
                     seed: int = 0) -> Tuple[float, float]:
    """Hutchinson estimate of ``Tr(H)`` for ``hvp(v) = H v`` on tensors of ``shape``.

    Returns ``(mean, standard error)`` over ``n_samples`` Rademacher probes drawn from ``seed``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(n_samples)):
        v = torch.randint(0, 2, tuple(shape), generator=gen).to(torch.float32) * 2 - 1
        vals.append(float((v * hvp(v)).sum()))
    a = np.asarray(vals)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else float("nan")


def _layer_params(den: torch.nn.Module, specs) -> List[Tuple[object, List[torch.Tensor], tuple]]:
    out = []
    for spec in specs:
        paths = (spec.module_path,) + tuple(spec.tied)
        try:
            ws = [den.get_submodule(p).weight for p in paths]
        except AttributeError:
            raise SensitivityError(f"layer {spec.name!r}: module {spec.module_path!r} not found in the denoiser") from None
        sl = (slice(None), slice(*spec.in_slice)) if spec.in_slice else (slice(None),)
        out.append((spec, ws, sl))
    return out


def digits_denoising_loss(den: torch.nn.Module, family: str, num_samples: int = 64, seed: int = 0,
                          batch_size: int = 64) -> Callable[[Optional[Sequence[int]]], torch.Tensor]:
    """``loss(indices=None)``: the digits models' v-prediction MSE on ``num_samples`` fixed
    calibration items (digit images, timesteps, noise drawn from ``seed``); ``indices`` picks items."""
    from ..zoo import digits as D
    from ..zoo.digits_data import digits_dataset

    images, labels = digits_dataset()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(images), generator=gen)[:num_samples]
    x0 = D.images_to_tensor(images)[idx]
    y = torch.as_tensor(labels)[idx]
    sched = D.make_scheduler()
    acp = sched.alphas_cumprod.float()
    t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    kind = "dit" if "dit" in family else "unet"

    def loss(indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        sel = slice(None) if indices is None else torch.as_tensor(list(indices))
        xs, ts, ys, vs = xt[sel], t[sel], y[sel], v[sel]
        if kind == "dit":
            pred = den(xs, timestep=ts, class_labels=ys).sample
        else:
            pred = D.unet_forward(den, xs, ts, ys)
        return torch.nn.functional.mse_loss(pred, vs)

    return loss


def hessian_traces(den: torch.nn.Module, specs, loss_fn: Callable[[], torch.Tensor], n_samples: int = 64,
                   seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Per layer: Hutchinson ``Tr(H_l)`` (one HVP per probe for all layers), its standard error, ``n_l``.

    Returns DataFrame(layer, trace, trace_se, numel).
    """
    items = _layer_params(den, specs)
    params = list(dict.fromkeys(w for _, ws, _ in items for w in ws))
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(int(seed))
    est = np.zeros((n_samples, len(items)))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        den.eval()
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no double backward
            _probes(den, items, params, loss_fn, gen, est, n_samples, progress)
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
    se = est.std(axis=0, ddof=1) / np.sqrt(n_samples) if n_samples > 1 else np.full(len(items), np.nan)
    return pd.DataFrame({"layer": [s.name for s, _, _ in items], "trace": est.mean(axis=0), "trace_se": se,
                         "numel": [int(np.prod(ws[0][sl].shape)) for _, ws, sl in items]})


def _probes(den, items, params, loss_fn, gen, est, n_samples, progress) -> None:
    """Fill ``est[s, k]`` with probe ``s``'s estimate ``v_kᵀ (H v)_k`` of layer ``k``."""
    from tqdm.auto import tqdm

    for s in tqdm(range(int(n_samples)), desc="hawq: Hessian-vector products", disable=not progress, unit="probe"):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gmap = dict(zip(map(id, params), grads))
        vs = {}
        dot = 0.0
        for k, (spec, ws, sl) in enumerate(items):
            shape = tuple(ws[0][sl].shape)
            v = torch.randint(0, 2, shape, generator=gen).to(ws[0].dtype) * 2 - 1
            vs[k] = v
            for w in ws:
                dot = dot + (gmap[id(w)][sl] * v).sum()
        hv = torch.autograd.grad(dot, params)
        hmap = dict(zip(map(id, params), hv))
        for k, (spec, ws, sl) in enumerate(items):
            h = sum(hmap[id(w)][sl] for w in ws)
            est[s, k] = float((vs[k] * h).sum())


def fisher_diagonals(den: torch.nn.Module, specs, loss_fn: Callable[[Optional[Sequence[int]]], torch.Tensor],
                     num_samples: int, progress: bool = False) -> Dict[str, torch.Tensor]:
    """Empirical-Fisher diagonal per layer: ``mean_i g_i²`` over single calibration items ``i``."""
    from tqdm.auto import tqdm

    items = _layer_params(den, specs)
    params = list(dict.fromkeys(w for _, ws, _ in items for w in ws))
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    acc = {spec.name: torch.zeros(ws[0][sl].shape) for spec, ws, sl in items}
    try:
        den.eval()
        for i in tqdm(range(int(num_samples)), desc="hawq: per-sample gradients", disable=not progress, unit="item"):
            grads = torch.autograd.grad(loss_fn([i]), params)
            gmap = dict(zip(map(id, params), grads))
            for spec, ws, sl in items:
                g = sum(gmap[id(w)][sl] for w in ws)
                acc[spec.name] += g.detach().float() ** 2
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
    return {k: v / num_samples for k, v in acc.items()}


def sensitivity_table(mq, den: torch.nn.Module, mode: str = "trace",
                      loss_fn: Optional[Callable] = None, family: Optional[str] = None,
                      num_samples: int = 64, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Ω per (layer, option) of ``mq``: DataFrame(layer, option, sensitivity[, trace]) and the cost in
    ``attrs`` (``cpu_seconds``, ``hvps`` or ``gradients``). ``loss_fn`` default: the digits loss."""
    if mode not in ("trace", "fisher"):
        raise SensitivityError(f"hawq: mode must be 'trace' or 'fisher', got {mode!r}")
    if loss_fn is None:
        fam = family or str(mq.model_id).split(":", 1)[0]
        if not fam.startswith("digits"):
            raise SensitivityError(f"hawq: no built-in calibration loss for model {fam!r}; pass loss_fn")
        loss_fn = digits_denoising_loss(den, fam, num_samples=num_samples, seed=seed)
    t0 = time.process_time()
    specs = list(mq.layers)
    rows = []
    if mode == "trace":
        tr = hessian_traces(den, specs, lambda: loss_fn(None), n_samples=num_samples, seed=seed, progress=progress)
        per = dict(zip(tr["layer"], zip(tr["trace"], tr["numel"])))
        for spec in specs:
            trace, n = per[spec.name]
            for o in mq.options:
                sse = float(mq.stats(spec.name, o)["sse"])
                rows.append({"layer": spec.name, "option": o, "sensitivity": max(trace, 0.0) / n * sse, "trace": trace})
        cost = {"hvps": int(num_samples)}
    else:
        fisher = fisher_diagonals(den, specs, loss_fn, num_samples, progress=progress)
        for spec, ws, sl in _layer_params(den, specs):
            w = ws[0][sl].detach().float()
            for o in mq.options:
                dw = mq.dequantize(spec.name, o).reshape(w.shape) - w
                rows.append({"layer": spec.name, "option": o, "sensitivity": float((fisher[spec.name] * dw * dw).sum())})
        cost = {"gradients": int(num_samples)}
    df = pd.DataFrame(rows)
    df.attrs.update(mode=mode, num_samples=int(num_samples), seed=int(seed),
                    cpu_seconds=time.process_time() - t0, **cost)
    return df


@ALLOCATORS.register("hawq")
def hawq_allocate(sizes: pd.DataFrame, target_bits: float, sensitivity: pd.DataFrame = None, method: str = "auto",
                  what: str = "this multiquantizer", **_):
    """Minimise ``Σ Ω(l, o)`` under the target's byte budget (exact knapsack)."""
    from . import min_cost_allocation

    if sensitivity is None:
        raise SensitivityError("hawq allocator needs a sensitivity table (hawq.sensitivity_table)")
    res = min_cost_allocation(sensitivity, "sensitivity", sizes, target_bits,
                              f"hawq-{sensitivity.attrs.get('mode', 'trace')}", method=method, what=what)
    res.details.update(mode=sensitivity.attrs.get("mode"), calibration_samples=sensitivity.attrs.get("num_samples"),
                       configs_evaluated=0, cpu_seconds=float(sensitivity.attrs.get("cpu_seconds", 0.0)))
    return res
