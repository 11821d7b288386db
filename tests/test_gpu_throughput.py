"""Throughput settings of evaluation jobs, on CPU: one worker per device (--devices), the full-precision
images made once per job and shared, batch sizes (N or auto) that do not change the numbers,
torch.compile reaching the denoiser, and the GPU throughput script's --tiny path."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sensitivity.errors import SensitivityError
from sensitivity.evaluation import batching
from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
from sensitivity.evaluation.runners.devices import assign_devices, parse_devices, worker_env
from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- devices
def test_parse_devices():
    assert parse_devices(None) is None
    assert parse_devices("cpu,cpu", cuda_count=0) == ["cpu", "cpu"]
    assert parse_devices("cuda:0, cuda:1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda", cuda_count=1) == ["cuda:0"]
    assert parse_devices("all", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cuda:1,cuda:1", cuda_count=2) == ["cuda:1", "cuda:1"]  # two workers on one card
    cases = [("cuda:3", 2, "only 2 CUDA device(s) are visible (cuda:0..cuda:1)"),
             ("cuda:0", 0, "no CUDA device is visible"),
             ("all", 0, "no CUDA device is visible"),
             ("cpu,cuda:0", 1, "mixes cpu and cuda"),
             ("gpu0", 1, "'gpu0' is not a torch device"),
             (",", 1, "no device given")]
    for spec, n, needle in cases:
        with pytest.raises(SensitivityError) as e:
            parse_devices(spec, cuda_count=n)
        assert needle in str(e.value) and "\n" not in str(e.value), spec


def test_workers_are_assigned_and_pinned_to_devices():
    assert assign_devices(["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:1"]
    assert assign_devices(["cuda:0", "cuda:1"], 3) == ["cuda:0", "cuda:1", "cuda:0"]
    # a pinned process sees only its GPU, as cuda:0; physical ids follow the parent's own visibility
    assert worker_env("cuda:1", parent_visible="") == ({"CUDA_VISIBLE_DEVICES": "1"}, "cuda:0")
    assert worker_env("cuda:1", parent_visible="4,6") == ({"CUDA_VISIBLE_DEVICES": "6"}, "cuda:0")
    assert worker_env("cpu") == ({}, "cpu")
    from sensitivity.evaluation.evaluator import EvaluatorFactory
    from sensitivity.evaluation.runners import LocalRunner, PipelinedFactory
    from sensitivity.evaluation.runners.process import ProcessRunner
    from sensitivity.evaluation.runners.thread import ThreadRunner

    base = EvaluatorFactory(family="digits-dit", multiquantizer=None, protocol={}, device="cuda:1")
    f = PipelinedFactory(base).with_device("cuda:0")
    assert f.base.device == "cuda:0" and f.base.device_label == "cuda:1" and base.device == "cuda:1"
    r = LocalRunner(f, devices=["cpu", "cpu"], threads=1)
    assert isinstance(r, ProcessRunner) and r.workers == 2 and r.devices == ["cpu", "cpu"]
    assert "on cpu,cpu" in r.describe()
    assert isinstance(LocalRunner(f, devices=["cpu"], threads=1), ThreadRunner)


# ---------------------------------------------------------------------------------------- digits-dit
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits-dit (random weights), a 6-layer multiquantizer, 20 images x 2 steps."""
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    pipe = fam.load_pipeline("random", device="cpu", dtype=torch.float32)
    den = fam.denoiser(pipe)
    path = tmp_path_factory.mktemp("gmq") / "digits-dit-random6.safetensors"
    build_multiquantizer(den, path, fam.find_layers(den)[:6], model_id=fam.model_id("random"),
                         options=("uaq-4", "uaq-3"), progress=False)
    mq = load_multiquantizer(path)
    protocol = EvalProtocol.for_family(fam, "random", n_per_class=2, steps=2, multiquantizer_hash=mq.hash)
    configs = [{n: ("uaq-3" if i % 2 else "uaq-4") for i, n in enumerate(mq.layer_names)},
               {n: "uaq-3" for n in mq.layer_names}]
    return fam, pipe, mq, protocol, configs, path


def _metrics(out):
    return {k: v for k, v in out.items() if k not in ("seconds", "timings")}


@pytest.fixture(scope="module")
def before(digits):
    """The numbers as evaluated before these settings: one in-memory evaluator, the model's batch size."""
    fam, pipe, mq, protocol, configs, _ = digits
    plain = Evaluator(fam, pipe, mq, protocol)
    return plain, [_metrics(plain.evaluate(c)) for c in configs]


