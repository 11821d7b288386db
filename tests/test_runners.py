"""Evaluation jobs: resume after SIGKILL, several drivers on one cache, worker loss, Ray = local.

The unit-level jobs evaluate a cheap real function: a small MLP whose weights are set from a real
multiquantizer (``apply``), scored by the output error against full precision on fixed inputs.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity.errors import MultiquantizerMismatchError, SensitivityError
from sensitivity.evaluation.cache import ConfigCache, SignatureMismatchError
from sensitivity.evaluation.runners import JobPlan, LocalRunner, RayRunner, layer_stats_from_multiquantizer, ray_available, run_job
from sensitivity.evaluation.sampler import SamplerSpec
from sensitivity.layers import find_layers
from sensitivity.multiquantizer import apply, build_multiquantizer, load_multiquantizer
from sensitivity.sizes import SizeTable

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EVAL = {"model": "tiny-mlp", "inputs": "randn(16,128) seed 1", "metric": "output mse"}
SIG = "tiny-mlp-sig"


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(128, 128), nn.GELU())])


class TinyEval:
    """Factory of a cheap real evaluation (picklable, for worker processes and Ray actors).

    ``delay``: extra seconds per config (to make kill points land mid-job); ``crash_marker``: the
    worker dies (``os._exit``) on ``crash_index`` the first time, leaving the marker file.
    """

    def __init__(self, mq_path, delay=0.0, crash_marker=None, crash_index=-1, model_seed=0):
        self.mq_path, self.delay, self.crash_marker, self.crash_index = str(mq_path), delay, crash_marker, crash_index
        self.model_seed = model_seed

    def __call__(self):
        model = tiny_mlp(self.model_seed)
        mq = load_multiquantizer(self.mq_path, model)  # refuses a multiquantizer of another model
        x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)

        def evaluate(index, options):
            if self.crash_marker and index == self.crash_index and not os.path.exists(self.crash_marker):
                Path(self.crash_marker).touch()
                os._exit(3)
            time.sleep(self.delay)
            t0 = time.perf_counter()
            apply(model, mq, options)
            with torch.no_grad():
                y = model(x)
            err = float(((y - ref) ** 2).mean())
            return {"mse": err, "rel_error": err / float((ref ** 2).mean()),
                    "timings": {"forward": time.perf_counter() - t0}}

        return evaluate


@pytest.fixture(scope="module")
def mq_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mq") / "tiny.safetensors"
    model = tiny_mlp()
    build_multiquantizer(model, path, find_layers(model), model_id="tiny-mlp", progress=False)
    return path


def make_plan(mq_path, n, seed=0):
    mq = load_multiquantizer(mq_path)
    return JobPlan.from_multiquantizer(mq, SamplerSpec(seed=seed, options=mq.options), n)


def _key(recs):
    return [(r["index"], r["config_hash"], r["config"], r["avg_bits"], r["quantized_bytes"], r["summed_error"],
             r["metrics"]) for r in recs]


def _check_complete(path, plan):
    """Exactly the planned configs, each once, none damaged."""
    with ConfigCache(path) as c:
        (run,) = c.runs()
        recs = c.records(run["run_id"])
        assert [r["index"] for r in recs] == list(range(plan.num_configs))
        assert [r["config"] for r in recs] == [plan.config(i) for i in range(plan.num_configs)]
        assert len(c.records()) == len({r["config_hash"] for r in c.records()}) == len({r["config_hash"] for r in recs})
        assert c.verify() == []
        assert run["claimed"] == 0
        return recs


def test_record_sizes_match_multiquantizer(mq_path):
    """A job's records count bytes / bits / error with the multiquantizer's stats (sums by hand)."""
    mq = load_multiquantizer(mq_path)
    plan = make_plan(mq_path, 5)
    sizes = SizeTable.from_layer_stats(layer_stats_from_multiquantizer(mq))
    total_fp = sum(s.fp16_bytes for s in mq.layers)
    for i in range(5):
        cfg = plan.config(i)
        qb = sum(mq.stats(s.name, cfg.get(s.name, "fp16"))["nbytes"] for s in mq.layers)
        err = sum(mq.stats(l, o)["error"] for l, o in cfg.items())
        avg, qb2, err2 = sizes.config_stats(cfg)
        assert qb2 == qb and avg == 16.0 * qb / total_fp
        assert err2 == pytest.approx(err, rel=1e-12)


def test_local_job_resume_and_extend(mq_path, tmp_path):
    cache = tmp_path / "c.sqlite"
    plan = make_plan(mq_path, 6)
    s = run_job(cache, plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL, progress=False)
    assert (s.evaluated, s.done_before, s.complete) == (6, 0, True)
    assert "6/6 configs" in str(s) and "configs/hour" in str(s)
    recs = _check_complete(cache, plan)
    assert all(r["metrics"]["mse"] > 0 and r["timings"]["evaluate"] > 0 for r in recs)
    by_cfg = {r["config_hash"]: r["metrics"]["mse"] for r in recs}
    assert len(set(by_cfg.values())) == len(by_cfg) > 1  # different configs, different errors
    # the same command again: nothing to do, no worker started
    s = run_job(cache, plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL, progress=False)
    assert (s.evaluated, s.done_before) == (0, 6)
    plan.num_configs = 9
    s = run_job(cache, plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL, progress=False)
    assert (s.evaluated, s.done_before) == (3, 6)
    _check_complete(cache, plan)


def test_bad_inputs_leave_cache_unchanged(mq_path, tmp_path):
    plan = make_plan(mq_path, 3)
    cache = tmp_path / "c.sqlite"
    # a multiquantizer of another model: refused by the worker before anything is written
    with pytest.raises(MultiquantizerMismatchError):
        run_job(cache, plan, LocalRunner(TinyEval(mq_path, model_seed=1)), signature=SIG, evaluation=EVAL,
                progress=False)
    assert not cache.exists()
    run_job(cache, plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL, progress=False)
    before = cache.read_bytes()
    plan.num_configs = 5
    with pytest.raises(SensitivityError, match="weights differ"):
        run_job(cache, plan, LocalRunner(TinyEval(mq_path, model_seed=1)), signature=SIG, evaluation=EVAL,
                progress=False)
    with pytest.raises(SignatureMismatchError, match="inputs"):
        run_job(cache, plan, LocalRunner(TinyEval(mq_path)), signature="other",
                evaluation=dict(EVAL, inputs="randn(32,128)"), progress=False)
    assert cache.read_bytes() == before
    with ConfigCache(cache) as c:
        assert c.done_indices(c.runs()[0]["run_id"]) == {0, 1, 2} and c.runs()[0]["planned"] == 3


def test_worker_processes_lost_worker_reassigned(mq_path, tmp_path):
    plan = make_plan(mq_path, 8)
    marker = tmp_path / "crashed"
    runner = LocalRunner(TinyEval(mq_path, crash_marker=str(marker), crash_index=3), workers=2,
                         start_method="forkserver")
    _ctx()  # the same forkserver (torch preloaded)
    s = run_job(tmp_path / "c.sqlite", plan, runner, signature=SIG, evaluation=EVAL, progress=False)
    assert marker.exists() and s.lost >= 1 and s.complete
    recs = _check_complete(tmp_path / "c.sqlite", plan)
    run_job(tmp_path / "ref.sqlite", plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL,
            progress=False)
    assert _key(recs) == _key(_check_complete(tmp_path / "ref.sqlite", plan))


def _job_main(mq_path, cache, n, delay, workers, result):
    """Body of a job process (what `sensitivity sample` runs): writes its summary to ``result``."""
    plan = make_plan(mq_path, n)
    s = run_job(cache, plan, LocalRunner(TinyEval(mq_path, delay=delay), workers=workers), signature=SIG,
                evaluation=EVAL, progress=False)
    Path(result).write_text(json.dumps({"evaluated": s.evaluated, "reused": s.reused, "complete": s.complete}))


_CTX = None


def _ctx():
    """A forkserver context with torch preloaded: job processes start in milliseconds, not seconds."""
    global _CTX
    if _CTX is None:
        import multiprocessing as mp

        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "diffusers", "sensitivity.multiquantizer", "sensitivity.evaluation.runners",
                                     "sensitivity.evaluation.evaluator", "sensitivity.workflows.sample", "sensitivity.cli"])
    return _CTX


def _job(mq_path, cache, n, result, delay=0.0, workers=1):
    p = _ctx().Process(target=_job_main, args=(str(mq_path), str(cache), n, delay, workers, str(result)))
    p.start()
    return p


def _count(cache):
    if not cache.exists():
        return 0
    try:
        with ConfigCache(cache) as c:
            return len(c)
    except SensitivityError:
        return 0


def _children(pid):
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(mq_path, tmp_path):
    """Kill the job (SIGKILL) at random points several times, rerun: exactly the planned configs, once each."""
    n = 24
    cache = tmp_path / "c.sqlite"
    rng = random.Random(1234)
    # kill after this many records (+ a random delay); 0 = while starting; one round with 2 worker processes
    for workers, target in [(1, 0), (2, 4), (1, 12)]:
        p = _job(mq_path, cache, n, tmp_path / "r.json", delay=0.05, workers=workers)
        deadline = time.time() + 120
        while _count(cache) < target and p.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        kids = _children(p.pid)
        p.kill()  # SIGKILL
        p.join()
        for k in kids:  # worker processes exit with their driver
            for _ in range(100):
                if not os.path.exists(f"/proc/{k}") or open(f"/proc/{k}/stat").read().split()[2] == "Z":
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"worker process {k} outlived its killed driver")
        if cache.exists():
            with ConfigCache(cache) as c:
                assert c.verify() == []
                recs = c.records()
                assert len(recs) == len({r["config_hash"] for r in recs})
    assert 0 < _count(cache)
    p = _job(mq_path, cache, n, tmp_path / "r.json")
    p.join(120)
    assert p.exitcode == 0
    assert json.loads((tmp_path / "r.json").read_text())["complete"]
    plan = make_plan(mq_path, n)
    recs = _check_complete(cache, plan)
    # identical to an uninterrupted run
    run_job(tmp_path / "ref.sqlite", plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL,
            progress=False)
    assert _key(recs) == _key(_check_complete(tmp_path / "ref.sqlite", plan))


def test_two_jobs_on_one_cache(mq_path, tmp_path):
    cache = tmp_path / "c.sqlite"
    n = 20
    procs = [_job(mq_path, cache, n, tmp_path / f"r{k}.json", delay=0.1) for k in range(2)]
    outs = []
    for k, p in enumerate(procs):
        p.join(120)
        assert p.exitcode == 0
        outs.append(json.loads((tmp_path / f"r{k}.json").read_text()))
    assert all(o["complete"] for o in outs)
    assert sum(o["evaluated"] + o["reused"] for o in outs) == n and all(o["evaluated"] > 0 for o in outs)
    _check_complete(cache, make_plan(mq_path, n))


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install 'sensitivity[ray]')")
def test_ray_matches_local_and_survives_a_dead_actor(mq_path, tmp_path):
    import ray

    plan = make_plan(mq_path, 10)
    run_job(tmp_path / "local.sqlite", plan, LocalRunner(TinyEval(mq_path)), signature=SIG, evaluation=EVAL,
            progress=False)
    marker = tmp_path / "crashed"
    runner = RayRunner(TinyEval(mq_path, crash_marker=str(marker), crash_index=4), address="local",
                       init_kwargs={"num_cpus": 2, "runtime_env": {"env_vars": {"PYTHONPATH": f"{TESTS}:{ROOT}"}}})
    try:
        s = run_job(tmp_path / "ray.sqlite", plan, runner, signature=SIG, evaluation=EVAL, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert marker.exists() and s.lost >= 1 and s.complete and "ray x2" in s.runner
    assert _key(_check_complete(tmp_path / "ray.sqlite", plan)) == _key(_check_complete(tmp_path / "local.sqlite", plan))


# ---------------------------------------------------------------------------- the real command
DIGITS_ARGS = ["--weights", "random", "--images-per-class", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def digits_mq(tmp_path_factory):
    """A multiquantizer of the first 6 layers of digits-dit (random weights): seconds to build."""
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("random", device="cpu", dtype=torch.float32)
    path = tmp_path_factory.mktemp("dmq") / "digits-dit-random6.safetensors"
    build_multiquantizer(den, path, fam.find_layers(den)[:6], model_id=fam.model_id("random"),
                         options=("uaq-4", "uaq-3"), progress=False)
    return path


def _sample_argv(mq, cache, n, *extra):
    return ["sample", "digits-dit", "--multiquantizer", str(mq), "--cache", str(cache), "--num-configs", str(n),
            "--seed", "3", "--no-progress", *DIGITS_ARGS, *extra]


def _cli_in_process(argv, out):
    """Run `sensitivity ARGV` (cli.main) in this process, stdout to ``out``; exits with its status."""
    import contextlib

    from sensitivity.cli import main as cli_main

    with open(out, "w") as fh, contextlib.redirect_stdout(fh):
        rc = cli_main(argv)
    os._exit(rc)


@pytest.mark.slow
def test_sample_command_killed_and_resumed(digits_mq, tmp_path):
    """`sensitivity sample digits-dit`: SIGKILL mid-job, rerun: every planned config exactly once.

    The command runs through ``cli.main`` in a process forked from a server that has torch and diffusers
    imported (a fresh interpreter would spend most of the test importing them).
    """
    cache = tmp_path / "c.sqlite"
    n = 12
    p = _ctx().Process(target=_cli_in_process, args=(_sample_argv(digits_mq, cache, n), str(tmp_path / "o1")))
    p.start()
    deadline = time.time() + 180
    while _count(cache) < 2 and p.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(7).uniform(0.0, 0.1))
    p.kill()
    p.join()
    assert 0 < _count(cache) < n
    p = _ctx().Process(target=_cli_in_process, args=(_sample_argv(digits_mq, cache, n, "--json"), str(tmp_path / "o2")))
    p.start()
    p.join(300)
    stdout = (tmp_path / "o2").read_text()
    assert p.exitcode == 0, stdout
    summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    assert summary["complete"] and summary["done"] == n and summary["done_before"] >= 1
    assert "configs/hour" in stdout
    with ConfigCache(cache) as c:
        (run,) = c.runs()
        recs = c.records(run["run_id"])
        assert [r["index"] for r in recs] == list(range(n)) and c.verify() == []
        assert run["sampler"]["seed"] == 3 and c.evaluation["steps"] == 2 and len(c.evaluation["seeds"]) == 10
        m = recs[0]["metrics"]
        assert set(m) >= {"fid", "kid", "accuracy", "psnr"} and "seconds" not in m
        assert recs[0]["timings"]["generate"] > 0
    # `sensitivity evaluate` on config 0 gives the job's record
    from sensitivity.cli import main as cli_main
    from sensitivity.config import QuantConfig

    cfg = tmp_path / "cfg0.json"
    QuantConfig(recs[0]["config"]).save(cfg)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["evaluate", "digits-dit", "--multiquantizer", str(digits_mq), "--config", str(cfg), "--json",
                       *DIGITS_ARGS])
    assert rc == 0
    rec = json.loads(buf.getvalue())
    assert rec["config_hash"] == recs[0]["config_hash"] and rec["signature"] == recs[0]["signature"]
    assert rec["avg_bits"] == pytest.approx(recs[0]["avg_bits"], rel=1e-12)
    for k, v in recs[0]["metrics"].items():
        assert rec["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_sample_command_bad_inputs(digits_mq, mq_path, tmp_path, capsys):
    """Missing prompt file, empty reference folder, multiquantizer of another model, corrupted or
    foreign cache: one clear line each (exit 2), and the cache is not touched."""
    from sensitivity.cli import main as cli_main

    cache = tmp_path / "c.sqlite"
    with ConfigCache(cache, signature="s", evaluation={"model": "x"}, create=True) as c:
        c.add({"config": {"a": "uaq-4"}, "metrics": {"fid": 1.0}})
    before = cache.read_bytes()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 100)
    empty_cfg = tmp_path / "empty_config.json"
    empty_cfg.write_text('{"options": {}}')
    cases = [
        (["sample", "sd15", "--weights", "tiny", "--multiquantizer", str(digits_mq), "--cache", str(cache),
          "--num-configs", "2", "--prompts", str(tmp_path / "captions_val2017.json")], "does not exist"),
        (["sample", "sd15", "--weights", "tiny", "--multiquantizer", str(digits_mq), "--cache", str(cache),
          "--num-configs", "2", "--prompts", str(prompts), "--num-images", "2", "--reference-dir", str(empty)],
         "holds 0 images"),
        (["sample", "digits-dit", "--multiquantizer", str(mq_path), "--cache", str(cache), "--num-configs", "2"]
         + DIGITS_ARGS, "built for tiny-mlp"),
        (["sample", "digits-dit", "--multiquantizer", str(digits_mq), "--cache", str(cache), "--num-configs", "2"]
         + DIGITS_ARGS, "another evaluation"),
        (["sample", "digits-dit", "--multiquantizer", str(digits_mq), "--cache", str(junk), "--num-configs", "2"]
         + DIGITS_ARGS, "not a sensitivity cache"),
        (["evaluate", "digits-dit", "--multiquantizer", str(mq_path), "--config", str(empty_cfg)] + DIGITS_ARGS,
         "built for tiny-mlp"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
    assert cache.read_bytes() == before
    assert junk.read_bytes() == b"\x00garbage" * 100


def test_pipelined_worker_gives_the_same_records(digits_mq, tmp_path):
    """Scoring config i while config i+1 generates (two configs in flight) changes no number."""
    from sensitivity.evaluation.protocol import protocol_for
    from sensitivity.evaluation.runners import PipelinedFactory

    _, _, base, protocol, mq = protocol_for("digits-dit", str(digits_mq), weights="random", images_per_class=1, steps=2)
    plan = JobPlan.from_multiquantizer(mq, SamplerSpec(seed=5, options=mq.options), 5)
    out = {}
    for mode in ("off", "on"):
        s = run_job(tmp_path / f"{mode}.sqlite", plan, LocalRunner(PipelinedFactory(base, pipeline=mode)),
                    signature=protocol.signature(), evaluation=protocol.to_dict(), progress=False)
        assert s.complete
        out[mode] = _check_complete(tmp_path / f"{mode}.sqlite", plan)
    assert _key(out["on"]) == _key(out["off"])


def test_one_worker_sample_exits_cleanly(digits_mq, tmp_path):
    """`sample --workers 1` (the in-process thread runner, 2 consumer threads) exits 0: its worker
    threads are joined before the interpreter exits (a thread left inside torch / OpenMP aborted it, 134)."""
    argv = [sys.executable, "-m", "sensitivity"] + _sample_argv(digits_mq, tmp_path / "c.sqlite", 2, "--workers", "1")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["OMP_NUM_THREADS"] = "2"  # two OpenMP threads per parallel region: what aborted at exit
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminate called" not in r.stderr


def test_sample_command_failed_configs_one_error_line(digits_mq, tmp_path, capsys, monkeypatch):
    """Every config fails for a reason that is not the input (here: the generation raises): exit 1 with one
    `error:` line naming how many failed and the first reason; nothing is recorded for them, so a rerun retries."""
    from sensitivity.cli import main as cli_main
    from sensitivity.evaluation.evaluator import Evaluator

    def broken(self, options):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(Evaluator, "evaluate", broken)
    cache = tmp_path / "c.sqlite"
    rc = cli_main(["sample", "digits-dit", "--multiquantizer", str(digits_mq), "--cache", str(cache), "--num-configs",
                   "2", "--workers", "1", "--no-progress"] + DIGITS_ARGS)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert rc == 1 and len(err) == 1, err
    assert "2 of 2 configs failed" in err[0] and "out of memory" in err[0] and "rerun" in err[0]
    with ConfigCache(cache) as c:
        assert c.records() == []
