"""The real-model evaluation path on tiny weights: metric dependencies checked before any image,
an offline FID Inception file, content-keyed reference signatures, W·A activation bits in the protocol."""

import builtins
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.cli import main as cli_main
from sensitivity.evaluation import metrics as M
from sensitivity.evaluation.evaluator import EvalProtocol


class _TinyInceptionBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 7, stride=8)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1)  # [B, 6, 1, 1]


class _TinyInception(nn.Module):
    """clean-fid's file layout: the TorchScript module's ``.layers`` maps (x - 128) / 128 to pooled features."""

    def __init__(self):
        super().__init__()
        self.layers = _TinyInceptionBody()

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def real_inputs(tmp_path_factory):
    """A tiny sd15 multiquantizer (2 options), a prompts file, a reference folder and an Inception file."""
    from PIL import Image

    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    root = tmp_path_factory.mktemp("real")
    fam = get_family("sd15")
    den = fam.load_denoiser("tiny", seed=0)
    mq = root / "sd15-tiny.safetensors"
    build_multiquantizer(den, mq, fam.find_layers(den), model_id=fam.model_id("tiny"), options=("kmeans_a-4", "kmeans_a-3"),
                         progress=False)
    ref = root / "coco" / "val"
    ref.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    torch.manual_seed(0)
    inception = root / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(inception))
    prompts = root / "prompts.txt"
    prompts.write_text("a red bus\na cat on a mat\n")
    return {"mq": mq, "ref": ref, "inception": inception, "prompts": prompts, "root": root}


def _sample_argv(r, cache, *extra):
    return ["sample", "sd15", "--weights", "tiny", "--multiquantizer", str(r["mq"]), "--cache", str(cache),
            "--num-configs", "1", "--prompts", str(r["prompts"]), "--num-images", "2", "--steps", "2",
            "--reference-dir", str(r["ref"]), "--inception", str(r["inception"]), "--reference-cache",
            str(r["root"] / "refcache"), "--no-progress", "--json", *extra]


def test_sample_sd15_a6_offline_with_inception_file(real_inputs, capsys):
    cache = real_inputs["root"] / "a6.sqlite"
    assert cli_main(_sample_argv(real_inputs, cache, "--act-bits", "6")) == 0
    summary = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0])
    assert summary["evaluated"] == 1 and summary["complete"]
    with sqlite3.connect(cache) as c:
        (metrics,) = c.execute("SELECT metrics FROM records").fetchone()
        evaluation = json.loads(c.execute("SELECT value FROM meta WHERE key='evaluation'").fetchone()[0])
    m = json.loads(metrics)
    assert np.isfinite(m["fid"]) and np.isfinite(m["kid"]) and m["psnr"] > 0
    assert evaluation["act_bits"] == 6 and evaluation["act_mode"] == "online"
    assert evaluation["feature_net"] == M.inception_name(real_inputs["inception"])
    assert evaluation["reference"].startswith("folder:4:") and ":stats:" in evaluation["reference"]
    assert len(list((real_inputs["root"] / "refcache").glob("fid_ref_*.npz"))) == 1  # computed once, cached


