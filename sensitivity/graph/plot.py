"""Graphviz drawings of a :class:`~sensitivity.graph.DenoiserGraph`: every node, blocks as clusters.

Weight nodes are boxes labelled with their place in the block (``attn1.to_q``), coloured by layer kind,
or by option when a config is given; combine nodes are small ovals (``add``, ``qk``, ``norm``, ...).
Blocks (``down_blocks.1``, ``transformer_blocks.3``, ...) are nested clusters. A node that feeds many
blocks (the time embedding, the text input) is drawn once; inside each block it feeds, a small grey
"from <node>" note beside each node it feeds stands for it (dashed edge), so hundreds of long edges do not tangle the drawing.

The crossing-minimisation and network-simplex limits (``mclimit``, ``nslimit``, ``nslimit1``) keep the
layout of an SDXL-size graph (1,611 nodes) at about 20 s instead of many minutes.

No truncation: the SVG is drawn at full size (zoom in a browser); the PNG's resolution is chosen so
that its longer side stays within ``max_png_pixels`` (cairo's limit is 32,767), never cropped: a taller
drawing becomes side-by-side columns at full resolution. The
layout runs once (``dot -Tdot``); SVG and PNG are rendered from the laid-out file without re-layout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import networkx as nx

from ..errors import SensitivityError
from ..io import atomic_path
from .dag import DenoiserGraph

KIND_COLORS = {"linear": "#9ecae1", "conv2d": "#a1d99b", "conv1d": "#a1d99b"}
OP_COLORS = {
    "add": "#fdae6b", "gated_add": "#fd8d3c", "mul": "#fdd0a2", "modulate": "#fdd49e", "cat": "#fcbba1",
    "matmul": "#d6616b", "norm": "#d9d9d9", "input": "#bcbddc", "output": "#bcbddc",
}
OPTION_COLORS = {
    "fp16": "#f0f0f0",
    "uaq-4": "#6baed6", "uaq-3": "#c6dbef",
    "kmeans_c-4": "#74c476", "kmeans_c-3": "#c7e9c0",
    "kmeans_a-4": "#9e9ac8", "kmeans_a-3": "#dadaeb",
}
BROADCAST_BLOCKS = 3  # a node feeding more than this many other blocks is a broadcast source (drawn via proxies)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _short(role: str) -> str:
    return role.split("/", 1)[1] if "/" in role else role


def to_dot(
    graph: DenoiserGraph,
    config: Optional[Mapping[str, str]] = None,
    title: Optional[str] = None,
    shapes: bool = False,
    rankdir: str = "TB",
) -> str:
    """DOT source of the whole graph (see the module docstring). ``shapes``: add weight shapes to labels."""
    g = graph.graph
    order = graph.nodes
    ids = {n: f"n{i}" for i, n in enumerate(order)}
    # cluster tree
    children: Dict[str, List[str]] = defaultdict(list)
    members: Dict[str, List[str]] = defaultdict(list)
    seen_cluster = set()
    for n in order:
        cl = g.nodes[n]["clusters"]
        members[cl[-1] if cl else ""].append(n)
        for i, c in enumerate(cl):
            if c not in seen_cluster:
                seen_cluster.add(c)
                children[cl[i - 1] if i else ""].append(c)
    lines = [
        "digraph G {",
        f"  graph [rankdir={rankdir}, compound=true, newrank=true, nodesep=0.12, ranksep=0.22, mclimit=0.1, "
        f"nslimit=2, nslimit1=2, fontname=Helvetica, fontsize=11, label={_q(title or graph.model_id or graph.model_class)}, labelloc=t, outputorder=edgesfirst];",
        "  node [fontname=Helvetica, fontsize=9, height=0.22, margin=\"0.04,0.02\", style=filled, penwidth=0.6];",
        "  edge [arrowsize=0.45, penwidth=0.6, color=\"#555555\"];",
    ]

    def _innermost(n: str) -> str:
        cl = g.nodes[n]["clusters"]
        return cl[-1] if cl else ""

    broadcast = {n for n in order if len({g.nodes[s]["block"] for s in g.successors(n)} - {g.nodes[n]["block"]})
                 > BROADCAST_BLOCKS}
    proxies: Dict[tuple, str] = {}  # (source, target) -> proxy id, drawn beside the target
    proxy_members: Dict[str, List[tuple]] = defaultdict(list)
    for a in order:
        if a not in broadcast:
            continue
        for b in sorted(g.successors(a), key=lambda x: g.nodes[x]["order"]):
            if g.nodes[b]["block"] != g.nodes[a]["block"]:
                proxies[(a, b)] = f"p{len(proxies)}"
                proxy_members[_innermost(b)].append((a, b))

    def proxy_label(a: str) -> str:
        d = g.nodes[a]
        if a.startswith("input:"):
            return a[len("input:"):]
        if d["kind"] == "combine" and not d["scope"]:  # a top-level op: name it by what it combines
            return f"{d['op']}(" + ", ".join(sorted(g.predecessors(a))) + ")"
        return _short(d["role"])

    # the longest path (the residual stream, mostly): heavy edges keep it straight, so blocks stack
    # vertically instead of drifting sideways
    path = nx.dag_longest_path(g) if g.number_of_nodes() else []
    spine = set(zip(path[:-1], path[1:]))

    def node_line(n: str) -> str:
        return _node_line(n)

    def _node_line(n: str) -> str:
        d = g.nodes[n]
        if d["kind"] == "weight":
            label = _short(d["role"])
            if shapes and d.get("weight_shape"):
                label += "\\n" + "x".join(map(str, d["weight_shape"]))
            if config is not None:
                opt = config.get(n, "fp16")
                color = OPTION_COLORS.get(opt, "#ffffff")
                label += f"\\n{opt}"
            else:
                color = KIND_COLORS.get(d["op"], "#9ecae1")
            return f"{ids[n]} [label={_q(label)}, shape=box, fillcolor={_q(color)}, tooltip={_q(n)}];"
        if d["kind"] in ("input", "output"):
            shape = "invhouse" if d["kind"] == "input" else "house"
            label = n[len("input:"):] if n.startswith("input:") else n
            return f"{ids[n]} [label={_q(label)}, shape={shape}, fillcolor={_q(OP_COLORS['input'])}];"
        tag = d.get("role", "").rsplit(":", 1)[-1] if d.get("role") else d["op"]
        if d.get("role", "").endswith("#sum"):
            tag = "+split"
        color = OP_COLORS.get(d["op"], "#ffffff")
        return (f"{ids[n]} [label={_q(tag)}, shape=oval, fillcolor={_q(color)}, fontsize=8, height=0.16, "
                f"tooltip={_q(n)}];")

    def emit(cluster: str, indent: str) -> None:
        for n in members.get(cluster, []):
            lines.append(indent + node_line(n))
        for key in proxy_members.get(cluster, []):
            pid = proxies[key]
            lines.append(f"{indent}{pid} [label={_q('from ' + proxy_label(key[0]))}, shape=note, fontsize=7, "
                         f"height=0.14, fillcolor=\"#eeeeee\", color=\"#999999\", tooltip={_q(key[0])}];")
            lines.append(f"{indent}{{rank=same; {pid}; {ids[key[1]]};}}")
        for c in children.get(cluster, []):
            depth = c.count(".")
            fill = ["#f7fbff", "#fff7ec", "#f7fcf5", "#fcfbfd"][len(g.nodes[members[c][0]]["clusters"]) % 4] if members.get(c) else "#ffffff"
            lines.append(f"{indent}subgraph {_q('cluster_' + c)} {{")
            lines.append(f"{indent}  label={_q(c)}; style=\"rounded,filled\"; fillcolor={_q(fill)}; color=\"#999999\"; "
                         f"fontsize={max(8, 12 - depth)}; labeljust=l;")
            emit(c, indent + "  ")
            lines.append(indent + "}")

    emit("", "  ")
    # edges; a broadcast source's edges into other blocks go to a small proxy node in the target's block
    for a, b in sorted(g.edges, key=lambda e: (g.nodes[e[0]]["order"], g.nodes[e[1]]["order"])):
        if a in broadcast and g.nodes[a]["block"] != g.nodes[b]["block"]:
            lines.append(f"  {proxies[(a, b)]} -> {ids[b]} [color=\"#999999\", style=dashed];")
        elif (a, b) in spine:
            lines.append(f"  {ids[a]} -> {ids[b]} [weight=20];")
        else:
            lines.append(f"  {ids[a]} -> {ids[b]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_binary() -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise SensitivityError("graphviz's `dot` program is not installed (apt install graphviz / conda install graphviz)")
    return exe


def _run(args: Sequence[str], timeout: float) -> None:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SensitivityError(f"graphviz ({args[0]}) took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise SensitivityError(f"graphviz ({' '.join(args[:2])}) failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")


def _bbox_points(laid_out: str) -> tuple:
    m = re.search(r'\bbb="([-\d.]+),([-\d.]+),([-\d.]+),([-\d.]+)"', laid_out)
    if not m:
        return (0.0, 0.0)
    x0, y0, x1, y1 = map(float, m.groups())
    return (x1 - x0, y1 - y0)


def _has_pil() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def _png_columns(exe: str, laid: Path, out: Path, w_pt: float, h_pt: float, dpi: float, max_px: int,
                 timeout: float, tmp: Path) -> None:
    """A drawing too tall for one PNG at ``dpi``: cut it into horizontal bands, placed side by side."""
    from PIL import Image

    z = dpi / 72.0
    w_px, h_px = int(w_pt * z) + 1, int(h_pt * z) + 1
    n = -(-h_px // max_px)
    band_pt = h_pt / n
    band_px = int(band_pt * z) + 1
    sheet = Image.new("RGB", (w_px * n, band_px), "white")
    for i in range(n):
        cy = h_pt - (i + 0.5) * band_pt  # graphviz y grows upwards: band 0 is the top of the drawing
        part = tmp / f"band{i}.png"
        _run([exe, "-n2", "-Tpng", "-Gdpi=72", f"-Gviewport={w_px},{band_px},{z:.4f},{w_pt / 2:.2f},{cy:.2f}",
              str(laid), "-o", str(part)], timeout)
        with Image.open(part) as im:
            sheet.paste(im.convert("RGB"), (i * w_px, 0))
    sheet.save(out, optimize=True)


def draw(
    graph: DenoiserGraph,
    out: str | os.PathLike | Iterable[str | os.PathLike],
    config: Optional[Mapping[str, str]] = None,
    title: Optional[str] = None,
    shapes: bool = False,
    max_png_pixels: int = 32000,
    png_dpi: float = 96.0,
    timeout: float = 900.0,
) -> Dict[str, object]:
    """Draw ``graph`` to each path of ``out`` (``.svg``, ``.png``, ``.pdf`` or ``.dot``); returns sizes.

    The PNG is rendered at ``png_dpi``; a drawing taller than ``max_png_pixels`` at that resolution is cut
    into bands placed side by side (columns, read left to right), so the text stays readable and the
    whole graph is drawn (without Pillow the dpi is lowered to fit instead). Returns ``{"width_in", "height_in",
    "png_dpi", "png_pixels", "files"}``.
    """
    outs = [Path(out)] if isinstance(out, (str, os.PathLike)) else [Path(o) for o in out]
    for o in outs:
        if o.suffix.lower() not in (".svg", ".png", ".pdf", ".dot"):
            raise SensitivityError(f"{o}: plot format must be .svg, .png, .pdf or .dot")
    dot_src = to_dot(graph, config=config, title=title, shapes=shapes)
    exe = _dot_binary()
    neato = shutil.which("neato") or exe
    result: Dict[str, object] = {"files": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "graph.dot"
        src.write_text(dot_src)
        laid = Path(tmp) / "laid.dot"
        _run([exe, "-Tdot", str(src), "-o", str(laid)], timeout)
        laid_text = laid.read_text()
        w_pt, h_pt = _bbox_points(laid_text)
        result["width_in"], result["height_in"] = round(w_pt / 72.0, 2), round(h_pt / 72.0, 2)
        longest_in = max(w_pt, h_pt, 1.0) / 72.0
        dpi = min(png_dpi, max_png_pixels / longest_in)
        result["png_dpi"] = round(dpi, 2)
        result["png_pixels"] = [int(w_pt / 72.0 * dpi), int(h_pt / 72.0 * dpi)]
        for o in outs:
            o.parent.mkdir(parents=True, exist_ok=True)
            fmt = o.suffix.lower()[1:]
            tmp_out = Path(tmp) / f"out.{fmt}"
            if fmt == "dot":
                tmp_out.write_text(dot_src)
            elif fmt == "png" and dpi < png_dpi and _has_pil():
                _png_columns(neato, laid, tmp_out, w_pt, h_pt, png_dpi, max_png_pixels, timeout, Path(tmp))
                n_cols = -(-int(h_pt / 72.0 * png_dpi + 1) // max_png_pixels)
                result["png_dpi"] = png_dpi
                result["png_pixels"] = [int(w_pt / 72.0 * png_dpi + 1) * n_cols, int(h_pt / 72.0 * png_dpi / n_cols + 1)]
            else:
                args = [neato, "-n2", f"-T{fmt}", str(laid), "-o", str(tmp_out)]
                if fmt == "png":
                    args.insert(2, f"-Gdpi={dpi:.3f}")
                _run(args, timeout)
            with atomic_path(o, "plot") as final:
                shutil.copyfile(tmp_out, final)
            result["files"].append(str(o))
    return result
