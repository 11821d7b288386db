"""Calibrated artifacts: an overlay of updated codes / tables and static activation ranges.

``sensitivity calibrate ... --out quant_configs/X-cal/`` writes a folder::

    X-cal/config.json               the QuantConfig (same options as X.json) + an "activations" section
    X-cal/calibration.safetensors   weights/<layer>/codes (bit-packed, the option's bits),
                                    weights/<layer>/<param> (the option's params, stored size and dtype),
                                    act/<point>/lo, act/<point>/hi (float32 scalars or [C])
                                    metadata "sensitivity.calibrated": the manifest (JSON)
    X-cal/report.json               per-layer output errors before / after, timings

The overlay applies on top of ``apply(den, mq, config)``: only the layers it lists are rewritten, every
code stays within its option's bit width and every table keeps its stored size, so the config's
average bits are unchanged. For export (ONNX QDQ and others)::

    from sensitivity.calibration import load_calibrated
    art = load_calibrated("quant_configs/X-cal")
    art.config                       # QuantConfig {layer: option}
    art.quantized_weight(layer, mq)  # QuantizedWeight (overlay if calibrated, else the multiquantizer's)
    art.weights                      # {layer: QuantizedWeight} of the calibrated layers only
    art.activations                  # ActivationCalibration or None: .bits, .observer, .granularity,
                                     # .ranges {point: (lo, hi)}, .scale_zero(point) -> (scale, zero_point)
    apply_calibrated(den, mq, art); ...; remove_calibrated(den)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError, CorruptFileError, SensitivityError
from ..io import atomic_dir
from ..options import QuantOption
from ..quantizers import QuantizedWeight
from ..quantizers.activation import disable_activation_quant, enable_static_activation_quant
from ..quantizers.packing import pack_codes, unpack_codes
from .observers import scale_zero

FORMAT = "sensitivity.calibrated/1"
META_KEY = "sensitivity.calibrated"
CONFIG_FILE = "config.json"
TENSORS_FILE = "calibration.safetensors"
REPORT_FILE = "report.json"
CALIBRATED_TAG = "+calibrated"


@dataclass
class ActivationCalibration:
    """Static activation ranges ``{point: (lo, hi)}`` (float32 scalars or ``[C]``) at ``bits``."""

    bits: int
    observer: str
    granularity: str
    ranges: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    attention: bool = True
    settings: Dict[str, Any] = field(default_factory=dict)

    def scale_zero(self, point: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int32)`` of ``point`` for unsigned ``bits``-bit codes."""
        lo, hi = self.ranges[point]
        return scale_zero(lo, hi, self.bits)

    def describe(self) -> Dict[str, Any]:
        return {"bits": self.bits, "observer": self.observer, "granularity": self.granularity,
                "attention": self.attention, "points": len(self.ranges), "file": TENSORS_FILE, **self.settings}


