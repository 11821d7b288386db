"""``sdnq``: a diffusers model folder for the SDNQ backend (``quant_method="sdnq"``, GPL-3.0 ``sdnq``).

SDNQ lays out every quantized layer as codes in the weight's own shape (``[C, K]``, conv ``[C, I, kh, kw]``,
grouped ``[C, G, N]``), bit-packed by its ``pack_int``, with fp32 ``scale`` / ``zero_point`` broadcast
against them (read in ``sdnq.quantizer.sdnq_quantize_layer_weight`` and ``sdnq.dequantizer``).
The writer

1. asks SDNQ for the structure: ``sdnq_post_load_quant`` on a copy of the fake-quantized denoiser with
   one ``modules_quant_config`` entry per quantized layer (its dtype ``uint<b>`` / ``int8`` /
   ``float8_e4m3fn``, ``group_size`` -1 per row, -2 per tensor or N, ``use_codebook``), every other
   weight module in ``modules_to_not_convert``, ``add_skip_keys=False``, ``minimum_allowed_numel=0``
   and ``minimum_allowed_channel_size=0`` (so no layer is skipped) and ``quant_conv=True``;
2. overwrites each layer's codes, scales, zero points and codebooks with ours, mapped per
   :mod:`sensitivity.export.methods` (UAQ: ``scale = Δ``, ``zero_point = -z·Δ``; K-Means: the fp16
   codebooks; INT8: codes - 128; FP8: the bit patterns); SDNQ's own quantization result is discarded;
3. checks every layer: SDNQ's dequantizer on our tensors must equal :func:`~sensitivity.multiquantizer.
   apply`'s weight (the largest difference is recorded in ``sdnq_check``; it is 0 in fp32: ``q·Δ + (-z·Δ)``
   is exact in fp32 for fp16 ``Δ`` and codes < 2^8), and that every layer of the config is an SDNQ
   layer; then ``save_pretrained``.

Reload: ``<DenoiserClass>.from_pretrained(DIR)`` with only ``sdnq`` installed (import ``sdnq`` first so
diffusers knows the backend). ``pipeline=``: the whole pipeline is written, the other components untouched.
Split layers (``#main`` / ``#skip`` halves) cannot be carried: SDNQ quantizes a module's weight as one.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import SensitivityError
from ..options import FP16, QuantOption
from .methods import EXPORT_FILE, method_format
from .plan import ExportPlan

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")


def _import_sdnq():
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    import logging

    logging.getLogger("sdnq").setLevel(logging.ERROR)
    import sdnq  # noqa: F401 - registers the diffusers backend
    from sdnq.quantizer import sdnq_post_load_quant

    return sdnq, sdnq_post_load_quant


def _layer_settings(option: str) -> Dict[str, Any]:
    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    kind = fmt.sdnq
    if kind == "uint_asymmetric":
        return {"weights_dtype": f"uint{opt.bits}", "group_size": -1, "use_codebook": False}
    if kind == "uint_asymmetric_grouped":
        return {"weights_dtype": f"uint{opt.bits}", "group_size": int(fmt.group), "use_codebook": False}
    if kind == "codebook_row":
        return {"weights_dtype": f"uint{opt.bits}", "group_size": -1, "use_codebook": True}
    if kind == "codebook_tensor":
        return {"weights_dtype": f"uint{opt.bits}", "group_size": -2, "use_codebook": True}
    if kind == "int8_symmetric":
        return {"weights_dtype": "int8", "group_size": -1 if fmt.per_row else -2, "use_codebook": False}
    if kind == "fp8_symmetric":
        return {"weights_dtype": "float8_e4m3fn", "group_size": -2, "use_codebook": False}
    raise SensitivityError(f"option {option!r} has no SDNQ mapping")  # pragma: no cover - checked earlier


def _fill(like: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """``per_row`` ``[C, L]`` (or ``[1, L]``) broadcast into SDNQ's tensor shape ``like``."""
    shape = tuple(like.shape)
    if per_row.shape[0] == 1 and per_row.numel() == like.numel():
        return per_row.reshape(shape).to(like.dtype).contiguous()
    view = per_row.reshape(per_row.shape[0], per_row.shape[1], *([1] * (len(shape) - 2)))
    return view.expand(shape).to(like.dtype).contiguous()


