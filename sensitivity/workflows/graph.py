"""A model's traced DAG, saved and drawn, as one call: ``model_graph_files(model, out=["dag.svg"])``.

```python
from sensitivity.workflows.graph import model_graph_files
run = model_graph_files("digits-dit", out=["dag_plots/digits-dit.png"], json_out="graphs/digits-dit.json")
run.summary["weight_nodes"], run.written
```
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]

DRAWING_SUFFIXES = (".svg", ".png", ".pdf", ".dot")


class GraphFiles(NamedTuple):
    """The traced graph, its summary (node / edge / op counts), the drawing's info (size; empty without a
    drawing) and the files written."""

    graph: Any
    summary: Dict[str, Any]
    drawing: Dict[str, Any]
    written: List[str]


def read_layer_options(path: PathLike) -> Dict[str, str]:
    """``{layer: option}`` of a JSON file holding that object or a config (``{"options": {...}}``)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SensitivityError(f"--config {path}: cannot read JSON ({exc})") from None
    if isinstance(d, dict) and isinstance(d.get("options"), dict):
        d = d["options"]
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise SensitivityError(f"--config {path}: expected a JSON object {{layer: option}}")
    return d


def model_graph_files(model: str, *, weights: str = "meta", out: Sequence[PathLike] = (),
                      json_out: Optional[PathLike] = None, config: Union[PathLike, Mapping[str, str], None] = None,
                      title: Optional[str] = None, shapes: bool = False,
                      log: Optional[Callable[[str], None]] = None) -> GraphFiles:
    """Trace ``model``'s denoiser on ``weights`` (default meta: no memory) and write the graph as JSON
    (``json_out``) and drawings (``out``: .svg / .png / .pdf / .dot, graphviz), weight nodes coloured by
    ``config`` (a config file or ``{layer: option}``); ``log`` gets a line before the (slow) drawing."""
    from ..graph import draw, family_graph

    for o in out:
        if not str(o).lower().endswith(DRAWING_SUFFIXES):
            raise SensitivityError(f"--out {o}: the drawing must be .svg, .png, .pdf or .dot")
    source = config
    if config is not None and not isinstance(config, Mapping):
        config = read_layer_options(config)
    g = family_graph(model, weights=weights)
    if config is not None:
        unknown = [k for k in config if k not in g.graph or g.graph.nodes[k]["kind"] != "weight"]
        if unknown:
            raise SensitivityError(f"--config {source}: layer {unknown[0]!r} is not a layer of {g.model_id}")
    s = g.summary()
    written: List[str] = []
    if json_out:
        written.append(str(g.save(json_out)))
    info: Dict[str, Any] = {}
    if out:
        if log:
            log(f"drawing {s['nodes']} nodes with graphviz ...")
        info = draw(g, [str(o) for o in out], config=config, title=title, shapes=shapes)
        written += info["files"]
    return GraphFiles(g, s, info, written)
