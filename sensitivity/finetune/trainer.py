"""Quantization-aware fine-tuning with knowledge distillation: the training loop, EMA, checkpoints.

```python
from sensitivity.finetune import FinetuneSettings, finetune
record = finetune(teacher, mq, config, data, "finetuned/dit-3.4", FinetuneSettings(steps=300, lr=1e-4),
                  model_id="digits-dit:shipped")
```

Loss per step (``x_t``, ``t``, conditioning from the data source; teacher = the full-precision
denoiser, student = the same module with fake-quantized weights, see :mod:`.student`)::

    distill_weight * mse(student(x_t), teacher(x_t))            output distillation
  + denoise_weight * mse(student(x_t), target)                  ordinary denoising loss (data with targets)
  + feature_weight * mean_b mse(f_b^S, f_b^T) / mean(f_b^T ** 2) intermediate features (block outputs)

Adam on the latent weights (``lr``) and the quantization params (``lr_quant``), linear warm-up then
cosine decay to 10 %; gradient-norm clipping; an EMA of every trained tensor (decay warmed up as
``min(decay, (1 + step) / (10 + step))``), which is what is exported when ``ema_decay > 0``.
Every ``checkpoint_every`` steps ``OUT/checkpoints/last.pt`` (tensors, optimizer, EMA, the data
generator's state, the loss log) is replaced atomically; a rerun with the same settings resumes
from it, so a run killed with ``kill -9`` loses at most ``checkpoint_every`` steps; a resumed run
draws the same batches and ends equal to an uninterrupted one up to float summation order (BLAS
results can depend on buffer alignment).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_values
from ..config import QuantConfig, as_options
from ..errors import SensitivityError
from ..io import atomic_path, atomic_write_json, check_writable
from ..options import FP16
from .artifact import RECORD_FILE, WEIGHTS_FILE, write_artifact
from .data import Batch, model_output
from .rules import ASSIGN_MODES
from .student import FakeQuantStudent

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of one fine-tuning run (all recorded in ``finetune.json``)."""

    steps: int = 300
    lr: float = 1e-4
    lr_quant: Optional[float] = None  # default: lr
    batch_size: int = 64
    seed: int = 0
    warmup: int = 20
    ema_decay: float = 0.99
    distill_weight: float = 1.0
    denoise_weight: float = 0.0
    feature_weight: float = 0.0
    assign: str = "rederive"
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    amp: Optional[str] = None  # None | "bf16" | "fp16"
    val_batches: int = 4

    def __post_init__(self):
        def bad(msg):
            raise SensitivityError(msg)

        if not isinstance(self.steps, int):
            bad(f"--steps must be an integer, got {self.steps!r}")
        check_values(**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("assign", "amp")})
        if self.distill_weight + self.denoise_weight + self.feature_weight <= 0:
            bad("the loss weights are all zero: set --distill-weight, --denoise-weight or --feature-weight")
        if self.assign not in ASSIGN_MODES:
            bad(f"--assign must be one of {', '.join(ASSIGN_MODES)}, got {self.assign!r}")
        if self.amp not in (None, *AMP_DTYPES):
            bad(f"--amp must be one of {', '.join(AMP_DTYPES)} (or off), got {self.amp!r}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["lr_quant"] = self.lr if self.lr_quant is None else self.lr_quant
        return d

    def identity(self) -> Dict[str, Any]:
        """The settings that decide the result (a resumed run must match them)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        return d


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))


def feature_modules(denoiser: torch.nn.Module) -> List[str]:
    """Paths of the block outputs matched by the feature loss: the items of every top-level
    ``ModuleList`` (transformer / down / up blocks) and ``mid_block``."""
    out = []
    for name, child in denoiser.named_children():
        if isinstance(child, torch.nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(child))]
        elif name == "mid_block" and child is not None:
            out.append(name)
    return out


class _FeatureTap:
    """Forward hooks that collect the first tensor output of ``paths`` into ``self.store``."""

    def __init__(self, root: torch.nn.Module, paths: List[str]):
        self.store: Optional[List[torch.Tensor]] = None
        self.handles = [root.get_submodule(p).register_forward_hook(self._hook) for p in paths]

    def _hook(self, module, args, out):
        if self.store is None:
            return
        t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
        if t is not None:
            self.store.append(t)

    def close(self):
        for h in self.handles:
            h.remove()


def _loss_terms(s_out: torch.Tensor, t_out: torch.Tensor, target: Optional[torch.Tensor],
                s_feats, t_feats, st: FinetuneSettings) -> Dict[str, torch.Tensor]:
    s_out, t_out = s_out.float(), t_out.float()
    terms: Dict[str, torch.Tensor] = {}
    if st.distill_weight > 0:
        terms["distill"] = F.mse_loss(s_out, t_out)
    if st.denoise_weight > 0 and target is not None:
        c = target.shape[1]
        terms["denoise"] = F.mse_loss(s_out[:, :c], target.float())
    if st.feature_weight > 0 and s_feats:
        fl = [F.mse_loss(a.float(), b.float()) / (b.float().pow(2).mean() + 1e-8) for a, b in zip(s_feats, t_feats)]
        terms["feature"] = torch.stack(fl).mean()
    return terms


def _total(terms: Mapping[str, torch.Tensor], st: FinetuneSettings) -> torch.Tensor:
    w = {"distill": st.distill_weight, "denoise": st.denoise_weight, "feature": st.feature_weight}
    return sum(w[k] * v for k, v in terms.items())


def _atomic_save(obj, path: Path) -> None:
    with atomic_path(path, "checkpoint") as tmp:
        torch.save(obj, tmp)


_CHECKPOINT_KEYS = ("identity", "step", "tensors", "ema", "optimizer", "generator", "log", "seconds", "val_before")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read ``last.pt`` with ``weights_only=True`` (tensors and plain containers, never arbitrary objects);
    a damaged or foreign file is one line naming it (delete it, or ``--restart`` to start over)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(ckpt, dict) and all(k in ckpt for k in _CHECKPOINT_KEYS)
    except Exception:  # truncated zip, garbage, a pickle with objects weights_only refuses...
        ok = False
    if not ok:
        raise SensitivityError(f"{path}: damaged or not a fine-tuning checkpoint; delete it or pass --restart "
                               "to start over")
    return ckpt


def _finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def finetune(teacher: torch.nn.Module, mq, config: QuantConfig | Mapping[str, str], data, out: str | os.PathLike,
             settings: FinetuneSettings = FinetuneSettings(), *, model_id: str = "", start=None,
             device=None, progress: bool = True, restart: bool = False,
             extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Fine-tune ``config`` of ``mq`` on ``teacher`` and write the artifact to ``out``; returns the record.

    ``start``: ``{layer: QuantizedWeight}`` to start from instead of ``mq``'s options (a calibrated
    artifact's); ``data``: a source of :mod:`.data`; ``teacher`` is only read. A rerun with the same
    settings resumes from ``out/checkpoints/last.pt``; ``restart=True`` discards it.
    """
    st = settings
    cfg = config if isinstance(config, QuantConfig) else QuantConfig(options=dict(config))
    cfg.check_model(model_id or mq.model_id)
    options = {k: v for k, v in as_options(cfg).items() if v != FP16}
    if not options:
        raise SensitivityError("the config quantizes no layer: nothing to fine-tune")
    mq.validate(options)
    if st.denoise_weight > 0 and getattr(data, "kind", "") == "prompts":
        raise SensitivityError("--denoise-weight needs data with targets (digits or an imagefolder), "
                               "not prompts alone")
    out = check_writable(out, "--out", directory=True)
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    identity = {"model_id": model_id, "multiquantizer": mq.hash, "config": cfg.config_hash,
                "start": None if start is None else sorted((k, v.option) for k, v in start.items()),
                "data": data.describe(), "settings": st.identity()}
    ckpt_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    record_path = out / RECORD_FILE
    if not restart and record_path.is_file() and (out / WEIGHTS_FILE).is_file():
        try:
            old = json.loads(record_path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and old.get("identity") == json.loads(json.dumps(identity, default=str)):
            old["already_done"] = True
            return old
    ckpt = None
    if ckpt_path.is_file() and not restart:
        ckpt = load_checkpoint(ckpt_path)
        if json.dumps(ckpt.get("identity"), sort_keys=True, default=str) != json.dumps(identity, sort_keys=True, default=str):
            raise SensitivityError(f"{out} holds a fine-tuning run with other settings, model or config; "
                                   "use another --out or --restart")
    elif restart and out.exists():
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        for name in (WEIGHTS_FILE, RECORD_FILE):
            (out / name).unlink(missing_ok=True)

    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    quantized = dict(start) if start is not None else {n: mq.quantized_weight(n, o) for n, o in options.items()}
    student = FakeQuantStudent(teacher, mq.layers, options, quantized, assign=st.assign, device=dev,
                               latent_from="weights" if start is None else "start")
    tensors = student.trainable()
    lr_q = st.lr if st.lr_quant is None else st.lr_quant
    groups = [{"params": list(student.weight_params()), "lr": st.lr, "base_lr": st.lr},
              {"params": list(student.quant_params()), "lr": lr_q, "base_lr": lr_q}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-12)
    ema = {k: v.detach().clone() for k, v in tensors.items()} if st.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(st.seed)
    val_gen = torch.Generator().manual_seed(st.seed + 1_000_003)
    val = [data.next_batch(val_gen).to(dev) for _ in range(st.val_batches)]
    amp = AMP_DTYPES.get(st.amp) if st.amp else None
    scaler = torch.amp.GradScaler(dev.type, enabled=(amp == torch.float16))
    taps = None
    if st.feature_weight > 0:
        paths = feature_modules(teacher)
        if not paths:
            raise SensitivityError("--feature-weight: the denoiser has no block list to match features of")
        taps = _FeatureTap(teacher, paths)

    def forward(model, batch: Batch, grad: bool):
        feats: List[torch.Tensor] = []
        if taps is not None:
            taps.store = feats
        ctx = torch.autocast(dev.type, dtype=amp) if amp is not None else torch.autocast(dev.type, enabled=False)
        with torch.set_grad_enabled(grad), ctx:
            y = model_output(model(**batch.kwargs))
        if taps is not None:
            taps.store = None
        return y, feats

    @torch.no_grad()
    def validate() -> Dict[str, float]:
        sums: Dict[str, float] = {}
        for b in val:
            t_out, t_f = forward(teacher, b, False)
            s_out, s_f = forward(student, b, False)
            for k, v in _loss_terms(s_out, t_out, b.target, s_f, t_f, st).items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(val)
        return sums

    step, log, seconds, resumed_from = 0, [], 0.0, None
    val_before = None
    if ckpt is not None:
        with torch.no_grad():
            for k, v in tensors.items():
                v.copy_(ckpt["tensors"][k])
            if ema is not None:
                for k in ema:
                    ema[k].copy_(ckpt["ema"][k])
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        gen.set_state(ckpt["generator"])
        step, log, seconds = int(ckpt["step"]), list(ckpt["log"]), float(ckpt["seconds"])
        val_before = dict(ckpt["val_before"])
        resumed_from = step
    else:
        val_before = validate() if val else {}

    def save_checkpoint():
        (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        obj = {"identity": json.loads(json.dumps(identity, default=str)), "step": step,
               "tensors": {k: v.detach().cpu() for k, v in tensors.items()},
               "ema": {k: v.cpu() for k, v in ema.items()} if ema is not None else {},
               "optimizer": opt.state_dict(), "generator": gen.get_state(), "log": log,
               "seconds": seconds, "val_before": val_before}
        if scaler.is_enabled():
            obj["scaler"] = scaler.state_dict()
        if not _finite(obj["tensors"]) or not _finite(obj["ema"]):  # a resume would only diverge again
            raise SensitivityError(f"fine-tuning diverged by step {step} (NaN or Inf weights); lower --lr")
        _atomic_save(obj, ckpt_path)

    bar = tqdm(total=st.steps, initial=step, desc=f"finetune {model_id}", unit="step", disable=not progress,
               mininterval=2)
    trained = list(tensors.values())
    t_run = time.perf_counter()
    while step < st.steps:
        t0 = time.perf_counter()
        batch = data.next_batch(gen).to(dev)
        f = lr_factor(step, st.steps, st.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        t_out, t_feats = forward(teacher, batch, False)
        s_out, s_feats = forward(student, batch, True)
        terms = _loss_terms(s_out, t_out, batch.target, s_feats, [x.detach() for x in t_feats], st)
        loss = _total(terms, st)
        if not torch.isfinite(loss):
            raise SensitivityError(f"fine-tuning diverged at step {step} (loss {float(loss)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if st.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trained, st.grad_clip)
        scaler.step(opt)
        scaler.update()
        student.project()
        if ema is not None:
            d = min(st.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in tensors.items():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        step += 1
        seconds += time.perf_counter() - t0
        log.append({"step": step, "loss": round(float(loss.detach()), 8),
                    **{k: round(float(v.detach()), 8) for k, v in terms.items()}})
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{log[-1]['loss']:.3g}")
        if step % st.checkpoint_every == 0 or step == st.steps:
            save_checkpoint()
    bar.close()
    if taps is not None and not val:
        taps.close()

    # export: the EMA values (when enabled), rounded to the stored dtypes, codes derived against them
    with torch.no_grad():
        if ema is not None:
            for k, v in tensors.items():
                v.copy_(ema[k].to(v.device))
            student.project()
        val_after = validate() if val else {}
        exported = student.export()
    if taps is not None:
        taps.close()
    base_bits = mq.avg_bits(options)
    record = {
        "command": "finetune", "model_id": model_id, "identity": json.loads(json.dumps(identity, default=str)),
        "settings": st.to_dict(), "data": data.describe(), "seed": st.seed,
        "multiquantizer": {"hash": mq.hash, "path": str(getattr(mq, "path", ""))},
        "config": {"hash": cfg.config_hash, "quantized_layers": len(options), "avg_bits": base_bits,
                   "provenance": cfg.provenance},
        "start": "multiquantizer" if start is None else "calibrated",
        "trained_tensors": len(tensors), "trained_values": int(sum(v.numel() for v in tensors.values())),
        "steps": step, "resumed_from_step": resumed_from, "train_seconds": round(seconds, 2),
        "wall_seconds_this_run": round(time.perf_counter() - t_run, 2),
        "val_loss_before": val_before, "val_loss_after": val_after,
        "loss_first": log[0] if log else None, "loss_last": log[-1] if log else None,
        "loss_log_every_10": [e for e in log if e["step"] % 10 == 0 or e["step"] == 1],
        "device": str(dev), "amp": st.amp,
    }
    if extra:
        record.update(dict(extra))
    write_artifact(out, teacher, mq.layers, cfg, exported, model_id=model_id or mq.model_id, base_hash=mq.hash,
                   record=record)
    from .artifact import load_finetuned

    ft = load_finetuned(out)
    after_bits = ft.avg_bits()
    if abs(after_bits - base_bits) > 1e-12 or ft.quantized_bytes() != mq.quantized_bytes(options):
        raise SensitivityError(f"internal: fine-tuned artifact has {after_bits} average bits, the config {base_bits}")
    record["avg_bits_after"] = after_bits
    record["artifact_hash"] = ft.hash
    atomic_write_json(record_path, record, "fine-tune record", default=str)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the artifact is complete; a rerun says so
    return record