@dataclass
class CalibratedArtifact:
    """A loaded (or freshly made) calibrated config. See the module docstring."""

    config: QuantConfig
    weights: Dict[str, QuantizedWeight]
    activations: Optional[ActivationCalibration]
    manifest: Dict[str, Any]
    path: Optional[Path] = None
    report: Dict[str, Any] = field(default_factory=dict)

    @property
    def multiquantizer_hash(self) -> str:
        return str(self.manifest.get("multiquantizer_hash", ""))

    @property
    def model_id(self) -> str:
        return str(self.manifest.get("model_id", ""))

    @property
    def calibration_hash(self) -> str:
        """Hash of everything the overlay changes (weights digests + activation ranges)."""
        return str(self.manifest.get("calibration_hash", ""))

    def quantized_weight(self, layer: str, mq=None) -> QuantizedWeight:
        """The layer's weight as deployed: the overlay's if calibrated, else ``mq``'s for its option."""
        if layer in self.weights:
            return self.weights[layer]
        if layer not in self.config.options:
            raise ConfigError(f"layer {layer!r} is full precision in this calibrated config")
        if mq is None:
            raise SensitivityError(f"layer {layer!r} is not in the overlay: pass the multiquantizer")
        return mq.quantized_weight(layer, self.config.options[layer])

    # ------------------------------------------------------------------------------------ save
    def save(self, out: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the folder atomically (a temp folder beside it, renamed into place); ``overwrite=False``: refuse
        an ``out`` that exists and is not empty (checked again at the final rename)."""
        from safetensors.numpy import save_file

        out = Path(out)
        if out.exists() and out.is_dir() and not (out / TENSORS_FILE).exists() and any(out.iterdir()):
            raise SensitivityError(f"--out {str(out)!r} exists and is not a calibrated config folder")
        with atomic_dir(out, "--out", replace=True, overwrite=overwrite) as tmp:
            tensors: Dict[str, np.ndarray] = {}
            layers: Dict[str, Any] = {}
            for name, q in self.weights.items():
                packed = pack_codes(q.codes.reshape(-1).cpu().contiguous().numpy().astype(np.uint8), q.bits)
                tensors[f"weights/{name}/codes"] = packed
                pnames = sorted(q.params)
                for p in pnames:
                    tensors[f"weights/{name}/{p}"] = q.params[p].detach().cpu().contiguous().numpy()
                layers[name] = {**self.manifest.get("layers", {}).get(name, {}), "option": q.option,
                                "shape": list(q.shape), "params": pnames, "error": float(q.error),
                                "digest": _digest([packed] + [tensors[f"weights/{name}/{p}"] for p in pnames])}
            acts = None
            if self.activations is not None:
                for point, (lo, hi) in self.activations.ranges.items():
                    tensors[f"act/{point}/lo"] = lo.detach().float().cpu().reshape(-1).numpy()
                    tensors[f"act/{point}/hi"] = hi.detach().float().cpu().reshape(-1).numpy()
                acts = {**self.activations.describe(),
                        "scalar_points": sorted(p for p, (lo, _) in self.activations.ranges.items() if lo.dim() == 0)}
            manifest = {**self.manifest, "format": FORMAT, "layers": layers, "activations": acts}
            manifest["calibration_hash"] = _digest([tensors[k] for k in sorted(tensors)])
            if not tensors:
                raise SensitivityError("nothing calibrated: no weight overlay and no activation ranges")
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={META_KEY: json.dumps(manifest, default=str)})
            cfg = self.config.to_dict()
            if acts is not None:
                cfg["activations"] = {k: v for k, v in acts.items() if k != "scalar_points"}
            cfg["calibrated"] = {"file": TENSORS_FILE, "calibration_hash": manifest["calibration_hash"],
                                 "weights_method": manifest.get("weights_method"),
                                 "calibrated_layers": len(layers)}
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
            (tmp / REPORT_FILE).write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        self.manifest = manifest
        self.path = out
        return out


def _digest(arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def is_calibrated_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / TENSORS_FILE).is_file()


def load_calibrated(path: str | os.PathLike) -> CalibratedArtifact:
    """Read a calibrated config folder (checks format and digests)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise SensitivityError(f"calibrated config {str(path)!r} is not a folder")
    tfile, cfile = path / TENSORS_FILE, path / CONFIG_FILE
    if not tfile.is_file() or not cfile.is_file():
        raise SensitivityError(f"{path}: not a calibrated config folder (needs {CONFIG_FILE} and {TENSORS_FILE})")
    config = QuantConfig.load(cfile)
    try:
        with safe_open(str(tfile), framework="np") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"{tfile}: not a readable safetensors file ({type(exc).__name__})") from None
    if raw is None:
        raise CorruptFileError(f"{tfile}: no {META_KEY!r} manifest in its metadata")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{tfile}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    if manifest.get("config_hash") and manifest["config_hash"] != config.config_hash:
        raise CorruptFileError(f"{cfile}: its options differ from the ones the overlay was calibrated for")
    weights: Dict[str, QuantizedWeight] = {}
    for name, d in manifest["layers"].items():
        opt = QuantOption.parse(d["option"])
        if config.options.get(name) != opt.name:
            raise CorruptFileError(f"{tfile}: layer {name!r} calibrated as {opt.name}, config says "
                                   f"{config.options.get(name, 'fp16')}")
        try:
            packed = arrays[f"weights/{name}/codes"]
            params_np = {p: arrays[f"weights/{name}/{p}"] for p in d["params"]}
        except KeyError as exc:
            raise CorruptFileError(f"{tfile}: tensor {exc.args[0]!r} is missing") from None
        if _digest([packed] + [params_np[p] for p in d["params"]]) != d["digest"]:
            raise CorruptFileError(f"{tfile}: data of layer {name!r} was modified or damaged")
        shape = tuple(int(s) for s in d["shape"])
        numel = int(np.prod(shape))
        codes = torch.from_numpy(np.asarray(unpack_codes(packed, opt.bits, numel), dtype=np.uint8).reshape(shape[0], -1))
        params = {p: torch.from_numpy(np.array(v)) for p, v in params_np.items()}
        weights[name] = QuantizedWeight(opt.name, shape, torch.float32, codes, params, float(d.get("error", float("nan"))))
    acts = None
    a = manifest.get("activations")
    if a:
        scalar = set(a.get("scalar_points", []))
        ranges = {}
        for key in arrays:
            if key.startswith("act/") and key.endswith("/lo"):
                point = key[4:-3]
                lo = torch.from_numpy(np.array(arrays[key]))
                hi = torch.from_numpy(np.array(arrays[f"act/{point}/hi"]))
                if point in scalar:
                    lo, hi = lo.reshape(()), hi.reshape(())
                ranges[point] = (lo, hi)
        extra = {k: v for k, v in a.items() if k not in ("bits", "observer", "granularity", "attention", "points",
                                                          "file", "scalar_points")}
        acts = ActivationCalibration(int(a["bits"]), a["observer"], a["granularity"], ranges,
                                     bool(a.get("attention", True)), extra)
    report = {}
    if (path / REPORT_FILE).is_file():
        report = json.loads((path / REPORT_FILE).read_text())
    return CalibratedArtifact(config, weights, acts, manifest, path, report)


