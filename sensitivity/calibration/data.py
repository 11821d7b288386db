"""Calibration sets: the denoiser's own inputs (latents, timesteps, conditioning), stored once.

Three kinds, as in q-diffusion:

* ``timestep_aware`` — ``num`` images sampled by the full-precision pipeline (seeds ``seed ..
  seed+num-1``, conditions cycled over the classes / prompts); the denoiser's inputs are captured at
  ``timesteps`` steps spread evenly over the whole trajectory (q-diffusion's ``--cali_st``; all steps
  by default), ``num`` samples per step (``--cali_n``);
* ``noise`` — the same conditioning and timesteps, but the latent replaced by pure N(0, I) noise;
* ``raw`` — (digits families) training images noised to the sampler's timesteps,
  ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε``, with their true labels.

Inputs are captured with a forward pre-hook on the denoiser, so any diffusers denoiser works:
positional tensors are stored as ``arg<i>``, keyword tensors as ``kw.<name>`` (nested dicts such as
SDXL's ``added_cond_kwargs`` as ``kw.<name>.<key>``), each ``[S, ...]`` over the ``S`` samples;
non-tensor keywords (JSON) and the provenance sit in the file's metadata
(``"sensitivity.calibration"``). Writing is resumable: finished chunks of images go to
``<out>.parts/`` and a rerun skips them; the final file is written to a temp name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_values
from ..errors import CorruptFileError, SensitivityError
from ..io import atomic_path, atomic_write_json, check_writable, resume_parts
from ..layers import architecture_hash

FORMAT = "sensitivity.calibration-set/1"
META_KEY = "sensitivity.calibration"
KINDS = ("timestep_aware", "noise", "raw")
_LATENT_NAMES = ("arg0", "kw.sample", "kw.hidden_states")
_TIMESTEP_NAMES = ("arg1", "kw.timestep")


@dataclass
class CalibrationSet:
    """Denoiser inputs ``{name: tensor [S, ...]}`` (``S`` samples), constant keywords and provenance.

    ``steps``: int64 ``[S]``, the sampler step (0 = first) each sample was taken at (-1: not from a
    trajectory); ``meta``: provenance (model id, kind, seeds, settings, architecture hash ...).
    """

    tensors: Dict[str, torch.Tensor]
    constants: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0]) if self.tensors else 0

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id", ""))

    @property
    def steps(self) -> torch.Tensor:
        return self.tensors.get("_step", torch.full((len(self),), -1, dtype=torch.long))

    def subset(self, index: Sequence[int] | torch.Tensor) -> "CalibrationSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        return CalibrationSet({k: v[idx] for k, v in self.tensors.items()}, dict(self.constants), dict(self.meta),
                              self.path)

    def split(self, held_out: float = 0.25, seed: int = 0) -> Tuple["CalibrationSet", "CalibrationSet"]:
        """Seeded random split into (fit, held-out) subsets."""
        n = len(self)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        k = max(1, int(round(n * held_out))) if n > 1 else 0
        return self.subset(perm[k:].sort().values), self.subset(perm[:k].sort().values)

    def batches(self, batch_size: int, device=None, dtype=None) -> Iterator[Tuple[tuple, dict]]:
        """``(args, kwargs)`` for the denoiser, ``batch_size`` samples at a time, in order."""
        n = len(self)
        for a in range(0, n, max(1, int(batch_size))):
            chunk = {k: v[a:a + batch_size] for k, v in self.tensors.items() if not k.startswith("_")}
            yield unflatten_inputs(chunk, self.constants, device=device, dtype=dtype)

    def check_model(self, model_id: str, where: str = "") -> None:
        """Raise SensitivityError if this set was captured from another model (family + weights id)."""
        name = where or (str(self.path) if self.path else "calibration set")
        if self.model_id != model_id:
            raise SensitivityError(f"{name}: calibration set of {self.model_id or 'an unknown model'}, "
                                   f"not of {model_id}")

    # ------------------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if len(self) == 0:
            raise SensitivityError(f"{path}: refusing to write an empty calibration set")
        meta = {**self.meta, "format": FORMAT, "constants": self.constants, "num_samples": len(self)}
        with atomic_path(path, "calibration set") as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata={META_KEY: json.dumps(meta, default=str)})
        self.path = path
        return path


def load_calibration_set(path: str | os.PathLike) -> CalibrationSet:
    """Read a calibration set written by :func:`make_calibration_set` (checks format, non-empty)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SensitivityError(f"calibration set {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except SensitivityError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise CorruptFileError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    if raw is None:
        raise CorruptFileError(f"{path}: not a sensitivity calibration set (no {META_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    constants = meta.pop("constants", {}) or {}
    sizes = {int(v.shape[0]) for v in tensors.values() if v.dim() > 0}
    if not tensors or sizes == {0}:
        raise SensitivityError(f"{path}: the calibration set is empty (0 samples)")
    if len(sizes) != 1:
        raise CorruptFileError(f"{path}: its tensors hold different numbers of samples {sorted(sizes)}")
    return CalibrationSet(tensors, constants, meta, path)


# ----------------------------------------------------------------------------- input capture
def flatten_inputs(args: tuple, kwargs: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Denoiser call -> (``{name: tensor}``, ``{name: JSON constant}``); see the module docstring."""
    tensors: Dict[str, torch.Tensor] = {}
    consts: Dict[str, Any] = {}

    def put(name: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            tensors[name] = v.detach()
        elif isinstance(v, Mapping):
            for k, x in v.items():
                put(f"{name}.{k}", x)
        else:
            try:
                json.dumps(v)
            except TypeError:
                raise SensitivityError(f"calibration capture: denoiser input {name!r} of type "
                                       f"{type(v).__name__} cannot be stored") from None
            consts[name] = v

    for i, a in enumerate(args):
        put(f"arg{i}", a)
    for k, v in kwargs.items():
        put(f"kw.{k}", v)
    return tensors, consts


def unflatten_inputs(tensors: Mapping[str, torch.Tensor], constants: Mapping[str, Any], device=None,
                     dtype=None) -> Tuple[tuple, dict]:
    """Inverse of :func:`flatten_inputs` (floating tensors cast to ``dtype``, all moved to ``device``)."""
    items = dict(constants)
    for k, v in tensors.items():
        if v.is_floating_point() and dtype is not None:
            v = v.to(dtype)
        items[k] = v.to(device) if device is not None else v
    args: Dict[int, Any] = {}
    kwargs: Dict[str, Any] = {}
    for name, v in items.items():
        if name.startswith("arg"):
            args[int(name[3:])] = v
            continue
        parts = name[3:].split(".")
        d = kwargs
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return tuple(args[i] for i in sorted(args)), kwargs


class _Recorder:
    """Forward pre-hook recording every denoiser call (tensors moved to CPU)."""

    def __init__(self, module: nn.Module):
        self.calls: List[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        t, c = flatten_inputs(args, kwargs)
        self.calls.append(({k: v.cpu() for k, v in t.items()}, c))

    def close(self) -> None:
        self.handle.remove()


def _batch_of(tensors: Mapping[str, torch.Tensor]) -> int:
    for name in _LATENT_NAMES:
        if name in tensors:
            return int(tensors[name].shape[0])
    return int(next(iter(tensors.values())).shape[0])


def _per_sample(tensors: Mapping[str, torch.Tensor], batch: int) -> Dict[str, torch.Tensor]:
    """Give every tensor a leading sample dim (a scalar timestep is expanded to ``[batch]``)."""
    out = {}
    for k, v in tensors.items():
        if v.dim() == 0:
            v = v.reshape(1).expand(batch).clone()
        elif v.shape[0] != batch:
            raise SensitivityError(f"calibration capture: input {k!r} has leading dim {v.shape[0]}, "
                                   f"the latent batch is {batch}")
        out[k] = v
    return out


def spread_steps(num_calls: int, timesteps: Optional[int]) -> List[int]:
    """``timesteps`` call indices spread evenly over ``num_calls`` (all when ``None`` or >= num_calls)."""
    if timesteps is None or timesteps >= num_calls:
        return list(range(num_calls))
    if timesteps < 1:
        raise SensitivityError(f"--timesteps must be >= 1, got {timesteps}")
    return sorted({int(round(x)) for x in np.linspace(0, num_calls - 1, int(timesteps))})


def _conditions(fam, num: int, prompts: Optional[Sequence[str]]) -> list:
    if fam.conditioning == "class":
        return [i % int(fam.num_classes) for i in range(num)]
    if not prompts:
        raise SensitivityError(f"model {fam.name!r}: a calibration set needs prompts (--prompts FILE)")
    return [prompts[i % len(prompts)] for i in range(num)]


def _capture_chunk(fam, pipe, kind: str, conditions: list, seeds: List[int], timesteps: Optional[int],
                   overrides: Mapping[str, Any], noise_seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    den = fam.denoiser(pipe)
    if kind == "raw":
        return _raw_chunk(fam, pipe, conditions, seeds, overrides)
    rec = _Recorder(den)
    try:
        fam.generate(pipe, conditions, seeds, batch_size=len(seeds), **overrides)
    finally:
        rec.close()
    if not rec.calls:
        raise SensitivityError(f"model {fam.name!r}: the pipeline never called its denoiser")
    keep = spread_steps(len(rec.calls), timesteps)
    parts: List[Dict[str, torch.Tensor]] = []
    consts = rec.calls[0][1]
    for i in keep:
        t, c = rec.calls[i]
        if c != consts:
            raise SensitivityError(f"model {fam.name!r}: denoiser keywords change between steps ({c} vs {consts})")
        b = _batch_of(t)
        t = _per_sample(t, b)
        t["_step"] = torch.full((b,), i, dtype=torch.long)
        t["_seed"] = torch.as_tensor([seeds[j % len(seeds)] for j in range(b)], dtype=torch.long)
        parts.append(t)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if kind == "noise":
        g = torch.Generator().manual_seed(int(noise_seed))
        lat = next(n for n in _LATENT_NAMES if n in out)
        out[lat] = torch.randn(out[lat].shape, generator=g, dtype=torch.float32).to(out[lat].dtype)
        tname = next((n for n in _TIMESTEP_NAMES if n in out), None)
        if tname is not None:
            pool = torch.unique(out[tname])
            pick = torch.randint(len(pool), (out[tname].shape[0],), generator=g)
            out[tname] = pool[pick].to(out[tname].dtype)
        out["_step"] = torch.full_like(out["_step"], -1)
    return out, consts


def _raw_chunk(fam, pipe, conditions, seeds, overrides):
    """Digits: training images noised to the sampler's timesteps, through the pipeline's own ``_predict``."""
    from ..zoo.digits import digits_dataset, images_to_tensor

    if not hasattr(pipe, "_predict") or fam.name not in ("digits-dit", "digits-unet"):
        raise SensitivityError(f"--kind raw needs the training data: only the digits models ship it, not {fam.name!r}")
    images, labels = digits_dataset()
    settings = fam.settings(pipe, **overrides)
    sched = pipe.scheduler
    sched.set_timesteps(int(settings.steps))
    ts = sched.timesteps.cpu()
    den = fam.denoiser(pipe)
    out: List[Dict[str, torch.Tensor]] = []
    consts: Dict[str, Any] = {}
    for j, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        idx = int(torch.randint(len(images), (1,), generator=g))
        step = int(torch.randint(len(ts), (1,), generator=g))
        x0 = images_to_tensor(images[idx:idx + 1])
        eps = torch.randn(x0.shape, generator=g)
        t = ts[step].reshape(1)
        abar = sched.alphas_cumprod[t.long()].float().reshape(1, 1, 1, 1)
        xt = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).to(den.device, den.dtype)
        rec = _Recorder(den)
        try:
            with torch.no_grad():
                pipe._predict(xt, t.to(den.device), torch.as_tensor([int(labels[idx])], device=den.device))
        finally:
            rec.close()
        tens, consts = rec.calls[0]
        tens = _per_sample(tens, 1)
        tens["_step"] = torch.tensor([step])
        tens["_seed"] = torch.tensor([int(s)])
        tens["_image"] = torch.tensor([idx])
        out.append(tens)
    return {k: torch.cat([p[k] for p in out]) for k in out[0]}, consts


def make_calibration_set(fam, pipe, out: str | os.PathLike, *, kind: str = "timestep_aware", num: int = 64,
                         timesteps: Optional[int] = None, seed: int = 0, prompts: Optional[Sequence[str]] = None,
                         chunk: int = 32, weights: Optional[str] = None, progress: bool = True,
                         **overrides: Any) -> CalibrationSet:
    """Capture a calibration set of ``fam`` (a zoo family) with ``pipe`` in full precision and write ``out``.

    ``num``: images (``timestep_aware``/``noise``: each gives one sample per kept step; ``raw``: one
    sample each). ``timesteps``: steps kept per trajectory (default all). ``seed``: image ``i`` uses
    seed ``seed + i`` (and the noise / data draws are seeded from it). ``overrides``: generation
    settings (``steps``, ``guidance`` ...). Resumable through ``<out>.parts/``.
    """
    if kind not in KINDS:
        raise SensitivityError(f"unknown calibration kind {kind!r}; use one of {', '.join(KINDS)}")
    check_values(num=num, timesteps=timesteps, chunk=chunk)
    out = check_writable(out, "--out")  # a folder there, or a read-only folder: refused before any work
    den = fam.denoiser(pipe)
    if den.device.type == "meta":
        raise SensitivityError(f"model {fam.name!r}: meta weights cannot produce a calibration set")
    from ..multiquantizer import restore

    restore(den)  # full precision
    settings = fam.settings(pipe, **overrides)
    conditions = _conditions(fam, int(num), prompts)
    seeds = [int(seed) + i for i in range(int(num))]
    layers_hash = architecture_hash(fam.find_layers(den))
    plan = {"format": FORMAT, "model_id": fam.model_id(weights), "kind": kind, "num": int(num),
            "timesteps": timesteps, "seed": int(seed), "settings": settings.to_dict(), "chunk": int(chunk),
            "architecture_hash": layers_hash,
            "prompts_hash": hashlib.blake2b(json.dumps(list(prompts or [])).encode(), digest_size=8).hexdigest()}
    parts = resume_parts(out, plan)
    t0 = time.perf_counter()
    from safetensors.torch import load_file, save_file

    n_chunks = math.ceil(int(num) / int(chunk))
    consts: Dict[str, Any] = {}
    resumed = 0
    try:
        for c in tqdm(range(n_chunks), desc=f"calibrate-data {fam.name} {kind}", unit="chunk", disable=not progress):
            part = parts / f"chunk-{c:05d}.safetensors"
            cpath = parts / f"chunk-{c:05d}.json"
            if part.exists() and cpath.exists():
                consts = json.loads(cpath.read_text())
                resumed += 1
                continue
            a, b = c * int(chunk), min(int(num), (c + 1) * int(chunk))
            tensors, consts = _capture_chunk(fam, pipe, kind, conditions[a:b], seeds[a:b], timesteps, overrides,
                                             noise_seed=int(seed) * 1_000_003 + c)
            with atomic_path(part, "calibration chunk") as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            atomic_write_json(cpath, consts, indent=None)
        chunks = [load_file(str(parts / f"chunk-{c:05d}.safetensors")) for c in range(n_chunks)]
        tensors = {k: torch.cat([ch[k] for ch in chunks]) for k in chunks[0]}
    except BaseException:
        raise  # finished chunks stay in <out>.parts/ for a rerun
    meta = dict(plan)
    meta.update({"seconds": round(time.perf_counter() - t0, 3), "resumed_chunks": resumed,
                 "inputs": {k: list(v.shape[1:]) for k, v in tensors.items() if not k.startswith("_")},
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    cs = CalibrationSet(tensors, consts, meta)
    cs.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    return cs
