"""Malformed input through the real CLI (issue 18): every case must

1. exit non-zero,
2. end stderr with ONE line ``error: ...`` naming the file / layer / option / value at fault, with no
   traceback anywhere,
3. leave nothing at the output path (``OUT`` below stays empty) and every input unchanged.

The CLI runs in-process (``sensitivity.cli.main``), on the shipped digits-dit weights and a two-option
multiquantizer built once; validation comes before any image is generated, so no case generates one.
Cases marked ``issue`` are the 18 the issue found failing; the others passed then and must keep passing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest

from sensitivity.cli import main

FAMILY = "digits-dit"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every input file of the cases, in one folder (``w.d``); outputs go under ``w.out``."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file, save_file

    from sensitivity.config import QuantConfig
    from sensitivity.evaluation.cache import ConfigCache
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    d = tmp_path_factory.mktemp("badinput")
    fam = get_family(FAMILY)
    den = fam.load_denoiser("shipped")
    layers = fam.find_layers(den)
    ns = type("W", (), {})()
    ns.d, ns.out = d, d / "out"
    ns.layers = [s.name for s in layers]

    ns.mq = d / "mq.safetensors"
    build_multiquantizer(den, ns.mq, layers, model_id=fam.model_id("shipped"), options=("uaq-4", "uaq-3"),
                         progress=False)
    raw = ns.mq.read_bytes()
    ns.truncated = d / "truncated.safetensors"
    ns.truncated.write_bytes(raw[: len(raw) // 2])
    ns.edited = d / "edited.safetensors"  # one digit of a layer's stored error changed
    at = raw.index(b'\\"error\\": ') + len(b'\\"error\\": ') + 2
    assert raw[at:at + 1].isdigit()
    ns.edited.write_bytes(raw[:at] + (b"1" if raw[at:at + 1] != b"1" else b"2") + raw[at + 1:])
    ns.listheader = d / "listheader.safetensors"
    head = b"[1, 2, 3]    "
    ns.listheader.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 64)
    ns.garbage = d / "garbage.safetensors"
    ns.garbage.write_bytes(os.urandom(256))
    ns.mqdir = d / "mqdir.safetensors"
    ns.mqdir.mkdir()

    unet = get_family("digits-unet")
    uden = unet.load_denoiser("random")
    ns.foreign = d / "foreign.safetensors"
    build_multiquantizer(uden, ns.foreign, unet.find_layers(uden)[:2], model_id=unet.model_id("random"),
                         options=("int8",), progress=False)

    # weights folder with one NaN weight
    ns.nanw = d / "nan-weights"
    shutil.copytree(fam.shipped_dir, ns.nanw)
    st = next((ns.nanw / "transformer").glob("*.safetensors"))
    tensors = load_file(st)
    key = next(k for k in tensors if k.endswith("attn1.to_q.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, st, metadata={"format": "pt"})

    # configs
    ns.cfg = d / "cfg.json"
    QuantConfig({n: "uaq-3" for n in ns.layers[:4]}).save(ns.cfg)
    ns.cfg_layer = d / "cfg_layer.json"
    ns.cfg_layer.write_text(json.dumps({"options": {"blocks.99.nosuch": "uaq-3"}}))
    ns.cfg_option = d / "cfg_option.json"
    ns.cfg_option.write_text(json.dumps({"options": {ns.layers[0]: "foo-4"}}))
    ns.cfg_pkl = d / "cfg.pkl"
    ns.cfg_pkl.write_bytes(pickle.dumps({ns.layers[0]: "mse-3"}))

    # caches
    ns.cache = d / "cache.sqlite"
    shutil.copyfile(Path(__file__).resolve().parents[1] / "caches" / "digits-dit.sqlite", ns.cache)
    ns.stale = d / "stale.sqlite"
    with ConfigCache(ns.stale, create=True) as c:
        c.ensure_signature("0" * 32, {"model_id": "digits-dit:old", "steps": 99})
    ns.damaged = d / "damaged.sqlite"
    ns.damaged.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    with ConfigCache(ns.cache) as c:
        c.export(d / "export.csv")
    df = pd.read_csv(d / "export.csv", dtype=str)
    cfg0 = json.loads(df.loc[0, "config"])
    cfg0[next(iter(cfg0))] = "zzz-3"
    df.loc[0, "config"] = json.dumps(cfg0)
    ns.csv_option = d / "bad_option.csv"
    df.to_csv(ns.csv_option, index=False)
    (d / "export.csv").unlink()

    ref = "model.transformer_blocks.0.attn1.to_q.weight_quantizer"
    ns.pkl = d / "ref.pkl"
    ns.pkl.write_bytes(pickle.dumps([{"config": {ref: ["mse-4", 100, 25, 0.1]}, "quantized_size": 25,
                                      "avg_bits": 4.0, "quantized_error": 0.1, "FID-GT-1k": 3.0}]))
    ns.pkl_empty = d / "ref_empty.pkl"
    ns.pkl_empty.write_bytes(pickle.dumps([{"config": {ref: ["mse-4", 100, 25, 0.1]}, "FID-GT-1k": 3.0},
                                           {"config": {ref: []}, "FID-GT-1k": 3.0}]))
    ns.pkl_inf = d / "ref_inf.pkl"
    ns.pkl_inf.write_bytes(pickle.dumps([{"config": {ref: ["mse-4", 100, float("inf"), 0.1]},
                                          "quantized_size": float("inf"), "avg_bits": 4.0,
                                          "quantized_error": 0.1, "FID-GT-1k": 3.0}]))

    # a folder this process cannot write (root ignores permission bits: fall back to sysfs)
    ro = d / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    ns.ro = ro if not _can_write(ro) else (Path("/sys") if Path("/sys").is_dir() and not _can_write(Path("/sys"))
                                           else None)
    ns.predictor_dir = d / "not-a-predictor"
    ns.predictor_dir.mkdir()
    torch.manual_seed(0)
    yield ns
    ro.chmod(0o755)


def _can_write(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def _snapshot(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and "out" not in p.relative_to(d).parts[:1]:
            out[str(p.relative_to(d))] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def check(w, capsys, argv, expect):
    """Run the CLI; assert the three checks. ``expect``: substrings the last stderr line must hold."""
    before = _snapshot(w.d)
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        out, err = capsys.readouterr()
        left = sorted(str(p.relative_to(w.out)) for p in w.out.rglob("*")) if w.out.exists() else []
        shutil.rmtree(w.out, ignore_errors=True)  # the next case starts clean whatever happened
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), f"exit 0 for {argv}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    assert lines, f"no stderr for {argv}"
    last = lines[-1]
    assert last.startswith("error: ") or last.startswith("sensitivity"), last
    for s in [expect] if isinstance(expect, str) else expect:
        assert s in last, f"{s!r} not in {last!r}"
    assert not left, f"left behind: {left}"
    stray = {k for k in set(_snapshot(w.d)) - set(before)}
    assert not stray, f"new files beside the inputs: {sorted(stray)}"
    assert _snapshot(w.d) == before, "an input changed"
    return last


def mq_args(w):
    return ["--multiquantizer", w.mq]


# --------------------------------------------------------------------------------- multiquantize, info
MULTIQUANTIZE = {
    "unknown-model": (lambda w: ["multiquantize", "nosuch", "--out", w.out / "x.safetensors"], "nosuch"),
    "unknown-option": (lambda w: ["multiquantize", FAMILY, "--options", "foo-4", "--out", w.out / "x.safetensors"],
                       "foo-4"),
    "unknown-weights": (lambda w: ["multiquantize", FAMILY, "--weights", w.d / "nosuch-folder",
                                   "--out", w.out / "x.safetensors"], "nosuch-folder"),
    "components-unknown": (lambda w: ["multiquantize", FAMILY, "--components", "denoiser,nosuch", "--out",
                                      w.out / "x.safetensors"], ["--components", "nosuch"]),
    "zero-threads": (lambda w: ["multiquantize", FAMILY, "--threads", "0", "--out", w.out / "x.safetensors"],
                     "--threads"),
    "issue:nan-weights": (lambda w: ["multiquantize", FAMILY, "--weights", w.nanw, "--no-progress",
                                     "--out", w.out / "nan.mq.safetensors"], ["nan-weights", "attn1.to_q", "NaN"]),
    "device-cuda": (lambda w: ["multiquantize", FAMILY, "--device", "cuda", "--out", w.out / "x.safetensors"],
                          ["--device cuda", "CUDA"]),
    "info-truncated": (lambda w: ["info", w.truncated], ["truncated.safetensors", "truncated"]),
    "info-edited": (lambda w: ["info", w.edited], ["edited.safetensors", "modified"]),
    "info-garbage": (lambda w: ["info", w.garbage], "garbage.safetensors"),
    "info-missing": (lambda w: ["info", w.d / "nosuch.safetensors"], "nosuch.safetensors"),
    "issue:info-list-header": (lambda w: ["info", w.listheader], ["listheader.safetensors", "header"]),
    "info-directory": (lambda w: ["info", w.mqdir], ["mqdir.safetensors", "not a file"]),
}


@pytest.mark.parametrize("case", list(MULTIQUANTIZE))
def test_multiquantize_and_info(w, capsys, case):
    argv, expect = MULTIQUANTIZE[case]
    if "cuda" in case:
        _need_no_cuda()
    check(w, capsys, argv(w), expect)


def _need_no_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")


# ------------------------------------------------------------------------------------------------ infer
def _infer(w, *extra, mq=True):
    base = ["infer", FAMILY, "--class-id", "3", "--no-progress", "--out", w.out / "images"]
    return base + (mq_args(w) if mq else []) + [*extra]


INFER = {
    "unknown-model": (lambda w: ["infer", "nosuch", "--class-id", "1", "--out", w.out / "images"], "nosuch"),
    "unknown-layer": (lambda w: _infer(w, "--config", w.cfg_layer), ["cfg_layer.json", "blocks.99.nosuch"]),
    "unknown-option": (lambda w: _infer(w, "--config", w.cfg_option), ["cfg_option.json", "foo-4"]),
    "truncated-mq": (lambda w: _infer(w, "--multiquantizer", w.truncated, mq=False), "truncated.safetensors"),
    "edited-mq": (lambda w: _infer(w, "--multiquantizer", w.edited, mq=False), "edited.safetensors"),
    "foreign-mq": (lambda w: _infer(w, "--multiquantizer", w.foreign, mq=False), ["foreign.safetensors", "digits-unet"]),
    "class-id-out-of-range": (lambda w: _infer(w, "--class-id", "10"), "class id 10"),
    "untrusted-pickle": (lambda w: _infer(w, "--config", w.cfg_pkl), ["cfg.pkl", "--trust-pickle"]),
    "mq-directory": (lambda w: _infer(w, "--multiquantizer", w.mqdir, mq=False), ["mqdir.safetensors", "not a file"]),
    "issue:device-cuda": (lambda w: _infer(w, "--config", w.cfg, "--device", "cuda"), ["--device cuda", "CUDA"]),
    "issue:nan-weights": (lambda w: _infer(w, "--weights", w.nanw, mq=False), ["nan-weights", "NaN"]),
    "steps-zero": (lambda w: _infer(w, "--steps", "0"), "--steps"),
    "guidance-nan": (lambda w: _infer(w, "--guidance", "nan"), ["--guidance", "nan"]),
    "n-images-zero": (lambda w: _infer(w, "--n-images", "0"), "--n-images"),
}


@pytest.mark.parametrize("case", list(INFER))
def test_infer(w, capsys, case):
    argv, expect = INFER[case]
    if "cuda" in case:
        _need_no_cuda()
    check(w, capsys, argv(w), expect)


# ------------------------------------------------------------------------------------- sample, evaluate
def _sample(w, *extra, cache=None):
    return ["sample", FAMILY, "--multiquantizer", w.mq, "--cache", cache or w.out / "s.sqlite", "--num-configs", "2",
            "--images-per-class", "1", "--no-progress", *extra]


def _evaluate(w, *extra):
    return ["evaluate", FAMILY, "--multiquantizer", w.mq, "--config", w.cfg, "--images-per-class", "1", *extra]


SAMPLE = {
    "zero-configs": (lambda w: _sample(w, "--num-configs", "0"), "--num-configs"),
    "zero-workers": (lambda w: _sample(w, "--workers", "0"), "--workers"),
    "devices-not-visible": (lambda w: _sample(w, "--devices", "cuda:3"), ["--devices", "cuda:3"]),
    "devices-and-device": (lambda w: _sample(w, "--devices", "cpu,cpu", "--device", "cpu"), "--devices"),
    "batch-size-word": (lambda w: _sample(w, "--batch-size", "big"), ["--batch-size", "big"]),
    "compile-backend": (lambda w: _sample(w, "--compile", "nosuch"), ["--compile", "nosuch"]),
    "stale-signature": (lambda w: _sample(w, cache=w.stale), ["stale.sqlite", "signature"]),
    "damaged-sqlite": (lambda w: _sample(w, cache=w.damaged), "damaged.sqlite"),
    "class-ids-out-of-range": (lambda w: _sample(w, "--class-ids", "0-10"), "class id 10"),
    "foreign-mq": (lambda w: _sample(w, "--multiquantizer", w.foreign), ["foreign.safetensors", "digits-unet"]),
    "truncated-mq": (lambda w: _sample(w, "--multiquantizer", w.truncated), "truncated.safetensors"),
    "unknown-model": (lambda w: ["sample", "nosuch", "--multiquantizer", w.mq, "--cache", w.out / "s.sqlite",
                                 "--num-configs", "2"], "nosuch"),
    "issue:threads-negative": (lambda w: _sample(w, "--threads", "-1"), ["--threads", "-1"]),
    "issue:steps-zero": (lambda w: _sample(w, "--steps", "0"), ["--steps", "0"]),
    "issue:guidance-nan": (lambda w: _sample(w, "--guidance", "nan"), ["--guidance", "nan"]),
    "issue:readonly-cache-dir": (lambda w: _sample(w, cache=w.ro / "s.sqlite"), ["s.sqlite", "not writable"]),
    "device-cuda": (lambda w: _sample(w, "--device", "cuda"), ["--device cuda", "CUDA"]),
    "nan-weights": (lambda w: _sample(w, "--weights", w.nanw), ["nan-weights", "NaN"]),
    "evaluate-unknown-layer": (lambda w: _evaluate(w, "--config", w.cfg_layer), ["cfg_layer.json", "blocks.99.nosuch"]),
    "evaluate-untrusted-pickle": (lambda w: _evaluate(w, "--config", w.cfg_pkl), ["cfg.pkl", "--trust-pickle"]),
    "evaluate-stale-signature": (lambda w: _evaluate(w, "--cache", w.stale), ["stale.sqlite", "signature"]),
    "evaluate-guidance-inf": (lambda w: _evaluate(w, "--guidance", "inf"), ["--guidance", "inf"]),
    "evaluate-nan-weights": (lambda w: _evaluate(w, "--weights", w.nanw, "--cache", w.out / "e.sqlite"),
                             ["nan-weights", "NaN"]),
}


@pytest.mark.parametrize("case", list(SAMPLE))
def test_sample_and_evaluate(w, capsys, case):
    argv, expect = SAMPLE[case]
    if "cuda" in case:
        _need_no_cuda()
    if "readonly" in case and w.ro is None:
        pytest.skip("no folder here that this process cannot write")
    check(w, capsys, argv(w), expect)


# ------------------------------------------------------------------------------- cache info/export/import
CACHE = {
    "info-damaged": (lambda w: ["cache", "info", w.damaged], "damaged.sqlite"),
    "info-missing": (lambda w: ["cache", "info", w.d / "nosuch.sqlite"], "nosuch.sqlite"),
    "export-damaged": (lambda w: ["cache", "export", w.damaged, "--out", w.out / "x.csv"], "damaged.sqlite"),
    "export-unknown-format": (lambda w: ["cache", "export", w.cache, "--out", w.out / "x.xlsx"], "xlsx"),
    "issue:export-readonly-dir": (lambda w: ["cache", "export", w.cache, "--out", w.ro / "x.csv"],
                                  ["x.csv", "not writable"]),
    "issue:export-onto-directory": (lambda w: ["cache", "export", w.cache, "--out", w.predictor_dir],
                                    ["not-a-predictor", "folder"]),
    "import-untrusted-pickle": (lambda w: ["cache", "import", w.out / "n.sqlite", w.pkl], ["ref.pkl", "--trust-pickle"]),
    "import-pickle-no-model": (lambda w: ["cache", "import", w.out / "n.sqlite", w.pkl, "--trust-pickle"],
                               ["ref.pkl", "--model"]),
    "import-stale-signature": (lambda w: ["cache", "import", w.stale, w.pkl, "--trust-pickle", "--model", FAMILY],
                               ["ref.pkl", "signature"]),
    "import-into-damaged": (lambda w: ["cache", "import", w.damaged, w.pkl, "--trust-pickle", "--model", FAMILY],
                            "damaged.sqlite"),
    "import-missing-file": (lambda w: ["cache", "import", w.out / "n.sqlite", w.d / "nosuch.csv"], "nosuch.csv"),
    "issue:import-pickle-empty-entry": (lambda w: ["cache", "import", w.out / "n.sqlite", w.pkl_empty, "--trust-pickle",
                                                   "--model", FAMILY], ["ref_empty.pkl", "entry 1"]),
    "issue:import-pickle-inf-size": (lambda w: ["cache", "import", w.out / "n.sqlite", w.pkl_inf, "--trust-pickle",
                                                "--model", FAMILY], ["ref_inf.pkl", "entry 0", "inf"]),
    "issue:import-csv-unknown-option": (lambda w: ["cache", "import", w.out / "n.sqlite", w.csv_option],
                                        ["bad_option.csv", "zzz-3"]),
    "import-readonly-dir": (lambda w: ["cache", "import", w.ro / "n.sqlite", w.pkl, "--trust-pickle",
                                             "--model", FAMILY], ["n.sqlite", "not writable"]),
}


@pytest.mark.parametrize("case", list(CACHE))
def test_cache(w, capsys, case):
    argv, expect = CACHE[case]
    if "readonly" in case and w.ro is None:
        pytest.skip("no folder here that this process cannot write")
    check(w, capsys, argv(w), expect)


# ----------------------------------------------------------------------------------------- train, predict
def _train(w, *extra):
    return ["train", w.cache, "--model", FAMILY, "--predictor", "bits", "--baselines", "", "--out", w.out / "pred", *extra]


TRAIN = {
    "missing-cache": (lambda w: ["train", w.d / "nosuch.sqlite", "--out", w.out / "pred"], "nosuch.sqlite"),
    "damaged-cache": (lambda w: ["train", w.damaged, "--predictor", "bits", "--baselines", "", "--out", w.out / "pred"],
                      "damaged.sqlite"),
    "unknown-predictor": (lambda w: _train(w, "--predictor", "nosuch"), "nosuch"),
    "one-fold": (lambda w: _train(w, "--folds", "1"), "--folds"),
    "unknown-model": (lambda w: _train(w, "--model", "nosuch"), "nosuch"),
    "issue:lam-nan": (lambda w: _train(w, "--lam", "nan"), ["--lam", "nan"]),
    "lam-inf": (lambda w: _train(w, "--lam", "inf"), ["--lam", "inf"]),
    "unknown-target": (lambda w: _train(w, "--target", "nosuch_metric"), "nosuch_metric"),
    "predict-not-a-predictor": (lambda w: ["predict", "--predictor", w.predictor_dir, "--cache", w.cache,
                                           "--out", w.out / "p.csv"], "not-a-predictor"),
}


@pytest.mark.parametrize("case", list(TRAIN))
def test_train_and_predict(w, capsys, case):
    argv, expect = TRAIN[case]
    check(w, capsys, argv(w), expect)


# ------------------------------------------------------------------------------------------------- search
def _search(w, *extra, out=None):
    return ["search", "--baseline", "error-ilp", "--multiquantizer", w.mq, "--out", out or w.out / "s.json", *extra]


SEARCH = {
    "infeasible-low-target": (lambda w: _search(w, "--target-bits", "1"), ["target 1", "smallest feasible"]),
    "unknown-option": (lambda w: _search(w, "--target-bits", "3.5", "--options", "foo-4"), "foo-4"),
    "option-not-in-mq": (lambda w: _search(w, "--target-bits", "3.5", "--options", "kmeans_a-4"), "kmeans_a-4"),
    "edited-mq": (lambda w: _search(w, "--target-bits", "3.5", "--multiquantizer", w.edited), "edited.safetensors"),
    "truncated-mq": (lambda w: _search(w, "--target-bits", "3.5", "--multiquantizer", w.truncated),
                     "truncated.safetensors"),
    "missing-predictor": (lambda w: ["search", "--predictor", w.d / "nosuch", "--target-bits", "3.5",
                                     "--out", w.out / "s.json"], "nosuch"),
    "uniform-unknown-option": (lambda w: ["search", "--baseline", "uniform", "--option", "uaq-9", "--multiquantizer",
                                          w.mq, "--out", w.out / "s.json"], "uaq-9"),
    "target-memory-unit": (lambda w: _search(w, "--target-memory", "4.5XB"), ["--target-memory", "4.5XB"]),
    "target-memory-infeasible": (lambda w: _search(w, "--target-memory", "1kB"), ["--target-memory", "infeasible"]),
    "memory-model-unknown": (lambda w: _search(w, "--target-memory", "1GB", "--memory-model", "nosuch"),
                             ["memory model", "nosuch"]),
    "target-memory-allocator": (lambda w: _search(w, "--target-memory", "1GB", "--baseline", "sdnq"),
                              ["--target-memory", "sdnq"]),
    "issue:target-inf": (lambda w: _search(w, "--target-bits", "inf"), ["--target-bits", "inf"]),
    "issue:target-above-16": (lambda w: _search(w, "--target-bits", "17"), ["17", "16"]),
    "target-above-options": (lambda w: _search(w, "--target-bits", "5"), ["--target-bits 5", "above 4.2080"]),
    "target-nan": (lambda w: _search(w, "--target-bits", "nan"), ["--target-bits", "nan"]),
    "issue:sweep-all-infeasible": (lambda w: _search(w, "--sweep", "1:2:0.5", out=w.out / "sweep"), "1:2:0.5"),
    "issue:mq-directory": (lambda w: _search(w, "--target-bits", "3.5", "--multiquantizer", w.mqdir),
                           "mqdir.safetensors"),
    "mq-list-header": (lambda w: _search(w, "--target-bits", "3.5", "--multiquantizer", w.listheader),
                       "listheader.safetensors"),
    "damaged-cache": (lambda w: _search(w, "--target-bits", "3.5", "--cache", w.damaged), "damaged.sqlite"),
}


@pytest.mark.parametrize("case", list(SEARCH))
def test_search(w, capsys, case):
    argv, expect = SEARCH[case]
    check(w, capsys, argv(w), expect)


def test_case_count():
    """The issue's 18 failing cases are all here, among at least 51."""
    everything = [MULTIQUANTIZE, INFER, SAMPLE, CACHE, TRAIN, SEARCH]
    names = [f"{i}:{k}" for i, t in enumerate(everything) for k in t]
    assert sum(":issue:" in n for n in names) >= 18
    assert len(names) >= 51