# ------------------------------------------------------------------------------- apply / remove
@torch.no_grad()
def write_overlay(module: nn.Module, mq, weights: Mapping[str, QuantizedWeight]) -> None:
    """Write overlay weights into ``module`` (which must hold ``apply(module, mq, config)``) and mark
    those layers so that a later :func:`~sensitivity.multiquantizer.apply` rewrites them."""
    from ..multiquantizer import _STATE_ATTR

    state = module.__dict__.get(_STATE_ATTR)
    specs = {s.name: s for s in mq.layers}
    for name, q in weights.items():
        spec = specs.get(name)
        if spec is None or state is None or state["options"].get(name, "").split("+")[0] != q.option:
            raise SensitivityError(f"overlay layer {name!r} ({q.option}) does not match the applied config")
        paths = (spec.module_path,) + tuple(spec.tied)
        w0 = module.get_submodule(paths[0]).weight
        value = q.dequantize().to(w0.device, w0.dtype)
        sl = (slice(None), slice(*spec.in_slice)) if spec.in_slice else (slice(None),)
        for p in paths:
            w = module.get_submodule(p).weight
            if p not in state["fp"]:
                state["fp"][p] = w.detach().clone()
            w.data[sl] = value
        state["options"][name] = q.option + CALIBRATED_TAG


def apply_calibrated(module: nn.Module, mq, artifact: CalibratedArtifact, activations: bool = True) -> Dict[str, Any]:
    """``apply(module, mq, artifact.config)``, then the weight overlay, then (``activations``) the static
    activation ranges. Returns ``{"layers": n quantized, "calibrated_layers": n, "activations": info}``."""
    from ..multiquantizer import apply

    if artifact.multiquantizer_hash and artifact.multiquantizer_hash != mq.hash:
        raise SensitivityError(f"calibrated config {artifact.path or ''} was made with multiquantizer "
                               f"{artifact.multiquantizer_hash[:12]}, not {mq.hash[:12]} ({mq.model_id})")
    applied = apply(module, mq, artifact.config)
    write_overlay(module, mq, artifact.weights)
    info = None
    if activations and artifact.activations is not None:
        a = artifact.activations
        info = enable_static_activation_quant(module, mq.layers, a.ranges, a.bits, attention=a.attention)
    return {"layers": len(applied), "calibrated_layers": len(artifact.weights), "activations": info}


def remove_calibrated(module: nn.Module) -> None:
    """Undo :func:`apply_calibrated`: activation hooks removed, weights restored bit-exactly."""
    from ..multiquantizer import restore

    disable_activation_quant(module)
    restore(module)


def load_config_or_calibrated(path: str | os.PathLike, trust_pickle: bool = False) -> Tuple[QuantConfig, Optional[CalibratedArtifact]]:
    """A config file -> ``(config, None)``; a calibrated folder -> ``(its config, the artifact)``."""
    if is_calibrated_dir(path):
        art = load_calibrated(path)
        return art.config, art
    if Path(path).is_dir():
        raise SensitivityError(f"{path}: a folder but not a calibrated config (no {TENSORS_FILE})")
    return QuantConfig.load(path, trust_pickle=trust_pickle), None
