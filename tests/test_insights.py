"""sensitivity.insights: layer-name rules, DataFrames with the documented columns, figures, write_insights."""

import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from sensitivity import insights as I
from sensitivity.errors import SensitivityError
from sensitivity.options import OPTION_NAMES, QuantOption
from sensitivity.search import config_bytes, search_scores, size_table, uniform_configs

NAMES = {
    # DiT / digits-dit
    "transformer_blocks.3.attn1.to_q": ("3", 3, "SA-Q", "SA"),
    "transformer_blocks.3.attn1.to_out.0": ("3", 3, "SA-Out", "SA"),
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": ("embed", -1, "t-Embed", "Embed"),
    "transformer_blocks.5.norm1.linear": ("5", 5, "AdaLN", "AdaLN"),
    "transformer_blocks.5.ff.net.0.proj": ("5", 5, "FF1", "FF"),
    "transformer_blocks.5.ff.net.2": ("5", 5, "FF2", "FF"),
    "pos_embed.proj": ("embed", -1, "Patchify", "IO"),
    "proj_out_1": ("out", 10_000, "Out-AdaLN", "IO"),
    "proj_out_2": ("out", 10_000, "Out", "IO"),
    # PixArt
    "transformer_blocks.27.attn2.to_k": ("27", 27, "CA-K", "CA"),
    "adaln_single.linear": ("embed", -1, "t-Embed", "Embed"),
    "adaln_single.emb.timestep_embedder.linear_2": ("embed", -1, "t-Embed", "Embed"),
    "caption_projection.linear_1": ("embed", -1, "c-Embed", "Embed"),
    "proj_out": ("out", 10_000, "Out", "IO"),
    # Hunyuan-DiT
    "blocks.25.skip_linear": ("25", 25, "Skip-Linear", "Skip"),
    "blocks.25.attn2.to_out.0": ("25", 25, "CA-Out", "CA"),
    "text_embedder.linear_1": ("embed", -1, "c-Embed", "Embed"),
    "time_extra_emb.timestep_embedder.linear_1": ("embed", -1, "t-Embed", "Embed"),
    "time_extra_emb.extra_embedder.linear_2": ("embed", -1, "c-Embed", "Embed"),
    "norm_out.linear": ("out", 10_000, "Out-AdaLN", "IO"),
    # SD1.5 / SDXL UNet
    "down_blocks.1.attentions.0.transformer_blocks.2.ff.net.2": ("down.1", 1, "FF2", "FF"),
    "down_blocks.1.attentions.0.proj_in": ("down.1", 1, "Proj-In", "Attn-IO"),
    "down_blocks.0.downsamplers.0.conv": ("down.0", 0, "Downsample", "Sample"),
    "mid_block.resnets.1.time_emb_proj": ("mid", 1000, "Res-TEmb", "Res"),
    "up_blocks.0.resnets.1.conv1#skip": ("up.0", 2000, "Res-Conv1#skip", "Res"),
    "up_blocks.2.resnets.0.conv_shortcut#main": ("up.2", 2002, "Res-Shortcut#main", "Res"),
    "up_blocks.1.upsamplers.0.conv": ("up.1", 2001, "Upsample", "Sample"),
    "conv_in": ("embed", -1, "Conv-In", "IO"),
    "conv_out": ("out", 10_000, "Out", "IO"),
    "time_embedding.linear_1": ("embed", -1, "t-Embed", "Embed"),
    "add_embedding.linear_2": ("embed", -1, "c-Embed", "Embed"),
    # digits UNet (UNet2DModel attention has no attn1)
    "up_blocks.0.attentions.1.to_v": ("up.0", 2000, "SA-V", "SA"),
    "mid_block.attentions.0.to_out.0": ("mid", 1000, "SA-Out", "SA"),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_describe_layer(name):
    info = I.describe_layer(name)
    assert (info.block, info.block_rank, info.op_type, info.op_group) == NAMES[name]


def test_describe_unknown_layer_falls_back():
    info = I.describe_layer("foo.3.bar")
    assert info.op_type == "foo.bar" and info.op_group == "Other"


SHAPES = {
    "pos_embed.proj": (128, 4, 2, 2),
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": (128, 256),
    "transformer_blocks.0.attn1.to_q": (128, 128),
    "transformer_blocks.0.attn1.to_k": (128, 128),
    "transformer_blocks.0.ff.net.0.proj": (512, 128),
    "transformer_blocks.0.ff.net.2": (128, 512),
    "transformer_blocks.1.attn1.to_q": (128, 128),
    "transformer_blocks.1.attn1.to_k": (128, 128),
    "transformer_blocks.1.ff.net.2": (128, 512),
    "proj_out_2": (16, 128),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    sizes = size_table(SHAPES, OPTION_NAMES)
    bits = sizes["option"].map(lambda o: QuantOption.parse(o).bits).to_numpy()
    sizes = sizes.assign(error=rng.uniform(0.5, 1.5, len(sizes)) * 4.0 ** (-bits))
    scores = sizes[["layer", "option"]].assign(score=-sizes["error"] * rng.uniform(0.5, 1.5, len(sizes)))
    records = []
    for i in range(40):
        p = rng.uniform()
        cfg = {l: f"{rng.choice(['uaq', 'kmeans_c', 'kmeans_a'])}-{3 if rng.uniform() < p else 4}" for l in SHAPES}
        records.append({"index": i, "config_hash": f"h{i}", "config": cfg, "metrics": {"fid": 20 + 30 * p + rng.normal()}})
    return sizes, scores, records


def test_layer_table_columns():
    df = I.layer_table(SHAPES)
    assert tuple(df.columns[:5]) == I.LAYER_COLUMNS
    assert list(df["layer"]) == list(SHAPES)
    assert (df["fp16_bytes"] == [2 * np.prod(s) for s in SHAPES.values()]).all()
    assert tuple(I.layer_table(list(SHAPES)).columns) == I.LAYER_COLUMNS


def test_score_table_and_summary(data):
    sizes, scores, _ = data
    st = I.score_table(scores)
    assert tuple(st.columns) == I.SCORE_COLUMNS
    assert len(st) == len(SHAPES) * len(OPTION_NAMES)
    assert set(st["bits"]) == {3, 4} and set(st["method"]) == {"uaq", "kmeans_c", "kmeans_a"}
    for by in ("block", "op_type", "op_group"):
        summ = I.score_summary(st, by)
        assert list(summ.columns) == ["count", "mean", "std", "min", "median", "max", "range"]
        assert summ["count"].sum() == len(st)
        np.testing.assert_allclose(summ["range"], summ["max"] - summ["min"])
    assert list(I.score_summary(st, "block").index) == ["embed", "0", "1", "out"]  # network order
    with pytest.raises(SensitivityError):
        I.score_table(scores.drop(columns="score"))


def test_module_score_table():
    layers = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k")
    rows = [{"module": "b0.attn", "layers": layers, "options": c, "score": float(i)}
            for i, c in enumerate(itertools.product(["uaq-4", "kmeans_a-3"], repeat=2))]
    mt = I.module_score_table(pd.DataFrame(rows))
    assert tuple(mt.columns) == I.MODULE_SCORE_COLUMNS
    assert set(mt["block"]) == {"0"} and set(mt["op_type"]) == {"SA"}
    assert sorted(mt["mean_bits"]) == [3.0, 3.5, 3.5, 4.0]


def test_config_table_and_option_mix(data):
    sizes, scores, _ = data
    res = search_scores(scores, sizes, 3.7)
    ct = I.config_table(res.to_config(), sizes=sizes, scores=scores)
    assert tuple(ct.columns) == I.CONFIG_COLUMNS
    assert int(ct["nbytes"].sum()) == res.quantized_bytes
    assert 16 * ct["nbytes"].sum() / ct["fp16_bytes"].sum() == pytest.approx(res.avg_bits)
    assert ct["score"].sum() == pytest.approx(res.objective)
    assert ct["error"].notna().all()
    mix = I.option_mix(ct, "op_type")
    assert mix.values.sum() == len(SHAPES)
    assert list(mix.columns) == [o for o in OPTION_NAMES if o in set(ct["option"])]
    frac = I.option_mix(ct, "block", normalize=True)
    np.testing.assert_allclose(frac.sum(axis=1), 1.0)
    # a partial config: the other layers are fp16 and cost their full size
    part = I.config_table({"proj_out_2": "uaq-3"}, sizes=sizes)
    assert (part["option"] == "fp16").sum() == len(SHAPES) - 1
    q, fp = config_bytes({"proj_out_2": "uaq-3"}, sizes)
    assert int(part["nbytes"].sum()) == q and int(part["fp16_bytes"].sum()) == fp
    with pytest.raises(SensitivityError, match="not_a_layer"):
        I.config_table({"not_a_layer": "uaq-4"}, sizes=sizes)


def test_pareto_table_and_mask(data):
    sizes, scores, records = data
    results = [search_scores(scores, sizes, t) for t in (3.4, 3.8)] + uniform_configs(sizes)
    results[0].predicted = -1.0
    pt = I.pareto_table(records, results, metric="fid", sizes=sizes)
    assert tuple(pt.columns[:5]) == I.PARETO_COLUMNS and "fid" in pt.columns
    cache = pt[pt["source"] == "cache"]
    assert len(cache) == len(records) and len(pt) == len(records) + len(results)
    # the Pareto flag agrees with a direct check: no other cached config is at most as large and better
    for i, row in cache.iterrows():
        dominated = ((cache["avg_bits"] <= row["avg_bits"]) & (cache["fid"] < row["fid"])).any()
        assert row["pareto"] == (not dominated)
    # a searched config that was evaluated gets its cached metric
    rec = dict(records[0], config=dict(results[1].options), config_hash="same", metrics={"fid": 12.5})
    pt2 = I.pareto_table(records + [rec], results, metric="fid", sizes=sizes)
    assert pt2.loc[pt2["label"] == "search-layer@3.8", "fid"].item() == 12.5


def test_figures(data, tmp_path):
    sizes, scores, records = data
    st = I.score_table(scores)
    ct = I.config_table(search_scores(scores, sizes, 3.6).to_config(), sizes=sizes)
    pt = I.pareto_table(records, [search_scores(scores, sizes, t) for t in (3.4, 3.8)], sizes=sizes)
    figs = [I.score_boxplot(st, by="block", hue="bits"), I.score_boxplot(st, by="op_type"),
            I.option_mix_barplot(ct, by="op_type"), I.pareto_plot(pt, y="fid")]
    for k, fig in enumerate(figs):
        assert fig.axes and fig.axes[0].get_xlabel()
        path = tmp_path / f"f{k}.png"
        fig.savefig(path)
        assert path.stat().st_size > 5_000
    labels = [t.get_text() for t in figs[0].axes[0].get_xticklabels()]
    assert labels == ["embed", "0", "1", "out"]
    with pytest.raises(SensitivityError):
        I.pareto_plot(pt, y="kid")


def test_write_insights(data, tmp_path):
    sizes, scores, records = data
    res = [search_scores(scores, sizes, t) for t in (3.4, 3.8)]
    written = I.write_insights(tmp_path / "ins", layer_scores=scores, configs={"s 3.8": res[1].to_config()},
                               sizes=sizes, records=records, results=res, metric="fid")
    names = {p.name for p in written}
    assert {"scores.csv", "scores_by_block.csv", "box_block.png", "box_op_type.png", "config_s_3.8.csv",
            "mix_s_3.8_op_type.png", "pareto.csv", "pareto_fid.png"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert not list((tmp_path / "ins").glob("*.tmp*"))
    back = pd.read_csv(tmp_path / "ins" / "config_s_3.8.csv")
    assert tuple(back.columns) == I.CONFIG_COLUMNS
