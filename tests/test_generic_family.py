"""Any diffusers denoiser from the CLI: tiny SD3 / Flux end to end, and a pipeline folder discovered by class."""

import json
import sqlite3

import pytest

from sensitivity.cli import main as cli_main


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_sample_tiny_from_cli(model, tmp_path, capsys):
    mq, cache, prompts = tmp_path / "mq.safetensors", tmp_path / "c.sqlite", tmp_path / "p.txt"
    prompts.write_text("a red bus\na cat\n")
    assert cli_main(["multiquantize", model, "--weights", "tiny", "--out", str(mq), "--options", "kmeans_a-4",
                     "kmeans_a-3", "--no-progress"]) == 0
    assert cli_main(["sample", model, "--weights", "tiny", "--multiquantizer", str(mq), "--cache", str(cache),
                     "--num-configs", "1", "--prompts", str(prompts), "--num-images", "2", "--steps", "2",
                     "--act-bits", "8", "--height", "32", "--width", "32", "--no-progress"]) == 0
    with sqlite3.connect(cache) as c:
        (metrics,) = c.execute("SELECT metrics FROM records").fetchone()
        evaluation = json.loads(c.execute("SELECT value FROM meta WHERE key='evaluation'").fetchone()[0])
    assert json.loads(metrics)["psnr"] > 0
    assert evaluation["model_id"] == f"{model}:tiny" and evaluation["height"] == 32 and evaluation["act_bits"] == 8


def test_pipeline_folder_discovered_from_model_index(tmp_path, capsys):
    from sensitivity.zoo import get_family

    folder = tmp_path / "my-sd3"
    get_family("sd3").load_pipeline("tiny").save_pretrained(folder)
    capsys.readouterr()
    assert cli_main(["layers", "diffusers", "--weights", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "diffusers-stablediffusion3pipeline" and data["denoiser_class"] == "SD3Transformer2DModel"
    assert data["layers"] == 33 and data["model_id"] == "diffusers-stablediffusion3pipeline:my-sd3"
    assert cli_main(["layers", "diffusers", "--pipeline-class", "NoSuchPipeline", "--weights", str(folder)]) == 2
    assert "not a diffusers pipeline class" in capsys.readouterr().err
    assert cli_main(["layers", "diffusers", "--weights", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