def test_fp_images_made_once_and_shared(digits, before, tmp_path, monkeypatch):
    """Two evaluators on one cache folder (two workers of a job): the full-precision images are
    generated once, the second loads them, and every number equals an unshared evaluator's."""
    fam, pipe, mq, protocol, configs, _ = digits
    plain, before = before
    calls = []
    original = Evaluator._generate_fp
    monkeypatch.setattr(Evaluator, "_generate_fp", lambda self: calls.append(1) or original(self))
    w1, w2 = (Evaluator(fam, pipe, mq, protocol, fp_images_dir=tmp_path) for _ in range(2))
    o1, o2 = w1.evaluate(configs[0]), w2.evaluate(configs[1])
    assert len(calls) == 1
    assert "fp_generate" in o1["timings"] and "fp_load" in o2["timings"] and "fp_generate" not in o2["timings"]
    assert [_metrics(o1), _metrics(o2)] == before
    (npy,) = tmp_path.glob("*.npy")
    assert np.array_equal(np.load(npy), plain.reference_images())
    assert json.loads(npy.with_suffix(".json").read_text())["num_images"] == protocol.num_images
    # another protocol (other seeds) does not reuse them
    other = EvalProtocol.for_family(fam, "random", n_per_class=2, steps=2, seed=7, multiquantizer_hash=mq.hash)
    Evaluator(fam, pipe, mq, other, fp_images_dir=tmp_path).evaluate(configs[0])
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npy"))) == 2


def test_waiting_worker_picks_the_shared_images_up_when_scoring(digits, before, tmp_path):
    """A worker that finds the lock taken (another worker generating) generates its own config and
    loads the full-precision images when it scores."""
    fam, pipe, mq, protocol, configs, _ = digits
    first = Evaluator(fam, pipe, mq, protocol, fp_images_dir=tmp_path)
    other = Evaluator(fam, pipe, mq, protocol, fp_images_dir=tmp_path)
    assert first._shared_fp.try_lock()  # "another worker" holds it
    import threading

    result = {}
    t = threading.Thread(target=lambda: result.update(out=other.evaluate(configs[0])))
    t.start()
    t.join(timeout=2.0)
    assert t.is_alive()  # generated its config, now waits for the full-precision images
    first._shared_fp.save(before[0].reference_images())
    first._shared_fp.unlock()
    t.join(timeout=120)
    assert not t.is_alive() and "fp_load" in result["out"]["timings"]
    assert _metrics(result["out"]) == before[1][0]


