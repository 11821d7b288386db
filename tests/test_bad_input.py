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
    ns.scores = d / "scores.csv"  # a valid (layer, option, score) table; no cost table beside the mq
    pd.DataFrame([(l, o, 0.0) for l in ns.layers for o in ("uaq-4", "uaq-3")],
                 columns=["layer", "option", "score"]).to_csv(ns.scores, index=False)

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
    "num-images-on-class-model": (lambda w: _sample(w, "--num-images", "20"), ["class-conditional", "--num-images"]),
    "full-configs-without-images": (lambda w: _sample(w, "--full-configs", "2"), ["--full-configs",
                                                                                "--full-images-per-class"]),
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
    "export-unknown-fidelity": (lambda w: ["cache", "export", w.cache, "--out", w.out / "x.csv", "--fidelity", "cheap"],
                                ["no fidelity 'cheap'"]),
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
    "mixed-without-cheap-labels": (lambda w: _train(w, "--fidelity", "mixed"), "has no cheap labels"),
    "prior-not-a-predictor": (lambda w: _train(w, "--prior", w.predictor_dir), "not-a-predictor"),
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
    "latency-with-baseline": (lambda w: _search(w, "--target-latency", "2"), ["--baseline error-ilp", "--target-latency"]),
    "latency-negative": (lambda w: _latency(w, "-1"), ["--target-latency", "-1"]),
    "latency-nan": (lambda w: _latency(w, "nan"), ["--target-latency", "nan"]),
    "latency-no-cost-table": (lambda w: _latency(w, "2"), ["no cost table", "mq.safetensors", "sensitivity costs"]),
    "latency-missing-costs": (lambda w: _latency(w, "2", "--costs", w.d / "nosuch.json"), "nosuch.json"),
    "latency-garbage-costs": (lambda w: _latency(w, "2", "--costs", w.scores), ["scores.csv", "not valid JSON"]),
    "memory-runtime-no-cost-table": (lambda w: _search(w, "--target-memory", "1GB", "--memory-model", "runtime"),
                                     ["no cost table", "mq.safetensors", "sensitivity costs"]),
    "memory-runtime-garbage-costs": (lambda w: _search(w, "--target-memory", "1GB", "--memory-model", "runtime",
                                                       "--costs", w.scores), ["scores.csv", "not valid JSON"]),
    "memory-costs-without-runtime": (lambda w: _search(w, "--target-memory", "1GB", "--costs", w.scores),
                                     ["--costs", "--memory-model runtime"]),
}


def _latency(w, target, *extra):
    return ["search", "--scores", w.scores, "--multiquantizer", w.mq, "--target-latency", target,
            "--out", w.out / "s.json", *extra]


@pytest.mark.parametrize("case", list(SEARCH))
def test_search(w, capsys, case):
    argv, expect = SEARCH[case]
    check(w, capsys, argv(w), expect)


COSTS = {
    "costs-missing-mq": (lambda w: ["costs", FAMILY, "--multiquantizer", w.d / "nosuch.safetensors"],
                         "nosuch.safetensors"),
    "costs-zero-repeats": (lambda w: ["costs", FAMILY, "--multiquantizer", w.mq, "--repeats", "0"], "--repeats"),
    "costs-out-not-json": (lambda w: ["costs", FAMILY, "--multiquantizer", w.mq, "--out", w.out / "c.txt"], "c.txt"),
    "costs-truncated-mq": (lambda w: ["costs", FAMILY, "--multiquantizer", w.truncated], "truncated.safetensors"),
}


@pytest.mark.parametrize("case", list(COSTS))
def test_costs(w, capsys, case):
    argv, expect = COSTS[case]
    check(w, capsys, argv(w), expect)


def test_case_count():
    """The issue's 18 failing cases are all here, among at least 51."""
    everything = [MULTIQUANTIZE, INFER, SAMPLE, CACHE, TRAIN, SEARCH, COSTS]
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


