"""Insights: where the predictor sees sensitivity, and what a config spends its bits on.

Tables are pandas DataFrames; figures are matplotlib ``Figure`` objects (Agg backend, nothing is
shown; save them with ``fig.savefig``). Every layer is described by its **block** and **op type**,
derived from the layer name by :func:`describe_layer` with rules for diffusers' DiT / PixArt /
Hunyuan-DiT transformers and UNets (SD1.5, SDXL, the digits UNet):

========================================================  ==========  ============  =========
layer name                                                block       op_type       op_group
========================================================  ==========  ============  =========
``transformer_blocks.3.attn1.to_q``                       ``3``       ``SA-Q``      ``SA``
``blocks.25.attn2.to_out.0`` (Hunyuan)                    ``25``      ``CA-Out``    ``CA``
``transformer_blocks.0.norm1.emb.timestep_embedder.linear_1``  ``embed``  ``t-Embed``  ``Embed``
``caption_projection.linear_1``                           ``embed``   ``c-Embed``   ``Embed``
``down_blocks.1.attentions.0.transformer_blocks.2.ff.net.2``  ``down.1``  ``FF2``   ``FF``
``up_blocks.0.resnets.1.conv1#skip``                      ``up.0``    ``Res-Conv1#skip``  ``Res``
``pos_embed.proj`` / ``proj_out_2``                       ``embed`` / ``out``  ``Patchify`` / ``Out``  ``IO``
========================================================  ==========  ============  =========

``block_rank`` orders blocks along the network (embed < down.* < mid < up.* / 0..N-1 < out).

Tables (documented columns; extra columns may follow):

* :func:`layer_table`  — ``layer, block, block_rank, op_type, op_group`` (+ ``numel, fp16_bytes``).
* :func:`score_table`  — per (layer, option) predictor score: ``layer, option, method, bits, score,
  block, block_rank, op_type, op_group``.
* :func:`module_score_table` — per scored module combination: ``module, block, block_rank, op_type,
  combination, mean_bits, score``.
* :func:`config_table` — per layer of a config: ``layer, block, block_rank, op_type, op_group,
  option, method, bits, nbytes, fp16_bytes, bits_per_weight, score, error``.
* :func:`option_mix`   — counts (or fractions) of each option per op type / block / op group.
* :func:`score_summary` — ``count, mean, std, min, median, max, range`` of the score per group.
* :func:`pareto_table` — ``source, label, avg_bits, <metric>, predicted, pareto`` for cached
  configs (``source="cache"``) and searched / baseline configs.

Figures: :func:`score_boxplot` (score distribution per block or op type: a wide box or high
outliers = a sensitive place), :func:`option_mix_barplot` (the option mix of a config per op type
or block), :func:`pareto_plot` (quality vs average bits: cache vs searched configs).
:func:`write_insights` writes all of them (CSV + PNG) to a folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .config import QuantConfig, as_options
from .errors import SensitivityError
from .options import OPTION_NAMES, QuantOption, canonical
from .sizes import SizeTable
from .zoo.naming import DIFFUSERS_NAMING, LayerInfo  # noqa: F401 - LayerInfo re-exported

LAYER_COLUMNS = ("layer", "block", "block_rank", "op_type", "op_group")
SCORE_COLUMNS = ("layer", "option", "method", "bits", "score", "block", "block_rank", "op_type", "op_group")
MODULE_SCORE_COLUMNS = ("module", "block", "block_rank", "op_type", "combination", "mean_bits", "score")
CONFIG_COLUMNS = ("layer", "block", "block_rank", "op_type", "op_group", "option", "method", "bits", "nbytes",
                  "fp16_bytes", "bits_per_weight", "score", "error")
PARETO_COLUMNS = ("source", "label", "avg_bits", "predicted", "pareto")

# colours: one hue per method, darker for 4 bits (fp16 grey)
OPTION_COLORS = {
    "uaq-4": "#1f5fa8", "uaq-3": "#7fb0e0",
    "kmeans_c-4": "#2a8a3e", "kmeans_c-3": "#94d09c",
    "kmeans_a-4": "#c0620e", "kmeans_a-3": "#f3b374",
    "fp16": "#9e9e9e",
}


# ---------------------------------------------------------------------------------------------
# layer names -> block, op type
# ---------------------------------------------------------------------------------------------


def _family_of(source: Any) -> Any:
    """The zoo family of a multiquantizer / graph (its ``model_id`` ``family:weights``), or None."""
    from .zoo import list_families

    mid = getattr(source, "model_id", None)
    name = str(mid).split(":", 1)[0] if mid else None
    return name if name in list_families() or (name or "").startswith("diffusers-") else None


def family_naming(family: Any) -> Any:
    """``family``'s naming rules, traced first for a family that derives them from its graph (the generic
    diffusers families: :mod:`sensitivity.zoo.graph_naming`; on their offline ``tiny`` build, once)."""
    from .zoo import get_family

    fam = get_family(family)
    if getattr(fam, "needs_graph_naming", False) and getattr(fam, "naming_weights", None) \
            and not fam.__dict__.get("_graph_naming_failed"):
        from .graph import family_graph

        try:
            fam.use_graph(family_graph(fam, fam.naming_weights))
        except SensitivityError:
            fam.__dict__["_graph_naming_failed"] = True  # the name rules stay
    return fam.layer_naming


def describe_layer(name: str, family: Any = None) -> LayerInfo:
    """Block and op type of a layer name by ``family``'s naming rules (a family name or object; default:
    the diffusers rules every built-in family uses). ``#main`` / ``#skip`` halves keep their suffix."""
    if family is None:
        return DIFFUSERS_NAMING.describe(name)
    return family_naming(family).describe(name)


