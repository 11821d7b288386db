"""``sensitivity graph MODEL --out dag_plots/NAME.svg``: the traced DAG of a denoiser, drawn with graphviz.

    sensitivity graph sdxl --weights meta --out dag_plots/sdxl.svg --out dag_plots/sdxl.png
    sensitivity graph digits-dit --out dag_plots/digits-dit.png --json-out graphs/digits-dit.json
    sensitivity graph digits-dit --summary          # counts only, no drawing
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import WEIGHTS_HELP, add_weights_argument

    p = sub.add_parser("graph", help="trace a denoiser into its data-flow DAG and draw it",
                       description="Trace one forward pass of MODEL's denoiser (on meta weights by default: no "
                       "memory, no download) into a DAG of quantizable layers and the ops that combine them, and "
                       "draw it with graphviz (blocks as clusters, the whole graph, no truncation).")
    p.add_argument("model", help="model family (see `sensitivity models`)")
    add_weights_argument(p, default="meta", help=WEIGHTS_HELP + " (default: meta)")
    p.add_argument("--out", action="append", default=[], metavar="FILE",
                   help="drawing to write: .svg, .png, .pdf or .dot (repeat for several)")
    p.add_argument("--json-out", metavar="FILE", help="also save the graph as JSON (sensitivity.graph format)")
    p.add_argument("--config", metavar="FILE", help="quant config JSON ({layer: option} or {'options': {...}}): "
                   "colour weight nodes by option")
    p.add_argument("--shapes", action="store_true", help="add weight shapes to the weight-node labels")
    p.add_argument("--title", help="drawing title (default: the model id)")
    p.add_argument("--summary", action="store_true", help="print node / edge / op counts (JSON)")
    p.set_defaults(func=run)


def _read_config(path: str) -> dict:
    from ..errors import SensitivityError

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


def run(args: argparse.Namespace) -> int:
    from ..errors import SensitivityError
    from ..graph import draw, family_graph

    if not args.out and not args.json_out and not args.summary:
        raise SensitivityError("nothing to do: pass --out FILE.svg|png, --json-out FILE or --summary")
    for o in args.out:
        if not o.lower().endswith((".svg", ".png", ".pdf", ".dot")):
            raise SensitivityError(f"--out {o}: the drawing must be .svg, .png, .pdf or .dot")
    config = _read_config(args.config) if args.config else None
    t0 = time.perf_counter()
    g = family_graph(args.model, weights=args.weights)
    if config is not None:
        unknown = [k for k in config if k not in g.graph or g.graph.nodes[k]["kind"] != "weight"]
        if unknown:
            raise SensitivityError(f"--config {args.config}: layer {unknown[0]!r} is not a layer of {g.model_id}")
    s = g.summary()
    written = []
    if args.json_out:
        written.append(str(g.save(args.json_out)))
    info = {}
    if args.out:
        print(f"drawing {s['nodes']} nodes with graphviz ...", file=sys.stderr)
        info = draw(g, args.out, config=config, title=args.title, shapes=args.shapes)
        written += info["files"]
    if args.summary:
        print(json.dumps({**s, "drawing": {k: v for k, v in info.items() if k != "files"}, "files": written}, indent=1))
    else:
        size = f", drawing {info['width_in']:.0f} x {info['height_in']:.0f} in" if info else ""
        print(f"{s['model']}: {s['weight_nodes']} weight nodes, {s['nodes']} nodes, {s['edges']} edges, "
              f"{s['blocks']} blocks{size} ({time.perf_counter() - t0:.1f} s)")
        for w in written:
            print(f"wrote {w}")
    return 0
