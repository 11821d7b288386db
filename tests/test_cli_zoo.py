"""CLI: ``sensitivity models``, ``layers`` and ``infer`` (tiny weights, offline), and their bad-input errors."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sensitivity.cli import main
from sensitivity.config import QuantConfig
from sensitivity.multiquantizer import build_multiquantizer
from sensitivity.zoo import get_family


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_models(capsys):
    rc, out, _ = run(["models"], capsys)
    assert rc == 0
    for name in ("sd15", "sdxl", "pixart-alpha", "pixart-sigma", "dit-xl-2", "hunyuan-dit"):
        assert name in out
    assert "DPMSolverMultistepScheduler" in out and "PNDMScheduler (checkpoint's)" in out
    rc, out, _ = run(["models", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["dit-xl-2"]["defaults"]["steps"] == 250 and rows["dit-xl-2"]["conditioning"] == "class"
    assert rows["sd15"]["default_weights"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_layers_meta_json_and_table(capsys):
    rc, out, _ = run(["layers", "hunyuan-dit", "--weights", "meta", "--json"], capsys)
    assert rc == 0
    rep = json.loads(out)
    assert rep["layers"] == len(rep["table"]) == 487 and rep["conv_linear_modules"] == 472
    assert rep["reference_layers"] == 474 and rep["fp16_bytes"] == 2_999_291_904
    assert rep["denoiser_params"] == 1_516_534_048 and len(rep["splits"]) == 19
    assert sorted(rep["excluded"]) == [f"time_extra_emb.pooler.{p}_proj" for p in "ckqv"]
    row = {r["name"]: r for r in rep["table"]}["blocks.30.skip_linear#skip"]
    assert row["split"] == [1408, 2816] and row["shape"] == [1408, 1408] and row["fp16_bytes"] == 2 * 1408 * 1408
    rc, out, _ = run(["layers", "dit-xl-2", "--weights", "meta"], capsys)
    assert rc == 0
    total = out.strip().splitlines()[-1]
    assert total.startswith("total: 201 layers, reference 201") and "54 tied copies" in total
    assert "749.8 M parameters" in total


def test_layers_bad_input(capsys, tmp_path):
    rc, _, err = run(["layers", "sd99", "--weights", "meta"], capsys)
    assert rc == 2
    one_error_line(err, "unknown model 'sd99'", "pixart-sigma")
    rc, _, err = run(["layers", "sd15", "--weights", str(tmp_path)], capsys)
    assert rc == 2
    one_error_line(err, str(tmp_path), "is not a diffusers model")


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    """A multiquantizer of tiny DiT (a subset of its layers, incl. the tied embedder) and configs."""
    d = tmp_path_factory.mktemp("infer")
    fam = get_family("dit-xl-2")
    den = fam.load_denoiser("tiny", seed=0)
    layers = fam.find_layers(den)
    pick = layers[:3] + layers[-3:]
    mq = build_multiquantizer(den, d / "mq.safetensors", pick, model_id=fam.model_id("tiny"),
                              options=("uaq-4", "uaq-3"), progress=False)
    torch.set_num_threads(1)  # numba's parallel kernel resets the shared OpenMP thread count
    QuantConfig({s.name: "uaq-3" for s in pick}, model="dit-xl-2:tiny", multiquantizer_hash=mq.hash).save(d / "w3.json")
    QuantConfig({"transformer_blocks.0.attn2.to_q": "uaq-4"}).save(d / "other_model.json")
    QuantConfig({pick[0].name: "kmeans_c-3"}).save(d / "missing_option.json")
    with open(d / "ref.pkl", "wb") as fh:
        pickle.dump({f"model.{pick[1].name}.weight_quantizer": "mse-3"}, fh)
    return d, pick


def test_infer_end_to_end(capsys, dit_files):
    d, pick = dit_files
    out = d / "out"
    argv = ["infer", "dit-xl-2", "--weights", "tiny", "--multiquantizer", str(d / "mq.safetensors"),
            "--config", str(d / "w3.json"), "--class-id", "3", "--class-id", "7", "--n-images", "3",
            "--act-bits", "8", "--out", str(out), "--no-progress", "--steps", "2", "--device", "cpu"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert "wrote 3 images" in stdout and "A8" in stdout
    rec = json.loads((out / "run.json").read_text())
    assert rec["model_id"] == "dit-xl-2:tiny" and rec["act_bits"] == 8
    assert rec["config"]["quantized_layers"] == len(pick) and 3.0 < rec["config"]["avg_bits"] < 5.0
    assert [(r["file"], r["class_id"], r["seed"]) for r in rec["images"]] == \
           [("00000.png", 3, 0), ("00001.png", 7, 1), ("00002.png", 3, 2)]
    assert rec["settings"]["steps"] == 2 and rec["settings"]["scheduler"] == "DPMSolverMultistepScheduler"
    imgs = [np.asarray(Image.open(out / r["file"])) for r in rec["images"]]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in imgs)
    # full precision, no act quantization: different images for the same seeds
    rc, _, err = run(["infer", "dit-xl-2", "--weights", "tiny", "--class-id", "3", "--out", str(d / "fp"),
                      "--no-progress", "--steps", "2"], capsys)
    assert rc == 0, err
    fp = np.asarray(Image.open(d / "fp" / "00000.png"))
    assert not np.array_equal(fp, imgs[0])
    assert json.loads((d / "fp" / "run.json").read_text())["config"] is None


def test_infer_text_model(capsys, tmp_path):
    out = tmp_path / "sigma"
    rc, stdout, err = run(["infer", "pixart-sigma", "--weights", "tiny", "--prompt", "a red bus", "--n-images", "2",
                           "--out", str(out), "--no-progress", "--act-bits", "6"], capsys)
    assert rc == 0, err
    rec = json.loads((out / "run.json").read_text())
    assert [r["prompt"] for r in rec["images"]] == ["a red bus", "a red bus"]
    assert rec["activation_quantization"]["bits"] == 6 and len(list(out.glob("*.png"))) == 2


@pytest.mark.parametrize("extra,needles", [
    (["--config", "other_model.json"], ["'transformer_blocks.0.attn2.to_q'", "is not in multiquantizer"]),
    (["--config", "missing_option.json"], ["'kmeans_c-3' is not in multiquantizer", "uaq-4, uaq-3"]),
    (["--config", "ref.pkl"], ["refusing to unpickle", "--trust-pickle"]),
])
def test_infer_bad_config(capsys, dit_files, extra, needles):
    d, _ = dit_files
    extra = [extra[0], str(d / extra[1])]
    rc, _, err = run(["infer", "dit-xl-2", "--weights", "tiny", "--multiquantizer", str(d / "mq.safetensors"),
                      "--class-id", "1", "--out", str(d / "bad"), *extra], capsys)
    assert rc == 2
    one_error_line(err, *needles)


def test_infer_trusted_reference_pickle(capsys, dit_files):
    d, pick = dit_files
    rc, _, err = run(["infer", "dit-xl-2", "--weights", "tiny", "--multiquantizer", str(d / "mq.safetensors"),
                      "--config", str(d / "ref.pkl"), "--trust-pickle", "--class-id", "1", "--steps", "1",
                      "--out", str(d / "pkl"), "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((d / "pkl" / "run.json").read_text())["config"]["quantized_layers"] == 1


def test_infer_bad_input(capsys, dit_files):
    d, _ = dit_files
    mq = str(d / "mq.safetensors")
    cases = [
        (["infer", "pixart-sigma", "--weights", "tiny", "--multiquantizer", mq, "--prompt", "x"],
         ["built for dit-xl-2:tiny", "not for model 'pixart-sigma'"]),
        (["infer", "dit-xl-2", "--weights", "tiny", "--prompt", "a cat"], ["class-conditional", "--class-id"]),
        (["infer", "dit-xl-2", "--weights", "tiny", "--class-id", "1", "--set", "stepz=3"],
         ["unknown generation setting 'stepz'"]),
        (["infer", "dit-xl-2", "--weights", "tiny", "--class-id", "1", "--config", str(d / "w3.json")],
         ["--config needs --multiquantizer"]),
        (["infer", "nope", "--class-id", "1"], ["unknown model 'nope'"]),
    ]
    for argv, needles in cases:
        rc, _, err = run(argv + ["--out", str(d / "bad2")], capsys)
        assert rc == 2, argv
        one_error_line(err, *needles)