def _layer_names(source: Any) -> List[str]:
    if hasattr(source, "layer_names"):
        return list(source.layer_names)
    if isinstance(source, pd.DataFrame):
        return list(dict.fromkeys(source["layer"]))
    if isinstance(source, Mapping):
        return list(source)
    names = []
    for item in source:
        names.append(item.name if hasattr(item, "name") else str(item))
    return names


def layer_table(source: Any) -> pd.DataFrame:
    """One row per layer: ``layer, block, block_rank, op_type, op_group`` (+ ``numel, fp16_bytes``).

    ``source``: a multiquantizer, a list of LayerSpec or names, a ``{layer: shape}`` mapping, or a
    DataFrame with a ``layer`` column.
    """
    rows = []
    specs = getattr(source, "layers", None) if not isinstance(source, (pd.DataFrame, Mapping)) else None
    specs = specs if specs is not None else (source if isinstance(source, (list, tuple)) else None)
    family = _family_of(source)
    for i, name in enumerate(_layer_names(source)):
        info = describe_layer(name, family)
        row = {"layer": name, "block": info.block, "block_rank": info.block_rank, "op_type": info.op_type,
               "op_group": info.op_group}
        spec = specs[i] if specs is not None and i < len(specs) and hasattr(specs[i], "numel") else None
        if spec is not None:
            row.update(numel=int(spec.numel), fp16_bytes=int(spec.fp16_bytes))
        elif isinstance(source, Mapping) and not isinstance(source, pd.DataFrame):
            shape = source[name]
            if isinstance(shape, (tuple, list)):
                n = int(np.prod(shape))
                row.update(numel=n, fp16_bytes=2 * n)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else list(LAYER_COLUMNS))


def _with_layer_info(df: pd.DataFrame) -> pd.DataFrame:
    infos = {l: describe_layer(l) for l in dict.fromkeys(df["layer"])}
    df = df.copy()
    df["block"] = [infos[l].block for l in df["layer"]]
    df["block_rank"] = [infos[l].block_rank for l in df["layer"]]
    df["op_type"] = [infos[l].op_type for l in df["layer"]]
    df["op_group"] = [infos[l].op_group for l in df["layer"]]
    return df


def _method_bits(options: Iterable[str]) -> Tuple[List[str], List[int]]:
    parsed = [QuantOption.parse(o) for o in options]
    return [p.method for p in parsed], [p.bits for p in parsed]


def score_table(layer_scores: pd.DataFrame) -> pd.DataFrame:
    """Predictor scores per (layer, option) with option and layer info; columns :data:`SCORE_COLUMNS`."""
    need = {"layer", "option", "score"} - set(layer_scores.columns)
    if need:
        raise SensitivityError(f"layer scores lack columns {sorted(need)}")
    df = layer_scores[["layer", "option", "score"]].copy()
    df["option"] = [canonical(o) for o in df["option"]]
    df["method"], df["bits"] = _method_bits(df["option"])
    df["score"] = df["score"].astype(float)
    df = _with_layer_info(df)
    return df[list(SCORE_COLUMNS)].reset_index(drop=True)


