"""CLIP score and LPIPS: optional metrics, checked before any model is loaded; CLIP score end to end
through `sensitivity evaluate` with a tiny CLIP model saved to a local folder (offline)."""

import json

import numpy as np
import pytest

from sensitivity.cli import main as cli_main
from sensitivity.errors import SensitivityError
from sensitivity.evaluation import extra_metrics as X


def _tiny_clip_folder(path, seed=0):
    """A random tiny CLIPModel with the SD1.5 CLIP tokenizer and a 32 px image processor, saved to ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sensitivity.zoo.common import clip_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, vocab_size=49408),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    clip_tokenizer("sd15/tokenizer").save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return _tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_score_is_the_clamped_cosine(clip_folder):
    import torch

    score = X.ClipScore(str(clip_folder))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    prompts = ["a red bus", "a cat", "two dogs"]
    s = score(images, prompts)
    with torch.no_grad():  # the same number from the model's own embeddings
        pix = score.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tok = score.tokenizer(prompts, padding=True, return_tensors="pt")
        out = score.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert s == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert score(images[:1], prompts[:1]) != score(images[1:2], prompts[:1])  # depends on the image


def test_clip_identity_is_content_keyed(clip_folder, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere" / "clip"
    shutil.copytree(clip_folder, copy)
    assert X.check_clip(str(copy)) == X.check_clip(str(clip_folder))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["projection_dim"] = 8
    (copy / "config.json").write_text(json.dumps(cfg))
    assert X.check_clip(str(copy)) != X.check_clip(str(clip_folder))
    with pytest.raises(SensitivityError, match="--clip-model"):
        X.check_clip(str(tmp_path / "no-such-folder"))


@pytest.fixture(scope="module")
def sd15_tiny(tmp_path_factory):
    from sensitivity.config import QuantConfig
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    root = tmp_path_factory.mktemp("sd15")
    fam = get_family("sd15")
    den = fam.load_denoiser("tiny", seed=0)
    layers = fam.find_layers(den)
    mq = root / "mq.safetensors"
    build_multiquantizer(den, mq, layers, model_id=fam.model_id("tiny"), options=("kmeans_a-4",), progress=False)
    cfg = root / "cfg.json"
    QuantConfig({s.name: "kmeans_a-4" for s in layers[::3]}).save(cfg)
    prompts = root / "p.txt"
    prompts.write_text("a red bus\na cat on a mat\n")
    return {"mq": mq, "cfg": cfg, "prompts": prompts, "root": root}


def _evaluate_argv(r, *extra):
    return ["evaluate", "sd15", "--weights", "tiny", "--multiquantizer", str(r["mq"]), "--config", str(r["cfg"]),
            "--prompts", str(r["prompts"]), "--num-images", "2", "--steps", "2", "--height", "32", "--width", "32",
            "--json", *extra]


@pytest.mark.slow  # ~30 s on 2 loaded cores: sd15 tiny generation twice (full precision + the config)
def test_evaluate_with_clip_score_offline(sd15_tiny, clip_folder, capsys):
    cache = sd15_tiny["root"] / "clip.sqlite"
    assert cli_main(_evaluate_argv(sd15_tiny, "--clip-model", str(clip_folder), "--cache", str(cache))) == 0
    out = capsys.readouterr().out
    rec = json.loads(out[out.index("{\n"):])
    assert 0.0 <= rec["metrics"]["clip_score"] <= 100.0 and rec["metrics"]["psnr"] > 0
    import sqlite3

    with sqlite3.connect(cache) as c:
        evaluation = json.loads(c.execute("SELECT value FROM meta WHERE key='evaluation'").fetchone()[0])
    assert "clip_score" in evaluation["metrics"] and evaluation["clip_model"] == X.check_clip(str(clip_folder))


def test_missing_clip_model_and_lpips_fail_before_loading(sd15_tiny, tmp_path, capsys, monkeypatch):
    from sensitivity.zoo.base import ModelFamily

    loaded = []
    monkeypatch.setattr(ModelFamily, "load_pipeline", lambda self, *a, **k: loaded.append(1))
    assert cli_main(_evaluate_argv(sd15_tiny, "--clip-model", str(tmp_path / "nothing"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-model" in err[0]
    try:
        import lpips  # noqa: F401
        have_lpips = True
    except Exception:  # noqa: BLE001 - lpips needs torchvision, which this environment must not have
        have_lpips = False
    if not have_lpips:
        assert cli_main(_evaluate_argv(sd15_tiny, "--lpips")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "LPIPS" in err[0] and "sensitivity[lpips]" in err[0], err
    assert cli_main(_evaluate_argv(sd15_tiny, "--lpips", "resnet")) == 2
    assert "alex, vgg, squeeze" in capsys.readouterr().err
    assert not loaded
