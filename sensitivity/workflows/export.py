"""A searched config written as a real low-bit model, as one call: ``export_model(model, mq, config, out, format=...)``.

```python
from sensitivity.workflows.export import export_model
run = export_model("digits-dit", "mq.safetensors", "w36.json", "exports/w36-packed", format="packed", weights="shipped")
run.record["avg_bits"], run.record["bytes_on_disk"]        # also exports/w36-packed/sensitivity_export.json
```
Formats: ``packed`` (reloaded by :func:`sensitivity.load_quantized`), ``sdnq`` (extra ``sdnq``; ``pipeline``:
the whole pipeline folder), ``onnx`` (extra ``onnx``). A pipeline multiquantizer exports the whole
pipeline folder (:func:`sensitivity.export.pipeline.export_pipeline`). Everything is checked before the
model loads; ``out`` appears only when complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class ExportResult(NamedTuple):
    """The export's record (``sensitivity_export.json``), the family, the model id, the folder, whether it is
    a whole-pipeline folder (a pipeline multiquantizer), and the seconds it took."""

    record: Dict[str, Any]
    family: Any
    model_id: str
    out: Path
    pipeline: bool
    seconds: float


def export_model(model: str, multiquantizer: PathLike, config: PathLike, out: PathLike, *, format: str,
                 weights: Optional[str] = None, pipeline_class: Optional[str] = None, device: Optional[str] = None,
                 dtype: Any = None, seed: int = 0, float_dtype: Optional[str] = None, pipeline: bool = False,
                 opset: int = 21, optimize: bool = False, metrics: Union[PathLike, Mapping[str, Any], None] = None,
                 overwrite: bool = False, command: Optional[str] = None) -> ExportResult:
    """Export ``model``'s denoiser (or, for a pipeline multiquantizer, its pipeline) with ``config`` of
    ``multiquantizer`` to ``out`` in ``format``; ``metrics``: held-out metrics for the model card (a JSON file
    or ``{name: value}``); ``command``: recorded in the card. The other parameters are those of
    :func:`sensitivity.export.export`; ``seed``: random init of ``random`` / ``tiny`` weights."""
    from ..checks import check_values
    from ..config import QuantConfig
    from ..export import check_format_arguments, export, require_extra
    from ..export.methods import check_exportable
    from ..io import check_new_folder
    from ..multiquantizer import load_multiquantizer
    from ..zoo.resolve import resolve_model

    t0 = time.time()
    check_values(seed=seed, opset=opset)
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    check_format_arguments(format, float_dtype=float_dtype, pipeline=pipeline or None, opset=opset)
    require_extra(format)
    if format == "onnx":
        from ..export.onnx_format import check_opset

        check_opset(opset)
    if not Path(multiquantizer).is_file():
        raise SensitivityError(f"--multiquantizer {str(multiquantizer)!r} does not exist")
    mq = load_multiquantizer(multiquantizer)
    model_id = fam.model_id(weights)
    if mq.model_id and mq.model_id != model_id:
        raise SensitivityError(f"multiquantizer {Path(multiquantizer).name} was built for {mq.model_id}, "
                               f"not for {model_id}")
    if metrics is not None and not isinstance(metrics, Mapping):
        metrics = _read_metrics(metrics)
    cfg = QuantConfig.load(config)
    cfg.check_model(model_id, str(config))
    mq.validate(cfg.options)
    check_exportable(format, cfg.options, {s.name: (s.shape, s.kind) for s in mq.layers})
    out = check_new_folder(out, "--out", overwrite=overwrite)  # before the model is loaded
    pipe = fam.load_pipeline(weights, device="cpu", dtype=dtype, seed=seed)
    den = fam.denoiser(pipe)
    source = {"family": fam.name, "weights": weights, "seed": seed, "model_id": model_id, "config_path": str(config)}
    if mq.components:  # a pipeline multiquantizer: the whole pipeline folder, each quantized component in `format`
        from ..export.pipeline import export_pipeline

        if format == "onnx":
            raise SensitivityError("a pipeline multiquantizer exports as a pipeline folder: --format packed or sdnq")
        record = export_pipeline(fam, pipe, mq, cfg, out, format=format, source=source, float_dtype=float_dtype,
                                 overwrite=overwrite, metrics=metrics, command=command)
        return ExportResult(record, fam, model_id, out, True, time.time() - t0)
    example = None
    if format == "onnx":
        from ..export.onnx_format import example_inputs

        example = example_inputs(fam, pipe)
    record = export(den, mq, cfg, out, format=format, source=source, float_dtype=float_dtype,
                    pipeline=pipe if pipeline else None, overwrite=overwrite, opset=opset, example_inputs=example,
                    optimize=optimize, metrics=metrics, command=command)
    return ExportResult(record, fam, model_id, out, False, time.time() - t0)


def _read_metrics(path: PathLike) -> Dict[str, Any]:
    """``--metrics``: a JSON file ``{name: value}``."""
    import json

    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SensitivityError(f"--metrics {str(path)!r}: cannot read a JSON file ({exc})") from None
    if not isinstance(metrics, dict):
        raise SensitivityError(f"--metrics {str(path)!r}: expected a JSON object {{name: value}}")
    return metrics