def test_batch_size_does_not_change_the_metrics(digits, before):
    """Seeds are per image, not per batch: batch 1, 4 and auto (on CPU: the model's default, 500) give the
    same images within float noise, and so the same metrics."""
    fam, pipe, mq, protocol, configs, _ = digits
    plain, want = before
    from sensitivity.multiquantizer import apply, restore

    evs = {bs: Evaluator(fam, pipe, mq, protocol, batch_size=bs) for bs in (1, 4, "auto")}
    apply(plain.denoiser, mq, configs[1])
    try:
        images = {bs: ev.generate() for bs, ev in evs.items()}
    finally:
        restore(plain.denoiser)
    for bs in (4, "auto"):
        assert np.abs(images[bs].astype(int) - images[1].astype(int)).max() <= 1, bs
        got = plain.score(images[bs])
        for k, v in plain.score(images[1]).items():
            assert got[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (bs, k)
    for k, v in plain.score(images["auto"]).items():  # auto on CPU is the default batch: the numbers before
        assert v == pytest.approx(want[1][k], rel=1e-9, abs=1e-12), k
    assert Evaluator(fam, pipe, mq, protocol, batch_size="auto").resolved_batch_size() == fam.defaults.batch_size == 500


def test_auto_batch_halves_on_out_of_memory(digits, before, monkeypatch):
    fam, pipe, mq, protocol, configs, _ = digits
    tried = []

    def trial(bs):
        tried.append(bs)
        if bs > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return bs * 1e9

    assert batching.largest_fitting_batch(trial, 64) == 8 and tried == [64, 32, 16, 8]
    assert batching.largest_fitting_batch(trial, 64, limit_bytes=4.5e9) == 4  # a peak above the limit: halve
    with pytest.raises(SensitivityError, match="even one image"):
        batching.largest_fitting_batch(lambda bs: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), 4)
    with pytest.raises(ValueError):  # other errors are not swallowed
        batching.largest_fitting_batch(lambda bs: (_ for _ in ()).throw(ValueError("bad")), 4)
    assert batching.power_of_two_at_most(1000) == 512 and batching.power_of_two_at_most(1) == 1
    assert batching.parse_batch_size("auto") == "auto" and batching.parse_batch_size("8") == 8
    for bad in ("0", "big", -2):
        with pytest.raises(SensitivityError, match="--batch-size"):
            batching.parse_batch_size(bad)
    # an auto batch that runs out of memory later is halved, with the same images
    real = type(fam).generate
    sizes = []

    def generate(self, pipe, conditions, seeds, batch_size=None, **kw):
        sizes.append(batch_size)
        if batch_size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(self, pipe, conditions, seeds, batch_size=batch_size, **kw)

    want = before[1][0]
    monkeypatch.setattr(type(fam), "generate", generate)
    ev = Evaluator(fam, pipe, mq, protocol, batch_size="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ev.evaluate(configs[0])
    assert sizes[:8] == [500, 250, 125, 62, 31, 15, 7, 3] and ev.batch_size == 3
    assert out["timings"]["worker"]["batch_size"] == 3 and any("ran out of memory" in str(w.message) for w in caught)
    assert _metrics(out) == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_compile_reaches_the_denoiser(digits, before, tmp_path):
    """`--compile eager` is a factory setting: the worker's denoiser is compiled, the record's timings say so,
    the numbers and the signature do not change."""
    from sensitivity.evaluation.protocol import protocol_for

    _, _, _, _, configs, path = digits
    common = dict(weights="random", images_per_class=2, steps=2)
    _, _, fac_c, prot_c, _ = protocol_for("digits-dit", str(path), compile="eager", **common)
    _, _, fac, prot, _ = protocol_for("digits-dit", str(path), **common)
    assert fac_c.compile == "eager" and fac.compile is False
    assert prot_c.signature() == prot.signature() == before[0].protocol.signature()
    ev_c = fac_c.build()
    assert ev_c.denoiser._compiled_call_impl is not None
    out_c = ev_c.evaluate(configs[0])
    assert out_c["timings"]["worker"] == {"device": "cpu", "compile": "eager", "batch_size": 500}
    assert _metrics(out_c) == pytest.approx(before[1][0], rel=1e-5, abs=1e-7)  # same weights (random, seed 0)


# ---------------------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_sample_devices_cpu_cpu_shares_one_fp_generation(digits, tmp_path):
    """`sample --devices cpu,cpu`: two pinned worker processes; the full-precision images are generated
    once for the job (one record says fp_generate), and the records equal a one-worker job's."""
    _, _, _, _, _, path = digits
    from sensitivity.evaluation.cache import ConfigCache

    def sample(cache, *extra):
        cache.parent.mkdir()
        argv = [sys.executable, "-m", "sensitivity", "sample", "digits-dit", "--multiquantizer", str(path),
                "--weights", "random", "--images-per-class", "2", "--steps", "2", "--cache", str(cache),
                "--num-configs", "6", "--seed", "2", "--no-progress", *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        with ConfigCache(cache) as c:
            return r.stdout, c.records()

    out2, two = sample(tmp_path / "two" / "c.sqlite", "--devices", "cpu,cpu", "--threads", "1")
    assert "local x2 processes on cpu,cpu" in out2 and len(list((tmp_path / "two" / "fp-images").glob("*.npy"))) == 1
    # at most one record times the generation (0 when the images were made before the first config was claimed);
    # whether the second worker claims a config (and so says fp_load) depends on timing: a loaded machine can
    # let the first worker take all six, so only "fetched at least once" is asserted
    assert sum("fp_generate" in r["timings"] for r in two) <= 1
    assert sum(("fp_load" in r["timings"]) or ("fp_generate" in r["timings"]) for r in two) >= 1
    assert {r["timings"]["worker"]["device"] for r in two} == {"cpu"}
    _, one = sample(tmp_path / "one" / "c.sqlite", "--workers", "1", "--threads", "1")
    key = lambda recs: sorted((r["index"], r["config_hash"], json.dumps(r["metrics"], sort_keys=True)) for r in recs)  # noqa: E731
    assert key(two) == key(one)


@pytest.mark.slow
def test_label_throughput_tiny(tmp_path):
    """benchmarks/gpu/label_throughput.py --tiny: the GPU script's code path on CPU, tiny configs."""
    out = tmp_path / "t.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "label_throughput.py"), "--tiny",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [m["model"] for m in res["models"]] == ["sd15", "pixart-alpha"]
    for m in res["models"]:
        assert m["configs_per_hour"] > 0 and m["hours_for_500_configs"] == pytest.approx(500 / m["configs_per_hour"])
        assert m["images_per_config"] == 1000 and m["steps"] in (50, 20)
        assert m["seconds_per_config"] == pytest.approx(sum(m["seconds_per_config_parts"].values()))
    assert "configs/hour" in r.stdout
