"""Discovery of the quantizable weight layers of any ``torch.nn.Module``.

A *layer* is the weight of one ``Conv1d``/``Conv2d``/``Linear`` module, named by its module path
(``transformer_blocks.3.attn1.to_q``). Three rules shape the list:

* **exclusions** — ``fnmatch`` patterns on module paths (e.g. Hunyuan's ``time_extra_emb.pooler.*``);
* **splits** — a layer whose input is a skip-connection concat is split along its input channels
  (dim 1) into two independently quantized halves named ``<path>#main`` (``[:split]``) and
  ``<path>#skip`` (``[split:]``);
* **ties** — modules that hold copies of one shared weight (DiT's 28 timestep embedders) are one
  layer, named by the first path; quantizing it writes every copy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import SensitivityError

SPLIT_SUFFIXES = ("#main", "#skip")
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable weight (or half of one).

    ``shape`` is the shape of *this* weight (for a split half, its slice); ``in_slice`` is the
    ``(start, stop)`` range of input channels (dim 1) for split halves, else ``None``; ``tied`` lists
    further module paths whose weights are copies of this one.
    """

    name: str
    module_path: str
    kind: str
    shape: Tuple[int, ...]
    in_slice: Optional[Tuple[int, int]] = None
    tied: Tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.numel

    @property
    def out_channels(self) -> int:
        return int(self.shape[0])

    @property
    def row_length(self) -> int:
        """Length of one output channel's row (what per-channel quantizers see)."""
        return self.numel // self.out_channels

    def to_dict(self) -> dict:
        d = {"name": self.name, "module": self.module_path, "kind": self.kind, "shape": list(self.shape)}
        if self.in_slice is not None:
            d["in_slice"] = list(self.in_slice)
        if self.tied:
            d["tied"] = list(self.tied)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerSpec":
        return cls(
            name=d["name"],
            module_path=d["module"],
            kind=d["kind"],
            shape=tuple(int(s) for s in d["shape"]),
            in_slice=tuple(d["in_slice"]) if d.get("in_slice") is not None else None,
            tied=tuple(d.get("tied", ())),
        )


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    return "linear"


def find_layers(
    module: nn.Module,
    exclude: Iterable[str] = (),
    splits: Optional[Mapping[str, int]] = None,
    ties: Optional[Mapping[str, Sequence[str]]] = None,
) -> List[LayerSpec]:
    """List the quantizable layers of ``module`` in ``named_modules()`` order.

    ``exclude``: fnmatch patterns of module paths to skip. ``splits``: ``{module_path: split}`` — input
    channel index where the ``#skip`` half starts. ``ties``: ``{first_path: [copy paths]}``.
    Raises :class:`SensitivityError` if a split or tie names a missing module, or if none is found.
    """
    exclude = tuple(exclude)
    splits = dict(splits or {})
    ties = {k: tuple(v) for k, v in (ties or {}).items()}
    tied_copies = {p for copies in ties.values() for p in copies}
    modules = dict(module.named_modules())
    for path in list(splits) + list(ties) + sorted(tied_copies):
        if path not in modules:
            raise SensitivityError(f"layer rule names module {path!r}, which the model does not have")

    layers: List[LayerSpec] = []
    for path, sub in modules.items():
        if not isinstance(sub, LAYER_TYPES) or getattr(sub, "weight", None) is None:
            continue
        if path in tied_copies or any(fnmatch.fnmatchcase(path, pat) for pat in exclude):
            continue
        shape = tuple(sub.weight.shape)
        kind = _kind(sub)
        tied = ties.get(path, ())
        if path in splits:
            split = int(splits[path])
            if not 0 < split < shape[1]:
                raise SensitivityError(f"layer {path!r}: split {split} outside its {shape[1]} input channels")
            for suffix, (a, b) in zip(SPLIT_SUFFIXES, ((0, split), (split, shape[1]))):
                layers.append(LayerSpec(path + suffix, path, kind, (shape[0], b - a) + shape[2:], (a, b), tied))
        else:
            layers.append(LayerSpec(path, path, kind, shape, None, tied))
    if not layers:
        raise SensitivityError("the model has no Conv1d/Conv2d/Linear weight layers to quantize")
    return layers


def layer_weight(root: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """The weight tensor of ``spec`` (a view of the slice for split halves)."""
    w = root.get_submodule(spec.module_path).weight
    if spec.in_slice is not None:
        a, b = spec.in_slice
        w = w[:, a:b]
    return w


def layer_table(layers: Sequence[LayerSpec]) -> List[dict]:
    """Rows for printing: name, kind, shape, split, params, fp16 bytes."""
    return [
        {
            "name": s.name,
            "kind": s.kind,
            "shape": list(s.shape),
            "split": list(s.in_slice) if s.in_slice else None,
            "tied_copies": len(s.tied),
            "params": s.numel,
            "fp16_bytes": s.fp16_bytes,
        }
        for s in layers
    ]


def architecture_hash(layers: Sequence[LayerSpec]) -> str:
    """Hash of the layer names, kinds, shapes and splits (not the weights)."""
    h = hashlib.blake2b(digest_size=16)
    for s in layers:
        h.update(repr((s.name, s.module_path, s.kind, s.shape, s.in_slice, s.tied)).encode())
    return h.hexdigest()


def weights_hash(root: nn.Module, layers: Sequence[LayerSpec]) -> str:
    """Hash of the weights of ``layers``, rounded to fp16 first.

    Rounding makes the hash the same whether the model is loaded in fp32 or fp16, on any device.
    """
    h = hashlib.blake2b(digest_size=16)
    for s in layers:
        w = layer_weight(root, s).detach()
        if w.is_meta:
            raise SensitivityError(f"layer {s.name!r} is on the meta device: load real weights first")
        h.update(s.name.encode())
        h.update(w.to("cpu", torch.float16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def check_ties(root: nn.Module, layers: Sequence[LayerSpec]) -> None:
    """Raise if a tied copy differs from its first module (the tie would change the model)."""
    for s in layers:
        first = root.get_submodule(s.module_path).weight
        for copy in s.tied:
            other = root.get_submodule(copy).weight
            if other.shape != first.shape or not torch.equal(other.detach(), first.detach()):
                raise SensitivityError(f"layer {s.name!r}: tied copy {copy!r} holds different weights")