def _our_tensors(layer, qw, option: str, weight_shape) -> Dict[str, torch.Tensor]:
    """Our codes and params in SDNQ's layout for ``layer`` (an SDNQ layer built for ``option``)."""
    from sdnq.packed_int import pack_int

    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    dq = layer.sdnq_dequantizer
    codes = qw.codes.reshape(tuple(dq.quantized_weight_shape))
    out: Dict[str, torch.Tensor] = {}
    if fmt.sdnq in ("uint_asymmetric", "uint_asymmetric_grouped"):
        d = qw.params["scale"].to(torch.float32).reshape(codes.shape[0], -1)
        z = qw.params["zero"].to(torch.float32).reshape(codes.shape[0], -1)
        if fmt.sdnq == "uint_asymmetric_grouped":
            out["scale"] = d.reshape(tuple(layer.scale.shape)).contiguous()
            out["zero_point"] = (-z * d).reshape(tuple(layer.zero_point.shape)).contiguous()
        else:
            out["scale"] = _fill(layer.scale, d)
            out["zero_point"] = _fill(layer.zero_point, -z * d)
        out["weight"] = pack_int(codes.to(torch.uint8), dq.weights_dtype)
    elif fmt.sdnq in ("codebook_row", "codebook_tensor"):
        table = qw.table().to(torch.float32)
        out["scale"] = table.reshape(-1).clone() if fmt.sdnq == "codebook_tensor" else _fill(layer.scale, table)
        out["weight"] = pack_int(codes.to(torch.uint8), dq.weights_dtype)
    elif fmt.sdnq == "int8_symmetric":
        out["scale"] = _fill(layer.scale, qw.params["scale"].to(torch.float32).reshape(-1, 1))
        out["weight"] = (codes.to(torch.int16) - 128).to(torch.int8)
    elif fmt.sdnq == "fp8_symmetric":
        out["scale"] = _fill(layer.scale, qw.params["scale"].to(torch.float32).reshape(1, 1))
        out["weight"] = codes.to(torch.uint8).contiguous().view(torch.float8_e4m3fn)
    return {k: v.contiguous().clone() for k, v in out.items()}  # own memory: tied copies must not share it


def _dequantize_sdnq(layer) -> torch.Tensor:
    kw = {k: getattr(layer, k, None) for k in ("weight", "scale", "scale_2", "scale_zero_point", "zero_point",
                                               "zero_point_scale", "zero_point_2", "svd_up", "svd_down")}
    return layer.sdnq_dequantizer(**kw, skip_quantized_matmul=layer.sdnq_dequantizer.use_quantized_matmul,
                                  dtype=layer.sdnq_dequantizer.result_dtype, skip_compile=True)


def check_sdnq_plan(plan: ExportPlan) -> None:
    """Raise one line if SDNQ cannot carry ``plan`` (a split layer: SDNQ quantizes a module's weight as one)."""
    for mp in plan.modules:
        if len(mp.parts) > 1:
            raise SensitivityError(f"layer {mp.parts[0].name!r}: SDNQ quantizes module {mp.module_path!r} as one "
                                   "weight, it cannot carry split #main/#skip halves; use --format packed")


