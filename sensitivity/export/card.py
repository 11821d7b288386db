"""The model card (``README.md``) of an export folder, in the hub convention, so the folder can be pushed as it is.

A YAML header (``base_model``, ``base_model_relation: quantized``, ``library_name: diffusers``, ``tags``),
then the config's average bits, the per-option mix (layers and share of the weights), the held-out
metrics when given, how to load the folder, and the command that made it. Nothing is uploaded.
A whole-pipeline export (:func:`pipeline_card`) has the same header and a table of its components:
quantized layers, average bits, weight bytes in memory (as ``search --target-memory`` counts them) and on disk.
``base_model`` is the family's hub repository when the weights are the hub's, else the model id.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Dict, Mapping, Optional

from ..options import FP16

CARD_FILE = "README.md"

_LOAD = {
    "packed": ("```python\nimport sensitivity\n\nden = sensitivity.load_quantized(\"{dir}\")  # {cls}, low-bit modules\n"
               "# pipe = <Pipeline>.from_pretrained(<base>, {attr}=den)\n```\n"
               "Run-time kernels per layer are recorded in `sensitivity_export.json` (`runtime`); "
               "`load_quantized(..., runtime=\"auto\", cache_budget=...)` chooses again.\n"),
    "sdnq": ("```python\nimport sdnq  # registers the SDNQ backend with diffusers (pip install sdnq)\n"
             "from diffusers import {cls}\n\nden = {cls}.from_pretrained(\"{dir}\")\n```\n"),
    "onnx": ("```python\nimport json, onnxruntime as ort\n\nsess = ort.InferenceSession(\"{dir}/model.onnx\", "
             "providers=[\"CPUExecutionProvider\"])\n# inputs: json.load(open(\"{dir}/sensitivity_export.json\"))[\"inputs\"]\n```\n"),
}


def _yaml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def base_model(record: Mapping[str, Any]) -> str:
    """The hub repository of the exported weights when known, else the model id."""
    weights = record.get("weights")
    family = record.get("family")
    if isinstance(weights, str) and weights.count("/") == 1 and not weights.startswith((".", "/")):
        return weights
    if family:
        try:
            from ..zoo import get_family

            hub = getattr(get_family(family), "hub_id", None)
        except Exception:  # noqa: BLE001 - an unknown family: fall back to the id
            hub = None
        if hub and weights in (hub, "pretrained", "hub"):
            return hub
    return str(record.get("model_id") or record.get("model_class") or "unknown")


def _header(record: Mapping[str, Any], tags: list) -> list:
    return (["---", f"base_model: {_yaml_str(base_model(record))}", "base_model_relation: quantized",
             "library_name: diffusers", "tags:"] + [f"- {_yaml_str(t)}" for t in tags] + ["---", ""])


def _how_made(command: Optional[str]) -> list:
    return ["## How it was made", "", "```", command, "```", ""] if command else []


def _metrics(metrics: Optional[Mapping[str, Any]]) -> list:
    if not metrics:
        return []
    return (["## Held-out metrics", "", "| metric | value |", "|---|---:|"]
            + [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()]
            + [""])


def model_card(record: Mapping[str, Any], numel: Mapping[str, int], metrics: Optional[Mapping[str, Any]] = None,
               command: Optional[str] = None, folder_name: str = ".") -> str:
    """The README text of an export folder. ``numel``: weights per layer; ``metrics``: ``{name: value}``."""
    fmt = record["export_format"]
    options = {k: v for k, v in record.get("options", {}).items()}
    mix: Dict[str, list] = defaultdict(lambda: [0, 0])
    total = sum(int(numel.get(k, 0)) for k in options) or 1
    for layer, opt in options.items():
        mix[opt][0] += 1
        mix[opt][1] += int(numel.get(layer, 0))
    bits = float(record.get("avg_bits", float("nan")))
    tags = ["sensitivity", "quantized", "mixed-precision", f"{fmt}"]
    if record.get("family"):
        tags.append(str(record["family"]))
    if record.get("act_bits"):
        tags.append(f"w-a{record['act_bits']}")
    lines = _header(record, tags)
    cls = record.get("model_class", "model")
    lines += [f"# {cls}, {bits:.3f} average bits ({fmt})", "",
              f"A mixed-precision quantization of `{record.get('model_id')}`'s denoiser found by "
              f"`sensitivity` (a Qua2SeDiMo-style search): {record.get('quantized_layers')} of "
              f"{record.get('layers')} weight layers quantized, {bits:.3f} bits per weight on average "
              f"({record.get('quantized_bytes', 0) / 2**20:.2f} MiB of quantized weights"
              + (f", {record['bytes_on_disk'] / 2**20:.2f} MiB on disk" if record.get("bytes_on_disk") else "") + ").",
              "", f"Config hash `{record.get('config', {}).get('hash')}`, multiquantizer hash "
              f"`{record.get('multiquantizer', {}).get('hash')}`.", "", "## Per-option mix", "",
              "| option | layers | share of weights |", "|---|---:|---:|"]
    for opt, (n, w) in sorted(mix.items(), key=lambda kv: (kv[0] == FP16, -kv[1][1])):
        lines.append(f"| {opt} | {n} | {100.0 * w / total:.1f}% |")
    lines.append("")
    lines += _metrics(metrics)
    lines += ["## How to load", "",
              _LOAD[fmt].format(dir=folder_name, cls=cls, attr="transformer" if "Transformer" in cls else "unet",
                                base=base_model(record)), ""]
    lines += _how_made(command)
    return "\n".join(lines)


def pipeline_card(record: Mapping[str, Any], command: Optional[str] = None, folder_name: str = ".",
                  metrics: Optional[Mapping[str, Any]] = None) -> str:
    """The README text of a whole-pipeline export folder (``record``: its ``sensitivity_export.json``)."""
    fmt = record.get("component_format", "packed")
    tags = ["sensitivity", "quantized", "mixed-precision", "pipeline", str(fmt)]
    if record.get("family"):
        tags.append(str(record["family"]))
    memory = record.get("component_memory_bytes") or {}
    disk = record.get("component_bytes_on_disk") or {}
    comps = record.get("components") or {}
    cls = record.get("pipeline_class", "pipeline")
    mb = lambda b: "–" if b is None else f"{b / 1e6:.3f}"  # noqa: E731
    lines = _header(record, tags)
    lines += [f"# {cls}, whole pipeline quantized ({fmt} components)", "",
              f"A mixed-precision quantization of `{record.get('model_id')}` found by `sensitivity` (a "
              f"Qua2SeDiMo-style search over every component under one budget): {record.get('quantized_layers')} "
              f"weight layers quantized, {float(record.get('avg_bits', float('nan'))):.3f} bits per weight on "
              f"average over them; {mb(sum(memory.values()) if memory else None)} MB of weights in memory "
              "(quantized layers as stored, every other tensor at fp16).", "",
              f"Config hash `{record.get('config', {}).get('hash')}`, multiquantizer hash "
              f"`{record.get('multiquantizer', {}).get('hash')}`.", "", "## Components", "",
              "| component | class | quantized layers | average bits | weights in memory (MB) | on disk (MB) |",
              "|---|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys([*memory, *disk, *comps]):
        c = comps.get(name) or {}
        bits = c.get("avg_bits")
        lines.append(f"| {name} | {c.get('model_class') or '–'} | {c.get('quantized_layers') or 0} | "
                     f"{'fp16' if bits is None else f'{float(bits):.3f}'} | {mb(memory.get(name))} | "
                     f"{mb(disk.get(name))} |")
    lines += [""] + _metrics(metrics) + ["## How to load", "",
              f"```python\nfrom sensitivity.export.pipeline import load_quantized_pipeline\n\n"
              f"pipe = load_quantized_pipeline(\"{folder_name}\")  # {cls}, low-bit components\n```\n",
              f"or `sensitivity infer --quantized {folder_name} --prompt \"...\"`.", ""]
    lines += _how_made(command)
    return "\n".join(lines)


def write_card(folder, record: Mapping[str, Any], numel: Mapping[str, int], metrics=None, command=None) -> str:
    """Write ``folder/README.md`` (returns the text)."""
    from pathlib import Path

    text = model_card(record, numel, metrics, command, folder_name=Path(str(record.get("path", folder))).name or ".")
    (Path(folder) / CARD_FILE).write_text(text)
    return text
