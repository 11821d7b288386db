"""Per-component quantization of a text-to-image pipeline: text encoder(s), denoiser, VAE decoder.

The Olive workflow's question — which component of the pipeline is sensitive to weight quantization?
— answered one component at a time: quantize one (the others full precision), generate every prompt
with fixed seeds, compare the images with the full-precision ones (MSE, PSNR).

```python
from sensitivity.zoo import get_family
from sensitivity.components import pipeline_components, run_components

fam = get_family("digits-sd"); pipe = fam.load_pipeline()
comps = pipeline_components(fam, pipe)          # {"text_encoder": Component, "denoiser": ..., "vae_decoder": ...}
result = run_components(fam, pipe, {"train": prompts}, {name: "uaq-3" for name in comps}, out_dir="components_out")
```

Layer rules per component (:func:`pipeline_components`; a family may override one with a method
``component_layer_rules(name, module) -> LayerRules``):

==================  ===========================================  ==========================================
component           root module                                  quantized layers
==================  ===========================================  ==========================================
``text_encoder``    ``pipe.text_encoder`` (``_2``, ``_3`` too:   every ``Linear`` (CLIP q/k/v/out_proj, fc1/fc2,
                    SDXL's second CLIP, Hunyuan's T5)            ``text_projection``; T5 q/k/v/o, wi_0/wi_1/wo;
                                                                 BERT ...). Token / position embedding tables
                                                                 are lookups, not matmuls, and stay fp.
``denoiser``        ``pipe.unet`` / ``pipe.transformer``         the family's :meth:`find_layers` rules (the
                                                                 Qua2SeDiMo search space)
``vae_decoder``     ``pipe.vae``                                 ``post_quant_conv`` and every ``Conv2d`` /
                                                                 ``Linear`` under ``decoder.`` (mid-block
                                                                 attention included). The encoder and
                                                                 ``quant_conv`` do not run in text-to-image
                                                                 generation and stay fp.
==================  ===========================================  ==========================================

Quantization goes through the ordinary machinery: one multiquantizer per component
(:func:`sensitivity.multiquantizer.build_multiquantizer` on the component's root module, only the
options asked for), :func:`~sensitivity.multiquantizer.apply` and
:func:`~sensitivity.multiquantizer.restore` (bit-exact), so every registered option — ``int8``,
``uaq-3``, ... — works per component. MSE is over pixel values in 0..255 (the Olive report's
scale); PSNR in dB with peak 255.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from torch import nn

from .config import QuantConfig, as_options
from .errors import SensitivityError
from .io import atomic_path, atomic_write_json, atomic_write_text
from .layers import LayerSpec, find_layers
from .multiquantizer import apply, build_multiquantizer, load_multiquantizer, restore
from .mqfile import COMPONENT_NAMES, TEXT_ENCODER_ATTRS  # noqa: F401 - every name a pipeline may have
from .options import FP16, QuantOption

VAE_DECODER_EXCLUDE = ("encoder", "encoder.*", "quant_conv")
PSNR_CAP_DB = 100.0


@dataclass
class Component:
    """One quantizable component: ``name`` (``text_encoder``, ``denoiser``, ``vae_decoder``...),
    ``attr`` (the pipeline attribute holding ``module``), ``layers`` (its quantizable layers)."""

    name: str
    attr: str
    module: nn.Module
    layers: List[LayerSpec]


def component_layers(family, name: str, module: nn.Module) -> List[LayerSpec]:
    """The quantizable layers of component ``name`` (rules in the module docstring)."""
    hook = getattr(family, "component_layer_rules", None)
    rules = hook(name, module) if hook is not None else None
    if rules is not None:
        return find_layers(module, exclude=rules.exclude, splits=rules.splits, ties=rules.ties)
    if name == "denoiser":
        return family.find_layers(module)
    if name == "vae_decoder":
        return [s for s in find_layers(module, exclude=VAE_DECODER_EXCLUDE) if s.kind != "conv1d"]
    if name.startswith("text_encoder"):
        return [s for s in find_layers(module) if s.kind == "linear"]
    raise SensitivityError(f"unknown component {name!r}")


def pipeline_components(family, pipe) -> Dict[str, Component]:
    """``{name: Component}`` of the pipeline, in generation order: text encoder(s), denoiser, VAE decoder."""
    out: Dict[str, Component] = {}
    for attr in TEXT_ENCODER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            out[attr] = Component(attr, attr, module, component_layers(family, attr, module))
    den = family.denoiser(pipe)
    out["denoiser"] = Component("denoiser", family.denoiser_attr, den, component_layers(family, "denoiser", den))
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, nn.Module):
        out["vae_decoder"] = Component("vae_decoder", "vae", vae, component_layers(family, "vae_decoder", vae))
    if len(out) < 2:
        raise SensitivityError(f"model {family.name!r}: the pipeline has no text encoder or VAE besides the denoiser")
    return out


def parse_component_configs(components: Mapping[str, Component], option: Optional[str] = None,
                            options: Mapping[str, str] = (), configs: Mapping[str, Union[str, os.PathLike]] = (),
                            only: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, str]]:
    """``{component: {layer: option}}`` from one ``option`` for every component, per-component
    ``options`` overrides and per-component config files (``configs``, QuantConfig JSON over the
    component's layer names); ``only``: the components to report (default all), the others need
    no option. Raises :class:`SensitivityError` naming the component / option / file."""
    options, configs = dict(options), dict(configs)
    for name in list(options) + list(configs) + list(only or []):
        if name not in components:
            raise SensitivityError(f"unknown component {name!r}; this pipeline has {', '.join(components)}")
    wanted = list(dict.fromkeys(only)) if only else list(components)
    for name in list(options) + list(configs):
        if name not in wanted:
            raise SensitivityError(f"component {name!r} has an option or config but is not among the "
                                   f"components reported ({', '.join(wanted)})")
    out: Dict[str, Dict[str, str]] = {}
    for name in wanted:
        comp = components[name]
        if name in configs:
            path = Path(configs[name])
            if not path.is_file():
                raise SensitivityError(f"--config {name}={path}: file does not exist")
            cfg = as_options(QuantConfig.load(path))
            known = {s.name for s in comp.layers}
            bad = sorted(set(cfg) - known)
            if bad:
                raise SensitivityError(f"config {path} names layer {bad[0]!r}, not a layer of the {name}")
            for layer, opt in cfg.items():
                QuantOption.parse(opt)
            out[name] = {k: QuantOption.parse(v).name for k, v in cfg.items() if QuantOption.parse(v).name != FP16}
            continue
        opt = options.get(name, option)
        if opt is None:
            raise SensitivityError(f"component {name!r}: no option (give --option or --component-option {name}=OPT)")
        opt = QuantOption.parse(opt).name
        out[name] = {} if opt == FP16 else {s.name: opt for s in comp.layers}
    return out


def _signature(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def images_mse_psnr(images: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
    """MSE over pixels (0..255 scale) and mean per-image PSNR (dB, peak 255, capped at 100)."""
    x = images.astype(np.float64)
    r = reference.astype(np.float64)
    per = ((x - r) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        db = np.where(per > 0, 10 * np.log10(255.0 ** 2 / np.maximum(per, 1e-300)), PSNR_CAP_DB)
    return {"mse": float(per.mean()), "psnr": float(np.minimum(db, PSNR_CAP_DB).mean())}


def run_components(family, pipe, prompt_sets: Mapping[str, Sequence[str]], configs: Mapping[str, Mapping[str, str]],
                   out_dir: Union[str, os.PathLike], *, images_per_prompt: int = 1, seed: int = 0,
                   model_id: str = "", progress: bool = True, **settings: Any) -> Dict[str, Any]:
    """Quantize each component of ``configs`` alone, generate every prompt, compare with full precision.

    ``prompt_sets``: ``{"train": [...], "test": [...]}``; image ``j`` of every prompt uses seed
    ``seed + j``. ``configs``: ``{component: {layer: option}}`` (:func:`parse_component_configs`).
    Writes into ``out_dir``: ``components.csv`` (one row per component x prompt), ``summary.csv``
    and ``components.json`` (per component and prompt set: mean MSE / PSNR, average bits),
    ``report.md``, ``grids/fp.png`` and ``grids/<component>.png`` (prompts in order; one row per
    prompt when ``images_per_prompt`` > 1, else 10 prompts per row),
    ``multiquantizers/<component>.safetensors``. Finished components are kept in
    ``out_dir/.partial`` and reused when the same command is rerun. Returns the JSON summary.
    """
    import pandas as pd

    comps = pipeline_components(family, pipe)
    unknown = [c for c in configs if c not in comps]
    if unknown:
        raise SensitivityError(f"unknown component {unknown[0]!r}; this pipeline has {', '.join(comps)}")
    prompts: List[str] = []
    split_of: List[str] = []
    for split, ps in prompt_sets.items():
        ps = list(family.check_conditions(list(ps)))
        prompts += ps
        split_of += [split] * len(ps)
    if not prompts:
        raise SensitivityError("no prompts given")
    k = int(images_per_prompt)
    if k < 1:
        raise SensitivityError(f"--images-per-prompt must be >= 1, got {k}")
    conds = [p for p in prompts for _ in range(k)]
    seeds = [int(seed) + j for _ in prompts for j in range(k)]
    out = Path(out_dir)
    partial = out / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    (out / "multiquantizers").mkdir(exist_ok=True)
    base = {"model": model_id, "prompts": prompts, "seeds": seeds, "settings": settings}

    def generate() -> np.ndarray:
        return family.generate(pipe, conds, seeds, **settings)

    def cached(tag: str, sig: str, fn) -> np.ndarray:
        path = partial / f"{tag}.npy"
        meta = partial / f"{tag}.json"
        if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("signature") == sig:
            return np.load(path, allow_pickle=False)
        images = fn()
        with atomic_path(path, "images") as tmp:
            np.save(tmp, images, allow_pickle=False)
        atomic_write_json(meta, {"signature": sig}, indent=None)
        return images

    fp = cached("fp", _signature(base), generate)
    columns = k if k > 1 else min(10, len(prompts))  # k > 1: one row per prompt
    save_grid(fp, out / "grids" / "fp.png", columns=columns)
    rows: List[Dict[str, Any]] = []
    summary: Dict[str, Any] = {"model": model_id, "images_per_prompt": k, "seed": int(seed),
                               "prompt_sets": {s: len(v) for s, v in prompt_sets.items()},
                               "settings": {key: v for key, v in settings.items()}, "components": {}}
    names = [c for c in comps if c in configs]
    bar = names
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc="components", unit="component")
    for name in bar:
        comp, cfg = comps[name], dict(configs[name])
        used = sorted(set(cfg.values()))
        mq_path = out / "multiquantizers" / f"{name}.safetensors"
        if cfg:
            mq = _reusable_multiquantizer(mq_path, comp, used)
            if mq is None:
                mq = build_multiquantizer(comp.module, mq_path, comp.layers, model_id=f"{model_id}/{name}",
                                          options=used, progress=False)  # written whole or not at all
            avg_bits = float(mq.avg_bits(cfg))
        else:
            mq, avg_bits = None, 16.0
        sig = _signature({**base, "component": name, "config": cfg})

        def quantized() -> np.ndarray:
            if not cfg:
                return generate()
            try:
                apply(comp.module, mq, cfg)
                return generate()
            finally:
                restore(comp.module)

        images = cached(name, sig, quantized)
        save_grid(images, out / "grids" / f"{name}.png", columns=columns)
        for i, prompt in enumerate(prompts):
            sl = slice(i * k, (i + 1) * k)
            m = images_mse_psnr(images[sl], fp[sl])
            rows.append({"component": name, "split": split_of[i], "prompt_index": i, "prompt": prompt, **m})
        per_split = {}
        for split in prompt_sets:
            idx = [i for i, s in enumerate(split_of) if s == split]
            if idx:
                sel = np.concatenate([np.arange(i * k, (i + 1) * k) for i in idx])
                per_split[split] = images_mse_psnr(images[sel], fp[sel])
        options_used = sorted(set(cfg.values())) or [FP16]
        summary["components"][name] = {"attr": comp.attr, "layers": len(comp.layers),
                                       "quantized_layers": len(cfg), "options": options_used,
                                       "avg_bits": avg_bits, **{f"{s}": v for s, v in per_split.items()}}
    frame = pd.DataFrame(rows, columns=["component", "split", "prompt_index", "prompt", "mse", "psnr"])
    _atomic_csv(frame, out / "components.csv")
    srows = [{"component": n, "options": "+".join(d["options"]), "avg_bits": d["avg_bits"],
              **{f"{s}_{m}": d[s][m] for s in prompt_sets if s in d for m in ("mse", "psnr")}}
             for n, d in summary["components"].items()]
    sframe = pd.DataFrame(srows)
    _atomic_csv(sframe, out / "summary.csv")
    if len(summary["components"]):
        key = "test" if "test" in prompt_sets else next(iter(prompt_sets))
        worst = max(summary["components"], key=lambda n: summary["components"][n][key]["mse"])
        summary["most_sensitive"] = {"component": worst, "by": f"{key} mse"}
    atomic_write_text(out / "components.json", json.dumps(summary, indent=1, default=float) + "\n")
    atomic_write_text(out / "report.md", report_markdown(summary, frame, list(prompt_sets)))
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _reusable_multiquantizer(path: Path, comp: Component, options: Sequence[str]):
    """The multiquantizer at ``path`` if it holds ``options`` for this component's current weights, else None."""
    if not path.is_file():
        return None
    try:
        mq = load_multiquantizer(path)
        mq.check_model(comp.module)
    except SensitivityError:
        return None
    if not set(options) <= set(mq.options) or [s.name for s in mq.layers] != [s.name for s in comp.layers]:
        return None
    return mq


def save_grid(images: np.ndarray, path: Path, columns: int, scale: int = 4) -> Path:
    """Write uint8 images ``[N, H, W, C]`` as one PNG grid (``columns`` per row, ``scale``x nearest upscaled)."""
    from PIL import Image

    n, h, w, c = images.shape
    rows, pad = -(-n // columns), 1
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path, "image grid") as tmp:
        img.save(tmp)
    return path


def _atomic_csv(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def report_markdown(summary: Mapping[str, Any], frame, splits: Sequence[str]) -> str:
    """The report: one summary row per component (mean MSE / PSNR per prompt set), then per prompt."""
    lines = [f"# Per-component quantization: {summary.get('model', '')}", "",
             f"{summary['images_per_prompt']} image(s) per prompt, seeds from {summary['seed']}; MSE over "
             "pixel values 0..255 against the full-precision images; PSNR in dB (peak 255).", ""]
    head = "| component | options | avg bits | " + " | ".join(f"{s} MSE | {s} PSNR" for s in splits) + " |"
    lines += [head, "|" + "---|" * (3 + 2 * len(splits))]
    for name, d in summary["components"].items():
        cells = [f"{d[s]['mse']:.3f} | {d[s]['psnr']:.2f}" if s in d else "– | –" for s in splits]
        lines.append(f"| {name} | {'+'.join(d['options'])} | {d['avg_bits']:.3f} | " + " | ".join(cells) + " |")
    if "most_sensitive" in summary:
        ms = summary["most_sensitive"]
        lines += ["", f"Most sensitive component (highest {ms['by']}): **{ms['component']}**."]
    lines += ["", "## Per prompt", "", "| component | set | prompt | MSE | PSNR |", "|---|---|---|---:|---:|"]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.component} | {r.split} | {r.prompt} | {r.mse:.3f} | {r.psnr:.2f} |")
    return "\n".join(lines) + "\n"
