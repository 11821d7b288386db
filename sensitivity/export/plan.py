"""The export plan: which module holds which parts at which option, checked before anything is written.

:func:`make_plan` takes a full-precision denoiser, its multiquantizer and a config and returns an
:class:`ExportPlan`: one :class:`ModulePlan` per weight module that the config quantizes (its parts in
input-channel order, its tied copies), plus the metadata every artifact records (model class, model
id, multiquantizer hash, config hash, average bits). Every format writes from a plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .. import __version__, io
from ..config import QuantConfig, as_options
from ..errors import ConfigError, MultiquantizerMismatchError, SensitivityError
from ..layers import LayerSpec
from ..options import FP16
from .methods import check_exportable
from .modules import PartSpec


@dataclass
class ModulePlan:
    """One weight module of the denoiser with at least one quantized part."""

    module_path: str
    kind: str
    weight_shape: Tuple[int, ...]
    parts: List[PartSpec]
    specs: List[LayerSpec]
    tied: Tuple[str, ...] = ()


@dataclass
class ExportPlan:
    denoiser: nn.Module
    mq: Any
    options: Dict[str, str]  # every layer of mq -> option (fp16 where the config leaves it)
    modules: List[ModulePlan]
    meta: Dict[str, Any] = field(default_factory=dict)

    def quantized_weight(self, layer: str):
        return self.mq.quantized_weight(layer, self.options[layer])


def digest(tensor: torch.Tensor) -> str:
    """blake2b-128 of a tensor's bytes (any dtype)."""
    t = tensor.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8)
    return hashlib.blake2b(memoryview(raw.numpy()), digest_size=16).hexdigest()  # no copy of the bytes


def config_digest(config: Mapping[str, Any]) -> str:
    """blake2b of a ``config.json``'s content (canonical JSON, ``_diffusers_version`` aside): the record
    keeps it, so an architecture setting edited after the export is refused at load, like a tensor."""
    body = {k: v for k, v in config.items() if k != "_diffusers_version"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def make_plan(denoiser: nn.Module, mq, config: "QuantConfig | Mapping[str, str]", format: str,
              source: Optional[Mapping[str, Any]] = None) -> ExportPlan:
    """Check that ``config`` fits ``mq`` and ``denoiser`` and that ``format`` can express it; build the plan.

    ``source``: ``{"family", "weights", "seed", "model_id"}`` of the denoiser (recorded; ``model_id`` is
    compared with the multiquantizer's).
    """
    source = dict(source or {})
    qc = config if isinstance(config, QuantConfig) else QuantConfig(as_options(config))
    options = dict(qc.options)
    mq.validate(options)
    model_id = source.get("model_id")
    if model_id and mq.model_id and model_id != mq.model_id:
        raise MultiquantizerMismatchError(
            f"multiquantizer {mq.path.name} was built for {mq.model_id}, not for {model_id}")
    qc.check_model(mq.model_id, str(source.get("config_path") or "config"))
    if qc.multiquantizer_hash and qc.multiquantizer_hash != mq.hash:
        raise ConfigError(f"config was made for multiquantizer {qc.multiquantizer_hash[:12]}, "
                          f"{mq.path.name} is {mq.hash[:12]}")
    mq.check_model(denoiser)
    check_exportable(format, options, {s.name: (s.shape, s.kind) for s in mq.layers})

    full = {s.name: options.get(s.name, FP16) for s in mq.layers}
    by_module: Dict[str, List[LayerSpec]] = {}
    for s in mq.layers:
        by_module.setdefault(s.module_path, []).append(s)
    modules: List[ModulePlan] = []
    for path, specs in by_module.items():
        if all(full[s.name] == FP16 for s in specs):
            continue
        specs = sorted(specs, key=lambda s: s.in_slice[0] if s.in_slice else 0)
        weight = denoiser.get_submodule(path).weight
        covered = sum(s.shape[1] for s in specs) if specs[0].in_slice else weight.shape[1]
        if specs[0].in_slice and covered != weight.shape[1]:
            raise SensitivityError(f"module {path!r}: its split halves cover {covered} of {weight.shape[1]} inputs")
        parts = []
        for s in specs:
            opt = full[s.name]
            params = () if opt == FP16 else tuple(sorted(mq.quantized_weight(s.name, opt).params))
            parts.append(PartSpec(s.name, tuple(s.shape), s.in_slice, opt, params))
        modules.append(ModulePlan(path, specs[0].kind, tuple(weight.shape), parts, specs, specs[0].tied))

    quantized = {k: v for k, v in full.items() if v != FP16}
    meta = {
        "format": f"sensitivity.export.{format}/1",
        "export_format": format,
        "model_class": type(denoiser).__name__,
        "model_id": model_id or mq.model_id,
        "family": source.get("family"),
        "weights": source.get("weights"),
        "seed": source.get("seed"),
        "multiquantizer": {"hash": mq.hash, "model_id": mq.model_id, "path": str(mq.path)},
        "config": {"hash": qc.config_hash, "path": source.get("config_path"), "model": qc.model,
                   "multiquantizer_hash": qc.multiquantizer_hash, "provenance": qc.provenance},
        "act_bits": qc.act_bits,
        "avg_bits": mq.avg_bits(quantized),
        "quantized_bytes": mq.quantized_bytes(quantized),
        "fp16_bytes": mq.fp16_bytes(),
        "quantized_layers": len(quantized),
        "layers": len(full),
        "options": full,
        "versions": {"sensitivity": __version__, "torch": torch.__version__},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return ExportPlan(denoiser, mq, full, modules, meta)


@contextmanager
def atomic_dir(out: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed.
    An existing non-empty ``out`` is refused unless ``overwrite`` (also when a concurrent run creates it)."""
    with io.atomic_dir(out, "--out", replace=True, overwrite=overwrite) as tmp:
        yield tmp
