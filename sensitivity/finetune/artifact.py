"""The fine-tuned artifact: one config's codes + tables, the same kind of data as a multiquantizer option.

A folder ``finetuned/NAME/`` holds

* ``quantized.safetensors`` — per quantized layer ``<layer>/<option>/codes`` (bit-packed uint8, as in
  a multiquantizer) and ``<layer>/<option>/<param>`` (the option's ``param_layout``: same names,
  shapes and dtypes as the multiquantizer's); its metadata ``"sensitivity.finetuned"`` is the JSON
  manifest (model id, the base multiquantizer's hash, layer specs, per-layer error / bytes / digest);
* ``config.json`` — the :class:`~sensitivity.config.QuantConfig` that was fine-tuned;
* ``finetune.json`` — the training record (settings, seed, steps, losses, times, average bits
  before / after), and ``checkpoints/`` while training runs.

:func:`load_finetuned` returns a :class:`FinetunedQuantizer`: per-layer
:class:`~sensitivity.quantizers.tensor.QuantizedWeight` objects (``quantized_weight(layer)``,
``quantized_weights()``), and the part of the multiquantizer interface that
:func:`sensitivity.multiquantizer.apply` and :class:`sensitivity.evaluation.evaluator.Evaluator` use
(``hash``, ``layers``, ``validate``, ``dequantize``, ``check_model``, ``avg_bits``, ...), so::

    ft = load_finetuned("finetuned/dit-3.4")
    apply(denoiser, ft, ft.config)          # the fine-tuned weights, in place; restore() undoes it
    ft.quantized_weights()                  # {layer: QuantizedWeight} for export
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..config import QuantConfig, as_options
from ..errors import ConfigError, CorruptFileError, MultiquantizerMismatchError, SensitivityError
from ..io import atomic_path, atomic_write_json
from ..layers import LayerSpec, architecture_hash, layer_weight, weights_hash
from ..options import FP16, QuantOption
from ..quantizers import get_method
from ..quantizers.packing import pack_codes, unpack_codes
from ..quantizers.tensor import QuantizedWeight

FORMAT = "sensitivity.finetuned/1"
METADATA_KEY = "sensitivity.finetuned"
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"
RECORD_FILE = "finetune.json"


def _digest(arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    core = {k: manifest[k] for k in ("format", "model_id", "base_multiquantizer", "weights_hash", "layers")}
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_stored(option: str, shape, codes: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``codes``/``params`` are exactly what ``option`` stores for a ``shape`` weight."""
    opt = QuantOption.parse(option)
    c = int(shape[0])
    k = int(np.prod(shape)) // c
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (c, k):
        raise SensitivityError(f"{option}: codes must be uint8 [{c}, {k}], got {codes.dtype} {tuple(codes.shape)}")
    if opt.bits < 8 and int(codes.max()) >= 2**opt.bits:
        raise SensitivityError(f"{option}: code {int(codes.max())} out of range [0, {2**opt.bits})")
    layout = get_method(opt.method).param_layout(opt.bits, shape)
    if set(layout) != set(params):
        raise SensitivityError(f"{option}: params {sorted(params)} differ from the layout {sorted(layout)}")
    for name, (pshape, dtype) in layout.items():
        p = params[name]
        if tuple(p.shape) != tuple(pshape) or p.dtype != getattr(torch, dtype):
            raise SensitivityError(f"{option}: param {name} must be {dtype} {tuple(pshape)}, "
                                   f"got {p.dtype} {tuple(p.shape)}")
        if not torch.isfinite(p.to(torch.float32)).all():
            raise SensitivityError(f"{option}: param {name} holds NaN or Inf")


def write_artifact(out: Path, teacher: torch.nn.Module, layers: List[LayerSpec], config: QuantConfig,
                   exported: Mapping[str, Tuple[torch.Tensor, Dict[str, torch.Tensor]]], *, model_id: str,
                   base_hash: str, record: Mapping[str, Any]) -> None:
    """Write ``quantized.safetensors``, ``config.json`` and ``finetune.json`` into ``out`` (each via
    :mod:`sensitivity.io`'s atomic writers)."""
    from safetensors.numpy import save_file

    options = {k: v for k, v in as_options(config).items() if v != FP16}
    tensors: Dict[str, np.ndarray] = {}
    entries = []
    for spec in layers:
        d = spec.to_dict()
        d["fp16_bytes"] = spec.fp16_bytes
        d["options"] = {}
        if spec.name in options:
            opt = QuantOption.parse(options[spec.name])
            codes, params = exported[spec.name]
            check_stored(opt.name, spec.shape, codes, params)
            packed = pack_codes(codes.reshape(-1).numpy(), opt.bits)
            names = sorted(params)
            arrays = [params[p].numpy() for p in names]
            tensors[f"{spec.name}/{opt.name}/codes"] = packed
            for p, a in zip(names, arrays):
                tensors[f"{spec.name}/{opt.name}/{p}"] = a
            values = get_method(opt.method).dequantize_rows(codes, params, opt.bits)
            w = layer_weight(teacher, spec).detach().to("cpu", torch.float32).reshape(values.shape)
            sse = float(((values - w) ** 2).sum(dtype=torch.float64))
            norm = float((w**2).sum(dtype=torch.float64))
            d["options"][opt.name] = {"error": sse / norm if norm > 0 else 0.0, "sse": sse,
                                      "nbytes": int(opt.nbytes(spec.shape)), "params": names,
                                      "digest": _digest([packed] + arrays)}
        entries.append(d)
    manifest: Dict[str, Any] = {
        "format": FORMAT, "model_id": model_id, "base_multiquantizer": base_hash,
        "architecture_hash": architecture_hash(layers), "weights_hash": weights_hash(teacher, layers),
        "layers": entries, "config": options,
    }
    manifest["hash"] = _manifest_hash(manifest)
    with atomic_path(out / WEIGHTS_FILE, "fine-tuned weights") as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(manifest)})
    cfg = QuantConfig(options=dict(options), model=config.model or model_id, multiquantizer_hash=manifest["hash"],
                      avg_bits=config.avg_bits,
                      provenance={**dict(config.provenance), "finetuned": {"base_multiquantizer": base_hash,
                                                                            "artifact": manifest["hash"]}})
    cfg.save(out / CONFIG_FILE)
    atomic_write_json(out / RECORD_FILE, dict(record, artifact_hash=manifest["hash"]), "fine-tune record", default=str)


