"""The traced denoiser DAG: every zoo family (tiny configs), SD3 (never covered by the reference), plots."""

import shutil

import networkx as nx
import pytest
import torch

from sensitivity.errors import SensitivityError
from sensitivity.graph import DenoiserGraph, build_graph, draw, family_graph, to_dot
from sensitivity.layers import find_layers
from sensitivity.zoo import get_family, list_families

FAMILIES = list_families()
_CACHE = {}


def tiny(name):
    """``(graph, layer names)`` of family ``name`` on tiny weights (traced once per session)."""
    if name not in _CACHE:
        fam = get_family(name)
        den = fam.load_denoiser("tiny")
        layers = fam.find_layers(den)
        _CACHE[name] = (build_graph(den, layers, model_id=fam.model_id("tiny")), [s.name for s in layers])
    return _CACHE[name]


def test_every_builtin_family_is_covered():
    assert {"sd15", "sdxl", "pixart-alpha", "pixart-sigma", "dit-xl-2", "hunyuan-dit", "digits-dit",
            "digits-unet"} <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_graph_is_dag_with_the_layer_set(name):
    g, layer_names = tiny(name)
    G = g.graph
    assert nx.is_directed_acyclic_graph(G)
    weight = {n for n, d in G.nodes(data=True) if d["kind"] == "weight"}
    assert weight == set(layer_names)  # = `sensitivity layers` (family rules: splits, ties, exclusions)
    assert g.weight_nodes == layer_names
    # split layers are two weight nodes whose outputs meet in one add node
    for half in (n for n in layer_names if n.endswith("#main")):
        base = half[: -len("#main")]
        assert base + "#skip" in weight
        assert set(G.predecessors(base + "#sum")) == {half, base + "#skip"}
    # one output, inputs without predecessors, every weight node reachable from an input
    assert [n for n, d in G.nodes(data=True) if d["kind"] == "output"] == ["output"]
    inputs = [n for n, d in G.nodes(data=True) if d["kind"] == "input"]
    assert inputs and all(G.in_degree(n) == 0 for n in inputs)
    reach = set().union(*(nx.descendants(G, n) for n in inputs))
    assert weight <= reach
    assert "output" in reach
    # modules partition the weight nodes
    mods = g.modules()
    covered = [l for m in mods.values() for l in m["layers"]]
    assert sorted(covered) == sorted(layer_names)
    for d in G.nodes.values():
        assert len(d["position"]) == 3 and d["role"]


def _pred(G, n):
    return set(G.predecessors(n))


def test_residual_block_edges_sd15():
    g, _ = tiny("sd15")
    G = g.graph
    r = "down_blocks.0.resnets.0"
    assert _pred(G, f"{r}.conv1") == {f"{r}.norm1:norm"}
    assert _pred(G, f"{r}.norm1:norm") == {"conv_in"}
    # the time embedding is added after conv1, conv2 follows norm2, then the residual add with the block input
    assert _pred(G, f"{r}.time_emb_proj") == {"time_embedding.linear_2"}
    assert _pred(G, f"{r}:add") == {f"{r}.conv1", f"{r}.time_emb_proj"}
    assert _pred(G, f"{r}.conv2") == {f"{r}.norm2:norm"}
    assert _pred(G, f"{r}:add.1") == {f"{r}.conv2", "conv_in"}
    assert G.nodes[f"{r}:add.1"]["op"] == "add"
    assert G.nodes[f"{r}.conv1"]["block"] == "down_blocks.0"
    assert G.nodes[f"{r}.conv1"]["group_type"] == "resnet"


def test_attention_block_edges_sd15():
    g, _ = tiny("sd15")
    G = g.graph
    b = "down_blocks.0.attentions.0.transformer_blocks.0"
    for attn in ("attn1", "attn2"):
        assert _pred(G, f"{b}.{attn}:qk") == {f"{b}.{attn}.to_q", f"{b}.{attn}.to_k"}
        assert _pred(G, f"{b}.{attn}:av") == {f"{b}.{attn}:qk", f"{b}.{attn}.to_v"}
        assert _pred(G, f"{b}.{attn}.to_out.0") == {f"{b}.{attn}:av"}
        assert G.nodes[f"{b}.{attn}:qk"]["op"] == "matmul"
    assert _pred(G, f"{b}.attn1.to_q") == {f"{b}.norm1:norm"}
    # cross-attention: keys and values come from the text input
    assert _pred(G, f"{b}.attn2.to_k") == {"input:encoder_hidden_states"}
    assert _pred(G, f"{b}.attn2.to_v") == {"input:encoder_hidden_states"}
    assert _pred(G, f"{b}:add") == {f"{b}.attn1.to_out.0", "down_blocks.0.attentions.0.proj_in"}
    mods = g.modules()
    assert mods[f"{b}.attn1"]["type"] == "attention"
    assert mods[f"{b}.attn2"]["type"] == "cross-attention"
    assert mods[f"{b}.ff"]["type"] == "ffn"
    assert mods["time_embedding"]["type"] == "embedding"
    assert mods["output"]["layers"] == ["conv_out"]


