"""The graph of a whole pipeline: one traced graph per component, joined where the data flows.

Each component of a pipeline multiquantizer (:mod:`sensitivity.pipeline_quant`) is traced on its own,
on the meta device: the denoiser with its family's example inputs, a text encoder on ``input_ids``
(``[1, L]`` zeros), the VAE decoder's ``decode`` on latents ``[1, C, h, w]``. Every node name and
every path-like attribute (``layer``, ``module_path``, ``scope``, ``block``, ``clusters``, ``group``)
is prefixed with ``<component>.``, so weight nodes carry the file's layer names; ``role`` becomes
``<component>:<role>`` (the GNN's role embedding thus tells the components apart) and every node gets
``component``. Edges join the parts as the pipeline runs them: each text encoder's output node feeds
the denoiser's ``input:encoder_hidden_states`` node, and the denoiser's output feeds the decoder's input.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import networkx as nx
import torch

from ..errors import SensitivityError
from .dag import DenoiserGraph, build_graph, family_graph

_PATH_ATTRS = ("layer", "module_path", "scope", "block", "group")


def _prefixed(graph: DenoiserGraph, name: str) -> nx.DiGraph:
    g = nx.relabel_nodes(graph.graph, {n: f"{name}.{n}" for n in graph.graph}, copy=True)
    for _, d in g.nodes(data=True):
        for key in _PATH_ATTRS:
            if isinstance(d.get(key), str) and d[key]:
                d[key] = f"{name}.{d[key]}"
        if isinstance(d.get("clusters"), list):
            d["clusters"] = [f"{name}.{c}" for c in d["clusters"]]
        if isinstance(d.get("role"), str):
            d["role"] = f"{name}:{d['role']}"
        d["component"] = name
    return g


def _component_graph(family, name: str, module, layers) -> DenoiserGraph:
    from ..pipeline_quant import DENOISER, VAE_DECODER

    if name == DENOISER:
        return build_graph(module, layers)
    p = next(module.parameters())
    if name == VAE_DECODER:
        cfg = module.config
        size = int(getattr(cfg, "sample_size", 64) or 64) // 2 ** (len(cfg.block_out_channels) - 1)
        z = torch.zeros(1, int(cfg.latent_channels), max(size, 1), max(size, 1), device=p.device, dtype=p.dtype)
        module.forward = module.decode  # trace the decoder only (the encoder does not run in generation)
        try:
            return build_graph(module, layers, inputs={"z": z}, input_names=("z",))
        finally:
            del module.forward
    cfg = module.config
    length = min(int(getattr(cfg, "max_position_embeddings", 0) or 16), 16)
    ids = torch.zeros(1, length, dtype=torch.long, device=p.device)
    return build_graph(module, layers, inputs={"input_ids": ids}, input_names=("input_ids",))


def pipeline_graph(family: Any, components: Optional[Sequence[str]] = None, weights: str = "meta") -> DenoiserGraph:
    """The joined graph of ``components`` (default: every component of the pipeline) of zoo family
    ``family`` (name or object), traced on ``weights`` (default meta: no memory). Weight nodes are the
    layers of ``sensitivity multiquantize --components`` in its order."""
    from ..components import component_layers
    from ..pipeline_quant import DENOISER, _pipeline_names, load_component, prefixed_layers
    from ..zoo import get_family

    fam = get_family(family) if isinstance(family, str) else family
    w = fam.resolve_weights(weights)
    names = _pipeline_names(fam, w, 0)
    if components is not None:
        bad = [c for c in components if c not in names]
        if bad:
            raise SensitivityError(f"model {fam.name!r}: the pipeline has no component {bad[0]!r}")
        names = [n for n in names if n in components]
    g = nx.DiGraph()
    layers: List = []
    seconds = 0.0
    offset = 0
    outputs, inputs = {}, {}
    for name in names:
        module = load_component(fam, w, name, materialize=w not in getattr(fam, "special_weights", ()))
        comp_layers = component_layers(fam, name, module)
        part = _component_graph(fam, name, module, comp_layers)
        pg = _prefixed(part, name)
        for _, d in pg.nodes(data=True):  # one trace order over the pipeline: components in generation order
            d["order"] = int(d["order"]) + offset
        offset += 1 + max((int(d["order"]) for _, d in part.graph.nodes(data=True)), default=0)
        g = nx.union(g, pg)
        layers += prefixed_layers(name, comp_layers)
        seconds += part.trace_seconds
        outputs[name] = [n for n, d in pg.nodes(data=True) if d["kind"] == "output"]
        inputs[name] = {n.split("input:", 1)[1]: n for n, d in pg.nodes(data=True) if d["kind"] == "input"}
    den_in = inputs.get(DENOISER, {})
    for name in names:
        if name.startswith("text_encoder") and den_in:
            target = den_in.get("encoder_hidden_states") or den_in.get("encoder_hidden_states_t5")
            if target is not None:
                g.add_edges_from((o, target) for o in outputs[name])
        if name == "vae_decoder" and DENOISER in outputs:
            g.add_edges_from((o, n) for o in outputs[DENOISER] for n in inputs[name].values())
    model_id = fam.model_id(w) if hasattr(fam, "model_id") else fam.name
    return DenoiserGraph(g, layers, "PipelineModules", model_id, seconds, {"components": names})


def graph_for_layers(family: Any, layers: Sequence[str], weights: str = "meta",
                     model_id: Optional[str] = None) -> DenoiserGraph:
    """The graph whose weight nodes are ``layers``: the pipeline graph of their components when the names
    start with a component (a pipeline multiquantizer's), else the family's denoiser graph. ``model_id``
    (``family:weights``) of a ``tiny`` build traces the tiny pipeline (on meta): its text encoders and VAE
    are shallower than the official ones, whose structure ``meta`` has."""
    from ..mqfile import COMPONENT_NAMES

    heads = list(dict.fromkeys(l.split(".", 1)[0] for l in layers))
    if layers and all(h in COMPONENT_NAMES for h in heads):
        if weights == "meta" and str(model_id or "").endswith(":tiny"):
            weights = "tiny"
        return pipeline_graph(family, heads, weights)
    return family_graph(family, weights=weights)
