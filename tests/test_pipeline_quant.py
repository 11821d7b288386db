"""The whole pipeline as one quantized model: multiquantize --components, sample, train, search --target-memory."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from sensitivity.cli import main as cli_main
from sensitivity.errors import SensitivityError
from sensitivity.zoo import get_family

FAST_TRAIN = ["--predictor", "additive", "--baselines", "bits", "--folds", "3", "--no-scores"]


def _run(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _pipeline_chain(model, weights, tmp_path, capsys, sample_args, train_args=FAST_TRAIN, metric="fid", size=(),
                    formats=("packed",), compare=False):
    """multiquantize --components all -> sample -> train -> search --target-memory / --target-bits."""
    from sensitivity.evaluation.cache import ConfigCache
    from sensitivity.multiquantizer import load_multiquantizer

    mq_path, cache, pred = tmp_path / "mq.safetensors", tmp_path / "c.sqlite", tmp_path / "pred"
    out = _run(["multiquantize", model, "--weights", weights, "--components", "all", "--options", "uaq-4", "uaq-3",
                "--out", mq_path, "--no-progress"], capsys)
    assert "components: text_encoder" in out
    mq = load_multiquantizer(mq_path)
    comps = [n for n, c in mq.components.items() if c["layers"]]
    assert comps[0] == "text_encoder" and comps[-2:] == ["denoiser", "vae_decoder"]
    assert all(l.split(".", 1)[0] in comps for l in mq.layer_names)
    _run(["sample", model, "--weights", weights, "--multiquantizer", mq_path, "--cache", cache, "--num-configs", 10,
          "--seed", 0, "--steps", 2, "--no-progress", *sample_args], capsys)
    with ConfigCache(cache) as c:
        recs = c.records()
    assert len(recs) == 10
    # every component is sampled, and each record carries its bytes per component
    assert {l.split(".", 1)[0] for r in recs for l in r["config"]} == set(comps)
    assert all(sum(r["component_bytes"].values()) == r["quantized_bytes"] for r in recs)
    _run(["train", cache, "--out", pred, "--target", metric, *train_args], capsys)
    fixed = sum(c["unquantized_fp16_bytes"] for c in mq.components.values())
    smallest = mq.size_table().min_bytes() + fixed
    largest = mq.size_table().max_bytes() + fixed
    target = (smallest + largest) // 2
    cfg_path = tmp_path / "mem.json"
    report = json.loads(_run(["search", "--predictor", pred, "--multiquantizer", mq_path, "--target-memory", target,
                              "--out", cfg_path, "--json"], capsys))
    assert report["memory_bytes"] <= target and report["target_memory"] == target
    cfg = json.loads(cfg_path.read_text())
    assert sum(cfg["provenance"]["component_bytes"].values()) == report["memory_bytes"]
    q, _ = mq.size_table().config_bytes(cfg["options"])
    assert q + fixed == report["memory_bytes"]  # the stored memory model: layers as stored + the rest at fp16
    # below the smallest whole-pipeline memory: one line naming the minimum
    rc = cli_main(["search", "--predictor", str(pred), "--multiquantizer", str(mq_path), "--target-memory",
                   str(smallest - 1), "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "infeasible" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    target_bits = round((mq.size_table().min_avg_bits() + mq.size_table().max_avg_bits()) / 2, 3)
    bits = json.loads(_run(["search", "--predictor", pred, "--multiquantizer", mq_path, "--target-bits", target_bits,
                            "--out", tmp_path / "bits.json", "--json"], capsys))
    assert bits["avg_bits"] <= target_bits  # over every quantized layer of every component
    # export the whole pipeline and generate from it: the same images as the config applied in memory
    gen = ["--prompt", "a red bus", "--steps", 2, *size, "--no-progress"]
    for fmt in formats:
        _run(["export", model, "--weights", weights, "--multiquantizer", mq_path, "--config", cfg_path, "--format", fmt,
              "--out", tmp_path / f"exp-{fmt}"], capsys)
        _run(["infer", "--quantized", tmp_path / f"exp-{fmt}", *gen, "--out", tmp_path / f"q-{fmt}"], capsys)
        run = json.loads((tmp_path / f"q-{fmt}" / "run.json").read_text())
        assert run["quantized"]["format"] == "pipeline" and run["quantized"]["config_hash"] == run_hash(cfg)
        _check_pipeline_card(tmp_path / f"exp-{fmt}", fmt, report)
    if not compare:
        return mq, cfg
    _run(["infer", model, "--weights", weights, "--multiquantizer", mq_path, "--config", cfg_path, *gen,
          "--out", tmp_path / "applied"], capsys)
    for fmt in formats:
        assert np.array_equal(_png(tmp_path / f"q-{fmt}" / "00000.png"), _png(tmp_path / "applied" / "00000.png"))
    return mq, cfg


def _check_pipeline_card(folder, fmt, report):
    """The export folder's model card: YAML header, one row per component, and the same whole-pipeline memory
    as the search that chose the config (one meaning of --target-memory)."""
    record = json.loads((folder / "sensitivity_export.json").read_text())
    assert sum(record["component_memory_bytes"].values()) == report["memory_bytes"]
    assert record["component_memory_bytes"] == report["component_bytes"]
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n") and "base_model_relation: quantized" in text
    if importlib.util.find_spec("yaml") is not None:
        import yaml

        header = yaml.safe_load(text.split("---\n")[1])
        assert header["base_model_relation"] == "quantized" and header["library_name"] == "diffusers"
        assert "pipeline" in header["tags"] and fmt in header["tags"]
    for name, nbytes in record["component_memory_bytes"].items():
        assert f"| {name} | " in text and f"| {nbytes / 1e6:.3f} |" in text
    assert "## How it was made" in text and "load_quantized_pipeline" in text


def run_hash(cfg):
    from sensitivity.config import config_hash

    return config_hash(cfg["options"])


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_digits_sd_pipeline_end_to_end(tmp_path, capsys):
    mq, cfg = _pipeline_chain("digits-sd", "shipped", tmp_path, capsys, ["--num-images", 20], compare=True)
    assert set(mq.components) == {"text_encoder", "denoiser", "vae_decoder"}
    if importlib.util.find_spec("sdnq") is None:
        pytest.skip("the sdnq pipeline export needs the sdnq extra")
    # sdnq: the CLIP text encoder through transformers, UNet and VAE through diffusers. SDNQ cannot carry
    # split layers (the up-block shortcuts), so they stay fp16 here
    from sensitivity.config import QuantConfig

    cfg_path = tmp_path / "nosplit.json"
    QuantConfig({k: v for k, v in cfg["options"].items() if "#" not in k}).save(cfg_path)
    gen = ["--prompt", "a handwritten seven", "--steps", 2, "--no-progress"]
    _run(["export", "digits-sd", "--weights", "shipped", "--multiquantizer", tmp_path / "mq.safetensors", "--config",
          cfg_path, "--format", "sdnq", "--out", tmp_path / "exp-sdnq"], capsys)
    _run(["infer", "--quantized", tmp_path / "exp-sdnq", *gen, "--out", tmp_path / "q-sdnq"], capsys)
    _run(["infer", "digits-sd", "--weights", "shipped", "--multiquantizer", tmp_path / "mq.safetensors", "--config",
          cfg_path, *gen, "--out", tmp_path / "a-sdnq"], capsys)
    assert np.array_equal(_png(tmp_path / "q-sdnq" / "00000.png"), _png(tmp_path / "a-sdnq" / "00000.png"))


@pytest.mark.parametrize("model", ["sd15", "pixart-alpha"])
def test_tiny_pipeline_end_to_end(model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na cat\n")
    size = ["--height", 32, "--width", 32]
    _pipeline_chain(model, "tiny", tmp_path, capsys, ["--prompts", prompts, "--num-images", 2, *size],
                    metric="psnr", size=size)


def test_one_component_in_memory_at_a_time():
    """load_component builds only the asked component with values; the others never leave the meta device."""
    from sensitivity.pipeline_quant import load_component
    from sensitivity.zoo.offline import materializing

    fam = get_family("pixart-alpha")
    te = load_component(fam, "tiny", "text_encoder", seed=3)
    assert not any(p.is_meta for p in te.parameters())
    with materializing([3 + 2]) as built:  # the text encoder's seed: the others are built on meta
        fam.build_pipeline("tiny", torch.float32, 3)
    real = [m for s, m in built if not next(m.parameters()).is_meta]
    assert len(real) == 1 and type(real[0]).__name__ == "T5EncoderModel"
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), real[0].state_dict().values()))


def test_pipeline_multiquantizer_checks_each_component(tmp_path):
    from sensitivity.errors import MultiquantizerMismatchError
    from sensitivity.multiquantizer import apply, restore
    from sensitivity.pipeline_quant import build_pipeline_multiquantizer, quantization_root

    fam = get_family("sd15")
    mq = build_pipeline_multiquantizer(fam, "tiny", ["text_encoder", "vae_decoder"], tmp_path / "mq.safetensors",
                                       options=["uaq-4"], progress=False)
    assert mq.components["denoiser"]["layers"] == 0  # not in the file: counted at fp16 in whole-pipeline bytes
    assert mq.components["denoiser"]["unquantized_fp16_bytes"] == mq.components["denoiser"]["fp16_bytes"] > 0
    pipe = fam.load_pipeline("tiny")
    root = quantization_root(fam, pipe, mq)
    mq.check_model(root)
    before = pipe.vae.decoder.conv_out.weight.detach().clone()
    apply(root, mq, {l: "uaq-4" for l in mq.layer_names})
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, before)  # the pipeline's own module is rewritten
    restore(root)
    assert torch.equal(pipe.vae.decoder.conv_out.weight, before)
    with torch.no_grad():
        next(l for n, l in pipe.text_encoder.named_modules() if n.endswith("fc1")).weight.add_(1.0)
    with pytest.raises(MultiquantizerMismatchError, match="text_encoder's weights differ"):
        mq.check_model(root)


def test_parse_bytes_and_memory_models():
    from sensitivity.sizes import (SizeTable, memory_table, parse_bytes, register_memory_model)

    assert parse_bytes("4.5GB") == 4_500_000_000 and parse_bytes("4GiB") == 4 * 2 ** 30
    assert parse_bytes("800MB") == 800_000_000 and parse_bytes("1234") == 1234
    for bad in ("4.5XB", "-1GB", "GB", "0"):
        with pytest.raises(SensitivityError, match="--target-memory"):
            parse_bytes(bad)
    table = SizeTable.from_shapes({"a": (8, 16), "b": (4, 16)}, ["uaq-4", "kmeans_c-4"])
    assert memory_table(table) is table
    # a run-time policy that dequantizes k-means layers once holds them at fp16
    register_memory_model("test-dequantize-kmeans", lambda l, o, b, fp: fp if o.startswith("kmeans") else b,
                          replace=True)
    mem = memory_table(table, "test-dequantize-kmeans")
    assert mem.config_bytes({"a": "kmeans_c-4"})[0] == table.fp16_total
    assert mem.config_bytes({"a": "uaq-4"}) == table.config_bytes({"a": "uaq-4"})
    with pytest.raises(SensitivityError, match="unknown memory model"):
        memory_table(table, "nosuch")


def test_describe_pipeline_layers():
    from sensitivity.insights import describe_layer, layer_table

    te = describe_layer("text_encoder.text_model.encoder.layers.3.self_attn.q_proj")
    assert (te.block, te.op_type, te.op_group) == ("te.3", "SA-Q", "SA")
    t5 = describe_layer("text_encoder.encoder.block.5.layer.1.DenseReluDense.wi_0")
    assert (t5.block, t5.op_type) == ("te.5", "FF1")
    den = describe_layer("denoiser.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "sd15")
    assert (den.block, den.op_type) == ("down.1", "CA-K")
    vae = describe_layer("vae_decoder.decoder.up_blocks.2.resnets.0.conv1")
    assert (vae.block, vae.op_type) == ("vae.up.2", "Res-Conv1")
    assert te.block_rank < den.block_rank < vae.block_rank
    lt = layer_table(["text_encoder.encoder.layers.0.mlp.fc1", "denoiser.conv_out", "conv_out"])
    assert list(lt["component"]) == ["text_encoder", "denoiser", "denoiser"]