def module_score_table(module_scores: pd.DataFrame) -> pd.DataFrame:
    """One row per scored module combination; columns :data:`MODULE_SCORE_COLUMNS`.

    ``block`` / ``op_type`` are those of the module's layers (joined with ``+`` when they differ).
    """
    need = {"module", "layers", "options", "score"} - set(module_scores.columns)
    if need:
        raise SensitivityError(f"module scores lack columns {sorted(need)}")
    rows = []
    cache: Dict[tuple, Tuple[str, int, str]] = {}
    for module, layers, options, score in zip(module_scores["module"], module_scores["layers"],
                                               module_scores["options"], module_scores["score"]):
        layers = tuple(layers)
        if layers not in cache:
            infos = [describe_layer(l) for l in layers]
            blocks = list(dict.fromkeys(i.block for i in infos))
            ops = list(dict.fromkeys(i.op_group for i in infos))
            cache[layers] = ("+".join(blocks), min(i.block_rank for i in infos), "+".join(ops))
        block, rank, op = cache[layers]
        opts = [canonical(o) for o in options]
        rows.append({"module": str(module), "block": block, "block_rank": rank, "op_type": op,
                     "combination": ",".join(opts), "mean_bits": float(np.mean(_method_bits(opts)[1])),
                     "score": float(score)})
    return pd.DataFrame(rows, columns=list(MODULE_SCORE_COLUMNS))


def _size_frame(sizes: Any) -> Optional[pd.DataFrame]:
    """The DataFrame view of a size table (a :class:`~sensitivity.sizes.SizeTable` or its frame)."""
    return sizes.frame() if isinstance(sizes, SizeTable) else sizes


