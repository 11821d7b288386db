"""The whole pipeline as one quantized model: text encoder(s), denoiser and VAE decoder in one multiquantizer.

A *pipeline multiquantizer* is an ordinary multiquantizer file whose layers belong to several
components of a text-to-image pipeline. Each layer's name (and module path) starts with its component
(:data:`sensitivity.components.COMPONENT_NAMES`), followed by the layer's path inside the component::

    text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    denoiser.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    vae_decoder.decoder.up_blocks.0.resnets.0.conv1

so every stage that takes a multiquantizer (sampler, cache, predictors, search, insights) works on the
union unchanged. The layers of each component follow the rules of :mod:`sensitivity.components`.
Configs are applied to :class:`PipelineModules`, a module whose children are the pipeline's components
under their component names (:func:`quantization_root` gives it for a pipeline, or the denoiser for a
denoiser-only file).

The manifest adds ``components``: per component of the pipeline (in the file or not) its parameter
count, fp16 bytes, bytes of its unquantized tensors (embeddings, norms, biases, excluded layers, at
fp16), and for the components in the file their layer count, architecture and weights hashes.

Building (:func:`build_pipeline_multiquantizer`) loads ONE component at a time in fp32 (for the
``random`` / ``tiny`` builds of the official configs, the other components are made on the meta
device, see :func:`sensitivity.zoo.offline.materializing`), quantizes it layer by layer into
``<out>.components/<component>.safetensors`` (resumable as any build), frees it, and finally streams
the component files into ``out``. Peak memory is the largest component in fp32, not the pipeline.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .components import COMPONENT_NAMES, TEXT_ENCODER_ATTRS, component_layers
from .errors import SensitivityError
from .io import atomic_path, atomic_write_json
from .layers import LayerSpec
from .mqfile import FORMAT, MANIFEST_KEY, _Lazy, _manifest_checksum, _manifest_hash, _SafetensorsReader, _write_safetensors
from .multiquantizer import Multiquantizer, build_multiquantizer, load_multiquantizer
from .options import OPTION_NAMES, QuantOption

DENOISER = "denoiser"
VAE_DECODER = "vae_decoder"
PIPELINE_CLASS = "PipelineModules"
_ROOT_ATTR = "_sensitivity_pipeline_root"


class PipelineModules(nn.Module):
    """The components of one pipeline as children named by component (``text_encoder``, ``denoiser``,
    ``vae_decoder``...). The modules are the pipeline's own (not copies): applying a config to this
    module rewrites the pipeline's weights in place."""

    def __init__(self, components: Mapping[str, nn.Module]):
        super().__init__()
        for name, module in components.items():
            self.add_module(name, module)

    def forward(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - a container, never called
        raise SensitivityError("PipelineModules holds the components of a pipeline; it has no forward")


def component_attr(family, name: str) -> str:
    """The pipeline attribute holding component ``name`` (``denoiser`` -> ``unet``/``transformer``)."""
    if name == DENOISER:
        return family.denoiser_attr
    if name == VAE_DECODER:
        return "vae"
    if name in TEXT_ENCODER_ATTRS:
        return name
    raise SensitivityError(f"unknown component {name!r}; known: {', '.join(COMPONENT_NAMES)}")


def parse_components(text: Optional[str], available: Optional[Sequence[str]] = None) -> List[str]:
    """``"text_encoder,denoiser"`` / ``"all"`` / None (= denoiser) -> component names in pipeline order.

    ``available``: the pipeline's components (``all`` expands to them; others are refused)."""
    if text is None or not str(text).strip():
        return [DENOISER]
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["all"]:
        if available is None:
            raise SensitivityError("--components all needs the pipeline's components")
        return list(available)
    for n in names:
        if n not in COMPONENT_NAMES:
            raise SensitivityError(f"--components: unknown component {n!r}; known: all, {', '.join(COMPONENT_NAMES)}")
        if available is not None and n not in available:
            raise SensitivityError(f"--components: this pipeline has no {n!r} (it has {', '.join(available)})")
    if len(set(names)) != len(names):
        raise SensitivityError(f"--components {text!r} names a component twice")
    order = list(available) if available is not None else list(COMPONENT_NAMES)
    return sorted(names, key=order.index)


def component_of(layer: str) -> str:
    """The component of a pipeline multiquantizer's layer name (its first dotted part)."""
    head, _, rest = layer.partition(".")
    if not rest or head not in COMPONENT_NAMES:
        raise SensitivityError(f"layer {layer!r} does not start with a component name ({', '.join(COMPONENT_NAMES)})")
    return head


def prefixed_layers(name: str, layers: Sequence[LayerSpec]) -> List[LayerSpec]:
    """``layers`` of component ``name`` with names, module paths and tied paths prefixed by ``name.``."""
    return [LayerSpec(f"{name}.{s.name}", f"{name}.{s.module_path}", s.kind, s.shape, s.in_slice,
                      tuple(f"{name}.{t}" for t in s.tied)) for s in layers]


def unprefixed(layer: str) -> str:
    """A pipeline layer name without its component (``denoiser.conv_out`` -> ``conv_out``)."""
    return layer.split(".", 1)[1] if "." in layer else layer


def is_pipeline_multiquantizer(mq: Any) -> bool:
    return bool(getattr(mq, "manifest", {}).get("components"))


def pipeline_component_names(family, pipe) -> List[str]:
    """The components of a loaded pipeline, in generation order."""
    names = [a for a in TEXT_ENCODER_ATTRS if isinstance(getattr(pipe, a, None), nn.Module)]
    names.append(DENOISER)
    if isinstance(getattr(pipe, "vae", None), nn.Module):
        names.append(VAE_DECODER)
    return names


def quantization_root(family, pipe, mq: Any = None) -> nn.Module:
    """The module a config of ``mq`` is applied to: :class:`PipelineModules` over every component of
    ``pipe`` for a pipeline multiquantizer (one object per pipeline, so ``apply``'s state persists), else
    the denoiser."""
    if mq is None or not is_pipeline_multiquantizer(mq):
        return family.denoiser(pipe)
    root = pipe.__dict__.get(_ROOT_ATTR)
    if root is None:
        root = PipelineModules({n: getattr(pipe, component_attr(family, n)) for n in pipeline_component_names(family, pipe)})
        pipe.__dict__[_ROOT_ATTR] = root
    missing = [c for c in mq.manifest["components"] if mq.manifest["components"][c].get("layers") and c not in root._modules]
    if missing:
        raise SensitivityError(f"multiquantizer {mq.path.name} has component {missing[0]!r}, which the pipeline lacks")
    return root


# ------------------------------------------------------------------------------------ loading components
def load_component(family, weights: Optional[str], name: str, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0, materialize: bool = True) -> nn.Module:
    """Component ``name`` of the pipeline alone, in eval mode on ``device``.

    ``random`` / ``tiny`` / ``meta`` builds make the other components on the meta device (no memory);
    a local diffusers folder loads the component's subfolder only; a hub id loads the pipeline and keeps
    the component. ``materialize=False``: structure only (meta device) where the build allows it."""
    from .zoo.offline import materializing

    w = family.resolve_weights(weights)
    attr = component_attr(family, name)
    special = w in getattr(family, "special_weights", ())
    if name == DENOISER and (materialize or not special):
        return family.load_denoiser(w, device=device, dtype=dtype, seed=seed)
    if special:
        with materializing(()) as built:  # every module on meta: find the seed of this component
            pipe = family.build_pipeline(w, dtype=dtype, seed=seed)
        module = getattr(pipe, attr, None)
        if module is None:
            raise SensitivityError(f"model {family.name!r}: the pipeline has no {attr!r}")
        if not materialize or w == "meta":
            return module.eval()
        seeds = [s for s, m in built if m is module]
        del pipe, built, module
        if seeds:
            with materializing(seeds):
                pipe = family.build_pipeline(w, dtype=dtype, seed=seed)
        else:  # built without the offline builders: the whole pipeline
            pipe = family.build_pipeline(w, dtype=dtype, seed=seed)
        module = getattr(pipe, attr)
        del pipe
        return module.to(torch.device(device)).eval()
    folder = Path(str(w)).expanduser()
    index = folder / "model_index.json"
    if index.is_file():
        entry = json.loads(index.read_text()).get(attr)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[1]:
            import importlib

            from .zoo.offline import dtype_kwargs

            cls = getattr(importlib.import_module(entry[0]), entry[1])
            kw = dtype_kwargs(dtype) if entry[0] == "diffusers" else {"torch_dtype": dtype}
            try:
                module = cls.from_pretrained(str(folder), subfolder=attr, **kw)
            except Exception as exc:  # noqa: BLE001 - any load failure is one line
                raise SensitivityError(f"--weights {w}: cannot load {attr}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
            return module.to(torch.device(device)).eval()
    pipe = family.load_pipeline(w, device=device, dtype=dtype, seed=seed)
    return getattr(pipe, attr).eval()


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_numel(layers: Sequence[LayerSpec]) -> int:
    return sum(s.numel * (1 + len(s.tied)) for s in layers)


# ------------------------------------------------------------------------------------ building
def build_pipeline_multiquantizer(family, weights: Optional[str], components: Sequence[str], out: str | os.PathLike, *,
                                  options: Sequence[str] = OPTION_NAMES, device: Optional[str] = None, seed: int = 0,
                                  threads: Optional[int] = None, resume: bool = True, progress: bool = True,
                                  extra: Optional[Mapping[str, Any]] = None) -> Multiquantizer:
    """Build the multiquantizer of ``components`` of ``family``'s pipeline (see the module docstring).

    One component in fp32 memory at a time; finished components are kept in ``<out>.components/`` and
    reused by a rerun with the same model, weights, seed and options (``resume=False`` starts afresh).
    """
    from .checks import check_finite_weights

    out = Path(out)
    options = tuple(dict.fromkeys(QuantOption.parse(o).name for o in options))
    device = device or "cpu"
    w = family.resolve_weights(weights)
    if w == "meta":
        raise SensitivityError("--weights meta holds no values: build needs real weights (--weights random?)")
    all_names = _pipeline_names(family, w, seed)
    names = [n for n in all_names if n in components]
    if list(components) != names:
        bad = [c for c in components if c not in all_names]
        if bad:
            raise SensitivityError(f"model {family.name!r}: the pipeline has no component {bad[0]!r} "
                                   f"(it has {', '.join(all_names)})")
    folder = out.with_name(out.name + ".components")
    plan = {"family": family.name, "weights": str(w), "seed": int(seed), "options": list(options), "format": FORMAT}
    plan_file = folder / "plan.json"
    if folder.exists():
        old = None
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            pass
        if not resume or old != plan:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not plan_file.exists():
        atomic_write_json(plan_file, plan, "the component plan")
    t0 = time.perf_counter()
    info: Dict[str, Dict[str, Any]] = {}
    files: List[Path] = []
    model_id = family.model_id(w)
    for name in all_names:
        attr = component_attr(family, name)
        if name not in names:  # not quantized: only its size counts in whole-pipeline bytes
            module = load_component(family, w, name, device="cpu", dtype=torch.float32, seed=seed, materialize=False)
            n = _param_count(module)
            info[name] = {"attr": attr, "class": type(module).__name__, "params": n, "fp16_bytes": 2 * n,
                          "unquantized_fp16_bytes": 2 * n, "layers": 0}
            del module
            gc.collect()
            continue
        path = folder / f"{name}.safetensors"
        done = folder / f"{name}.json"
        if path.is_file() and done.is_file():
            try:
                meta = json.loads(done.read_text())
                load_multiquantizer(path)
                info[name] = meta
                files.append(path)
                continue
            except (OSError, ValueError, SensitivityError):
                pass
        module = load_component(family, w, name, device=device, dtype=torch.float32, seed=seed)
        layers = component_layers(family, name, module)
        if not layers:
            raise SensitivityError(f"component {name!r} of {family.name!r} has no quantizable layers")
        check_finite_weights(module, layers, f"--weights {w} ({name})")
        root = PipelineModules({name: module})
        specs = prefixed_layers(name, layers)
        mq = build_multiquantizer(root, path, specs, model_id=f"{model_id}/{name}", options=options, device=device,
                                  resume=resume, progress=progress, threads=threads)
        n = _param_count(module)
        info[name] = {"attr": attr, "class": type(module).__name__, "params": n, "fp16_bytes": 2 * n,
                      "unquantized_fp16_bytes": 2 * (n - _layer_numel(layers)), "layers": len(layers),
                      "architecture_hash": mq.manifest["architecture_hash"], "weights_hash": mq.manifest["weights_hash"],
                      "build_seconds": mq.manifest["build_seconds"]}
        atomic_write_json(done, info[name], "the component record")
        files.append(path)
        del module, root, mq
        gc.collect()
    result = _merge(files, out, info, model_id=model_id, options=options, seconds=time.perf_counter() - t0,
                    extra={"family": family.name, "weights": str(w), "seed": int(seed), "components": names,
                           **dict(extra or {})})
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _pipeline_names(family, weights: str, seed: int) -> List[str]:
    """The pipeline's components without loading weights where the build allows (meta)."""
    from .zoo.offline import materializing

    if weights in getattr(family, "special_weights", ()):
        with materializing(()):
            pipe = family.build_pipeline(weights, dtype=torch.float32, seed=seed)
        return pipeline_component_names(family, pipe)
    index = Path(str(weights)).expanduser() / "model_index.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        names = [a for a in TEXT_ENCODER_ATTRS if isinstance(entries.get(a), list) and entries[a][0]]
        names.append(DENOISER)
        if isinstance(entries.get("vae"), list) and entries["vae"][0]:
            names.append(VAE_DECODER)
        return names
    return pipeline_component_names(family, family.load_pipeline(weights, device="cpu", seed=seed))


def _combined_hash(parts: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _merge(files: Sequence[Path], out: Path, info: Mapping[str, Mapping[str, Any]], *, model_id: str,
           options: Sequence[str], seconds: float, extra: Mapping[str, Any]) -> Multiquantizer:
    """Stream the component files into one multiquantizer ``out`` with the components' manifest."""
    readers = [_SafetensorsReader(p) for p in files]
    manifests = [json.loads(r.metadata[MANIFEST_KEY]) for r in readers]
    layers = [d for m in manifests for d in m["layers"]]
    in_file = [n for n in info if info[n].get("layers")]
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "model_id": model_id,
        "model_class": PIPELINE_CLASS,
        "architecture_hash": _combined_hash({n: [info[n]["architecture_hash"], info[n]["params"]] for n in in_file}),
        "weights_hash": _combined_hash({n: info[n]["weights_hash"] for n in in_file}),
        "options": list(options),
        "layers": layers,
        "fp16_bytes": sum(d["fp16_bytes"] for d in layers),
        "components": {n: dict(v) for n, v in info.items()},
        "settings": manifests[0]["settings"] if manifests else {},
        "versions": manifests[0]["versions"] if manifests else {},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_layers": sum(m.get("resumed_layers", 0) for m in manifests),
        "recomputed_options": sum(m.get("recomputed_options", 0) for m in manifests),
        "extra": dict(extra),
    }
    manifest["hash"] = _manifest_hash(manifest)
    manifest["checksum"] = _manifest_checksum(manifest)
    manifest["quantize_seconds"] = round(sum(m.get("quantize_seconds", 0.0) for m in manifests), 3)
    manifest["build_seconds"] = round(seconds, 3)
    tensors = [(name, _Lazy(r, name)) for r in readers for name in r.keys()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, "multiquantizer") as tmp:
        _write_safetensors(tmp, tensors, {MANIFEST_KEY: json.dumps(manifest)})
    return load_multiquantizer(out)


# ------------------------------------------------------------------------------------ sizes
def unquantized_bytes(mq: Any) -> int:
    """fp16 bytes of every weight of the pipeline that no layer of ``mq`` holds (components not in the
    file included); 0 for a denoiser-only file without the record."""
    comps = getattr(mq, "manifest", {}).get("components") or {}
    return int(sum(int(c.get("unquantized_fp16_bytes", 0)) for c in comps.values()))


def component_table(mq: Any) -> Dict[str, Dict[str, Any]]:
    """``{component: {"params", "fp16_bytes", "unquantized_fp16_bytes", "layers", "layer_fp16_bytes"}}``."""
    comps = getattr(mq, "manifest", {}).get("components") or {}
    out: Dict[str, Dict[str, Any]] = {}
    for n, c in comps.items():
        out[n] = {k: c.get(k) for k in ("class", "params", "fp16_bytes", "unquantized_fp16_bytes", "layers")}
        out[n]["layer_fp16_bytes"] = int(c["fp16_bytes"]) - int(c["unquantized_fp16_bytes"])
    return out


def component_weights_check(mq: Any, root: nn.Module) -> Optional[Tuple[str, str]]:
    """``(component, reason)`` of the first component of ``root`` whose weights differ from the file's."""
    from .layers import weights_hash

    by_comp: Dict[str, List[LayerSpec]] = {}
    for s in mq.layers:
        by_comp.setdefault(component_of(s.name), []).append(s)
    for name, specs in by_comp.items():
        want = mq.manifest["components"][name]["weights_hash"]
        if weights_hash(root, specs) != want:
            return name, "its weights differ from the ones the file was built from"
    return None


def build_pipeline_components(family, weights: Optional[str], components: str, out: str | os.PathLike,
                              **kwargs: Any) -> Multiquantizer:
    """:func:`build_pipeline_multiquantizer` of ``components`` given as text (``"text_encoder,denoiser"``,
    ``"all"``; :func:`parse_components`), with ``extra`` recording the request."""
    w = family.resolve_weights(weights)
    names = parse_components(components, _pipeline_names(family, w, int(kwargs.get("seed", 0))))
    return build_pipeline_multiquantizer(family, w, names, out, **kwargs)


# ------------------------------------------------------------------------------------ one component's view
class _PrefixedReader:
    """A tensor reader of the pipeline file that serves a component's tensors under unprefixed names."""

    def __init__(self, reader: _SafetensorsReader, prefix: str):
        self.reader, self.prefix = reader, prefix
        self.path = reader.path

    def get(self, name: str):
        return self.reader.get(self.prefix + name)

    def info(self, name: str):
        return self.reader.info(self.prefix + name)

    def __contains__(self, name: str) -> bool:
        return (self.prefix + name) in self.reader

    def keys(self) -> List[str]:
        n = len(self.prefix)
        return [k[n:] for k in self.reader.keys() if k.startswith(self.prefix)]


class ComponentMultiquantizer(Multiquantizer):
    """The layers of one component of a pipeline multiquantizer, named as in the component's own module
    (``denoiser.conv_out`` -> ``conv_out``): what the per-model stages (export, apply on the component
    alone) take. ``hash`` is ``<pipeline hash>/<component>``; :meth:`check_model` checks the component's
    weights hash of the pipeline file."""

    def __init__(self, parent: Multiquantizer, name: str):
        comp = parent.components.get(name)
        if not comp or not comp.get("layers"):
            raise SensitivityError(f"multiquantizer {parent.path.name} has no layers of component {name!r}")
        prefix = f"{name}."
        layers = []
        for d in parent.manifest["layers"]:
            if d["name"].startswith(prefix):
                e = dict(d, name=d["name"][len(prefix):], module=d["module"][len(prefix):])
                if d.get("tied"):
                    e["tied"] = [t[len(prefix):] for t in d["tied"]]
                layers.append(e)
        manifest = {k: v for k, v in parent.manifest.items() if k != "components"}
        manifest.update(layers=layers, model_id=f"{parent.model_id}/{name}", hash=f"{parent.hash}/{name}",
                        weights_hash=comp["weights_hash"], architecture_hash=comp["architecture_hash"],
                        model_class=comp.get("class", ""), fp16_bytes=sum(d["fp16_bytes"] for d in layers))
        super().__init__(parent.path, manifest, _PrefixedReader(parent._reader, prefix))
        self.parent, self.component = parent, name

    def check_model(self, module: nn.Module, check_weights: bool = True) -> None:
        root = PipelineModules({self.component: module})
        Multiquantizer.check_model(self.parent_view(), root, check_weights)

    def parent_view(self) -> Multiquantizer:
        """The pipeline file restricted to this component, names prefixed (for checks on a one-child root)."""
        manifest = dict(self.parent.manifest)
        manifest["layers"] = [d for d in self.parent.manifest["layers"] if d["name"].startswith(self.component + ".")]
        manifest["components"] = {self.component: self.parent.components[self.component]}
        return Multiquantizer(self.parent.path, manifest, self.parent._reader)


def component_config(config: Mapping[str, str], name: str) -> Dict[str, str]:
    """The entries of a pipeline config that belong to component ``name``, unprefixed."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