def test_atomic_helpers(tmp_path):
    """sensitivity.io: the target appears whole or not at all; temporaries never stay."""
    from sensitivity.errors import SensitivityError
    from sensitivity.io import atomic_dir, atomic_path, atomic_write_text

    f = tmp_path / "a" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert not f.exists() and not any(f.parent.iterdir())
    atomic_write_text(f, "whole")
    assert f.read_text() == "whole" and [p.name for p in f.parent.iterdir()] == ["x.json"]

    folder = tmp_path / "imgs"
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "0.png").write_bytes(b"x")
            raise RuntimeError("generation failed")
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with atomic_dir(folder) as tmp:
        (tmp / "0.png").write_bytes(b"new")
    folder.joinpath("keep.txt").write_text("mine")
    with atomic_dir(folder) as tmp:  # into an existing folder: same names replaced, others kept
        (tmp / "0.png").write_bytes(b"newer")
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "keep.txt"]
    assert (folder / "0.png").read_bytes() == b"newer"
    with pytest.raises(RuntimeError):  # replace mode: a failed writer leaves the old folder as it was
        with atomic_dir(folder, replace=True) as tmp:
            (tmp / "1.png").write_bytes(b"x")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "keep.txt"]
    with atomic_dir(folder, replace=True) as tmp:  # the whole folder replaced: entries only the old one had are gone
        (tmp / "1.png").write_bytes(b"x")
    assert [p.name for p in folder.iterdir()] == ["1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "imgs"]  # no temporaries or old folders left
    with pytest.raises(SensitivityError, match="is a folder"):
        atomic_write_text(folder, "x")
    with pytest.raises(SensitivityError, match="not a folder"):
        with atomic_dir(f):
            pass
