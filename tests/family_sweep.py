"""Layers of a tiny family for the per-family sweeps (export formats, run-time kernels).

The tiny configs keep every layer of the official ones (tiny SDXL: 803 layers), so a sweep's cost is
per layer, while the code paths it checks are per layer kind. :func:`layer_sample` keeps every kind
(conv / linear, split halves, tied copies) and spreads the rest evenly over the model.
"""

from typing import List, Sequence


def layer_sample(layers: Sequence, max_layers: int = 120) -> List:
    """At most ``max_layers`` of ``layers`` (all of them when fewer), in model order: the first layer of each
    (kind, split, tied) group, every split half's partner, then evenly spaced layers up to the limit."""
    layers = list(layers)
    if len(layers) <= max_layers:
        return layers
    keep = {}
    for i, s in enumerate(layers):
        keep.setdefault((s.kind, s.in_slice is not None, bool(s.tied)), i)
    by_module = {}
    for i, s in enumerate(layers):
        by_module.setdefault(s.module_path, []).append(i)
    chosen = set(keep.values())
    for i in list(chosen):  # a split layer's halves travel together
        chosen.update(by_module[layers[i].module_path])
    step = len(layers) / max(1, max_layers - len(chosen))
    k = 0.0
    while len(chosen) < max_layers and int(k) < len(layers):
        for j in by_module[layers[int(k)].module_path]:
            chosen.add(j)
        k += step
    return [layers[i] for i in sorted(chosen)]
