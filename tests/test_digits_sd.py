"""digits-sd (the embedded SD-shaped text-to-image model) and the per-component report (`sensitivity components`)."""

import json

import numpy as np
import pytest
import torch

from sensitivity import cli
from sensitivity.components import parse_component_configs, pipeline_components, run_components
from sensitivity.errors import SensitivityError
from sensitivity.multiquantizer import apply, build_multiquantizer, restore
from sensitivity.zoo import get_family
from sensitivity.zoo import digits_sd as S

pytestmark = pytest.mark.skipif(not (S.SD_DIR / "model_index.json").is_file(),
                                reason="digits-sd weights not trained (scripts/train_digits_sd.py train)")

_PIPE = {}


def shipped():
    if "p" not in _PIPE:
        _PIPE["p"] = get_family("digits-sd").load_pipeline()
    return _PIPE["p"]


def test_loads_with_stable_diffusion_pipeline_from_pretrained_offline():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(str(S.SD_DIR), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any(name.endswith("attn2.to_k") for name, _ in pipe.unet.named_modules())
    # the tokenizer spells the caption words as whole tokens
    assert pipe.tokenizer.tokenize("a handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]
    size = sum(f.stat().st_size for f in S.SD_DIR.rglob("*.safetensors"))
    assert size < 8 * 2 ** 20, f"shipped weights {size / 2 ** 20:.1f} MiB"
    fam = get_family("digits-sd")
    assert fam.model_id() == "digits-sd:shipped"
    assert len(fam.find_layers(pipe.unet)) == len(fam.find_layers(fam.load_denoiser()))


def test_prompts_reach_cross_attention_and_pick_the_digit():
    fam = get_family("digits-sd")
    pipe = shipped()
    seen = []
    hook = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.register_forward_hook(
        lambda m, i, o: seen.append(i[0].detach().clone()))
    try:
        a = fam.generate(pipe, ["a handwritten seven", "a handwritten seven"], [3, 3])
        b = fam.generate(pipe, ["the digit 2"], [3])
    finally:
        hook.remove()
    assert a.shape == (2, 32, 32, 1) and a.dtype == np.uint8
    assert np.array_equal(a[0], a[1])                         # deterministic per seed
    assert not np.array_equal(a[0], b[0])                     # the prompt changes the image
    assert not torch.equal(seen[0][0], seen[-1][0])           # ... through the cross-attention keys
    from sensitivity.evaluation.metrics import DigitsFeatures

    prompts = [S.caption("a handwritten {word}", d, "bold") for d in range(10)] * 2
    images = fam.generate(pipe, prompts, list(range(20)))
    pred = DigitsFeatures().predict(images)
    assert (pred == np.array(fam.class_labels(prompts))).mean() >= 0.8


def test_captions_and_labels():
    assert S.class_of_prompt("the digit 7, bold") == 7
    assert S.class_of_prompt("a thin handwritten nine") == 9
    with pytest.raises(SensitivityError, match="names no digit"):
        S.class_of_prompt("a purple cat")
    lines = S.read_prompt_file(S.PROMPTS_DIR / "eval.txt", 20)
    assert [S.class_of_prompt(p) for p in lines] == list(range(10)) * 2
    fam = get_family("digits-sd")
    from sensitivity.evaluation.evaluator import EvalProtocol

    p = EvalProtocol.for_family(fam, n_per_class=3)
    assert p.num_images == 30 and p.conditions[:2] == tuple(lines[:2]) and "accuracy" in p.metrics


def test_insight_categories_of_unet2dcondition_names():
    from sensitivity.insights import describe_layer

    fam = get_family("digits-sd")
    layers = fam.find_layers(shipped().unet)
    groups = {spec.name: describe_layer(spec.name).op_group for spec in layers}
    assert all(fam.layer_category(n) == g for n, g in groups.items())
    assert {"CA", "SA", "FF", "Res"} <= set(groups.values())
    assert fam.layer_category("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == "CA"
    assert fam.layer_category("up_blocks.1.resnets.0.conv_shortcut#skip") == "Res"


@pytest.mark.parametrize("target", ["text_encoder", pytest.param("denoiser", marks=pytest.mark.slow), "vae_decoder"])
def test_component_quantization_leaves_the_others_bit_identical(target, tmp_path):
    fam = get_family("digits-sd")
    pipe = fam.load_pipeline()
    comps = pipeline_components(fam, pipe)
    assert list(comps) == ["text_encoder", "denoiser", "vae_decoder"]
    before = {n: {k: v.clone() for k, v in c.module.state_dict().items()} for n, c in comps.items()}
    comp = comps[target]
    mq = build_multiquantizer(comp.module, tmp_path / "mq.safetensors", comp.layers, model_id=f"digits-sd/{target}",
                              options=["uaq-3"], progress=False)
    apply(comp.module, mq, {s.name: "uaq-3" for s in comp.layers})
    for name, c in comps.items():
        now = c.module.state_dict()
        same = all(torch.equal(now[k], v) for k, v in before[name].items())
        assert same == (name != target), name
    restore(comp.module)
    for name, c in comps.items():
        assert all(torch.equal(c.module.state_dict()[k], v) for k, v in before[name].items())


def test_component_layer_rules():
    fam = get_family("digits-sd")
    comps = pipeline_components(fam, shipped())
    vae = [s.name for s in comps["vae_decoder"].layers]
    assert "post_quant_conv" in vae and all(n == "post_quant_conv" or n.startswith("decoder.") for n in vae)
    assert any(".attentions." in n for n in vae)  # the mid-block attention is quantized too
    te = comps["text_encoder"].layers
    assert te and all(s.kind == "linear" for s in te)
    assert any(s.name.endswith("self_attn.q_proj") for s in te) and any(s.name.endswith("mlp.fc2") for s in te)
    with pytest.raises(SensitivityError, match="unknown component 'vae'"):
        parse_component_configs(comps, "uaq-4", {"vae": "uaq-3"})
    cfg = parse_component_configs(comps, "uaq-4", {"denoiser": "fp16"})
    assert cfg["denoiser"] == {} and set(cfg["text_encoder"].values()) == {"uaq-4"}


def _prompt_files(tmp_path):
    (tmp_path / "train.txt").write_text("a handwritten seven\nthe digit 3\n")
    (tmp_path / "test.txt").write_text("number 1\n")
    return str(tmp_path / "train.txt"), str(tmp_path / "test.txt")


def test_components_cli_writes_the_table(tmp_path, capsys):
    train, test = _prompt_files(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["components", "digits-sd", "--prompts", train, "--test-prompts", test, "--option", "uaq-3",
                   "--component-option", "text_encoder=uaq-4", "--components", "text_encoder,vae_decoder",
                   "--images-per-prompt", "2", "--steps", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    import pandas as pd

    rows = pd.read_csv(out / "components.csv")
    assert len(rows) == 2 * 3 and set(rows.split) == {"train", "test"}
    assert (rows.mse > 0).all() and (rows.psnr < 100).all()
    summary = json.loads((out / "components.json").read_text())
    assert summary["components"]["text_encoder"]["options"] == ["uaq-4"]
    assert set(summary["components"]["text_encoder"]) >= {"train", "test", "avg_bits"}
    assert summary["most_sensitive"]["component"] in summary["components"]
    for name in ("fp", "text_encoder", "vae_decoder"):
        assert (out / "grids" / f"{name}.png").is_file()
    assert "| vae_decoder | uaq-3 |" in (out / "report.md").read_text()
    assert not (out / ".partial").exists()
    assert "most sensitive:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "{tmp}/missing.txt", "--option", "uaq-3"], "missing.txt"),
    (["--prompts", "{train}", "--option", "uaq-7x"], "uaq-7x"),
    (["--prompts", "{train}", "--component-option", "vae=uaq-3"], "unknown component 'vae'"),
    (["--prompts", "{train}"], "--option"),
])
def test_components_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    train, _ = _prompt_files(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, train=train) for a in argv]
    rc = cli.main(["components", "digits-sd", *argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("model, text_encoders", [pytest.param("sd15", ["text_encoder"], marks=pytest.mark.slow),
                                                   ("pixart-sigma", ["text_encoder"])])
def test_components_of_real_families_on_tiny_weights(model, text_encoders, tmp_path):
    fam = get_family(model)
    pipe = fam.load_pipeline("tiny", seed=0)
    comps = pipeline_components(fam, pipe)
    assert list(comps) == text_encoders + ["denoiser", "vae_decoder"]
    assert all(comps[t].layers and all(s.kind == "linear" for s in comps[t].layers) for t in text_encoders)
    assert comps["denoiser"].layers == fam.find_layers(fam.denoiser(pipe))


@pytest.mark.slow
def test_components_report_on_tiny_sd15(tmp_path):
    fam = get_family("sd15")
    pipe = fam.load_pipeline("tiny", seed=0)
    comps = pipeline_components(fam, pipe)
    assert list(comps) == ["text_encoder", "denoiser", "vae_decoder"]
    cfgs = parse_component_configs(comps, "uaq-4", {"denoiser": "fp16", "vae_decoder": "fp16"})
    summary = run_components(fam, pipe, {"train": ["a red bus"], "test": ["a cat"]}, cfgs, tmp_path / "out",
                             model_id=fam.model_id("tiny"), progress=False, steps=1)
    d = summary["components"]
    assert d["denoiser"]["train"]["mse"] == 0.0 and d["vae_decoder"]["test"]["psnr"] == 100.0
    assert d["text_encoder"]["avg_bits"] < 5 and d["text_encoder"]["train"]["mse"] > 0
