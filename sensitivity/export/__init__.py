"""Export: a searched config becomes a real low-bit model that diffusers loads.

```python
from sensitivity.export import export, load_quantized
export(den, mq, "quant_configs/w36.json", "out/w36-packed", format="packed",
       source={"family": "digits-dit", "weights": "shipped", "model_id": "digits-dit:shipped"})
den_q = load_quantized("out/w36-packed")        # diffusers model class, low-bit modules
```

Formats (``sensitivity.export.methods``: ``EXPORT_FORMATS`` by name, ``EXPORT_MAPPINGS`` by method class):

* ``packed`` (:mod:`.packed`): our own safetensors format with bit-packed codes and fp16 tables; weights
  dequantize on the fly (``materialize=True``: once); bit-exact with :func:`~sensitivity.multiquantizer.apply`.
* ``sdnq`` (:mod:`.sdnq_format`, extra ``sensitivity[sdnq]``): a diffusers model folder in SDNQ's
  format that ``<DenoiserClass>.from_pretrained(DIR)`` reloads with ``pip install sdnq`` alone.
* ``onnx`` (:mod:`.onnx_format`, extra ``sensitivity[onnx]``): ``torch.onnx`` export with QDQ initializers
  for uniform options and dequantized initializers for k-means ones.

Every artifact records the model class and id, the multiquantizer hash and the config hash in
``sensitivity_export.json``. Checks happen before anything is written, and the output folder appears
only when complete (a temporary folder renamed into place).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..errors import SensitivityError
from .methods import EXPORT_FORMATS, FORMATS, check_exportable, method_format  # noqa: F401
from .plan import EXPORT_FILE, atomic_dir, make_plan

EXTRAS = {"sdnq": ("sdnq", "sdnq"), "onnx": ("onnx", "onnx, onnxruntime and onnxscript")}


def require_extra(format: str) -> None:
    """Raise one line if ``format``'s optional packages are not installed."""
    import importlib.util

    if format not in EXTRAS:
        return
    mods = {"sdnq": ["sdnq"], "onnx": ["onnx", "onnxruntime", "onnxscript"]}[format]
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        raise SensitivityError(f"--format {format} needs {', '.join(missing)}: pip install \"sensitivity[{format}]\"")


def export(denoiser, mq, config, out: str | os.PathLike, format: str = "packed", *,
           source: Optional[Mapping[str, Any]] = None, float_dtype=None, pipeline=None,
           overwrite: bool = False, opset: int = 21, example_inputs=None) -> Dict[str, Any]:
    """Export ``denoiser`` (full precision) with ``config`` (QuantConfig, path or ``{layer: option}``) to ``out``.

    ``source``: ``{"family", "weights", "seed", "model_id"}`` recorded with the export (``model_id`` is
    checked against the multiquantizer). ``float_dtype``: dtype of the tensors that are not quantized
    (default: the denoiser's). ``pipeline`` (sdnq): also write the whole pipeline folder. ``opset``
    and ``example_inputs`` (onnx): the ONNX opset and the denoiser's example call (kwargs dict).
    Returns the export record (what ``sensitivity_export.json`` holds, plus ``bytes_on_disk``).
    """
    from ..config import QuantConfig

    if format not in EXPORT_FORMATS:
        EXPORT_FORMATS.get(format)  # raises the one-line error
    require_extra(format)
    if isinstance(config, (str, os.PathLike)):
        path = str(config)
        config = QuantConfig.load(config)
        source = dict(source or {}, config_path=path)
    from ..zoo.base import resolve_dtype

    float_dtype = resolve_dtype(float_dtype)
    plan = make_plan(denoiser, mq, config, format, source)
    write = EXPORT_FORMATS.get(format)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        record = write(plan, tmp, float_dtype=float_dtype, pipeline=pipeline, opset=opset, example_inputs=example_inputs)
        record.setdefault("bytes_on_disk", sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()))
    record["path"] = str(out)
    return record


def load_quantized(path: str | os.PathLike, device="cpu", dtype=None, materialize: bool = False,
                   expect_class: Optional[str] = None, verify: bool = True):
    """Reload an export folder as its diffusers model class.

    ``packed``: low-bit modules that dequantize on the fly (``materialize=True``: once, at load);
    ``sdnq``: ``<Class>.from_pretrained`` with SDNQ's modules (needs ``sdnq``). ``onnx`` folders are
    run with onnxruntime, not loaded here. ``expect_class``: fail unless the folder holds that class.
    ``verify``: check every tensor's digest (packed). The record is kept in ``model.sensitivity_export``.
    """
    from ..zoo.base import resolve_dtype
    from .packed import load_packed, read_record

    folder = Path(path)
    record = read_record(folder)
    fmt = record["export_format"]
    dtype = resolve_dtype(dtype)
    if fmt == "packed":
        return load_packed(folder, record, device=device, dtype=dtype, materialize_weights=materialize,
                           expect_class=expect_class, verify=verify)
    if fmt == "sdnq":
        require_extra("sdnq")
        from .sdnq_format import load_sdnq

        return load_sdnq(folder, record, device=device, dtype=dtype, expect_class=expect_class)
    raise SensitivityError(f"{folder} is an {fmt} export: run it with onnxruntime "
                           "(sensitivity.export.onnx_format.run_onnx), it is not a torch model")


__all__ = ["export", "load_quantized", "require_extra", "check_exportable", "method_format", "EXPORT_FORMATS", "FORMATS",
           "EXPORT_FILE"]
