"""Block and op type of every layer, read off a traced graph instead of layer-name rules (any diffusers denoiser).

```python
from sensitivity.graph import family_graph
naming = naming_from_graph(family_graph("sd3", "tiny"))      # traced once, on tiny or meta weights
naming.describe("transformer_blocks.11.attn.add_q_proj")    # LayerInfo('11', 11, 'SA-Q-ctx', 'SA')
```
:class:`GraphNaming` has the interface of :class:`~sensitivity.zoo.naming.LayerNaming` (``describe(name)``), so
insights and every table that describes layers work for a family no name rule knows (SD3, Flux, Sana...).
It is derived from the graph of :mod:`sensitivity.graph` (this module only reads the graph object it is given;
it imports no later stage):

* **block**: the node's outermost cluster. Items of one list of blocks (``transformer_blocks.3``) are ``"3"``
  when the model has one such list, ``"<list>.3"`` (``_blocks`` dropped: ``down.1``, ``single_transformer.0``)
  when it has several; a top-level cluster is its name (``mid_block`` -> ``mid``). Layers of the ``embedding``
  module kind are block ``embed``, those after the last block ``out``. ``block_rank`` follows trace order.
* **op type** by the layer's module kind (``group_type``) and its place in the data flow:
  attention -> ``SA-``/``CA-`` + ``Q`` / ``K`` (the weight layers feeding the first / second input of the
  attention's ``q·k`` product), ``V`` (feeding ``softmax·v``), ``Out`` (fed by it); ffn -> ``FF1`` ... ``FFn``
  in trace order; adanorm -> ``AdaLN``; embedding -> ``t-Embed`` (descends from the timestep input),
  ``c-Embed`` (from a conditioning input), ``Patchify`` / ``Conv-In`` (from the latent, downsampling or not);
  output -> ``Out-AdaLN`` (feeds a modulation) or ``Out``; resnet -> ``Res-TEmb`` (reads the time embedding,
  not the latent), then ``Res-Conv1``, ``Res-Conv2``, ``Res-Shortcut`` in trace order; sampler ->
  ``Downsample`` / ``Upsample`` (output smaller / larger than the latent). Anything else keeps the node's
  graph role with list indices dropped (``proj_mlp``). A layer of a second stream of a joint block (its module
  path says ``context`` or its name starts with ``add_``, SD3 / Flux) gets ``-ctx``.
* **op group**: ``SA``, ``CA``, ``FF``, ``AdaLN``, ``Embed``, ``IO``, ``Res``, ``Sample``, ``Other``.

Names are generalised over block indices, so a graph traced on a 2-block tiny model describes the layers of the
24-block real one; a name the graph did not hold falls back to the name rules (``fallback``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .naming import DIFFUSERS_NAMING, LayerInfo, LayerNaming

_LIST_ITEM = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")
_TIME_INPUTS = {"input:timestep"}
_LATENT_INPUTS = {"input:sample", "input:hidden_states"}
_RANK_EMBED, _RANK_OUT, _SEGMENT = -1, 10**9, 10**5


@dataclass(frozen=True)
class GraphNaming:
    """Layer descriptions derived from a traced graph (see the module docstring).

    ``table``: ``{generalised name: (segment, op_type, op_group)}`` where the generalised name has its block
    index replaced by ``{i}`` and ``segment`` names the list of blocks (or ``embed`` / ``out`` / a top-level
    block); ``segments``: ``{segment: (label prefix or fixed label, rank base, is_list)}``.
    """

    table: Dict[str, Tuple[str, str, str]]
    segments: Dict[str, Tuple[str, int, bool]]
    model_class: str = ""
    fallback: LayerNaming = field(default=DIFFUSERS_NAMING)

    def describe(self, name: str) -> LayerInfo:
        base, _, half = name.partition("#")
        suffix = f"#{half}" if half else ""
        for key, index in _generalisations(base, self.segments):
            hit = self.table.get(key)
            if hit is None:
                continue
            segment, op_type, group = hit
            label, rank, is_list = self.segments[segment]
            if is_list:
                return LayerInfo(f"{label}{index}", rank + index, op_type + suffix, group)
            return LayerInfo(label, rank, op_type + suffix, group)
        return self.fallback.describe(name)

    def rows(self, names: Sequence[str]) -> List[Dict[str, Any]]:
        """``[{layer, block, block_rank, op_type, op_group}]`` for ``names``."""
        out = []
        for n in names:
            i = self.describe(n)
            out.append({"layer": n, "block": i.block, "block_rank": i.block_rank, "op_type": i.op_type,
                        "op_group": i.op_group})
        return out


def _generalisations(name: str, segments: Dict[str, Tuple[str, int, bool]]):
    """``(key, index)`` candidates of a layer name: its list-block index replaced by ``{i}``, then the name itself."""
    for seg, (_, _, is_list) in segments.items():
        if is_list and name.startswith(seg + "."):
            rest = name[len(seg) + 1:]
            idx, _, tail = rest.partition(".")
            if idx.isdigit():
                yield f"{seg}.{{i}}.{tail}", int(idx)
    yield name, 0


def _weights_along(G, start: str, scope: str, backward: bool) -> List[str]:
    """Weight nodes reached from ``start`` through non-weight ``combine`` nodes inside ``scope``, walking
    back (``backward``: predecessors; ``start`` itself included) or forward (successors)."""
    step = G.predecessors if backward else G.successors
    found, seen, stack = [], set(), [start] if backward else list(step(start))
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        d = G.nodes[n]
        if d.get("kind") == "weight":
            found.append(n)
            continue
        if d.get("kind") != "combine" or not _inside(d.get("scope", ""), scope):
            continue
        stack.extend(step(n))
    return found


def _weight_feeders(G, start: str, scope: str) -> List[str]:
    """Weight nodes feeding ``start`` inside ``scope``, in trace order."""
    return sorted(_weights_along(G, start, scope, backward=True), key=lambda n: G.nodes[n]["order"])


def _weight_consumers(G, start: str, scope: str) -> List[str]:
    """Weight nodes fed by ``start`` inside ``scope``."""
    return _weights_along(G, start, scope, backward=False)


def _inside(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _attention_roles(G, group: str, members: Sequence[str]) -> Dict[str, str]:
    """``{layer: Q|K|V|Out}`` for the weight nodes of one attention module, from its ``qk`` / ``av`` nodes."""
    roles: Dict[str, str] = {}
    qks = sorted((n for n, d in G.nodes(data=True) if d.get("kind") == "combine" and d.get("op") == "matmul"
                  and str(d.get("role", "")).endswith(":qk") and _inside(d.get("scope", ""), group)),
                 key=lambda n: G.nodes[n]["order"])
    members_set = set(members)
    for qk in qks:
        preds = list(G.predecessors(qk))  # insertion order: the producers of q first, then of k
        if len(preds) == 1:
            for w in _weight_feeders(G, preds[0], group):
                roles.setdefault(w, "QK")
        else:
            for w in _weight_feeders(G, preds[0], group):
                roles.setdefault(w, "Q")
            for p in preds[1:]:
                for w in _weight_feeders(G, p, group):
                    roles.setdefault(w, "K")
        for av in G.successors(qk):
            if not str(G.nodes[av].get("role", "")).endswith(":av"):
                continue
            for p in G.predecessors(av):
                if p != qk:
                    for w in _weight_feeders(G, p, group):
                        roles.setdefault(w, "V")
            for w in _weight_consumers(G, av, group):
                roles.setdefault(w, "Out")
    return {k: v for k, v in roles.items() if k in members_set}


def _input_ancestors(G, node: str) -> Set[str]:
    import networkx as nx

    return {a for a in nx.ancestors(G, node) if G.nodes[a].get("kind") == "input"}


def _spatial(shape) -> Optional[int]:
    """Spatial / token extent of an output shape: H*W of [B, C, H, W], tokens of [B, T, C]."""
    if not shape:
        return None
    s = tuple(shape)
    if len(s) == 4:
        return int(s[2]) * int(s[3])
    if len(s) == 3:
        return int(s[1])
    return None


def _latent_extent(G) -> Optional[int]:
    for n in _LATENT_INPUTS:
        if n in G:
            return _spatial(G.nodes[n].get("out_shape"))
    return None


def _stream(layer: str) -> str:
    """``-ctx`` for a layer of a joint block's second (text) stream: a module path part with ``context``
    (``norm1_context``, ``ff_context``) or an ``add`` projection (``add_q_proj``, ``to_add_out``)."""
    parts = layer.split(".")
    if any("context" in p for p in parts[:-1]) or re.search(r"(?:^|_)add(?:_|$)", parts[-1]):
        return "-ctx"
    return ""


def naming_from_graph(graph: Any, fallback: LayerNaming = DIFFUSERS_NAMING) -> GraphNaming:
    """A :class:`GraphNaming` from a :class:`sensitivity.graph.DenoiserGraph` (module docstring: the rules)."""
    G = graph.graph
    layers = [s.name for s in graph.layers]
    order = {n: G.nodes[n]["order"] for n in layers}
    latent = _latent_extent(G)
    # ---- segments: lists of blocks and top-level blocks, in trace order
    seg_of: Dict[str, Tuple[str, int]] = {}
    seg_order: List[str] = []
    for n in sorted(layers, key=order.get):
        d = G.nodes[n]
        if d.get("group_type") == "embedding":
            seg, idx = "embed", 0
        elif d.get("group_type") == "output":
            seg, idx = "out", 0
        elif d.get("block"):
            m = _LIST_ITEM.match(d["block"])
            seg, idx = (m.group("prefix"), int(m.group("index"))) if m else (d["block"], 0)
        else:
            seg, idx = "other", 0
        seg_of[n] = (seg, idx)
        if seg not in seg_order:
            seg_order.append(seg)
    lists = [s for s in seg_order if s not in ("embed", "out", "other") and
             any(seg_of[n][0] == s and _LIST_ITEM.match(G.nodes[n]["block"] or "") for n in layers)]
    segments: Dict[str, Tuple[str, int, bool]] = {"embed": ("embed", _RANK_EMBED, False),
                                                  "out": ("out", _RANK_OUT, False),
                                                  "other": ("other", _RANK_OUT - 1, False)}
    for k, seg in enumerate(s for s in seg_order if s not in segments):
        if seg in lists:
            label = "" if len(lists) == 1 else re.sub(r"_blocks?$", "", seg) + "."
            segments[seg] = (label, (k + 1) * _SEGMENT, True)
        else:
            segments[seg] = (re.sub(r"_block$", "", seg), (k + 1) * _SEGMENT, False)
    # ---- op types by module kind
    by_group: Dict[str, List[str]] = {}
    for n in layers:
        by_group.setdefault(G.nodes[n].get("group") or n, []).append(n)
    op: Dict[str, Tuple[str, str]] = {}
    for group, members in by_group.items():
        members = sorted(members, key=order.get)
        kind = G.nodes[members[0]].get("group_type")
        if kind in ("attention", "cross-attention"):
            pre = "CA" if kind == "cross-attention" else "SA"
            roles = _attention_roles(G, group, members)
            for n in members:
                op[n] = (f"{pre}-{roles.get(n, _role_tail(G, n))}", pre)
        elif kind == "ffn":
            for k, n in enumerate(members):
                op[n] = (f"FF{k + 1}", "FF")
        elif kind == "adanorm":
            for n in members:
                op[n] = ("AdaLN", "AdaLN")
        elif kind == "embedding":
            for n in members:
                ins = _input_ancestors(G, n)
                if ins & _TIME_INPUTS:
                    op[n] = ("t-Embed", "Embed")
                elif ins - _LATENT_INPUTS:
                    op[n] = ("c-Embed", "Embed")
                else:
                    ext = _spatial(G.nodes[n].get("out_shape"))
                    down = G.nodes[n].get("op") != "linear" and latent and ext and ext < latent
                    op[n] = ("Patchify" if down or G.nodes[n].get("op") == "linear" else "Conv-In", "IO")
        elif kind == "output":
            for n in members:
                mod = any(G.nodes[s].get("op") == "modulate" for s in G.successors(n))
                op[n] = ("Out-AdaLN" if mod else "Out", "IO")
        elif kind == "resnet":
            convs = []
            for n in members:
                if not (_input_ancestors(G, n) & _LATENT_INPUTS):
                    op[n] = ("Res-TEmb", "Res")
                else:
                    convs.append(n)
            for k, n in enumerate(convs):
                op[n] = (("Res-Conv1", "Res-Conv2", "Res-Shortcut")[k] if k < 3 else f"Res-Conv{k + 1}", "Res")
        elif kind == "sampler":
            for n in members:
                preds = [p for p in G.predecessors(n)]
                ins = [_spatial(G.nodes[p].get("out_shape")) for p in preds]
                ext = _spatial(G.nodes[n].get("out_shape"))
                up = ext is not None and any(i is not None and ext > i for i in ins)
                op[n] = ("Upsample" if up else "Downsample", "Sample")
        else:
            for n in members:
                op[n] = _projection(G, n) or (_role_tail(G, n), "Other")
    table: Dict[str, Tuple[str, str, str]] = {}
    for n in layers:
        seg, _ = seg_of[n]
        op_type, grp = op[n]
        if grp in ("SA", "CA", "FF", "AdaLN"):
            op_type += _stream(n)
        key = n
        if segments[seg][2]:
            m = re.match(rf"^{re.escape(seg)}\.(\d+)\.(.+)$", n)
            if m:
                key = f"{seg}.{{i}}.{m.group(2)}"
        table.setdefault(key, (seg, op_type, grp))
    return GraphNaming(table, segments, getattr(graph, "model_class", ""), fallback)


def _projection(G, n: str) -> Optional[Tuple[str, str]]:
    """``Proj-In`` (feeds an attention layer of its parent module) / ``Proj-Out`` (fed by an attention or FFN
    layer of it) for a layer of no module kind, e.g. a UNet transformer's ``proj_in`` / ``proj_out``."""
    path = G.nodes[n].get("module_path") or n
    scope = path.rsplit(".", 1)[0] if "." in path else ""
    kinds = ("attention", "cross-attention")
    if any(G.nodes[w].get("group_type") in kinds for w in _weight_consumers(G, n, scope)):
        return "Proj-In", "Attn-IO"
    feeders = [w for p in G.predecessors(n) for w in _weight_feeders(G, p, scope)]
    if any(G.nodes[w].get("group_type") in kinds + ("ffn",) for w in feeders):
        return "Proj-Out", "Attn-IO"
    return None


def _role_tail(G, n: str) -> str:
    role = str(G.nodes[n].get("role") or n)
    tail = role.split("/", 1)[-1]
    return re.sub(r"\.\d+(?=\.|$)", "", tail) or tail