def config_table(config: QuantConfig | Mapping[str, str], sizes: Optional[pd.DataFrame] = None,
                 scores: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per layer of a config; columns :data:`CONFIG_COLUMNS`.

    ``sizes``: a size table (:func:`sensitivity.search.size_table`, e.g. ``mq.stats_frame()``) for
    ``nbytes``, ``fp16_bytes``, ``bits_per_weight`` and ``error``; its layers absent from the config
    appear as ``fp16``. ``scores``: predictor layer scores (``layer, option, score``). Missing values are NaN.
    """
    options = as_options(config)
    sizes = _size_frame(sizes)
    layers = list(dict.fromkeys(sizes["layer"])) if sizes is not None else list(options)
    extra = [l for l in options if sizes is not None and l not in set(layers)]
    if extra:
        raise SensitivityError(f"config layer {extra[0]!r} is not in the multiquantizer")
    df = pd.DataFrame({"layer": layers, "option": [options.get(l, "fp16") for l in layers]})
    df["method"], df["bits"] = _method_bits(df["option"])
    df = _with_layer_info(df)
    df["nbytes"] = np.nan
    df["fp16_bytes"] = np.nan
    df["error"] = np.nan
    if sizes is not None:
        fp = sizes.drop_duplicates("layer").set_index("layer")["fp16_bytes"]
        df["fp16_bytes"] = df["layer"].map(fp).astype(float)
        key = sizes.set_index(["layer", "option"])
        idx = pd.MultiIndex.from_arrays([df["layer"], df["option"]])
        nb = key["nbytes"].reindex(idx).to_numpy(dtype=float)
        is_fp = (df["option"] == "fp16").to_numpy()
        df["nbytes"] = np.where(is_fp, df["fp16_bytes"], nb)
        if "error" in key.columns:
            df["error"] = np.where(is_fp, 0.0, key["error"].reindex(idx).to_numpy(dtype=float))
    df["bits_per_weight"] = 16.0 * df["nbytes"] / df["fp16_bytes"]
    df["score"] = np.nan
    if scores is not None:
        lut = {(l, canonical(o)): float(s) for l, o, s in zip(scores["layer"], scores["option"], scores["score"])}
        df["score"] = [lut.get((l, o), np.nan) for l, o in zip(df["layer"], df["option"])]
    return df[list(CONFIG_COLUMNS)]


def _ordered(df: pd.DataFrame, by: str) -> List[str]:
    if by == "block":
        return list(df.sort_values("block_rank", kind="stable")["block"].drop_duplicates())
    return list(dict.fromkeys(df[by]))


def option_mix(table: pd.DataFrame, by: str = "op_type", normalize: bool = False) -> pd.DataFrame:
    """Number (or fraction, ``normalize``) of layers per option for each ``by`` value (rows in network
    order; option columns in the canonical order)."""
    if by not in table.columns:
        raise SensitivityError(f"option_mix: no column {by!r} (have {list(table.columns)})")
    counts = pd.crosstab(table[by], table["option"])
    cols = [o for o in (*OPTION_NAMES, "fp16") if o in counts.columns] + [c for c in counts.columns if c not in OPTION_NAMES and c != "fp16"]
    counts = counts.reindex(index=_ordered(table, by), columns=cols).fillna(0).astype(int)
    counts.columns.name = "option"
    if normalize:
        return counts.div(counts.sum(axis=1), axis=0)
    return counts


def score_summary(table: pd.DataFrame, by: str = "op_type", value: str = "score") -> pd.DataFrame:
    """``count, mean, std, min, median, max, range`` of ``value`` per ``by`` (network order)."""
    g = table.groupby(by, sort=False)[value]
    out = pd.DataFrame({"count": g.count(), "mean": g.mean(), "std": g.std(), "min": g.min(),
                        "median": g.median(), "max": g.max()})
    out["range"] = out["max"] - out["min"]
    return out.reindex(_ordered(table, by))


def pareto_mask(x: np.ndarray, y: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Points not dominated by another with fewer-or-equal bits and better-or-equal quality."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    yy = y if lower_is_better else -y
    out = np.zeros(x.size, dtype=bool)
    best = np.inf
    for i in np.lexsort((yy, x)):
        if np.isfinite(yy[i]) and yy[i] < best:
            out[i] = True
            best = yy[i]
    return out


def _hash(options: Mapping[str, str]) -> str:
    """The cache's config hash (:func:`sensitivity.config.config_hash`)."""
    from .config import config_hash

    return config_hash(dict(options))


def pareto_table(records: Optional[Iterable[Mapping[str, Any]]] = None, results: Sequence[Any] = (),
                 metric: str = "fid", sizes: Optional[pd.DataFrame] = None,
                 lower_is_better: Optional[bool] = None) -> pd.DataFrame:
    """Cached configs and searched / baseline configs on one table; columns :data:`PARETO_COLUMNS`
    plus ``metric`` (the cache metric; NaN for configs not evaluated).

    ``records``: cache records (``config``, ``avg_bits``, ``metrics``); their avg bits are recomputed
    from ``sizes`` when given. ``results``: :class:`sensitivity.search.SearchResult` objects (or
    dicts with ``label``/``method``, ``avg_bits`` and optionally ``predicted`` and ``metric``).
    ``pareto`` marks the cache configs on the cache's own Pareto front (bits vs metric).
    """
    from .evaluation.metric_specs import lower_is_better as _lower, record_metric

    lower = _lower(metric, lower_is_better)
    table = SizeTable.of(sizes) if sizes is not None else None
    records = list(records or ())
    evaluated = {}  # config hash -> metric, so a searched config that was evaluated shows its metric
    for rec in records:
        v = record_metric(rec, metric)
        if v is not None and rec.get("config"):
            evaluated[_hash(rec["config"])] = v
    rows = []
    for rec in records:
        v = record_metric(rec, metric)
        bits = table.avg_bits(as_options(rec["config"])) if table is not None else rec.get("avg_bits")
        rows.append({"source": "cache", "label": str(rec.get("config_hash") or rec.get("index") or ""),
                     "avg_bits": float(bits) if bits is not None else np.nan, metric: np.nan if v is None else v,
                     "predicted": rec.get("predicted", np.nan)})
    for r in results:
        if isinstance(r, Mapping):
            label = r.get("label") or r.get("method")
            bits, pred, val = r.get("avg_bits"), r.get("predicted"), r.get(metric)
            src = r.get("source") or r.get("method") or "config"
        else:
            label = r.method if r.target_bits is None or r.method.startswith("uniform") else f"{r.method}@{r.target_bits:g}"
            bits, pred = r.avg_bits, r.predicted
            val = r.details.get("metric_value") if r.details.get("metric") == metric else r.details.get(metric)
            if val is None:
                val = evaluated.get(_hash(r.options))
            src = r.method.split("-")[0] if r.method.startswith(("uniform", "cache")) else r.method
        rows.append({"source": src, "label": label, "avg_bits": float(bits),
                     metric: np.nan if val is None else float(val),
                     "predicted": np.nan if pred is None else float(pred)})
    df = pd.DataFrame(rows, columns=["source", "label", "avg_bits", metric, "predicted"])
    df["pareto"] = False
    cache = df["source"] == "cache"
    if cache.any():
        df.loc[cache, "pareto"] = pareto_mask(df.loc[cache, "avg_bits"], df.loc[cache, metric], lower)
    return df[["source", "label", "avg_bits", "predicted", "pareto", metric]]


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline",
                                                "module://ipykernel.pylab.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_boxplot(table: pd.DataFrame, by: str = "block", value: str = "score", title: Optional[str] = None,
                  hue: Optional[str] = None):
    """Box plot of ``value`` per ``by`` (network order): wide boxes and high outliers = sensitive places.

    ``hue``: optional column (e.g. ``bits``) splitting each box. Returns a matplotlib Figure.
    """
    plt = _plt()
    if by not in table.columns or value not in table.columns:
        raise SensitivityError(f"score_boxplot: need columns {by!r} and {value!r}")
    keys = _ordered(table, by)
    hues = [None] if hue is None else sorted(table[hue].dropna().unique(), reverse=True)
    width = max(6.0, 0.45 * len(keys) * max(1, len(hues)) + 2)
    fig, ax = plt.subplots(figsize=(min(width, 24), 4.2))
    step = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = table if h is None else table[table[hue] == h]
        data = [sub.loc[sub[by] == k, value].dropna().to_numpy() for k in keys]
        pos = np.arange(len(keys)) + (j - (len(hues) - 1) / 2) * step
        bp = ax.boxplot(data, positions=pos, widths=step * 0.85, patch_artist=True, showfliers=True,
                        flierprops={"markersize": 3})
        color = "#7fb0e0" if h is None else plt.cm.viridis(j / max(1, len(hues) - 1))
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.8)
        if h is not None:
            ax.plot([], [], "s", color=color, label=f"{hue} {h}")
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels(keys, rotation=45 if len(keys) > 8 or max(map(len, map(str, keys))) > 6 else 0,
                       ha="right" if len(keys) > 8 else "center")
    ax.set_xlabel(by)
    ax.set_ylabel(value)
    ax.grid(axis="y", alpha=0.3)
    if hue is not None:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"{value} per {by}")
    fig.tight_layout()
    return fig


