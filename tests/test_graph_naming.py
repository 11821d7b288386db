"""Block and op type of every layer read off the traced graph (zoo/graph_naming.py): the derived tables of tiny
SD3 and Flux, agreement with the name rules of the registered families (SD1.5, PixArt-α) on every layer, and the
registered families' own layer tables unchanged."""

import json

import pytest

from sensitivity.cli import main as cli_main
from sensitivity.graph import family_graph
from sensitivity.zoo import get_family
from sensitivity.zoo.graph_naming import naming_from_graph
from sensitivity.zoo.naming import DIFFUSERS_NAMING


def _table(naming, names):
    return {r["layer"]: (r["block"], r["op_type"], r["op_group"]) for r in naming.rows(names)}


@pytest.fixture(scope="module")
def sd3_graph():
    return family_graph("sd3", "tiny")


def test_derived_layer_table_of_tiny_sd3(sd3_graph):
    t = _table(naming_from_graph(sd3_graph), sd3_graph.layer_names)
    print("\n".join(f"{k:48s} {v}" for k, v in t.items()))
    assert len(t) == 33
    assert t["pos_embed.proj"] == ("embed", "Patchify", "IO")
    assert t["time_text_embed.timestep_embedder.linear_1"] == ("embed", "t-Embed", "Embed")
    assert t["time_text_embed.text_embedder.linear_2"] == ("embed", "c-Embed", "Embed")  # pooled text
    assert t["context_embedder"] == ("embed", "c-Embed", "Embed")
    block0 = {k.split(".", 2)[2]: v[1] for k, v in t.items() if k.startswith("transformer_blocks.0.")}
    assert block0 == {"norm1.linear": "AdaLN", "norm1_context.linear": "AdaLN-ctx", "attn.to_q": "SA-Q",
                      "attn.to_k": "SA-K", "attn.to_v": "SA-V", "attn.add_q_proj": "SA-Q-ctx",
                      "attn.add_k_proj": "SA-K-ctx", "attn.add_v_proj": "SA-V-ctx", "attn.to_out.0": "SA-Out",
                      "attn.to_add_out": "SA-Out-ctx", "ff.net.0.proj": "FF1", "ff.net.2": "FF2",
                      "ff_context.net.0.proj": "FF1-ctx", "ff_context.net.2": "FF2-ctx"}
    assert {v[0] for k, v in t.items() if k.startswith("transformer_blocks.1.")} == {"1"}
    assert t["norm_out.linear"] == ("out", "Out-AdaLN", "IO") and t["proj_out"] == ("out", "Out", "IO")


def test_derived_layer_table_of_tiny_flux():
    g = family_graph("flux", "tiny")
    naming = naming_from_graph(g)
    t = _table(naming, g.layer_names)
    print("\n".join(f"{k:48s} {v}" for k, v in t.items()))
    assert len(t) == 28
    assert t["x_embedder"] == ("embed", "Patchify", "IO")
    assert t["transformer_blocks.0.attn.to_q"] == ("transformer.0", "SA-Q", "SA")  # two lists of blocks
    assert t["transformer_blocks.0.attn.add_v_proj"] == ("transformer.0", "SA-V-ctx", "SA")
    assert t["single_transformer_blocks.0.attn.to_k"] == ("single_transformer.0", "SA-K", "SA")
    assert t["single_transformer_blocks.0.norm.linear"][1:] == ("AdaLN", "AdaLN")
    assert t["single_transformer_blocks.0.proj_out"][1:] == ("Proj-Out", "Attn-IO")  # fed by the attention
    ranks = [naming.describe(n).block_rank for n in ("x_embedder", "transformer_blocks.0.ff.net.2",
                                                     "single_transformer_blocks.0.proj_mlp", "proj_out")]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4  # embed < double blocks < single blocks < out
    # generalised over block indices: the 19 + 38 blocks of FLUX.1 from a 1 + 1 block trace
    v37 = naming.describe("single_transformer_blocks.37.attn.to_v")
    assert (v37.block, v37.op_type, v37.op_group) == ("single_transformer.37", "SA-V", "SA")
    assert naming.describe("transformer_blocks.18.ff_context.net.2").op_type == "FF2-ctx"


@pytest.mark.parametrize("model,count", [("pixart-alpha", 287), ("sd15", 294)])
def test_graph_naming_agrees_with_the_name_rules_of_registered_families(model, count):
    """Where hand-written rules exist, the graph derivation finds the same block and op type for every layer;
    the registered families keep their own (name) rules: their layer tables are unchanged."""
    fam = get_family(model)
    g = family_graph(model, "tiny")
    assert len(g.layers) == count == fam.reference_layer_count
    derived = naming_from_graph(g)
    for s in g.layers:
        a, b = derived.describe(s.name), DIFFUSERS_NAMING.describe(s.name)
        assert (a.block, a.op_type, a.op_group) == (b.block, b.op_type, b.op_group), s.name
        assert fam.describe_layer(s.name) == b  # the family's table is the name rules' one
    assert not hasattr(fam, "use_graph")


def test_insights_describe_sd3_by_its_graph(tmp_path):
    from sensitivity.insights import describe_layer, layer_table
    from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer

    fam = get_family("sd3")
    den = fam.load_denoiser("tiny")
    out = tmp_path / "mq.safetensors"
    build_multiquantizer(den, out, fam.find_layers(den), model_id=fam.model_id("tiny"), options=("uaq-4",),
                         progress=False)
    table = layer_table(load_multiquantizer(out))
    row = table.set_index("layer").loc["transformer_blocks.1.attn.add_k_proj"]
    assert (row["block"], row["op_type"], row["op_group"]) == ("1", "SA-K-ctx", "SA")
    assert (table["op_group"] == "Other").sum() == 0
    assert describe_layer("transformer_blocks.23.attn.to_out.0", "sd3").op_type == "SA-Out"  # SD3-medium: 24 blocks


def test_layers_ops_from_the_cli(tmp_path, capsys):
    from sensitivity.zoo.generic import tiny_sd3

    folder = tmp_path / "some-sd3"
    tiny_sd3(__import__("torch").float32, 0).save_pretrained(folder)
    capsys.readouterr()
    assert cli_main(["layers", "diffusers", "--weights", str(folder), "--ops", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["table"]}
    assert rows["transformer_blocks.0.attn.to_v"]["op_type"] == "SA-V"
    assert rows["transformer_blocks.0.ff_context.net.0.proj"]["op_type"] == "FF1-ctx"
    assert cli_main(["layers", "sd15", "--weights", "meta", "--ops"]) == 0
    out = capsys.readouterr().out
    assert "Res-Shortcut" in out and "CA-K" in out and "total: 294 layers" in out
