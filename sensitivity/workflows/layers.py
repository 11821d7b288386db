"""A model's quantizable layers as one call: ``layer_report(model, weights="meta")``.

```python
from sensitivity.workflows.layers import layer_report
rep = layer_report("sdxl", weights="meta")          # no memory, no download
rep["layers"], rep["fp16_bytes"], rep["table"][0]   # counts, and one row per layer (name, kind, shape, split...)
```
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, Optional


def layer_report(model: str, *, weights: Optional[str] = None, pipeline_class: Optional[str] = None,
                 device: Optional[str] = None, dtype: Any = None, seed: int = 0, ops: bool = False) -> Dict[str, Any]:
    """Everything ``sensitivity layers --json`` prints: the family's layer rules applied to ``model``'s denoiser
    (counts, splits, exclusions, tied copies, parameters, fp16 bytes) and ``table``, one row per layer;
    ``ops``: each row's ``block`` / ``op_type`` / ``op_group`` too. ``weights="meta"`` loads no memory."""
    from ..zoo.resolve import resolve_model

    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    denoiser = fam.load_denoiser(weights, device="cpu" if weights == "meta" else device, dtype=dtype, seed=seed)
    rep = denoiser_layer_report(fam, denoiser, weights)
    if ops:
        add_ops(fam, denoiser, rep)
    return rep


def denoiser_layer_report(fam: Any, denoiser: Any, weights: str) -> Dict[str, Any]:
    """:func:`layer_report` of a loaded ``denoiser`` of family ``fam`` (without the op columns)."""
    from ..layers import LAYER_TYPES, architecture_hash, layer_table

    layers = fam.find_layers(denoiser)
    rules = fam.layer_rules(denoiser)
    modules = [(p, m) for p, m in denoiser.named_modules() if isinstance(m, LAYER_TYPES)]
    excluded = [p for p, _ in modules if any(fnmatch.fnmatchcase(p, pat) for pat in rules.exclude)]
    tied_params = sum(m.weight.numel() for p, m in modules for s in layers if p in s.tied)
    return {
        "model": fam.name,
        "model_id": fam.model_id(weights),
        "weights": weights,
        "denoiser_class": type(denoiser).__name__,
        "architecture_hash": architecture_hash(layers),
        "conv_linear_modules": len(modules),
        "layers": len(layers),
        "reference_layers": fam.reference_layer_count,
        "split_modules": len(rules.splits),
        "excluded": excluded,
        "tied_copies": sum(len(s.tied) for s in layers if s.in_slice is None or s.name.endswith("#main")),
        "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
        "layer_params": sum(s.numel for s in layers),
        "tied_copy_params": tied_params,
        "fp16_bytes": sum(s.fp16_bytes for s in layers),
        "splits": {k: int(v) for k, v in rules.splits.items()},
        "table": layer_table(layers),
    }


def add_ops(fam: Any, denoiser: Any, rep: Dict[str, Any]) -> None:
    """``block`` / ``op_type`` / ``op_group`` in every row of ``rep["table"]`` (a generic family traces ``denoiser``)."""
    from ..insights import family_naming

    if getattr(fam, "needs_graph_naming", False):
        from ..graph import build_graph

        fam.use_graph(build_graph(denoiser, fam.find_layers(denoiser)))
    naming = family_naming(fam)
    for r in rep["table"]:
        i = naming.describe(r["name"])
        r.update(block=i.block, op_type=i.op_type, op_group=i.op_group)
