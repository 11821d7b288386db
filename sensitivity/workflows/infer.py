"""Images with a quantization config applied, as one call: ``infer(model, out, config=..., prompts=[...])``.

```python
from sensitivity.workflows.infer import infer
run = infer("digits-dit", "out/w36", multiquantizer="mq.safetensors", config="w36.json", class_ids=[3, 7])
run.record["config"]["avg_bits"], run.images.shape      # run.json's content; uint8 [N, H, W, C]
infer(None, "out/packed", quantized="exports/w36-packed", class_ids=[3])   # a `sensitivity export` folder
```
Writes ``out/00000.png``... and ``out/run.json`` together (or nothing). Without ``config`` the model runs
in full precision. Image ``i`` uses condition ``i mod len(conditions)`` and seed ``seed_base + i``.
Every file is checked before the model loads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class InferResult(NamedTuple):
    """What :func:`infer` wrote: the folder, its ``run.json`` content, the images (uint8 ``[N, H, W, C]``) and
    the generation's seconds."""

    out: Path
    record: Dict[str, Any]
    images: Any
    generate_seconds: float


def infer_conditions(family: Any, prompts: Optional[Sequence[str]] = None, prompts_file: Optional[PathLike] = None,
                     class_ids: Optional[Sequence[int]] = None) -> list:
    """The conditions of ``family``'s images: ``class_ids`` for a class model, ``prompts`` (or the lines of
    ``prompts_file``) for a text model; one line naming the mismatch otherwise."""
    if family.conditioning == "class":
        if prompts or prompts_file:
            raise SensitivityError(f"model {family.name!r} is class-conditional: use --class-id, not prompts")
        conds = list(class_ids or [])
        if not conds:
            raise SensitivityError(f"model {family.name!r} needs at least one --class-id")
        return conds
    if class_ids:
        raise SensitivityError(f"model {family.name!r} is text-conditional: use --prompt, not --class-id")
    if prompts_file:
        from ..zoo.digits_sd import read_prompt_file

        return read_prompt_file(prompts_file, what="--prompts-file")
    if not prompts:
        raise SensitivityError(f"model {family.name!r} needs at least one --prompt (or --prompts-file)")
    return list(prompts)


