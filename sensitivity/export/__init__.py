"""Export: a searched config becomes a real low-bit model that diffusers loads.

```python
from sensitivity.export import export, load_quantized
export(den, mq, "quant_configs/w36.json", "out/w36-packed", format="packed",
       source={"family": "digits-dit", "weights": "shipped", "model_id": "digits-dit:shipped"})
den_q = load_quantized("out/w36-packed")        # diffusers model class, low-bit modules
```

Formats (``sensitivity.export.methods``: ``EXPORT_FORMATS`` by name, one :class:`~.base.Exporter` each;
``EXPORT_MAPPINGS`` by method class):

* ``packed`` (:mod:`.packed`): our own safetensors format with bit-packed codes and fp16 tables; at run
  time each layer runs the kernel the recorded policy chose (:mod:`.runtime`: dequantized on the fly,
  cached, or W8A8 on torch's int8 matmul); bit-exact with :func:`~sensitivity.multiquantizer.apply`
  (W8A8: up to float32 summation order).
* ``sdnq`` (:mod:`.sdnq_format`, extra ``sensitivity[sdnq]``): a diffusers model folder in SDNQ's
  format that ``<DenoiserClass>.from_pretrained(DIR)`` reloads with ``pip install sdnq`` alone.
* ``onnx`` (:mod:`.onnx_format`, extra ``sensitivity[onnx]``): ``torch.onnx`` export with QDQ initializers
  for uniform options and dequantized initializers for k-means ones.

Every artifact records the model class and id, the multiquantizer hash and the config hash in
``sensitivity_export.json`` and carries a model card, ``README.md``, in the hub convention (:mod:`.card`). Checks happen before anything is written, and the output folder appears
only when complete (a temporary folder renamed into place).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..errors import SensitivityError
from .base import Exporter, get_exporter  # noqa: F401
from .methods import EXPORT_FILE, EXPORT_FORMATS, FORMATS, check_exportable, method_format  # noqa: F401
# :mod:`.plan` imports torch: it is loaded on first use, so that the format registry, ``FORMATS`` and the checks
# here cost no torch import (the CLI's ``--help`` lists the formats from the registry)


def require_extra(format: str) -> None:
    """Raise one line if ``format``'s optional packages (its exporter's ``required_packages``) are not installed."""
    if format in EXPORT_FORMATS:
        get_exporter(format).validate_environment()


def check_format_arguments(format: str, *, float_dtype=None, pipeline=None, opset: Optional[int] = None) -> None:
    """Refuse an argument that ``format`` would ignore: ``float_dtype`` is packed's, ``pipeline`` sdnq's,
    ``opset`` is checked by the onnx exporter (:func:`.onnx_format.check_opset`)."""
    if float_dtype is not None and format != "packed":
        raise SensitivityError(f"--float-dtype is for --format packed; {format} keeps the model's dtypes")
    if pipeline is not None and pipeline is not False and format != "sdnq":
        raise SensitivityError(f"--pipeline is for --format sdnq; a {format} export holds the denoiser alone")


def export(denoiser, mq, config, out: str | os.PathLike, format: str = "packed", *,
           source: Optional[Mapping[str, Any]] = None, float_dtype=None, pipeline=None,
           overwrite: bool = False, opset: int = 21, example_inputs=None,
           cache_budget: Optional[int] = None, optimize: bool = False,
           metrics: Optional[Mapping[str, Any]] = None, command: Optional[str] = None,
           calibration_inputs=None) -> Dict[str, Any]:
    """Export ``denoiser`` (full precision) with ``config`` (QuantConfig, path or ``{layer: option}``) to ``out``.

    ``source``: ``{"family", "weights", "seed", "model_id"}`` recorded with the export (``model_id`` is
    checked against the multiquantizer). ``float_dtype``: dtype of the tensors that are not quantized
    (default: the denoiser's). ``pipeline`` (sdnq): also write the whole pipeline folder. ``opset``
    and ``example_inputs`` (onnx): the ONNX opset and the denoiser's example call (kwargs dict; packed:
    run once to choose the run-time kernels, :mod:`.runtime`); ``cache_budget`` (packed): bytes of float
    weights the recorded run-time policy may cache (default: ``max(16 MiB, 0.05 x quantized bytes)``).
    The config's ``act_bits`` (8: W8A8) is recorded and used by the run-time modules (onnx: static QDQ for
    onnxruntime's integer kernels, ranges observed over ``calibration_inputs``, a list of the denoiser's
    keyword inputs; default: seeded example inputs, :mod:`.onnx_format`). ``optimize``
    (onnx): save onnxruntime's optimized graph. ``metrics`` (``{name: value}``, held-out) and ``command``
    (the command line that made it) go into the folder's model card, ``README.md`` (:mod:`.card`).
    Returns the export record (what ``sensitivity_export.json`` holds, plus ``bytes_on_disk``).
    """
    from ..config import QuantConfig

    exporter = get_exporter(format)
    check_format_arguments(format, float_dtype=float_dtype, pipeline=pipeline, opset=opset)
    exporter.validate_environment()
    from ..zoo.base import resolve_dtype

    options = exporter.check_options({"float_dtype": resolve_dtype(float_dtype), "example_inputs": example_inputs,
                                      "cache_budget": cache_budget, "pipeline": pipeline, "opset": opset,
                                      "optimize": optimize, "calibration_inputs": calibration_inputs})
    if isinstance(config, (str, os.PathLike)):
        path = str(config)
        config = QuantConfig.load(config)
        source = dict(source or {}, config_path=path)
    from .plan import atomic_dir, make_plan

    plan = make_plan(denoiser, mq, config, format, source)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        record = exporter.write(plan, tmp, **options)
        _seal_config(tmp, record)
        record.setdefault("bytes_on_disk", sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()))
        from math import prod

        from .card import write_card

        numel = {s.name: prod(s.shape) for s in mq.layers}
        record["path"] = str(out)
        write_card(tmp, record, numel, metrics=metrics, command=command)
    record["path"] = str(out)
    return record


def _seal_config(folder: Path, record: Dict[str, Any]) -> None:
    """Add the digest of the written ``config.json`` to the record files (see :func:`.plan.config_digest`)."""
    import json

    sub = folder / record.get("denoiser_folder", ".")
    cfg = sub / "config.json"
    if not cfg.is_file():
        return
    from .plan import config_digest

    record["config_digest"] = config_digest(json.loads(cfg.read_text()))
    for f in dict.fromkeys([folder / EXPORT_FILE, sub / EXPORT_FILE]):
        if f.is_file():
            f.write_text(json.dumps(record, indent=1) + "\n")


def load_quantized(path: str | os.PathLike, device="cpu", dtype=None, materialize: bool = False,
                   expect_class: Optional[str] = None, verify: bool = True, runtime: Optional[str] = None,
                   cache_budget: Optional[int] = None, act_bits: Optional[int] = None):
    """Reload an export folder as its diffusers model class.

    ``packed``: low-bit modules on the run-time kernels recorded at export (:mod:`.runtime`;
    ``runtime="auto"`` chooses again under ``cache_budget`` bytes, ``"on_the_fly"`` / ``"cached"`` /
    ``"int8_dynamic"`` forces one kernel; ``act_bits=8``: W8A8) (``materialize=True``: plain float modules);
    ``sdnq``: ``<Class>.from_pretrained`` with SDNQ's modules (needs ``sdnq``). ``onnx`` folders are
    run with onnxruntime, not loaded here. ``expect_class``: fail unless the folder holds that class.
    ``verify``: check every tensor's digest (packed). The record is kept in ``model.sensitivity_export``.
    A model with low-bit modules refuses ``fuse_lora`` (:func:`refuse_fuse_lora`).
    """
    from ..zoo.base import resolve_dtype
    from .packed import read_record

    folder = Path(path)
    record = read_record(folder)
    fmt = record["export_format"]
    exporter = get_exporter(fmt)
    if fmt != "onnx":
        exporter.validate_environment()
    kwargs = {"device": device, "dtype": resolve_dtype(dtype), "expect_class": expect_class}
    if fmt == "packed":
        kwargs.update(materialize_weights=materialize, verify=verify, runtime=runtime, cache_budget=cache_budget,
                      act_bits=act_bits)
    model = exporter.load(folder, record, **kwargs)
    if not (fmt == "packed" and materialize):
        # instance attribute: diffusers' pipe.fuse_lora() calls model.fuse_lora() before touching a layer
        model.fuse_lora = functools.partial(refuse_fuse_lora, str(folder), fmt)
    return model


def refuse_fuse_lora(folder: str, fmt: str, *args, **kwargs):
    """``fuse_lora`` of a loaded export with low-bit modules: one error line, nothing changed.

    peft would merge the LoRA into ``base_layer.weight.data``, a dequantized copy (packed) or the codes
    (sdnq): the adapter would be lost or the codes corrupted. Adapters run unfused (``set_adapters``).
    """
    hint = ("keep the adapter unfused (load_lora_weights / set_adapters), or load with materialize=True "
            "for plain float layers" if fmt == "packed" else "keep the adapter unfused (load_lora_weights / set_adapters)")
    raise SensitivityError(f"fuse_lora on the {fmt} export {folder}: its low-bit layers cannot take a fused "
                           f"LoRA; {hint}")


__all__ = ["export", "load_quantized", "require_extra", "check_format_arguments", "check_exportable", "method_format",
           "EXPORT_FORMATS", "FORMATS", "EXPORT_FILE", "Exporter", "get_exporter"]