# ======================================================================================================
# Issue 24: the workflows added since (calibrate-data, calibrate, finetune, export, components, search
# baselines, sample options). One row per case of the issue (``case N``), same three checks.
# ======================================================================================================
@pytest.fixture(scope="module")
def v(w, tmp_path_factory):
    """Inputs of the issue-24 cases, beside ``w``'s (in ``w.d``, so the checks see them unchanged)."""
    import torch

    from sensitivity.config import QuantConfig
    from sensitivity.io import _host

    d = w.d
    ns = type("V", (), {})()
    ns.cal_dir = d / "cal_dir.safetensors"  # a folder where the calibration file should go
    ns.cal_dir.mkdir()
    ns.cfg_family = d / "cfg_family.json"  # "model": the family name alone (accepted everywhere)
    QuantConfig({n: "uaq-4" for n in w.layers[:4]}, model=FAMILY).save(ns.cfg_family)
    ns.cfg_unet = d / "cfg_unet.json"  # a config of another model (refused everywhere, one message)
    QuantConfig({n: "uaq-4" for n in w.layers[:4]}, model="digits-unet:shipped").save(ns.cfg_unet)
    ns.ft_damaged = d / "ft-damaged"  # a fine-tuning run whose checkpoint was cut short
    (ns.ft_damaged / "checkpoints").mkdir(parents=True)
    (ns.ft_damaged / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04" + os.urandom(300))

    # a predictor folder whose fold tensors are listed but whose weights.safetensors is gone
    pred = tmp_path_factory.mktemp("pred") / "bits"
    assert main(["train", str(w.cache), "--model", FAMILY, "--predictor", "bits", "--baselines", "", "--folds", "2",
                 "--no-scores", "--out", str(pred)]) == 0
    ns.pred_noweights = d / "pred-noweights"
    shutil.copytree(pred, ns.pred_noweights)
    man = json.loads((ns.pred_noweights / "predictor.json").read_text())
    man["members"]["bits"]["folds"][0]["tensors"] = ["coef"]
    (ns.pred_noweights / "predictor.json").write_text(json.dumps(man))

    # a packed export, written with a stale temporary of a killed export beside it and a group-readable umask
    dead = _dead_pid()
    ns.exports = tmp_path_factory.mktemp("exports")
    stale = ns.exports / f".packed.{_host()}-{dead}-0123abcd.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"\0" * 1000)
    old = os.umask(0o022)
    try:
        assert main(["export", FAMILY, "--weights", "shipped", "--multiquantizer", str(w.mq), "--config",
                     str(ns.cfg_family), "--format", "packed", "--out", str(ns.exports / "packed")]) == 0
    finally:
        os.umask(old)
    ns.export = ns.exports / "packed"
    ns.edited_export = d / "edited-export"  # config.json hand-edited: same shapes, another norm_eps
    shutil.copytree(ns.export, ns.edited_export)
    cfg = json.loads((ns.edited_export / "config.json").read_text())
    cfg["norm_eps"] = 1e-2
    (ns.edited_export / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(0)
    return ns


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _cal_data(w, *extra, out=None):
    return ["calibrate-data", FAMILY, "--weights", "shipped", "--num", "2", "--no-progress",
            "--out", out or w.out / "cal.safetensors", *extra]


def _finetune(w, *extra, out=None, cfg=None):
    return ["finetune", FAMILY, "--weights", "shipped", "--multiquantizer", w.mq, "--config", cfg or w.cfg,
            "--steps", "2", "--batch-size", "4", "--no-progress", "--out", out or w.out / "ft", *extra]


def _export(w, *extra, cfg=None, fmt="packed"):
    return ["export", FAMILY, "--weights", "shipped", "--multiquantizer", w.mq, "--config", cfg or w.cfg,
            "--format", fmt, "--out", w.out / "exp", *extra]


def _calibrate(w, *extra, cfg=None):
    return ["calibrate", FAMILY, "--weights", "shipped", "--multiquantizer", w.mq, "--config", cfg or w.cfg,
            "--data", w.d / "nosuch-cal.safetensors", "--out", w.out / "calibrated", *extra]


def _hawq(w, *extra):
    return ["search", "--baseline", "hawq", "--multiquantizer", w.mq, "--target-bits", "3.5", "--out",
            w.out / "h.json", *extra]


ISSUE24 = {
    "case1:calibrate-data-out-is-folder": (lambda w, v: _cal_data(w, out=v.cal_dir), ["cal_dir.safetensors", "folder"]),
    "case1:calibrate-data-readonly": (lambda w, v: _cal_data(w, out=w.ro / "c.safetensors"), ["c.safetensors", "not writable"]),
    "case2:finetune-damaged-checkpoint": (lambda w, v: _finetune(w, out=v.ft_damaged), ["last.pt", "delete it", "--restart"]),
    "case3:predict-no-weights-file": (lambda w, v: ["predict", "--predictor", v.pred_noweights, "--cache", w.cache,
                                                    "--out", w.out / "p.csv"], ["pred-noweights", "weights.safetensors"]),
    "case3:search-no-weights-file": (lambda w, v: ["search", "--predictor", v.pred_noweights, "--multiquantizer", w.mq,
                                                   "--target-bits", "3.5", "--out", w.out / "s.json"],
                                     ["pred-noweights", "weights.safetensors"]),
    "case4:hawq-calibration-samples-negative": (lambda w, v: _hawq(w, "--calibration-samples", "-4"),
                                                ["--calibration-samples", "-4"]),
    "case4:hawq-calibration-samples-zero": (lambda w, v: _hawq(w, "--calibration-samples", "0"),
                                            ["--calibration-samples", "0"]),
    "case5:sample-set-steps-negative": (lambda w, v: _sample(w, "--set", "steps=-3"), ["--set steps", "-3"]),
    "case5:sample-set-guidance-nan": (lambda w, v: _sample(w, "--set", "guidance=nan"), ["--set guidance", "nan"]),
    "case5:sample-set-steps-and-steps": (lambda w, v: _sample(w, "--steps", "4", "--set", "steps=5"), ["steps given twice", "--set steps"]),
    "case6:calibrate-data-set-steps-negative": (lambda w, v: _cal_data(w, "--set", "steps=-3"), ["--set steps", "-3"]),
    "case7:finetune-lr-nan": (lambda w, v: _finetune(w, "--lr", "nan"), ["--lr", "nan"]),
    "case7:finetune-lr-zero": (lambda w, v: _finetune(w, "--lr", "0"), ["--lr", "0"]),
    "case8:export-pipeline-with-packed": (lambda w, v: _export(w, "--pipeline"), ["--pipeline", "sdnq"]),
    "case8:export-float-dtype-with-sdnq": (lambda w, v: _export(w, "--float-dtype", "fp16", fmt="sdnq"),
                                           ["--float-dtype", "packed"]),
    "case8:export-opset-5": (lambda w, v: _export(w, "--opset", "5", fmt="onnx"), ["--opset", "5"]),
    "case9:export-config-of-another-model": (lambda w, v: _export(w, cfg=v.cfg_unet), ["cfg_unet.json", "digits-unet"]),
    "case9:finetune-config-of-another-model": (lambda w, v: _finetune(w, cfg=v.cfg_unet), ["cfg_unet.json", "digits-unet"]),
    "case9:calibrate-config-of-another-model": (lambda w, v: _calibrate(w, cfg=v.cfg_unet), ["cfg_unet.json", "digits-unet"]),
    "case9:evaluate-config-of-another-model": (lambda w, v: _evaluate(w, "--config", v.cfg_unet),
                                               ["cfg_unet.json", "digits-unet"]),
    "case9:infer-config-of-another-model": (lambda w, v: _infer(w, "--config", v.cfg_unet), ["cfg_unet.json", "digits-unet"]),
    "case10:infer-edited-export-config": (lambda w, v: ["infer", "--quantized", v.edited_export, "--class-id", "3",
                                                        "--out", w.out / "images"], ["config.json", "modified"]),
    "case11:export-onto-existing-export": (lambda w, v: _export(w, cfg=v.cfg_family) + ["--out", v.export],
                                           ["packed", "already exists", "--overwrite"]),
    "case13:calibrate-adaround-iters-negative": (lambda w, v: _calibrate(w, "--adaround-iters", "-5"),
                                                 ["--adaround-iters", "-5"]),
    "case14:components-option-for-unreported": (lambda w, v: ["components", "digits-sd", "--weights", "shipped",
                                                              "--component-option", "denoiser=int8",
                                                              "--components", "vae_decoder", "--out", w.out / "c"],
                                                ["denoiser", "not among"]),
}


@pytest.mark.parametrize("case", list(ISSUE24))
def test_issue24_cases(w, v, capsys, case):
    argv, expect = ISSUE24[case]
    if "readonly" in case and w.ro is None:
        pytest.skip("no folder here that this process cannot write")
    if "sdnq" in case or "onnx" in case or "opset" in case:
        import importlib.util

        if importlib.util.find_spec("sdnq" if "sdnq" in case else "onnx") is None:
            pytest.skip("the export extra is not installed")
    last = check(w, capsys, argv(w, v), expect)
    assert "weights_only=False" not in last


def test_issue24_every_case_has_a_row():
    """The 15 cases of issue 24: rows above for the refusals, tests below for the others."""
    rows = {int(k.split(":")[0][4:]) for k in ISSUE24}
    elsewhere = {5: "test_set_steps_is_the_steps_setting", 11: "test_io.test_two_runs_racing_for_one_folder_cannot_both_win",
                 12: "test_export_clears_stale_temporaries_and_honours_the_umask", 14: "test_components_option_of_one_component",
                 15: "test_export_clears_stale_temporaries_and_honours_the_umask"}
    assert rows | set(elsewhere) == set(range(1, 16))


def test_export_clears_stale_temporaries_and_honours_the_umask(v):
    """Cases 12 and 15: the export written in the fixture removed the killed run's temporary beside it,
    and its files have the umask's modes (0644 under 022), not the 0600 of a temporary file."""
    assert sorted(p.name for p in v.exports.iterdir()) == ["packed"]
    files = [p for p in v.export.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "sensitivity_export.json"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}
    assert oct(v.export.stat().st_mode & 0o777) == oct(0o755)
    rec = json.loads((v.export / "sensitivity_export.json").read_text())
    assert rec["config_digest"] and rec["config"]["model"] == FAMILY  # case 9: the family name is accepted


def test_export_loads_with_its_own_config(v):
    """Case 10's other side: the untouched export loads (the digest matches what was written)."""
    from sensitivity.export import load_quantized

    assert type(load_quantized(v.export)).__name__ == "DiTTransformer2DModel"


def test_set_steps_is_the_steps_setting():
    """Case 5: ``--set steps=N`` / ``--set guidance=G`` are the steps / guidance settings of the protocol
    (before, they went to the pipeline as unknown extra options and every config failed)."""
    from sensitivity.errors import SensitivityError
    from sensitivity.evaluation.evaluator import EvalProtocol

    a = EvalProtocol.for_family(FAMILY, "shipped", n_per_class=1, steps=7, guidance=2.0)
    b = EvalProtocol.for_family(FAMILY, "shipped", n_per_class=1, extra={"steps": 7, "guidance": 2.0})
    assert a == b and a.signature() == b.signature() and a.steps == 7 and a.extra == ()
    with pytest.raises(SensitivityError, match="steps given twice"):
        EvalProtocol.for_family(FAMILY, "shipped", n_per_class=1, steps=8, extra={"steps": 7})
    with pytest.raises(SensitivityError, match="--steps must be >= 1"):
        EvalProtocol.for_family(FAMILY, "shipped", n_per_class=1, extra={"steps": 0})


def test_set_steps_evaluates(w, capsys, tmp_path):
    """Case 5 end to end: a valid ``--set steps=2 --set guidance=2`` evaluation succeeds with those settings."""
    cache = tmp_path / "e.sqlite"
    rc = main([str(a) for a in _evaluate(w, "--set", "steps=2", "--set", "guidance=2.0", "--cache", cache,
                                         "--class-ids", "0-1", "--json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    from sensitivity.evaluation.cache import ConfigCache

    with ConfigCache(cache) as c:
        proto = c.evaluation
    assert proto["steps"] == 2 and proto["guidance"] == 2.0 and not proto.get("extra")


def test_components_option_of_one_component():
    """Case 14: ``--component-option denoiser=int8 --components denoiser`` needs no option for the others."""
    from sensitivity.components import Component, parse_component_configs
    from sensitivity.errors import SensitivityError
    from sensitivity.layers import LayerSpec

    def comp(name):
        spec = LayerSpec(name=f"{name}.l", module_path=f"{name}.l", kind="linear", shape=(4, 4))
        return Component(name, name, None, [spec])

    comps = {n: comp(n) for n in ("text_encoder", "denoiser", "vae_decoder")}
    assert parse_component_configs(comps, None, {"denoiser": "int8"}, only=["denoiser"]) == \
        {"denoiser": {"denoiser.l": "int8"}}
    with pytest.raises(SensitivityError, match="'text_encoder': no option"):
        parse_component_configs(comps, None, {"denoiser": "int8"})


def test_every_numeric_option_has_a_constraint():
    """Every int/float option of every subcommand has an entry in checks.CONSTRAINTS that its default
    meets, and NaN given to it is refused at the door naming the option (issue 24)."""
    import argparse

    from sensitivity.checks import check_arguments, constraint_for, numeric_actions
    from sensitivity.cli import COMMANDS, build_parser
    from sensitivity.errors import SensitivityError

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    missing, seen = [], 0
    for command, p in sub.choices.items():
        for action in numeric_actions(p):
            seen += 1
            c = constraint_for(action.dest, command)
            if c is None:
                missing.append(f"{command} {max(action.option_strings, key=len)}")
                continue
            c.check(action.dest, action.default)
            args = argparse.Namespace(**{a.dest: a.default for a in p._actions})
            setattr(args, action.dest, float("nan"))
            name = max(action.option_strings, key=len) if action.option_strings else action.dest
            with pytest.raises(SensitivityError, match=f"^{name} must be a finite number"):
                check_arguments(p, args, command)
    assert seen >= 80
    assert not missing, "numeric options without a constraint in sensitivity.checks.CONSTRAINTS: " + ", ".join(missing)


# every subcommand that writes: its output in a folder it cannot write is refused before any work
def _with_out(argv, w, name="x"):
    return argv[:argv.index("--out") + 1] + [w.ro / name] + argv[argv.index("--out") + 2:]


OUTPUTS = {
    "multiquantize": lambda w, v: ["multiquantize", FAMILY, "--out", w.ro / "x.safetensors"],
    "infer": lambda w, v: _with_out(_infer(w), w, "images"),
    "demo": lambda w, v: ["demo", "--out", w.ro / "demo"],
    "sample": lambda w, v: _sample(w, cache=w.ro / "s.sqlite"),
    "evaluate": lambda w, v: _evaluate(w, "--cache", w.ro / "e.sqlite"),
    "graph": lambda w, v: ["graph", FAMILY, "--out", w.ro / "g.svg"],
    "train": lambda w, v: _with_out(_train(w), w, "pred"),
    "predict": lambda w, v: ["predict", "--predictor", v.pred_noweights, "--cache", w.cache, "--out", w.ro / "p.csv"],
    "search": lambda w, v: _with_out(_search(w, "--target-bits", "3.5"), w, "s.json"),
    "insights": lambda w, v: ["insights", "--cache", w.cache, "--out", w.ro / "ins"],
    "components": lambda w, v: ["components", "digits-sd", "--weights", "shipped", "--option", "int8",
                                "--out", w.ro / "c"],
    "calibrate-data": lambda w, v: _cal_data(w, out=w.ro / "c.safetensors"),
    "calibrate": lambda w, v: _with_out(_calibrate(w), w, "calibrated"),
    "export": lambda w, v: _with_out(_export(w), w, "exp"),
    "finetune": lambda w, v: _finetune(w, out=w.ro / "ft"),
    "cache": lambda w, v: ["cache", "export", w.cache, "--out", w.ro / "x.csv"],
    "costs": lambda w, v: ["costs", FAMILY, "--multiquantizer", w.mq, "--out", w.ro / "c.json"],
}


def test_every_writing_subcommand_has_an_output_row():
    import argparse

    from sensitivity.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def writes(p):  # an --out anywhere in the subcommand (cache: in its export / import subcommands)
        return any(writes(s) for a in p._actions if isinstance(a, argparse._SubParsersAction)
                   for s in a.choices.values()) or any(a.dest == "out" for a in p._actions)

    writing = {c for c, p in sub.choices.items() if writes(p)} | {"sample", "evaluate"}  # these two write --cache
    assert writing <= set(OUTPUTS), f"no read-only-output row for {sorted(writing - set(OUTPUTS))}"


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_output_in_a_readonly_folder(w, v, capsys, command):
    if w.ro is None:
        pytest.skip("no folder here that this process cannot write")
    check(w, capsys, OUTPUTS[command](w, v), "not writable")


def test_calibrate_refuses_an_existing_out_without_overwrite(w, capsys):
    """A calibrated folder is minutes of work: rerunning into it needs --overwrite (as export does), refused before
    any work, the old folder untouched."""
    existing = w.d / "calibrated-before"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("an earlier calibration")
    argv = _calibrate(w)
    argv[argv.index("--out") + 1] = existing
    check(w, capsys, argv, ["--out", "calibrated-before", "--overwrite"])
    assert (existing / "keep.txt").read_text() == "an earlier calibration"