def option_mix_barplot(table: pd.DataFrame, by: str = "op_type", normalize: bool = True, title: Optional[str] = None):
    """Stacked bars: the option mix of a config (``config_table``) per ``by``. Returns a Figure."""
    plt = _plt()
    mix = option_mix(table, by=by, normalize=normalize)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.5 * len(mix) + 3), 24), 4.2))
    bottom = np.zeros(len(mix))
    x = np.arange(len(mix))
    for opt in mix.columns:
        vals = mix[opt].to_numpy(dtype=float)
        ax.bar(x, vals, bottom=bottom, color=OPTION_COLORS.get(opt, None), label=opt, width=0.8,
               edgecolor="white", linewidth=0.5)
        bottom += vals
    ax.set_xticks(x)
    ax.set_xticklabels(mix.index, rotation=45 if len(mix) > 6 else 0, ha="right" if len(mix) > 6 else "center")
    ax.set_ylabel("fraction of layers" if normalize else "layers")
    ax.set_xlabel(by)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left", title="option")
    ax.set_title(title or f"option mix per {by}")
    fig.tight_layout()
    return fig


def pareto_plot(table: pd.DataFrame, y: str = "fid", title: Optional[str] = None,
                lower_is_better: Optional[bool] = None, cache_label: str = "cache"):
    """Quality (``y``: a metric or ``predicted``) vs average bits: cache configs (grey, Pareto front
    connected) and searched / baseline configs (one marker style per source). ``cache_label`` names
    the grey points in the legend (say so when they were measured on other images). Returns a Figure."""
    from .evaluation.metric_specs import lower_is_better as _lower

    plt = _plt()
    if y not in table.columns:
        raise SensitivityError(f"pareto_plot: no column {y!r} (have {list(table.columns)})")
    lower = _lower(y, lower_is_better)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cache = table[(table["source"] == "cache") & table[y].notna()]
    if len(cache):
        ax.scatter(cache["avg_bits"], cache[y], s=12, color="#9e9e9e", alpha=0.7, label=f"{cache_label} ({len(cache)})")
        front = cache[pareto_mask(cache["avg_bits"], cache[y], lower)].sort_values("avg_bits")
        ax.plot(front["avg_bits"], front[y], "-", color="#616161", lw=1, label="cache Pareto front")
    markers = iter(["o", "s", "^", "D", "v", "P", "X", "*"])
    colors = iter(plt.cm.tab10.colors)
    for src, sub in table[(table["source"] != "cache") & table[y].notna()].groupby("source", sort=False):
        sub = sub.sort_values("avg_bits")
        line = "-" if len(sub) > 1 and src.startswith("search") else "none"
        color = next(colors)
        ax.plot(sub["avg_bits"], sub[y], linestyle=line, marker=next(markers, "o"), color=color, ms=6, label=src)
        if line == "none":  # baselines: name each point that says more than legend + x (the uniform option)
            for xb, yb, lab in zip(sub["avg_bits"], sub[y], sub["label"]):
                if "@" in str(lab):  # "<method>@<target>": the legend and the x axis say it already
                    continue
                ax.annotate(str(lab).replace("uniform-", ""), (xb, yb), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
    ax.set_xlabel("average bits")
    ax.set_ylabel(y + (" (lower is better)" if lower else " (higher is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"{y} vs average bits")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# all at once
# ---------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "config"


def write_insights(out_dir: str | os.PathLike, layer_scores: Optional[pd.DataFrame] = None,
                   configs: Mapping[str, QuantConfig | Mapping[str, str]] | None = None,
                   sizes: Optional[pd.DataFrame] = None, module_scores: Optional[pd.DataFrame] = None,
                   records: Optional[Sequence[Mapping[str, Any]]] = None, results: Sequence[Any] = (),
                   metric: str = "fid", dpi: int = 110, cache_label: str = "cache") -> List[Path]:
    """Write every table (CSV) and figure (PNG) that the inputs allow to ``out_dir``; returns the paths.

    ``configs``: ``{name: config}``; ``records``: cache records; ``results``: SearchResults for the
    Pareto plot. Files: ``scores.csv``, ``scores_by_{block,op_type}.csv``, ``box_{block,op_type}.png``,
    ``modules.csv``, ``box_modules_block.png``, ``config_<name>.csv``, ``mix_<name>.csv``,
    ``mix_<name>_{op_type,block}.png``, ``pareto.csv``, ``pareto_<metric|predicted>.png``.
    ``cache_label``: legend name of the cache points in the Pareto plots.
    """
    plt = _plt()
    from .io import atomic_path, check_writable

    out = check_writable(out_dir, "insights folder", directory=True)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def save_csv(df: pd.DataFrame, name: str, index: bool = False) -> None:
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=index)
        written.append(out / name)

    def save_fig(fig, name: str) -> None:
        try:
            with atomic_path(out / name) as tmp:
                fig.savefig(tmp, dpi=dpi)
        finally:
            plt.close(fig)
        written.append(out / name)

    st = None
    if layer_scores is not None:
        st = score_table(layer_scores)
        save_csv(st, "scores.csv")
        for by in ("block", "op_type"):
            save_csv(score_summary(st, by), f"scores_by_{by}.csv", index=True)
            save_fig(score_boxplot(st, by=by, hue="bits"), f"box_{by}.png")
    if module_scores is not None and len(module_scores):
        mt = module_score_table(module_scores)
        save_csv(mt, "modules.csv")
        save_fig(score_boxplot(mt, by="block", title="module combination scores per block"), "box_modules_block.png")
    for name, cfg in (configs or {}).items():
        ct = config_table(cfg, sizes=sizes, scores=layer_scores)
        slug = _slug(name)
        save_csv(ct, f"config_{slug}.csv")
        save_csv(option_mix(ct, "op_type"), f"mix_{slug}.csv", index=True)
        avg = f" ({SizeTable.of(sizes).avg_bits(as_options(cfg)):.3f} avg bits)" if sizes is not None else ""
        for by in ("op_type", "block"):
            save_fig(option_mix_barplot(ct, by=by, title=f"{name}{avg}: option mix per {by}"), f"mix_{slug}_{by}.png")
    if records or results:
        pt = pareto_table(records, results, metric=metric, sizes=sizes)
        save_csv(pt, "pareto.csv")
        for y in (metric, "predicted"):
            if pt[y].notna().any():
                save_fig(pareto_plot(pt, y=y, cache_label=cache_label), f"pareto_{_slug(y)}.png")
    return written


def save_figure(fig: Any, path: Union[str, os.PathLike], dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``path`` atomically (the format from its suffix), then close it."""
    import matplotlib.pyplot as plt

    from .io import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