def test_dit_block_adaln_and_gated_residual():
    g, _ = tiny("digits-dit")
    G = g.graph
    b = "transformer_blocks.1"
    mod = _pred(G, f"{b}.attn1.to_q")
    assert len(mod) == 1 and G.nodes[next(iter(mod))]["op"] == "modulate"
    assert f"{b}.norm1.linear" in _pred(G, next(iter(mod)))
    res = next(iter(G.successors(f"{b}.attn1.to_out.0")))
    assert G.nodes[res]["op"] == "gated_add" and f"{b}.norm1.linear" in _pred(G, res)
    # the per-block timestep embedders are tied copies: one subgraph, as in the reference
    assert not any(n.startswith("transformer_blocks.1.norm1.emb") for n in G)


def test_sd3_transformer_never_covered_by_the_reference():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    layers = find_layers(m)
    g = build_graph(m, layers)
    G = g.graph
    assert nx.is_directed_acyclic_graph(G)
    assert {n for n, d in G.nodes(data=True) if d["kind"] == "weight"} == {s.name for s in layers}
    a = "transformer_blocks.0.attn"
    # joint attention: image and text queries are concatenated before q·k
    assert _pred(G, f"{a}:cat") == {f"{a}.to_q", f"{a}.add_q_proj"}
    assert _pred(G, f"{a}:qk") == {f"{a}:cat", f"{a}:cat.1"}
    assert _pred(G, f"{a}.to_out.0") == {f"{a}:av"}
    assert {"input:hidden_states", "input:encoder_hidden_states", "input:pooled_projections",
            "input:timestep"} <= set(G)


def test_full_size_on_meta_weights_matches_layers():
    g = family_graph("dit-xl-2", "meta")
    fam = get_family("dit-xl-2")
    assert len(g.weight_nodes) == len(fam.find_layers(fam.load_denoiser("meta")))
    assert g.info["meta"] is True


def test_json_round_trip_and_config_attributes(tmp_path):
    g, names = tiny("digits-dit")
    p = g.save(tmp_path / "g.json")
    h = DenoiserGraph.load(p)
    assert h.weight_nodes == g.weight_nodes
    assert set(h.graph.edges) == set(g.graph.edges)
    assert h.graph.nodes[names[3]] == g.graph.nodes[names[3]]
    cfg = {names[0]: "uaq-3", names[1]: "kmeans_c-4"}
    df = g.config_attributes(cfg)
    assert list(df["bits"][:3]) == [3, 4, 16]
    assert df["reduction"].iloc[0] > 4 and df["reduction"].iloc[2] == 1.0
    ann = g.annotate(cfg)
    assert ann.nodes[names[0]]["method"] == "uaq"
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(SensitivityError, match="bad.json"):
        DenoiserGraph.load(tmp_path / "bad.json")


def test_dot_has_every_node_and_block_clusters():
    g, _ = tiny("sd15")
    src = to_dot(g)
    assert src.count("subgraph ") >= len({d["block"] for d in g.graph.nodes.values() if d["block"]})
    assert 'subgraph "cluster_down_blocks.0"' in src
    assert all(f"n{i} [" in src for i in range(len(g)))


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")
def test_graph_command_draws_svg(tmp_path, capsys):
    from sensitivity.cli import main

    out = tmp_path / "d.svg"
    assert main(["graph", "digits-dit", "--weights", "tiny", "--out", str(out)]) == 0
    svg = out.read_text()
    assert "transformer_blocks.5" in svg and "attn1.to_q" in svg
    assert "wrote" in capsys.readouterr().out
    assert main(["graph", "digits-dit", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out" in capsys.readouterr().err


def test_unknown_denoiser_gives_clear_error():
    with pytest.raises(SensitivityError, match="Sequential"):
        build_graph(torch.nn.Sequential(torch.nn.Linear(2, 2)))
