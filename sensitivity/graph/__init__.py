"""``sensitivity.graph``: the DAG of a denoiser, derived from one traced forward pass, and its plots.

>>> g = build_graph(denoiser, layers)          # or family_graph("sdxl") on meta weights
>>> g.weight_nodes == [s.name for s in layers]
>>> g.graph                                     # networkx.DiGraph, data-flow edges
>>> g.modules()                                 # {group: {"type": "attention", "layers": [...]}}
>>> g.config_attributes(config, mq.stats_frame())
>>> draw(g, "dag_plots/sdxl.svg")               # graphviz, blocks as clusters

See :mod:`sensitivity.graph.trace` for how nodes and edges are made and :mod:`sensitivity.graph.dag`
for the node attributes.
"""

from .dag import GROUP_TYPES, DenoiserGraph, build_graph, family_graph
from .inputs import GRAPH_INPUTS, example_inputs, meta_copy
from .plot import draw, to_dot

__all__ = [
    "DenoiserGraph",
    "GROUP_TYPES",
    "GRAPH_INPUTS",
    "build_graph",
    "draw",
    "example_inputs",
    "family_graph",
    "meta_copy",
    "to_dot",
]
