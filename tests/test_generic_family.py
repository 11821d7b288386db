"""Any diffusers denoiser from the CLI: tiny SD3 / Flux end to end, a saved pipeline folder discovered by class,
pipeline knobs (--height / --width / --set) reaching the pipeline call and the signature."""

import functools
import json
import sqlite3

import pytest

from sensitivity.cli import main as cli_main


def _records(cache):
    with sqlite3.connect(cache) as c:
        rows = [(json.loads(m), json.loads(cfg)) for m, cfg in c.execute("SELECT metrics, config FROM records")]
        evaluation = json.loads(c.execute("SELECT value FROM meta WHERE key='evaluation'").fetchone()[0])
        (signature,) = c.execute("SELECT value FROM meta WHERE key='signature'").fetchone()
    return rows, evaluation, signature


def _spy_pipeline_calls(monkeypatch, pipeline_class):
    """Record the keyword arguments of every call of ``pipeline_class`` (then run it)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    original, calls = cls.__call__, []

    @functools.wraps(original)  # keeps the call's signature (the settings a user may --set are read from it)
    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    return calls


@pytest.mark.parametrize("model,pipeline_class", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_multiquantize_then_sample_tiny_from_cli(model, pipeline_class, tmp_path, monkeypatch, capsys):
    mq, cache, prompts = tmp_path / "mq.safetensors", tmp_path / "c.sqlite", tmp_path / "p.txt"
    prompts.write_text("a red bus\na cat\n")
    assert cli_main(["multiquantize", model, "--weights", "tiny", "--out", str(mq), "--options", "kmeans_a-4",
                     "kmeans_a-3", "--no-progress"]) == 0
    calls = _spy_pipeline_calls(monkeypatch, pipeline_class)
    knob = ["--set", "max_sequence_length=8"] if model == "flux" else ["--set", "max_sequence_length=64"]
    assert cli_main(["sample", model, "--weights", "tiny", "--multiquantizer", str(mq), "--cache", str(cache),
                     "--num-configs", "2", "--prompts", str(prompts), "--num-images", "2", "--steps", "2",
                     "--act-bits", "8", "--height", "32", "--width", "48", *knob, "--fixed", "proj_out=fp16",
                     "--no-progress"]) == 0
    rows, evaluation, signature = _records(cache)
    assert len(rows) == 2 and all(m["psnr"] > 0 for m, _ in rows)
    assert all("proj_out" not in cfg for _, cfg in rows)  # --fixed keeps the final projection full precision
    assert evaluation["model_id"] == f"{model}:tiny" and evaluation["act_bits"] == 8
    assert (evaluation["height"], evaluation["width"]) == (32, 48)
    assert evaluation["extra"] == {"max_sequence_length": int(knob[1].split("=")[1])}
    # the knobs reached the pipeline call: full-precision reference + 2 configs, each with the same settings
    assert calls and all((c["height"], c["width"], c["max_sequence_length"], c["num_inference_steps"])
                         == (32, 48, int(knob[1].split("=")[1]), 2) for c in calls)
    # another --set value is another protocol: the cache refuses it (one line) instead of mixing records
    capsys.readouterr()
    assert cli_main(["sample", model, "--weights", "tiny", "--multiquantizer", str(mq), "--cache", str(cache),
                     "--num-configs", "2", "--prompts", str(prompts), "--num-images", "2", "--steps", "2",
                     "--act-bits", "8", "--height", "32", "--width", "40", *knob, "--no-progress"]) == 2
    assert "signature" in capsys.readouterr().err


def test_pipeline_settings_are_the_pipeline_calls(tmp_path, capsys):
    """--set takes any argument of the pipeline's __call__ (not the prompts / generator / output it owns)."""
    from sensitivity.errors import SensitivityError
    from sensitivity.zoo import get_family

    sd3 = get_family("sd3")
    assert sd3.settings(None, max_sequence_length=64, skip_guidance_layers=[7]).extra == {
        "max_sequence_length": 64, "skip_guidance_layers": [7]}
    for bad in ("no_such_knob", "generator", "prompt_embeds", "output_type"):
        with pytest.raises(SensitivityError, match=f"unknown generation setting '{bad}'"):
            sd3.settings(None, **{bad: 1})
    with pytest.raises(SensitivityError, match="max_sequence_length"):  # not an SD1.5 pipeline argument
        get_family("sd15").settings(None, max_sequence_length=8)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    assert cli_main(["sample", "sd3", "--weights", "tiny", "--multiquantizer", str(tmp_path / "none.safetensors"),
                     "--cache", str(tmp_path / "c.sqlite"), "--num-configs", "1", "--prompts", str(prompts),
                     "--num-images", "2", "--set", "no_such_knob=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_knob" in err[0], err
    assert not (tmp_path / "c.sqlite").exists()


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from sensitivity.zoo import get_family

    folder = tmp_path_factory.mktemp("pipes") / "my-sd3"
    get_family("sd3").load_pipeline("tiny").save_pretrained(folder)
    return folder


def test_pipeline_folder_discovered_from_model_index(sd3_folder, tmp_path, capsys):
    capsys.readouterr()
    assert cli_main(["layers", "diffusers", "--weights", str(sd3_folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "diffusers-stablediffusion3pipeline" and data["denoiser_class"] == "SD3Transformer2DModel"
    assert data["layers"] == 33 and data["model_id"] == "diffusers-stablediffusion3pipeline:my-sd3"
    assert cli_main(["layers", "diffusers", "--pipeline-class", "NoSuchPipeline", "--weights", str(sd3_folder)]) == 2
    assert "not a diffusers pipeline class" in capsys.readouterr().err
    assert cli_main(["layers", "diffusers", "--weights", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert cli_main(["layers", "sd15", "--pipeline-class", "StableDiffusionPipeline"]) == 2
    assert "--pipeline-class is for MODEL 'diffusers'" in capsys.readouterr().err


def test_multiquantize_then_sample_a_saved_pipeline_folder(sd3_folder, tmp_path, capsys):
    """`--model diffusers --weights FOLDER` (class from model_index.json), and the same with --pipeline-class."""
    mq, cache, prompts = tmp_path / "mq.safetensors", tmp_path / "c.sqlite", tmp_path / "p.txt"
    prompts.write_text("a red bus\na cat\n")
    assert cli_main(["multiquantize", "diffusers", "--weights", str(sd3_folder), "--out", str(mq),
                     "--options", "kmeans_a-4", "--no-progress"]) == 0
    argv = ["sample", "diffusers", "--weights", str(sd3_folder), "--multiquantizer", str(mq), "--cache", str(cache),
            "--num-configs", "2", "--prompts", str(prompts), "--num-images", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--no-progress"]
    capsys.readouterr()
    assert cli_main(argv + ["--json"]) == 0
    summary = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0])
    assert summary["evaluated"] == 2 and summary["complete"]
    rows, evaluation, _ = _records(cache)
    assert rows and all(m["psnr"] > 0 for m, _ in rows)
    assert evaluation["model_id"] == "diffusers-stablediffusion3pipeline:my-sd3"
    # naming the class explicitly is the same family: the job is complete, nothing re-evaluated
    assert cli_main(argv[:2] + ["--pipeline-class", "StableDiffusion3Pipeline"] + argv[2:] + ["--json"]) == 0
    summary = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0])
    assert summary["evaluated"] == 0 and summary["complete"]
    # a folder of another pipeline class is refused in one line
    assert cli_main(argv[:2] + ["--pipeline-class", "FluxPipeline"] + argv[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stablediffusion3pipeline" in err[0].lower() and "flux" in err[0].lower(), err