def test_killing_cleanfid_fails_before_any_image(real_inputs, capsys, monkeypatch):
    from sensitivity.zoo.base import ModelFamily

    real_import = builtins.__import__

    def no_cleanfid(name, *args, **kwargs):
        if name == "cleanfid" or name.startswith("cleanfid."):
            raise ImportError(f"No module named {name!r} (killed by the test)")
        return real_import(name, *args, **kwargs)

    generated, loaded = [], []
    monkeypatch.setattr(builtins, "__import__", no_cleanfid)
    for mod in [m for m in list(__import__("sys").modules) if m == "cleanfid" or m.startswith("cleanfid.")]:
        monkeypatch.delitem(__import__("sys").modules, mod)
    monkeypatch.setattr(M, "_cleanfid_resize_module", M._cleanfid_resize_module.__wrapped__)
    monkeypatch.setattr(ModelFamily, "generate", lambda self, *a, **k: generated.append(1))
    monkeypatch.setattr(ModelFamily, "load_pipeline", lambda self, *a, **k: loaded.append(1))
    cache = real_inputs["root"] / "killed.sqlite"
    assert cli_main(_sample_argv(real_inputs, cache, "--act-bits", "6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clean-fid" in err[0] and "sensitivity[cleanfid]" in err[0], err
    assert not generated and not loaded and not cache.exists()


def test_missing_inception_and_bad_inception_are_one_line_errors(real_inputs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(M, "CLEANFID_INCEPTION_DIR", tmp_path / "nothing-here")
    argv = _sample_argv(real_inputs, tmp_path / "c.sqlite")
    i = argv.index("--inception")
    assert cli_main(argv[:i] + argv[i + 2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception PATH" in err[0] and M.CLEANFID_INCEPTION_URL in err[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    argv[i + 1] = str(bad)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a TorchScript FID-Inception" in err[0] and not (tmp_path / "c.sqlite").exists()


def test_reference_signature_is_keyed_by_content(real_inputs, tmp_path):
    """Copying the reference folder elsewhere (new path, new mtimes) keeps the signature; editing a file changes it."""
    ext = M.CleanFIDInception(device="cpu", model=real_inputs["inception"])
    copy = tmp_path / "elsewhere" / "val2017"
    shutil.copytree(real_inputs["ref"], copy, copy_function=shutil.copy)  # new mtimes

    def signature(folder, cache):
        feats = M.reference_folder_features(folder, cache, ext, verbose=False)
        return EvalProtocol.for_family("sd15", "tiny", conditions=["a", "b"], reference_dir=folder,
                                       inception=real_inputs["inception"], reference_features=feats).signature()

    a = signature(real_inputs["ref"], tmp_path / "cache1")
    assert signature(copy, tmp_path / "cache2") == a
    assert len(list((tmp_path / "cache2").glob("*.npz"))) == 1
    from PIL import Image

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(copy / "000.png")
    assert signature(copy, tmp_path / "cache2") != a


def test_protocol_act_bits_in_signature_and_old_signatures_unchanged():
    base = EvalProtocol.for_family("digits-dit", n_per_class=2)
    assert "act_bits" not in base.to_dict() and "extra" not in base.to_dict()  # old caches keep their signature
    a6 = EvalProtocol.for_family("digits-dit", n_per_class=2, act_bits=6)
    a8 = EvalProtocol.for_family("digits-dit", n_per_class=2, act_bits=8)
    assert len({base.signature(), a6.signature(), a8.signature()}) == 3
    assert EvalProtocol.from_dict(a6.to_dict()) == a6 and a6.act_mode == "online"
    from sensitivity.errors import SensitivityError

    with pytest.raises(SensitivityError, match="act_bits 5"):
        EvalProtocol.for_family("digits-dit", n_per_class=2, act_bits=5)
    with pytest.raises(SensitivityError, match="calibration set"):
        EvalProtocol.for_family("digits-dit", n_per_class=2, act_bits=6).__class__(
            **{**a6.to_dict(), "conditions": a6.conditions, "seeds": a6.seeds, "metrics": a6.metrics,
               "act_mode": "static"})


def test_committed_cache_keeps_its_signature():
    """The committed digits-dit cache's signature is still what its protocol produces today."""
    from sensitivity.evaluation.cache import ConfigCache

    path = Path(__file__).resolve().parent.parent / "caches" / "digits-dit.sqlite"
    with ConfigCache(path) as c:
        evaluation, signature = c.evaluation, c.signature
    assert EvalProtocol.from_dict(evaluation).signature() == signature


def test_bops_as_the_reference_defines_them():
    """MACs counted on the real generation x weight bits x activation bits, all steps; one digits-dit image."""
    from sensitivity.evaluation.bops import count_macs, tera_bops, weight_bits
    from sensitivity.multiquantizer import build_multiquantizer  # noqa: F401
    from sensitivity.zoo import get_family

    assert (weight_bits("uaq-3"), weight_bits("kmeans_c-3"), weight_bits("fp8_e4m3"), weight_bits("int8"),
            weight_bits(None)) == (3, 16, 8, 8, 16)
    fam = get_family("digits-dit")
    pipe = fam.load_pipeline()
    den = fam.denoiser(pipe)
    layers = fam.find_layers(den)
    with count_macs(den, layers) as macs:
        fam.generate(pipe, [3], [0], steps=2)
    q = next(s for s in layers if s.name == "transformer_blocks.0.attn1.to_q")
    tokens = (8 // den.config.patch_size) ** 2
    assert macs[q.name] == 2 * tokens * q.shape[0] * q.shape[1]  # 2 steps, no guidance
    fp = tera_bops({}, macs)
    assert fp == pytest.approx(sum(macs.values()) * 16 * 16 / 1e12)
    assert tera_bops({q.name: "uaq-4"}, macs, act_bits=6) == pytest.approx(
        (sum(macs.values()) * 16 - macs[q.name] * 12) * 6 / 1e12)


def test_copied_reference_folder_keeps_the_cache_from_the_cli(real_inputs, tmp_path, capsys):
    """A job resumed with the reference folder copied elsewhere (new path, new mtimes) and a fresh feature cache
    is the same protocol: the cache accepts it and nothing is evaluated again; an edited image is refused."""
    cache = tmp_path / "c.sqlite"
    argv = _sample_argv(real_inputs, cache)
    assert cli_main(argv) == 0
    capsys.readouterr()
    copy = tmp_path / "mnt" / "coco-copy"
    shutil.copytree(real_inputs["ref"], copy, copy_function=shutil.copy)
    moved = list(argv)
    moved[moved.index("--reference-dir") + 1] = str(copy)
    moved[moved.index("--reference-cache") + 1] = str(tmp_path / "other-refcache")
    assert cli_main(moved) == 0
    summary = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0])
    assert summary["complete"] and summary["evaluated"] == 0 and summary["done_before"] == 1
    from PIL import Image

    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(copy / "001.png")
    moved[moved.index("--reference-cache") + 1] = str(tmp_path / "third-refcache")
    assert cli_main(moved) == 2
    assert "signature" in capsys.readouterr().err