def infer(model: Optional[str], out: PathLike, *, weights: Optional[str] = None,
          pipeline_class: Optional[str] = None, device: Optional[str] = None, dtype: Any = None, seed: int = 0,
          quantized: Optional[PathLike] = None, materialize: bool = False,
          multiquantizer: Optional[PathLike] = None, config: Optional[PathLike] = None, trust_pickle: bool = False,
          finetuned: Optional[PathLike] = None, prompts: Optional[Sequence[str]] = None,
          prompts_file: Optional[PathLike] = None, class_ids: Optional[Sequence[int]] = None,
          n_images: Optional[int] = None, seed_base: int = 0, act_bits: Optional[int] = None,
          progress: bool = True, **settings: Any) -> InferResult:
    """Generate ``n_images`` (default: one per condition) with ``model`` into ``out``; see the module docstring.

    The weights: ``multiquantizer`` + ``config`` (a config .json, a reference .pkl with ``trust_pickle``, or a
    calibrated folder), a fine-tuned artifact ``finetuned`` (its config unless ``config``), or an export
    folder ``quantized`` (packed / sdnq / pipeline; ``model`` and ``weights`` default to its own;
    ``materialize``: dequantize once at load). ``act_bits``: online activation quantization (8 or 6).
    ``seed``: random init of ``random`` / ``tiny`` weights. ``settings``: generation settings (``steps``,
    ``guidance``, ``height``, ``width``, ``scheduler``, ``batch_size``, pipeline extras).
    """
    import torch

    from .. import __version__ as sensitivity_version
    from ..captions import check_clean_caption
    from ..checks import check_finite_weights, check_values
    from ..config import QuantConfig
    from ..io import atomic_dir, check_writable
    from ..quantizers.activation import enable_activation_quant
    from ..zoo.resolve import resolve_model

    t0 = time.time()
    check_values(n_images=n_images, seed_base=seed_base, seed=seed, act_bits=act_bits)
    check_clean_caption(settings)
    record = None
    if quantized:
        from ..export.packed import read_record

        if multiquantizer or config:
            raise SensitivityError("--quantized runs an exported model: drop --multiquantizer and --config")
        record = read_record(Path(quantized))
        if record["export_format"] not in ("packed", "sdnq", "pipeline"):
            raise SensitivityError(f"--quantized {quantized}: a {record['export_format']} export cannot run "
                                   "in torch (packed and sdnq can)")
        family = record.get("family")
        if model is None:
            model = family
        elif family and model != family:
            raise SensitivityError(f"--quantized {quantized} was exported from {record.get('model_id')}, "
                                   f"not from model {model!r}")
        if weights is None:
            weights = record.get("weights")
            seed = record.get("seed") if record.get("seed") is not None else seed
    elif materialize:
        raise SensitivityError("--materialize needs --quantized DIR")
    if model is None:
        raise SensitivityError("give MODEL (or --quantized DIR)")
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    conds = infer_conditions(fam, prompts, prompts_file, class_ids)
    fam.check_conditions(conds)
    n = n_images if n_images is not None else len(conds)
    if n < 1:
        raise SensitivityError(f"--n-images must be >= 1, got {n}")
    conditions = [conds[i % len(conds)] for i in range(n)]
    seeds = [seed_base + i for i in range(n)]

    # check files before loading the model (cheap, and the usual mistakes)
    mq = cfg = calibrated = None
    if finetuned:
        from ..finetune import load_finetuned

        if multiquantizer:
            raise SensitivityError("--finetuned holds its own weights: drop --multiquantizer")
        mq = load_finetuned(finetuned)
        if str(mq.model_id).split(":", 1)[0] != fam.name:
            raise SensitivityError(f"--finetuned {finetuned} was made for {mq.model_id}, not for model {fam.name!r}")
        cfg = QuantConfig.load(config, trust_pickle=trust_pickle) if config else mq.config
        cfg.check_model(mq.model_id, str(config or finetuned))
        mq.validate(cfg.options)
    elif config and not multiquantizer:
        raise SensitivityError("--config needs --multiquantizer (the quantized weights come from it)")
    if multiquantizer:
        from ..multiquantizer import load_family_multiquantizer

        mq = load_family_multiquantizer(multiquantizer, fam.name)
    if config and not finetuned:
        from ..calibration.artifact import load_config_or_calibrated

        cfg, calibrated = load_config_or_calibrated(config, trust_pickle=trust_pickle)
        if calibrated is not None and act_bits:
            raise SensitivityError(f"{config}: a calibrated config carries its own activation ranges; "
                                   "drop --act-bits")
        cfg.check_model(mq.model_id, str(config))
        try:
            mq.validate(cfg.options)
        except SensitivityError as exc:
            raise SensitivityError(f"--config {config}: {exc}") from None
        if cfg.multiquantizer_hash and cfg.multiquantizer_hash != mq.hash:
            print(f"warning: {config} was made for multiquantizer {cfg.multiquantizer_hash[:12]}, "
                  f"using {mq.hash[:12]} (its layers and options fit)", file=sys.stderr)

    out = check_writable(out, "--out", directory=True)
    if record is not None and record["export_format"] == "pipeline":  # every quantized component from the folder
        from ..export.pipeline import load_quantized_pipeline

        pipe = load_quantized_pipeline(quantized, device=device, dtype=dtype, materialize=materialize)
    else:
        pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=seed)
    den = fam.denoiser(pipe)
    if record is None or record["export_format"] != "pipeline":
        check_finite_weights(den, None, f"--weights {weights}")
    generation = fam.settings(pipe, **settings)  # validates the settings before any work
    t_load = time.time() - t0

    applied: Dict[str, str] = {}
    if record is not None and record["export_format"] != "pipeline":
        from ..export import load_quantized

        qden = load_quantized(quantized, device=device, dtype=den.dtype, materialize=materialize,
                              expect_class=type(den).__name__)
        setattr(pipe, fam.denoiser_attr, qden)
        del den
        den = qden
        t_load = time.time() - t0
    act = None
    if mq is not None:
        from ..multiquantizer import apply
        from ..pipeline_quant import quantization_root

        root = quantization_root(fam, pipe, mq)  # every component for a pipeline multiquantizer
        if calibrated is not None and root is not den:
            raise SensitivityError(f"--config {config}: a calibrated config is of the denoiser, not of the "
                                   "pipeline multiquantizer's components")
        mq.check_model(root)
        if calibrated is not None:
            from ..calibration.artifact import apply_calibrated

            info = apply_calibrated(den, mq, calibrated)
            applied = dict(cfg.options)
            act = info["activations"]
        elif cfg is not None:
            applied = apply(root, mq, cfg)
    if act_bits:
        act = enable_activation_quant(den, fam.find_layers(den), act_bits)

    t1 = time.time()
    images = fam.generate(pipe, conditions, seeds, progress=progress, **settings)
    t_gen = time.time() - t1
    files = [{"file": f"{i:05d}.png", ("class_id" if fam.conditioning == "class" else "prompt"): c, "seed": s}
             for i, (c, s) in enumerate(zip(conditions, seeds))]

    import diffusers

    run_record = {
        "command": "infer",
        "model": fam.name,
        "model_id": fam.model_id(weights),
        "weights": weights,
        "seed": seed,
        "device": str(device),
        "dtype": str(den.dtype).replace("torch.", ""),
        "multiquantizer": None if mq is None else {"path": str(finetuned or multiquantizer),
                                                   "hash": mq.hash, "model_id": mq.model_id,
                                                   "finetuned": bool(finetuned)},
        "config": None if cfg is None else {
            "path": str(config), "hash": cfg.config_hash, "quantized_layers": len(applied),
            "avg_bits": mq.avg_bits(cfg.options), "provenance": cfg.provenance},
        "quantized": None if record is None else {
            "path": str(quantized), "format": record["export_format"], "materialize": materialize,
            "model_id": record.get("model_id"), "multiquantizer_hash": record["multiquantizer"]["hash"],
            "config_hash": record["config"]["hash"], "avg_bits": record.get("avg_bits")},
        "act_bits": act_bits if calibrated is None else (calibrated.activations.bits if calibrated.activations else None),
        "calibration": None if calibrated is None else {"calibration_hash": calibrated.calibration_hash,
                                                        "weights_method": calibrated.manifest.get("weights_method"),
                                                        "calibrated_layers": len(calibrated.weights)},
        "activation_quantization": act,
        "settings": generation.to_dict(),
        "images": files,
        "image_shape": list(images.shape[1:]),
        "seconds": {"load": round(t_load, 3), "generate": round(t_gen, 3)},
        "versions": {"sensitivity": sensitivity_version, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    with atomic_dir(out, "--out") as tmp:  # the PNGs and run.json appear together, or not at all
        for img, rec in zip(images, files):
            _save_png(img, tmp / rec["file"])
        (tmp / "run.json").write_text(json.dumps(run_record, indent=1, default=str) + "\n")
    return InferResult(out, run_record, images, t_gen)


def _save_png(image, path: Path) -> None:
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(arr).save(path, format="PNG")