class FinetunedQuantizer:
    """A loaded fine-tuned artifact (see the module docstring). One option per quantized layer."""

    def __init__(self, path: Path, manifest: Dict[str, Any], tensors: Dict[str, np.ndarray]):
        self.path = Path(path)
        self.manifest = manifest
        self._tensors = tensors
        self._specs: Dict[str, LayerSpec] = {}
        self._stats: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for d in manifest["layers"]:
            spec = LayerSpec.from_dict(d)
            self._specs[spec.name] = spec
            self._stats[spec.name] = d["options"]
        self._cache: Dict[str, QuantizedWeight] = {}

    # ---- description (the multiquantizer interface) ----------------------------------------------
    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def base_multiquantizer_hash(self) -> str:
        return self.manifest["base_multiquantizer"]

    @property
    def config(self) -> QuantConfig:
        return QuantConfig.load(self.path.parent / CONFIG_FILE)

    @property
    def options(self) -> Tuple[str, ...]:
        return tuple(sorted({o for s in self._stats.values() for o in s}))

    @property
    def layers(self) -> List[LayerSpec]:
        return list(self._specs.values())

    @property
    def layer_names(self) -> List[str]:
        return list(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, layer: str) -> bool:
        return layer in self._specs

    def __repr__(self) -> str:
        return f"FinetunedQuantizer({self.model_id!r}, {len(self.manifest['config'])} quantized layers, path={str(self.path)!r})"

    def option_of(self, layer: str) -> str:
        """The option ``layer`` was fine-tuned with (``fp16`` if it is not quantized)."""
        self._spec(layer)
        return self.manifest["config"].get(layer, FP16)

    def _spec(self, layer: str) -> LayerSpec:
        try:
            return self._specs[layer]
        except KeyError:
            raise ConfigError(f"layer {layer!r} is not in fine-tuned artifact {self.path.parent}") from None

    def _check_option(self, layer: str, option: str) -> str:
        opt = QuantOption.parse(option).name
        have = self.option_of(layer)
        if opt != FP16 and opt != have:
            raise ConfigError(f"layer {layer!r}: option {opt!r} was not fine-tuned in {self.path.parent} "
                              f"(it holds {have!r})")
        return opt

    def validate(self, options: Mapping[str, str]) -> None:
        for layer, opt in options.items():
            self._check_option(layer, opt)

    def stats(self, layer: str, option: str) -> Dict[str, Any]:
        spec = self._spec(layer)
        opt = self._check_option(layer, option)
        if opt == FP16:
            return {"error": 0.0, "sse": 0.0, "nbytes": spec.fp16_bytes}
        s = self._stats[layer][opt]
        return {"error": s["error"], "sse": s["sse"], "nbytes": s["nbytes"]}

    def fp16_bytes(self, layer: Optional[str] = None) -> int:
        if layer is not None:
            return self._spec(layer).fp16_bytes
        return sum(s.fp16_bytes for s in self._specs.values())

    def quantized_bytes(self, options: Optional[Mapping[str, str]] = None) -> int:
        options = self.manifest["config"] if options is None else options
        self.validate(options)
        return sum(self.stats(n, options.get(n, FP16))["nbytes"] for n in self._specs)

    def avg_bits(self, options: Optional[Mapping[str, str]] = None) -> float:
        """``16 * Σ stored bytes / Σ fp16 bytes`` over all layers (default: the fine-tuned config)."""
        return 16.0 * self.quantized_bytes(options) / self.fp16_bytes()

    def summed_error(self, options: Optional[Mapping[str, str]] = None) -> float:
        options = self.manifest["config"] if options is None else options
        return float(sum(self.stats(n, o)["error"] for n, o in options.items()))

    def layer_stats(self) -> Dict[str, Dict[str, Any]]:
        """``{layer: {"fp16_bytes", "options": {option: [nbytes, error]}}}`` (only the fine-tuned option),
        as :func:`sensitivity.evaluation.runners.layer_stats_from_multiquantizer`."""
        return {n: {"fp16_bytes": s.fp16_bytes,
                    "options": {o: [int(v["nbytes"]), float(v["error"])] for o, v in self._stats[n].items()}}
                for n, s in self._specs.items()}

    def check_model(self, denoiser: torch.nn.Module, check_weights: bool = True) -> None:
        """Raise :class:`MultiquantizerMismatchError` unless ``denoiser`` is the model it was tuned from."""
        where = f"fine-tuned artifact {self.path.parent}"
        for spec in self._specs.values():
            try:
                w = layer_weight(denoiser, spec)
            except (AttributeError, KeyError, IndexError, SensitivityError):
                raise MultiquantizerMismatchError(f"{where}: the model has no layer {spec.module_path!r}") from None
            if tuple(w.shape) != spec.shape:
                raise MultiquantizerMismatchError(f"{where}: layer {spec.name!r} has shape {tuple(w.shape)} in the "
                                                  f"model, {spec.shape} in the artifact")
        if check_weights:
            from ..multiquantizer import applied_options

            if applied_options(denoiser):
                raise SensitivityError("check_model: the model has a config applied; call restore() first")
            if weights_hash(denoiser, self.layers) != self.manifest["weights_hash"]:
                raise MultiquantizerMismatchError(f"{where}: the model's weights differ from the teacher it was "
                                                  "fine-tuned from")

    # ---- tensors ---------------------------------------------------------------------------------
    def quantized_weight(self, layer: str, option: Optional[str] = None,
                         dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        """The fine-tuned :class:`QuantizedWeight` of ``layer`` (codes uint8 ``[C, K]`` + params)."""
        opt = self.option_of(layer) if option is None else self._check_option(layer, option)
        if opt == FP16:
            raise ConfigError(f"layer {layer!r} is full precision in {self.path.parent}")
        if layer not in self._cache:
            spec = self._spec(layer)
            st = self._stats[layer][opt]
            prefix = f"{layer}/{opt}/"
            try:
                packed = self._tensors[prefix + "codes"]
                params_np = [self._tensors[prefix + p] for p in st["params"]]
            except KeyError as exc:
                raise CorruptFileError(f"{self.path}: tensor {exc.args[0]!r} is missing") from None
            if _digest([packed] + params_np) != st["digest"]:
                raise CorruptFileError(f"{self.path}: data of layer {layer!r} was modified or damaged")
            bits = QuantOption.parse(opt).bits
            codes = torch.from_numpy(np.asarray(unpack_codes(packed, bits, spec.numel), dtype=np.uint8)
                                     .reshape(spec.out_channels, -1).copy())
            params = {p: torch.from_numpy(np.array(a)) for p, a in zip(st["params"], params_np)}
            self._cache[layer] = QuantizedWeight(opt, spec.shape, torch.float32, codes, params, st["error"], st["sse"])
        q = self._cache[layer]
        return QuantizedWeight(q.option, q.shape, dtype, q.codes, q.params, q.error, q.sse)

    def quantized_weights(self, dtype: torch.dtype = torch.float32) -> Dict[str, QuantizedWeight]:
        """``{layer: QuantizedWeight}`` of every quantized layer (for export)."""
        return {n: self.quantized_weight(n, dtype=dtype) for n in self.manifest["config"]}

    def dequantize(self, layer: str, option: str, device=None, dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        opt = self._check_option(layer, option)
        if opt == FP16:
            raise ConfigError(f"layer {layer!r}: 'fp16' has no quantized weight; use restore()")
        q = self.quantized_weight(layer, opt)
        value = q.dequantize().to(device=device or "cpu", dtype=dtype)
        if out is not None:
            out.copy_(value)
            return out
        return value


def load_finetuned(path: str | os.PathLike) -> FinetunedQuantizer:
    """Open a fine-tuned artifact folder (or its ``quantized.safetensors``); checks format and hash."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    p = Path(path)
    f = p / WEIGHTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise SensitivityError(f"{str(p)!r} is not a fine-tuned artifact (no {WEIGHTS_FILE})")
    try:
        with safe_open(str(f), framework="numpy") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(f))
    except Exception as exc:  # noqa: BLE001 - any read failure is one line
        raise CorruptFileError(f"{f}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise CorruptFileError(f"{f}: not a sensitivity fine-tuned artifact (no {METADATA_KEY} metadata)")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{f}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    if manifest.get("hash") != _manifest_hash(manifest):
        raise CorruptFileError(f"{f}: its manifest was modified (hash mismatch)")
    if not (f.parent / CONFIG_FILE).is_file():
        raise CorruptFileError(f"{f.parent}: {CONFIG_FILE} is missing")
    return FinetunedQuantizer(f, manifest, tensors)
