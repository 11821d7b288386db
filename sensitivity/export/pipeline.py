"""Export the whole pipeline of a pipeline multiquantizer's config: one diffusers pipeline folder.

:func:`export_pipeline` writes the pipeline with ``save_pretrained`` (tokenizers, scheduler, every
component), then replaces the folder of each component the config quantizes (text encoders through
their transformers classes, the denoiser, the VAE) with that component's ``packed`` or ``sdnq`` export
(:func:`sensitivity.export.export` on the component and its share of the config,
:class:`sensitivity.pipeline_quant.ComponentMultiquantizer`). The top folder's ``sensitivity_export.json``
has ``export_format: "pipeline"``, the per-component format, the exported components and the bytes of
the weights per component on disk and in memory (``component_memory_bytes``: as ``search --target-memory``
counts them, :func:`sensitivity.search.memory.component_bytes`); ``README.md`` is its model card
(:func:`sensitivity.export.card.pipeline_card`). :func:`load_quantized_pipeline` loads it back as the pipeline class
named in ``model_index.json`` with the low-bit components in place. Every plan is checked before
anything is written; the folder appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..errors import SensitivityError
from .methods import EXPORT_FILE
from .plan import atomic_dir, make_plan

PIPELINE_FORMAT = "pipeline"
COMPONENT_FORMATS = ("packed", "sdnq")


def export_pipeline(family, pipe, mq, config, out: str | os.PathLike, format: str = "packed", *,
                    source: Optional[Mapping[str, Any]] = None, float_dtype=None,
                    overwrite: bool = False, command: Optional[str] = None,
                    metrics: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Export ``pipe`` (full precision) with ``config`` of the pipeline multiquantizer ``mq`` to folder ``out``.

    ``format``: how each quantized component is written (``packed`` or ``sdnq``). ``source``: ``{"family",
    "weights", "seed"}`` recorded; ``command`` (the command line that made it) and ``metrics`` (``{name: value}``, held-out)
    go into the model card.
    Returns the record (also ``out/sensitivity_export.json``)."""
    from ..config import QuantConfig
    from ..pipeline_quant import (ComponentMultiquantizer, component_attr, component_config,
                                  is_pipeline_multiquantizer, quantization_root)
    from ..search.memory import component_bytes
    from ..zoo.base import resolve_dtype
    from . import require_extra
    from .card import CARD_FILE, pipeline_card

    if format not in COMPONENT_FORMATS:
        raise SensitivityError(f"a pipeline export writes its components as {' or '.join(COMPONENT_FORMATS)}, "
                               f"not {format!r}")
    require_extra(format)
    if not is_pipeline_multiquantizer(mq):
        raise SensitivityError(f"multiquantizer {mq.path.name} is of the denoiser alone: export it with "
                               "`sensitivity export` (a pipeline export needs `multiquantize --components`)")
    source = dict(source or {})
    if isinstance(config, (str, os.PathLike)):
        source["config_path"] = str(config)
        config = QuantConfig.load(config)
    qc = config if isinstance(config, QuantConfig) else QuantConfig(dict(config))
    mq.validate(qc.options)
    float_dtype = resolve_dtype(float_dtype)
    root = quantization_root(family, pipe, mq)
    mq.check_model(root)
    plans = {}
    for name, comp in mq.components.items():
        sub = component_config(qc.options, name)
        if not comp.get("layers") or not sub:
            continue
        view = ComponentMultiquantizer(mq, name)
        plans[name] = make_plan(getattr(root, name), view, sub, format,
                                {**source, "model_id": view.model_id, "config_path": source.get("config_path")})
    if format == "sdnq":
        from .sdnq_format import check_sdnq_plan

        for name, plan in plans.items():
            check_sdnq_plan(plan)
            cls = type(getattr(root, name)).__name__
            if "T5" in cls:  # measured with sdnq 0.2.8: the reloaded T5 layers dequantize to uint8 and fail
                raise SensitivityError(f"component {name} ({cls}): an SDNQ T5 encoder does not run after reloading; "
                                       "export the pipeline with --format packed")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp))
        components: Dict[str, Any] = {}
        for name, plan in plans.items():
            attr = component_attr(family, name)
            folder = tmp / attr
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            if format == "packed":
                from .packed import write_packed

                rec = write_packed(plan, folder, float_dtype=float_dtype)
            else:
                from .sdnq_format import write_sdnq

                rec = write_sdnq(plan, folder)
            components[name] = {"attr": attr, "format": format, "avg_bits": rec.get("avg_bits"),
                                "quantized_layers": rec.get("quantized_layers"), "model_class": rec.get("model_class")}
        disk = {}
        for name in mq.components:
            folder = tmp / component_attr(family, name)
            if folder.is_dir():
                disk[name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        record = {
            "format": "sensitivity.export.pipeline/1", "export_format": PIPELINE_FORMAT, "component_format": format,
            "model_id": mq.model_id, "family": source.get("family"), "weights": source.get("weights"),
            "seed": source.get("seed"), "pipeline_class": type(pipe).__name__,
            "multiquantizer": {"hash": mq.hash, "model_id": mq.model_id, "path": str(mq.path)},
            "config": {"hash": qc.config_hash, "path": source.get("config_path"), "model": qc.model,
                       "provenance": qc.provenance},
            "avg_bits": mq.avg_bits(qc.options), "quantized_layers": len(qc.options),
            "components": components, "component_bytes_on_disk": disk,
            "component_memory_bytes": component_bytes(mq, qc.options),
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        (tmp / CARD_FILE).write_text(pipeline_card(record, command, folder_name=Path(str(out)).name or ".",
                                                          metrics=metrics))
        record["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    record["path"] = str(out)
    return record


def load_quantized_pipeline(path: str | os.PathLike, device="cpu", dtype=None, materialize: bool = False,
                            verify: bool = True):
    """Load a :func:`export_pipeline` folder: the pipeline class of its ``model_index.json`` with each
    exported component loaded by :func:`sensitivity.export.load_quantized` (low-bit modules)."""
    import diffusers

    from ..zoo.base import resolve_dtype
    from ..zoo.offline import WEIGHTS_ATTR, dtype_kwargs
    from . import load_quantized
    from .packed import read_record

    folder = Path(path)
    record = read_record(folder)
    if record.get("export_format") != PIPELINE_FORMAT:
        raise SensitivityError(f"{folder} is a {record.get('export_format')} export of one model, not a pipeline")
    index = folder / "model_index.json"
    if not index.is_file():
        raise SensitivityError(f"{folder}: model_index.json is missing")
    cls_name = json.loads(index.read_text()).get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise SensitivityError(f"{index}: diffusers {diffusers.__version__} has no pipeline class {cls_name!r}")
    dtype = resolve_dtype(dtype)
    parts = {c["attr"]: load_quantized(folder / c["attr"], device=device, dtype=dtype, materialize=materialize,
                                       verify=verify) for c in record["components"].values()}
    kw = dtype_kwargs(dtype) if dtype is not None else {}
    try:
        pipe = cls.from_pretrained(str(folder), **parts, **kw)
    except Exception as exc:  # noqa: BLE001 - any load failure is one line
        raise SensitivityError(f"{folder}: cannot load the pipeline: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    pipe = pipe.to(device)
    if record.get("weights") is not None:
        pipe.__dict__[WEIGHTS_ATTR] = record["weights"]  # the family's generation defaults (tiny) follow it
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.__dict__["sensitivity_export"] = {k: v for k, v in record.items()}
    return pipe