@torch.no_grad()
def write_sdnq(plan: ExportPlan, folder: Path, pipeline=None) -> Dict[str, Any]:
    """Write ``plan`` as an SDNQ diffusers folder (``pipeline``: the whole pipeline folder)."""
    from ..layers import LAYER_TYPES
    from ..multiquantizer import apply, restore

    _, sdnq_post_load_quant = _import_sdnq()
    check_sdnq_plan(plan)
    den = plan.denoiser
    quantized = {k: v for k, v in plan.options.items() if v != FP16}
    apply(den, plan.mq, quantized)
    try:
        model = copy.deepcopy(den)
        reference = {mp.module_path: den.get_submodule(mp.module_path).weight.detach().clone() for mp in plan.modules}
    finally:
        restore(den)
    modules_quant_config: Dict[str, Dict[str, Any]] = {}
    targets: Dict[str, Any] = {}
    for mp in plan.modules:
        part = mp.parts[0]
        for path in [mp.module_path] + list(mp.tied):
            modules_quant_config[f"{path}.weight"] = _layer_settings(part.option)
            targets[path] = (mp, part)
    skip = [f"{name}.weight" for name, m in model.named_modules()
            if getattr(m, "weight", None) is not None and name not in targets
            and (isinstance(m, LAYER_TYPES) or isinstance(m, torch.nn.Embedding))]
    try:
        model = sdnq_post_load_quant(
            model, weights_dtype="int8", torch_dtype=den.dtype, quant_conv=True, quant_embedding=False,
            add_skip_keys=False, minimum_allowed_numel=0, minimum_allowed_channel_size=0, use_quantized_matmul=False,
            modules_to_not_convert=skip, modules_quant_config=modules_quant_config, dequantize_fp32=True)
    except RuntimeError as exc:  # SDNQ's own shape limits; one line instead of its traceback
        raise SensitivityError(f"SDNQ could not quantize this config ({str(exc).splitlines()[0]}); "
                               "use --format packed") from None
    worst = 0.0
    for path, (mp, part) in targets.items():
        layer = model.get_submodule(path)
        if not hasattr(layer, "sdnq_dequantizer"):
            raise SensitivityError(f"SDNQ left layer {path!r} unquantized (option {part.option})")
        want = _layer_settings(part.option)
        got = layer.sdnq_dequantizer
        if got.weights_dtype != want["weights_dtype"] or got.use_codebook != want["use_codebook"]:
            raise SensitivityError(f"SDNQ stored layer {path!r} as {got.weights_dtype} (codebook {got.use_codebook}), "
                                   f"not {want['weights_dtype']} for option {part.option}")
        qw = plan.quantized_weight(part.name)
        for key, value in _our_tensors(layer, qw, part.option, mp.weight_shape).items():
            old = getattr(layer, key)
            if old is None or tuple(old.shape) != tuple(value.shape) or old.dtype != value.dtype:
                raise SensitivityError(f"layer {path!r}: SDNQ's {key} is {None if old is None else (tuple(old.shape), old.dtype)}, "
                                       f"ours {(tuple(value.shape), value.dtype)}")
            setattr(layer, key, torch.nn.Parameter(value, requires_grad=False))
        diff = (_dequantize_sdnq(layer).to(torch.float32) - reference[mp.module_path].to(torch.float32)).abs().max()
        worst = max(worst, float(diff))
    if pipeline is not None:
        from diffusers import DiffusionPipeline  # noqa: F401

        attr = next((n for n in ("unet", "transformer") if getattr(pipeline, n, None) is den), None)
        if attr is None:
            raise SensitivityError("--pipeline: the pipeline does not hold the exported denoiser")
        setattr(pipeline, attr, model)
        try:
            pipeline.save_pretrained(str(folder), safe_serialization=True)
        finally:
            setattr(pipeline, attr, den)
        model_dir = folder / attr
    else:
        model.save_pretrained(str(folder), safe_serialization=True)
        model_dir = folder
    record = dict(plan.meta)
    record.update({
        "sdnq_check": {"max_abs_weight_diff": worst, "layers": len(targets)},
        "sdnq_version": _sdnq_version(),
        "pipeline": pipeline is not None,
        "denoiser_folder": os.path.relpath(model_dir, folder),
        "torch_dtype": str(den.dtype).replace("torch.", ""),
    })
    if not hasattr(den, "save_config"):  # a transformers model (a pipeline's text encoder)
        record["library"] = "transformers"
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if model_dir != folder:
        (model_dir / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record



def _sdnq_version() -> str:
    try:
        from importlib.metadata import version

        return version("sdnq")
    except Exception:  # noqa: BLE001
        return "unknown"


def load_sdnq(folder: Path, record: Dict[str, Any], device="cpu", dtype: Optional[torch.dtype] = None,
              expect_class: Optional[str] = None):
    """``<DenoiserClass>.from_pretrained`` of an sdnq export folder (the pipeline's denoiser subfolder)."""
    import diffusers

    _import_sdnq()
    from .packed import model_class

    sub = Path(folder) / record.get("denoiser_folder", ".")
    cls, _ = model_class(record, sub, expect_class)
    try:
        model = cls.from_pretrained(str(sub), torch_dtype=dtype or getattr(torch, record.get("torch_dtype", "float32")))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SensitivityError(f"{sub}: {cls.__name__}.from_pretrained failed: {str(exc).splitlines()[0]}") from None
    del diffusers
    return model.to(torch.device(device)).eval()
