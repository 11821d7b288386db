"""The denoiser DAG: nodes, block positions, modules, per-config attributes, JSON persistence.

Node attributes (all nodes): ``op`` (``linear``/``conv2d``/``conv1d`` for weight nodes; ``add``,
``mul``, ``modulate``, ``gated_add``, ``cat``, ``matmul``, ``norm``, ``op:<name>`` for combine nodes;
``input``, ``output``), ``kind`` (``weight``/``combine``/``input``/``output``), ``scope`` (module path
where the op ran), ``out_shape`` (output tensor shape of the traced pass), ``order`` (trace order),
``depth`` (longest path from an input), and the **block position**:

* ``clusters``: the nested blocks holding the node, outermost first — module paths ending in a list
  index (``down_blocks.1``, ``down_blocks.1.attentions.0``, ``transformer_blocks.3``) or top-level
  modules (``mid_block``, ``time_embedding``), each holding at least two quantizable layers;
* ``block``: the outermost cluster (``""`` outside every block);
* ``position``: ``[block, sub-block, sub-sub-block]`` 1-based ordinals in trace order (0 = none);
* ``role``: the node's place inside its innermost block, shared by all blocks of one kind
  (``transformer_blocks/attn1.to_q``, ``resnets/conv1``, ``transformer_blocks/attn1:qk``).

Weight nodes add ``layer`` (= :class:`~sensitivity.layers.LayerSpec` name), ``module_path``,
``weight_shape``, ``numel``, ``fp16_bytes``, ``in_slice``, ``tied_copies``, and the **module** they belong
to (``group``: module path; ``group_type``: ``attention``, ``cross-attention``, ``ffn``, ``embedding``,
``output``, ``resnet``, ``adanorm``, ``sampler``, ``block``) — the units of module-level scores.

Per config (:meth:`DenoiserGraph.config_attributes`): ``option``, ``method``, ``bits``, ``reduction``
(fp16 bytes / quantized bytes) and ``error`` (relative squared error from the multiquantizer stats).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import pandas as pd
from torch import nn

from ..errors import SensitivityError
from ..layers import LayerSpec, find_layers
from ..options import FP16, QuantOption
from .inputs import GRAPH_INPUTS, example_inputs, meta_copy
from .trace import trace

FORMAT = "sensitivity.graph/1"
GROUP_TYPES = ("attention", "cross-attention", "ffn", "embedding", "output", "resnet", "adanorm", "sampler", "block")


# ------------------------------------------------------------------------------------ structure
def _cluster_set(layers: Sequence[LayerSpec]) -> set:
    """Module paths that are blocks: list items or top-level modules holding >= 2 layers."""
    counts: Counter = Counter()
    for s in {s.module_path for s in layers}:
        parts = s.split(".")
        for i in range(1, len(parts)):
            p = parts[:i]
            if p[-1].isdigit() or (i == 1 and not parts[1].isdigit()):
                counts[".".join(p)] += 1
    return {p for p, c in counts.items() if c >= 2}


def _clusters_of(path: str, clusters: set, inclusive: bool) -> List[str]:
    parts = path.split(".") if path else []
    n = len(parts) + (1 if inclusive else 0)
    return [".".join(parts[:i]) for i in range(1, n) if ".".join(parts[:i]) in clusters]


def _role(path: str, innermost: Optional[str]) -> str:
    if not innermost:
        return path
    parts = innermost.split(".")
    container = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    rest = path[len(innermost):].lstrip(".")
    return f"{container}/{rest}"


def _groups(model: nn.Module, layers: Sequence[LayerSpec]) -> Dict[str, Tuple[str, Optional[str]]]:
    """``{layer: (group path, category or None)}`` from the deepest categorised ancestor module."""
    from ..zoo import family_for_denoiser
    from ..zoo.naming import module_category

    fam = family_for_denoiser(model)
    category = fam.module_category if fam is not None else module_category
    modules = dict(model.named_modules())
    out = {}
    for s in layers:
        parts = s.module_path.split(".")
        found = (None, None)
        for i in range(len(parts) - 1, 0, -1):
            p = ".".join(parts[:i])
            m = modules.get(p)
            cat = category(m) if m is not None else None
            if cat is not None:
                found = (p, cat)
                break
        out[s.name] = found
    return out


# ------------------------------------------------------------------------------------ the graph
@dataclass
class DenoiserGraph:
    """A traced denoiser DAG (``graph``: networkx DiGraph) and the layers its weight nodes stand for."""

    graph: nx.DiGraph
    layers: List[LayerSpec]
    model_class: str
    model_id: Optional[str] = None
    trace_seconds: float = 0.0
    info: Dict[str, Any] = field(default_factory=dict)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def nodes(self) -> List[str]:
        """All node names in a stable topological order (ties broken by trace order)."""
        g = self.graph
        return list(nx.lexicographical_topological_sort(g, key=lambda n: (g.nodes[n]["order"], n)))

    @property
    def weight_nodes(self) -> List[str]:
        """Weight-node names in layer order (= ``[s.name for s in layers]``)."""
        return [s.name for s in self.layers]

    @property
    def layer_names(self) -> List[str]:
        return self.weight_nodes

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __repr__(self) -> str:
        return (f"DenoiserGraph({self.model_id or self.model_class!r}, {len(self.layers)} weight nodes, "
                f"{self.graph.number_of_nodes()} nodes, {self.graph.number_of_edges()} edges)")

    def summary(self) -> Dict[str, Any]:
        """Counts: nodes, edges, weight nodes, per op, blocks, depth, trace seconds."""
        g = self.graph
        return {
            "model": self.model_id or self.model_class,
            "model_class": self.model_class,
            "nodes": g.number_of_nodes(),
            "edges": g.number_of_edges(),
            "weight_nodes": len(self.layers),
            "ops": dict(sorted(Counter(d["op"] for _, d in g.nodes(data=True)).items())),
            "blocks": len({d["block"] for _, d in g.nodes(data=True) if d["block"]}),
            "depth": max((d["depth"] for _, d in g.nodes(data=True)), default=0),
            "trace_seconds": round(self.trace_seconds, 3),
        }

    def modules(self) -> Dict[str, Dict[str, Any]]:
        """The module partition of the weight nodes: ``{group: {"type": ..., "layers": [...]}}``.

        Groups are disjoint and cover every layer; ``type`` is one of :data:`GROUP_TYPES`.
        """
        out: Dict[str, Dict[str, Any]] = {}
        g = self.graph
        for name in self.weight_nodes:
            d = g.nodes[name]
            e = out.setdefault(d["group"], {"type": d["group_type"], "layers": []})
            e["layers"].append(name)
        return out

    # ---- per-config attributes -------------------------------------------------------------------
    def config_attributes(self, config: Mapping[str, str], stats: Optional[pd.DataFrame] = None) -> pd.DataFrame:
        """Per weight node under ``config`` (``{layer: option}``; absent layers are fp16).

        Columns: layer, option, method, bits, nbytes, reduction (fp16 bytes / bytes), error. ``stats`` is a
        multiquantizer stats table (``mq.stats_frame()``: layer, option, error, nbytes); without it bytes
        come from the option's size formula and error is NaN.
        """
        lookup = _stats_lookup(stats)
        rows = []
        for s in self.layers:
            opt = config.get(s.name, FP16)
            o = QuantOption.parse(opt)
            if o.is_fp:
                nbytes, err = s.fp16_bytes, 0.0
            elif lookup is not None and (s.name, o.name) in lookup:
                err, nbytes = lookup[(s.name, o.name)]
            else:
                nbytes, err = o.nbytes(s.shape), float("nan")
            rows.append({"layer": s.name, "option": o.name, "method": o.method, "bits": o.bits,
                         "nbytes": int(nbytes), "reduction": s.fp16_bytes / nbytes, "error": float(err)})
        return pd.DataFrame(rows)

    def annotate(self, config: Mapping[str, str], stats: Optional[pd.DataFrame] = None) -> nx.DiGraph:
        """A copy of the graph whose weight nodes carry option, method, bits, reduction, error of ``config``."""
        g = self.graph.copy()
        for r in self.config_attributes(config, stats).itertuples(index=False):
            g.nodes[r.layer].update(option=r.option, method=r.method, bits=r.bits, reduction=r.reduction, error=r.error)
        return g

    # ---- persistence -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        g = self.graph
        nodes = []
        for n in self.nodes:
            d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.nodes[n].items()}
            d["name"] = n
            nodes.append(d)
        return {
            "format": FORMAT,
            "model_class": self.model_class,
            "model_id": self.model_id,
            "trace_seconds": self.trace_seconds,
            "info": self.info,
            "layers": [s.to_dict() for s in self.layers],
            "nodes": nodes,
            "edges": [[a, b] for a, b in sorted(g.edges, key=lambda e: (g.nodes[e[0]]["order"], g.nodes[e[1]]["order"]))],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "graph") -> "DenoiserGraph":
        if d.get("format") != FORMAT:
            raise SensitivityError(f"{source}: not a {FORMAT} file (format {d.get('format')!r})")
        g = nx.DiGraph()
        for nd in d["nodes"]:
            nd = dict(nd)
            name = nd.pop("name")
            for k in ("out_shape", "weight_shape", "in_slice"):
                if nd.get(k) is not None:
                    nd[k] = tuple(nd[k])
            g.add_node(name, **nd)
        g.add_edges_from((a, b) for a, b in d["edges"])
        return cls(g, [LayerSpec.from_dict(x) for x in d["layers"]], d["model_class"], d.get("model_id"),
                   float(d.get("trace_seconds", 0.0)), dict(d.get("info", {})))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph as JSON (atomically)."""
        from ..io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")), "graph")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DenoiserGraph":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SensitivityError(f"{path}: cannot read graph JSON ({exc})") from None
        return cls.from_dict(d, source=str(path))


