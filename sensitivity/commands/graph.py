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


def run(args: argparse.Namespace) -> int:
    from ..errors import SensitivityError
    from ..workflows.graph import model_graph_files

    if not args.out and not args.json_out and not args.summary:
        raise SensitivityError("nothing to do: pass --out FILE.svg|png, --json-out FILE or --summary")
    t0 = time.perf_counter()
    res = model_graph_files(args.model, weights=args.weights, out=args.out, json_out=args.json_out,
                            config=args.config, title=args.title, shapes=args.shapes,
                            log=lambda text: print(text, file=sys.stderr))
    s, info, written = res.summary, res.drawing, res.written
    if args.summary:
        print(json.dumps({**s, "drawing": {k: v for k, v in info.items() if k != "files"}, "files": written}, indent=1))
    else:
        size = f", drawing {info['width_in']:.0f} x {info['height_in']:.0f} in" if info else ""
        print(f"{s['model']}: {s['weight_nodes']} weight nodes, {s['nodes']} nodes, {s['edges']} edges, "
              f"{s['blocks']} blocks{size} ({time.perf_counter() - t0:.1f} s)")
        for w in written:
            print(f"wrote {w}")
    return 0
