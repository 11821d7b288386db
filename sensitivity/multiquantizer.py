"""The multiquantizer: every quantization option of every layer, computed once, saved compactly.

``build_multiquantizer`` quantizes each layer of a denoiser with each option (six by default) and
writes ONE safetensors file:

* ``<layer>/<option>/codes`` — bit-packed uint8 codes (``bits`` per weight, see
  :mod:`sensitivity.quantizers.packing`);
* ``<layer>/<option>/<param>`` — the fp16 scales/zero points (UAQ) or codebooks (K-Means);
* metadata ``"sensitivity.manifest"`` — JSON: model id, model class, architecture and weight hashes,
  layers (name, module, shape, split, ties), per-option error / sse / bytes / digest, settings,
  library versions, build seconds.

The file is barely larger than the quantized payloads (``(4+3)*3 = 21`` bits per weight for the six
options, i.e. about 1.3x the fp16 weights). Building is resumable: finished layers go to
``<out>.parts/`` as they complete, and a rerun skips them; the final file is assembled by streaming
the parts into a temporary file that is renamed into place, so it is never half-written.

Loading is lazy: :func:`load_multiquantizer` reads the manifest only; tensors are read (and their
digest checked) when a layer's option is first used. :func:`apply` writes a config's dequantized
weights into the model in place, rewriting only layers whose option changed since the last apply;
:func:`restore` copies the full-precision weights back bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import QuantConfig, as_options
from .errors import ConfigError, CorruptFileError, MultiquantizerMismatchError, SensitivityError
from .io import atomic_path, resume_parts
from .threads import threads_for, using_threads
from .layers import LayerSpec, architecture_hash, check_ties, find_layers, layer_weight, weights_hash
from .options import FP16, OPTION_NAMES, QuantOption
from .quantizers import get_method
from .quantizers.tensor import QuantizedWeight, quantize_prepared, squared_norm
from .quantizers.packing import pack_codes, unpack_codes
# the file format lives in the torch-free mqfile (``sensitivity info`` reads manifests without torch)
from .mqfile import (FORMAT, MANIFEST_KEY, _Lazy, _SafetensorsReader, _manifest_checksum, _manifest_hash,  # noqa: F401
                     _open, _write_safetensors, read_manifest)


def _digest(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import numba  # noqa: F401 - recorded because the k-means kernels are compiled with it

    return {
        "sensitivity": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# the multiquantizer object
# --------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    spec: LayerSpec
    stats: Dict[str, Dict[str, Any]]  # option -> {"error","sse","nbytes","digest","params"}


class Multiquantizer:
    """A loaded multiquantizer file (lazy). See the module docstring."""

    def __init__(self, path: Path, manifest: Dict[str, Any], reader: Optional[_SafetensorsReader] = None):
        self.path = Path(path)
        self.manifest = manifest
        self._reader = reader
        self._entries: Dict[str, _Entry] = {}
        for d in manifest["layers"]:
            spec = LayerSpec.from_dict(d)
            self._entries[spec.name] = _Entry(spec, d["options"])
        self._sizes = None
        self._codes: Dict[Tuple[str, str], torch.Tensor] = {}
        self._params: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}

    # ---- description -----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.manifest.get("model_id", "")

    @property
    def options(self) -> Tuple[str, ...]:
        return tuple(self.manifest["options"])

    @property
    def layers(self) -> List[LayerSpec]:
        return [e.spec for e in self._entries.values()]

    @property
    def layer_names(self) -> List[str]:
        return list(self._entries)

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def components(self) -> Dict[str, Dict[str, Any]]:
        """A pipeline multiquantizer's ``{component: {...}}`` (:mod:`sensitivity.pipeline_quant`); ``{}`` else."""
        return dict(self.manifest.get("components") or {})

    def __contains__(self, layer: str) -> bool:
        return layer in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Multiquantizer({self.model_id!r}, {len(self)} layers, options={list(self.options)}, path={str(self.path)!r})"

    def _entry(self, layer: str) -> _Entry:
        try:
            return self._entries[layer]
        except KeyError:
            raise ConfigError(f"layer {layer!r} is not in multiquantizer {self.path.name} ({self.model_id})") from None

    def _check_option(self, layer: str, option: str) -> str:
        opt = QuantOption.parse(option).name
        if opt != FP16 and opt not in self.options:
            raise ConfigError(
                f"layer {layer!r}: option {opt!r} is not in multiquantizer {self.path.name} "
                f"(it has {', '.join(self.options)})"
            )
        return opt

    def stats(self, layer: str, option: str) -> Dict[str, Any]:
        """``{"error", "sse", "nbytes"}`` of ``layer`` under ``option`` (``fp16``: zero error)."""
        entry = self._entry(layer)
        opt = self._check_option(layer, option)
        if opt == FP16:
            return {"error": 0.0, "sse": 0.0, "nbytes": entry.spec.fp16_bytes}
        s = entry.stats[opt]
        return {"error": s["error"], "sse": s["sse"], "nbytes": s["nbytes"]}

    def fp16_bytes(self, layer: Optional[str] = None) -> int:
        if layer is not None:
            return self._entry(layer).spec.fp16_bytes
        return sum(e.spec.fp16_bytes for e in self._entries.values())

    def size_table(self):
        """The :class:`~sensitivity.sizes.SizeTable` of this file (built once): bytes and error per (layer, option)."""
        if self._sizes is None:
            from .sizes import SizeTable

            self._sizes = SizeTable.from_multiquantizer(self)
        return self._sizes

    def quantized_bytes(self, options: Mapping[str, str]) -> int:
        """Σ bytes over all layers; layers absent from ``options`` count as fp16 (:class:`SizeTable`)."""
        self.validate(options)
        return self.size_table().quantized_bytes(options)

    def avg_bits(self, options: Mapping[str, str]) -> float:
        """``16 * Σ quantized bytes / Σ fp16 bytes`` over all layers of the multiquantizer (:class:`SizeTable`)."""
        self.validate(options)
        return self.size_table().avg_bits(options)

    def summed_error(self, options: Mapping[str, str]) -> float:
        """Σ relative errors of the chosen options (fp16: 0) (:class:`SizeTable`)."""
        self.validate(options)
        return self.size_table().summed_error(options)

    def validate(self, options: Mapping[str, str]) -> None:
        """Raise ConfigError naming the first layer or option that does not fit this multiquantizer."""
        for layer, opt in options.items():
            self._entry(layer)
            self._check_option(layer, opt)

    def stats_frame(self):
        """pandas DataFrame: one row per (layer, option) with error, nbytes, fp16_bytes, bits_per_weight."""
        import pandas as pd

        rows = []
        for name, e in self._entries.items():
            for opt in self.options:
                s = e.stats[opt]
                o = QuantOption.parse(opt)
                rows.append(
                    {
                        "layer": name,
                        "option": opt,
                        "method": o.method,
                        "bits": o.bits,
                        "error": s["error"],
                        "sse": s["sse"],
                        "nbytes": s["nbytes"],
                        "fp16_bytes": e.spec.fp16_bytes,
                        "bits_per_weight": 16.0 * s["nbytes"] / e.spec.fp16_bytes,
                    }
                )
        return pd.DataFrame(rows)

    # ---- tensors ---------------------------------------------------------------------------------
    def _load(self, layer: str, option: str) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        key = (layer, option)
        if key in self._codes:
            return self._codes[key], self._params[key]
        if self._reader is None:
            raise SensitivityError(f"multiquantizer {self.path} has no tensor data loaded")
        entry = self._entry(layer)
        st = entry.stats[option]
        prefix = f"{layer}/{option}/"
        packed = self._reader.get(prefix + "codes")
        params_np = {p: self._reader.get(prefix + p) for p in st["params"]}
        if _digest([packed] + [params_np[p] for p in st["params"]]) != st["digest"]:
            raise CorruptFileError(f"{self.path}: data of layer {layer!r} option {option!r} was modified or damaged")
        bits = QuantOption.parse(option).bits
        codes = unpack_codes(packed, bits, entry.spec.numel)
        codes_t = torch.from_numpy(np.asarray(codes, dtype=np.uint8).reshape(entry.spec.out_channels, -1))
        params = {p: torch.from_numpy(np.array(v)) for p, v in params_np.items()}
        self._codes[key], self._params[key] = codes_t, params
        return codes_t, params

    def quantized_weight(self, layer: str, option: str, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        opt = self._check_option(layer, option)
        codes, params = self._load(layer, opt)
        s = self._entry(layer).stats[opt]
        return QuantizedWeight(opt, self._entry(layer).spec.shape, dtype, codes, params, s["error"], s["sse"])

    def dequantize(
        self, layer: str, option: str, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The dequantized weight of ``layer`` under ``option``, shaped like the layer's weight.

        ``out``: a contiguous float32 CPU tensor of the layer's shape to write into (no temporaries)."""
        opt = self._check_option(layer, option)
        if opt == FP16:
            raise ConfigError(f"layer {layer!r}: 'fp16' has no quantized weight; use restore()")
        codes, params = self._load(layer, opt)
        spec = self._entry(layer).spec
        o = QuantOption.parse(opt)
        method = get_method(o.method)
        dev = torch.device(device) if device is not None else codes.device
        params = {k: v.to(dev) for k, v in params.items()}
        if (out is not None and dev.type == "cpu" and out.device.type == "cpu" and out.dtype == torch.float32
                and out.is_contiguous() and tuple(out.shape) == tuple(spec.shape)):
            method.dequantize_rows(codes, params, o.bits, out=out.view(codes.shape))
            return out
        values = method.dequantize_rows(codes.to(dev, non_blocking=True), params, o.bits)
        values = values.reshape(spec.shape).to(dtype)
        if out is not None:
            out.copy_(values)
            return out
        return values

    def preload(self, options: Optional[Iterable[str]] = None, progress: bool = False) -> None:
        """Read and unpack the codes of ``options`` (default all) for every layer now, not lazily."""
        opts = [self._check_option("*", o) for o in (options or self.options)]
        for name in tqdm(self._entries, desc="preload", disable=not progress, leave=False):
            for o in opts:
                self._load(name, o)

    # ---- checks ----------------------------------------------------------------------------------
    def check_model(self, module: nn.Module, check_weights: bool = True) -> None:
        """Raise MultiquantizerMismatchError if ``module`` is not the model this file was built for."""
        where = f"multiquantizer {self.path.name} (built for {self.model_id})"
        modules = dict(module.named_modules())
        for spec in self.layers:
            sub = modules.get(spec.module_path)
            if sub is None or getattr(sub, "weight", None) is None:
                raise MultiquantizerMismatchError(f"{where}: the model has no layer {spec.module_path!r}")
            w = layer_weight(module, spec)
            if tuple(w.shape) != spec.shape:
                raise MultiquantizerMismatchError(
                    f"{where}: layer {spec.name!r} has shape {tuple(w.shape)} in the model, {spec.shape} in the file"
                )
        if check_weights:
            state = _state(module)
            if state is not None and state["options"]:
                raise SensitivityError("check_model: the model has a config applied; call restore() first")
            comps = self.manifest.get("components")
            if comps:  # a pipeline multiquantizer: one weights hash per component (names start with it)
                by_comp: Dict[str, List[LayerSpec]] = {}
                for spec in self.layers:
                    by_comp.setdefault(spec.name.split(".", 1)[0], []).append(spec)
                for comp, specs in by_comp.items():
                    if weights_hash(module, specs) != comps[comp]["weights_hash"]:
                        raise MultiquantizerMismatchError(
                            f"{where}: the {comp}'s weights differ from the ones it was built from")
            elif weights_hash(module, self.layers) != self.manifest["weights_hash"]:
                raise MultiquantizerMismatchError(f"{where}: the model's weights differ from the ones it was built from")


# --------------------------------------------------------------------------------------------------
# build / load
# --------------------------------------------------------------------------------------------------
def _part_path(parts: Path, index: int) -> Path:
    return parts / f"layer-{index:05d}.safetensors"


def option_settings(option: str) -> Dict[str, Any]:
    """What decides an option's stored result: its method's settings (class, version, config)."""
    return get_method(QuantOption.parse(option).method).settings()


def _quantize_layer(
    module: nn.Module, spec: LayerSpec, options: Sequence[str], device: Optional[torch.device]
) -> Tuple[List[Tuple[str, np.ndarray]], Dict[str, Dict[str, Any]]]:
    if not options:
        return [], {}
    w = layer_weight(module, spec).detach()
    if w.is_meta:
        raise SensitivityError(f"layer {spec.name!r} is on the meta device: build needs real weights (--weights random?)")
    if device is not None:
        w = w.to(device)
    if w.dim() < 2 or w.numel() == 0:
        raise SensitivityError(f"layer {spec.name!r}: cannot quantize a weight of shape {tuple(w.shape)}: need >= 2 dims")
    rows = w.reshape(w.shape[0], -1).to(torch.float32)  # shared by the options, as their norm
    try:
        norm = squared_norm(rows)
    except SensitivityError:
        raise SensitivityError(f"layer {spec.name!r} contains NaN or Inf weights") from None
    tensors: List[Tuple[str, np.ndarray]] = []
    stats: Dict[str, Dict[str, Any]] = {}
    for opt in options:
        q = quantize_prepared(rows, QuantOption.parse(opt), tuple(w.shape), w.dtype, norm)
        packed = pack_codes(q.codes.reshape(-1).cpu().numpy(), q.bits)
        names = sorted(q.params)
        params = [q.params[p].detach().cpu().numpy() for p in names]  # fp16 or fp32, as the method's param_layout
        tensors.append((f"{spec.name}/{opt}/codes", packed))
        tensors += [(f"{spec.name}/{opt}/{p}", a) for p, a in zip(names, params)]
        stats[opt] = {
            "error": float(q.error),
            "sse": float(q.sse),
            "nbytes": int(q.nbytes),
            "params": names,
            "digest": _digest([packed] + params),
        }
    return tensors, stats


def build_multiquantizer(
    module: nn.Module,
    out: str | os.PathLike,
    layers: Optional[Sequence[LayerSpec]] = None,
    *,
    model_id: str = "",
    options: Sequence[str] = OPTION_NAMES,
    device: Optional[str | torch.device] = None,
    resume: bool = True,
    progress: bool = True,
    extra: Optional[Mapping[str, Any]] = None,
    threads: Optional[int] = None,
) -> Multiquantizer:
    """Quantize every layer of ``module`` with every option and write ``out`` (a .safetensors file).

    ``threads``: CPU threads for large layers (default: the free cores, :func:`sensitivity.threads.free_cores`);
    layers under :data:`sensitivity.threads.SMALL_WORK` weights run on one thread.

    ``layers`` defaults to :func:`sensitivity.layers.find_layers` (use the zoo family's rules for real
    models). ``device``: where the quantizer math runs (default: the weights' device). A killed build
    resumes from ``<out>.parts/`` when rerun with ``resume=True``; ``resume=False`` starts afresh.
    """
    out = Path(out)
    options = tuple(dict.fromkeys(QuantOption.parse(o).name for o in options))
    if any(o == FP16 for o in options) or not options:
        raise SensitivityError("options must be quantization options such as 'uaq-4' (not empty, not 'fp16')")
    layers = list(layers) if layers is not None else find_layers(module)
    if not layers:
        raise SensitivityError("the model has no layers to quantize")
    seen_names = set()
    for spec in layers:
        if spec.name in seen_names:
            raise SensitivityError(f"layer {spec.name!r} is listed twice; give each layer once")
        seen_names.add(spec.name)
    check_ties(module, layers)
    dev = torch.device(device) if device is not None else None
    t0 = time.perf_counter()
    arch = architecture_hash(layers)
    whash = weights_hash(module, layers)
    option_set = {o: option_settings(o) for o in options}
    settings = {"options": list(options),
                "methods": {QuantOption.parse(o).method: st for o, st in option_set.items()}}
    plan = {"format": FORMAT, "architecture_hash": arch, "weights_hash": whash}

    parts = resume_parts(out, plan, restart=not resume, mismatch="holds an unfinished build for another model "
                         "(architecture or weights differ); delete it or rebuild with --restart")

    layer_stats: List[Dict[str, Any]] = []
    seconds = 0.0  # quantization seconds, summed over resumed runs
    resumed_seconds = 0.0
    done = 0
    recomputed = 0  # options of resumed layers computed again (new option, or its method's settings changed)
    bar = tqdm(layers, desc=f"multiquantize {model_id or type(module).__name__}", unit="layer", disable=not progress)
    for i, spec in enumerate(bar):
        part = _part_path(parts, i)
        kept: Dict[str, Dict[str, Any]] = {}
        reader: Optional[_SafetensorsReader] = None
        prev_seconds = 0.0
        if part.exists():
            try:
                reader = _SafetensorsReader(part)
                meta = reader.metadata
                if json.loads(meta["layer"])["name"] != spec.name:
                    raise ValueError("another layer")
                old_stats = json.loads(meta["stats"])
                old_settings = json.loads(meta.get("settings", "{}"))
                kept = {o: old_stats[o] for o in options if o in old_stats and old_settings.get(o) == option_set[o]}
                prev_seconds = float(meta.get("seconds", 0.0))
            except (SensitivityError, KeyError, ValueError):
                reader, kept, prev_seconds = None, {}, 0.0  # an unreadable part is recomputed
        todo = [o for o in options if o not in kept]
        if not todo and reader is not None and set(json.loads(reader.metadata["stats"])) == set(options):
            layer_stats.append({o: kept[o] for o in options})
            seconds += prev_seconds
            resumed_seconds += prev_seconds
            done += 1
            continue
        if reader is not None:
            recomputed += len(todo)
        t_layer = time.perf_counter()
        with using_threads(threads_for(spec.numel, limit=threads)):
            new_tensors, new_stats = _quantize_layer(module, spec, todo, dev)
        dt = time.perf_counter() - t_layer
        seconds += dt + prev_seconds
        resumed_seconds += prev_seconds
        by_opt: Dict[str, List[Tuple[str, np.ndarray]]] = {o: [] for o in options}
        for name, arr in new_tensors:
            by_opt[name.rsplit("/", 2)[1]].append((name, arr))
        if reader is not None:
            for name in reader.keys():
                o = name.rsplit("/", 2)[1]
                if o in kept:
                    by_opt[o].append((name, reader.get(name)))
        tensors = [t for o in options for t in by_opt[o]]
        stats = {o: (kept[o] if o in kept else new_stats[o]) for o in options}
        meta = {"layer": json.dumps(spec.to_dict()), "stats": json.dumps(stats), "seconds": repr(dt + prev_seconds),
                "settings": json.dumps(option_set)}
        with atomic_path(part, "multiquantizer part") as tmp:
            _write_safetensors(tmp, tensors, meta)
        layer_stats.append(stats)
        bar.set_postfix_str(spec.name[-40:])
    bar.close()

    # assemble: stream every part into one file
    layer_entries = []
    for spec, stats in zip(layers, layer_stats):
        d = spec.to_dict()
        d["fp16_bytes"] = spec.fp16_bytes
        d["options"] = stats
        layer_entries.append(d)
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "model_id": model_id,
        "model_class": type(module).__name__,
        "architecture_hash": arch,
        "weights_hash": whash,
        "options": list(options),
        "layers": layer_entries,
        "fp16_bytes": sum(s.fp16_bytes for s in layers),
        "settings": settings,
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_layers": done,
        "recomputed_options": recomputed,
    }
    if extra:
        manifest["extra"] = dict(extra)
    manifest["hash"] = _manifest_hash(manifest)
    manifest["checksum"] = _manifest_checksum(manifest)
    readers = [_SafetensorsReader(_part_path(parts, i)) for i in range(len(layers))]
    tensors = [(name, _Lazy(r, name)) for r in readers for name in r.keys()]
    manifest["quantize_seconds"] = round(seconds, 3)
    # wall seconds of this run (hashing + quantizing, before the final streaming copy) + resumed parts
    manifest["build_seconds"] = round(resumed_seconds + time.perf_counter() - t0, 3)
    with atomic_path(out, "multiquantizer") as tmp:
        _write_safetensors(tmp, tensors, {MANIFEST_KEY: json.dumps(manifest)})
    shutil.rmtree(parts, ignore_errors=True)
    return load_multiquantizer(out)


def load_multiquantizer(path: str | os.PathLike, model: Optional[nn.Module] = None) -> Multiquantizer:
    """Open a multiquantizer file lazily; with ``model``, also check that it was built for that model."""
    path = Path(path)
    reader, manifest = _open(path)
    mq = Multiquantizer(path, manifest, reader)
    if model is not None:
        mq.check_model(model)
    return mq


def load_family_multiquantizer(path: str | os.PathLike, family: str) -> Multiquantizer:
    """The ``--multiquantizer`` of a command on model ``family`` (a family name): one line when the file is
    missing or was built for another family."""
    path = Path(path)
    if not path.is_file():
        raise SensitivityError(f"--multiquantizer {str(path)!r} {'is not a file' if path.exists() else 'does not exist'}")
    mq = load_multiquantizer(path)
    if str(mq.model_id).split(":", 1)[0] != family:
        raise SensitivityError(f"multiquantizer {path.name} was built for {mq.model_id}, not for model {family!r}")
    return mq


# --------------------------------------------------------------------------------------------------
# apply / restore
# --------------------------------------------------------------------------------------------------
_STATE_ATTR = "_sensitivity_quant_state"


def _state(module: nn.Module) -> Optional[Dict[str, Any]]:
    return module.__dict__.get(_STATE_ATTR)


@torch.no_grad()
def apply(module: nn.Module, mq: Multiquantizer, config: QuantConfig | Mapping[str, str]) -> Dict[str, str]:
    """Set every layer of ``mq`` in ``module`` to its option in ``config`` (absent layers: full precision).

    The first call keeps a copy of the full-precision weights (on their device) for :func:`restore`.
    Later calls rewrite only the layers whose option changed. Returns the applied ``{layer: option}``.
    """
    options = as_options(config)
    mq.validate(options)
    state = _state(module)
    if state is None:
        state = {"mq": mq.hash, "fp": {}, "options": {}}
        module.__dict__[_STATE_ATTR] = state
    elif state["mq"] != mq.hash:
        raise SensitivityError("apply: the model holds a config of another multiquantizer; call restore() first")
    for spec in mq.layers:
        want = options.get(spec.name, FP16)
        have = state["options"].get(spec.name, FP16)
        if want == have:
            continue
        paths = (spec.module_path,) + spec.tied
        weights = [module.get_submodule(p).weight for p in paths]
        for p, w in zip(paths, weights):
            if p not in state["fp"]:
                state["fp"][p] = w.detach().clone()
        sl = (slice(None), slice(*spec.in_slice)) if spec.in_slice else (slice(None),)
        if want == FP16:
            for p, w in zip(paths, weights):
                w.data[sl] = state["fp"][p][sl]
        elif spec.in_slice is None and weights[0].is_contiguous():
            first = mq.dequantize(spec.name, want, device=weights[0].device, dtype=weights[0].dtype,
                                  out=weights[0].data)
            for w in weights[1:]:
                w.data.copy_(first)
        else:
            value = mq.dequantize(spec.name, want, device=weights[0].device, dtype=weights[0].dtype)
            for w in weights:
                w.data[sl] = value
        if want == FP16:
            state["options"].pop(spec.name, None)
        else:
            state["options"][spec.name] = want
    return dict(state["options"])


@torch.no_grad()
def restore(module: nn.Module) -> None:
    """Bring every weight changed by :func:`apply` back to full precision, bit-exactly."""
    state = module.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for path, original in state["fp"].items():
        module.get_submodule(path).weight.data.copy_(original)


def applied_options(module: nn.Module) -> Dict[str, str]:
    """The ``{layer: option}`` currently applied to ``module`` (empty if full precision)."""
    state = _state(module)
    return dict(state["options"]) if state else {}