def _stats_lookup(stats: Optional[pd.DataFrame]) -> Optional[Dict[Tuple[str, str], Tuple[float, int]]]:
    if stats is None:
        return None
    return {(r.layer, r.option): (float(r.error), int(r.nbytes)) for r in stats[["layer", "option", "error", "nbytes"]].itertuples(index=False)}


# ------------------------------------------------------------------------------------ building
def _annotate_structure(g: nx.DiGraph, layers: Sequence[LayerSpec], groups: Mapping[str, Tuple[Optional[str], Optional[str]]]) -> None:
    """Add clusters, block, position, role, depth, group to every node of ``g`` (in place)."""
    clusters = _cluster_set(layers)
    order = sorted(g.nodes, key=lambda n: g.nodes[n]["order"])
    for n in order:
        d = g.nodes[n]
        if d["kind"] == "weight":
            cl = _clusters_of(d["module_path"], clusters, inclusive=False)
            d["role"] = _role(d["module_path"], cl[-1] if cl else None) + (d["layer"][len(d["module_path"]):] if d["in_slice"] else "")
        elif d["kind"] == "combine":
            cl = _clusters_of(d["scope"], clusters, inclusive=True)
            tag = d.get("role") if d.get("role") in ("qk", "av") else d["op"]
            if d.get("role") == "split_sum":
                base = _role(n[: -len("#sum")], cl[-1] if cl else None) + "#sum"
            else:
                base = _role(d["scope"], cl[-1] if cl else None) + f":{tag}"
            d["role"] = base
        else:
            cl = []
            d["role"] = n
        d["clusters"] = cl
        d["block"] = cl[0] if cl else ""
    # ordinals of blocks in trace order, 3 levels
    ordinal: Dict[str, int] = {}
    child_count: Counter = Counter()
    for n in order:
        cl = g.nodes[n]["clusters"]
        for i, c in enumerate(cl):
            if c not in ordinal:
                parent = cl[i - 1] if i else ""
                child_count[parent] += 1
                ordinal[c] = child_count[parent]
    for n in order:
        cl = g.nodes[n]["clusters"]
        pos = [ordinal[c] for c in cl[:3]]
        g.nodes[n]["position"] = pos + [0] * (3 - len(pos))
    # depth: longest path from a source
    for n in nx.topological_sort(g):
        preds = list(g.predecessors(n))
        g.nodes[n]["depth"] = 1 + max(g.nodes[p]["depth"] for p in preds) if preds else 0
    # module groups of weight nodes
    in_block = {n for n in g if g.nodes[n]["kind"] == "weight" and g.nodes[n]["block"]}
    for s in layers:
        d = g.nodes[s.name]
        path, cat = groups.get(s.name, (None, None))
        if not d["block"]:  # top level, outside every block: embedding if it feeds a block, else output
            if not in_block or not in_block.isdisjoint(nx.descendants(g, s.name)):
                d["group"], d["group_type"] = (path if cat == "embedding" and path else s.module_path.split(".")[0]), "embedding"
            else:
                d["group"], d["group_type"] = "output", "output"
        elif cat is None:
            d["group"], d["group_type"] = s.name, "block"
        else:
            d["group"], d["group_type"] = path, cat


def build_graph(
    model: nn.Module,
    layers: Optional[Sequence[LayerSpec]] = None,
    inputs: Optional[Mapping[str, Any]] = None,
    input_names: Iterable[str] = GRAPH_INPUTS,
    meta: bool = True,
    model_id: Optional[str] = None,
) -> DenoiserGraph:
    """Trace ``model`` into a :class:`DenoiserGraph`.

    ``layers``: the quantizable layers (default ``find_layers(model)``; pass the family's list so splits,
    ties and exclusions match ``sensitivity layers``). ``inputs``: forward keyword arguments (default
    :func:`~sensitivity.graph.inputs.example_inputs`). ``meta``: trace an architecture copy on the meta
    device (no memory, no compute) when the model has real weights and a diffusers config.
    """
    layers = list(layers) if layers is not None else find_layers(model)
    traced = model
    if meta and inputs is None:
        copy, made = meta_copy(model)
        mods = dict(copy.named_modules()) if made else {}
        if made and all(s.module_path in mods and all(t in mods for t in s.tied) for s in layers):
            traced = copy
    was_training = traced.training
    traced.eval()
    try:
        kw = dict(inputs) if inputs is not None else example_inputs(traced)
        res = trace(traced, layers, kw, input_names)
    finally:
        traced.train(was_training)
    groups = _groups(traced, layers)
    _annotate_structure(res.graph, layers, groups)
    info = {"calls": res.n_calls, "meta": next(traced.parameters()).is_meta, "inputs": sorted(
        n[len("input:"):] for n, d in res.graph.nodes(data=True) if d["kind"] == "input")}
    return DenoiserGraph(res.graph, layers, res.model_class, model_id, res.seconds, info)


def family_graph(family: Any, weights: str = "meta", device: str = "cpu") -> DenoiserGraph:
    """The graph of a zoo family (name or :class:`ModelFamily`), traced on its ``weights`` (default meta).

    Uses the family's layer rules (``fam.find_layers``), so the weight nodes are exactly the layers of
    ``sensitivity layers``.
    """
    try:
        from ..zoo import get_family
    except ImportError as exc:  # pragma: no cover - the zoo is part of the package
        raise SensitivityError(f"the model zoo is not available: {exc}") from None
    fam = get_family(family) if isinstance(family, str) else family
    kwargs = {"device": device} if weights != "meta" else {}
    try:
        den = fam.load_denoiser(weights, **kwargs)
    except TypeError:
        den = fam.load_denoiser(weights)
    layers = fam.find_layers(den)
    model_id = fam.model_id(weights) if hasattr(fam, "model_id") else fam.name
    return build_graph(den, layers, model_id=model_id)
