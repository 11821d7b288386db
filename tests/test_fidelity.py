"""Multi-fidelity labels (issue 25, item 3): one cache holds cheap labels of many configs and full labels of a
few (``sample --full-configs``), ``train`` stacks the cheap-metric members on the full labels, and the
predictor folder reloads, searches and reproduces like any other."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sensitivity import cli
from sensitivity.errors import SensitivityError
from sensitivity.evaluation.cache import ConfigCache
from sensitivity.multiquantizer import load_multiquantizer

JOB = ["--weights", "random", "--images-per-class", "1", "--steps", "2", "--seed", "3", "--no-progress",
       "--paired-features", "--num-configs", "12", "--full-configs", "6", "--full-images-per-class", "2"]
VOLATILE = ("id", "timings", "host", "created_at")


@pytest.fixture(scope="module")
def mf_cache(dit_random_mq, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fidelity-cache") / "mf.sqlite"
    argv = ["sample", "digits-dit", "--multiquantizer", str(dit_random_mq), "--cache", str(cache), *JOB,
            "--workers", "1", "--threads", "1"]
    assert cli.main(argv) == 0
    return cache


def _by_fidelity(cache: Path):
    with ConfigCache(cache) as c:
        recs = c.fidelity_records()
    return {f: sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rs),
                      key=lambda r: (r["run_id"], r["index"])) for f, rs in recs.items()}


def test_sample_full_configs_writes_two_fidelities_resumes_and_reproduces(dit_random_mq, mf_cache, tmp_path, capsys):
    recs = _by_fidelity(mf_cache)
    assert set(recs) == {"full", "cheap"}
    assert len(recs["cheap"]) == 12 and len(recs["full"]) == 6
    cheap_hash = {r["index"]: r["config_hash"] for r in recs["cheap"]}
    assert all(cheap_hash[r["index"]] == r["config_hash"] for r in recs["full"])  # configs 0..5 of the same run
    assert {"feature_mse", "fd_fp", "fid"} <= set(recs["cheap"][0]["metrics"])
    with ConfigCache(mf_cache) as full, ConfigCache(mf_cache, fidelity="cheap") as cheap:
        assert len(full.evaluation["seeds"]) == 20 and len(cheap.evaluation["seeds"]) == 10
        assert len(full.records()) == 6 and len(cheap.records()) == 12  # each object sees its own fidelity
        info = full.info(verify=True)
    assert info["fidelities"]["cheap"]["records"] == 12 and not info["damaged_records"]
    # the same command again: nothing to do (resumable)
    argv = ["sample", "digits-dit", "--multiquantizer", str(dit_random_mq), "--cache", str(mf_cache), *JOB, "--json"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    out = json.loads(next(l for l in capsys.readouterr().out.splitlines() if l.startswith("{")))
    assert out["evaluated"] == 0 and out["full"]["evaluated"] == 0 and out["full"]["complete"]
    # byte-identical records at both fidelities whatever the worker count: tests/test_reproducible.py


def test_train_stacks_cheap_members_reloads_and_searches(dit_random_mq, mf_cache, tmp_path, capsys):
    from sensitivity.predictors import load_predictor, train
    from sensitivity.predictors.fidelity import STACK_KIND, MultiFidelityPredictor
    from sensitivity.search import search

    reports, preds = [], []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = tmp_path / f"pred{threads}"
            reports.append(train(mf_cache, out, model="digits-dit", predictor="lightgbm", baselines=("additive",),
                                 folds=3, seed=0, progress=False))
            preds.append(load_predictor(out))
        finally:
            torch.set_num_threads(old)
    rep, p = reports[0], preds[0]
    assert isinstance(p, MultiFidelityPredictor) and p.kind == STACK_KIND
    assert p.target.metric == "fid" and p.stack.members == ["lightgbm@feature_mse", "lightgbm@fd_fp", "lightgbm@psnr"]
    assert rep["n_configs"] == 6 and rep["fidelity"]["n_cheap"] == {"feature_mse": 12, "fd_fp": 12, "psnr": 12}
    assert set(rep["predictors"]) == {STACK_KIND, *p.stack.members, "additive"}
    # the stack's prediction is the weighted sum of its standardised members, each member a cheap-metric predictor
    mq = load_multiquantizer(dit_random_mq)
    codes = p.table.encode([{l: "uaq-3" for l in mq.layer_names[:k]} for k in range(0, 12, 3)])
    members = np.array([p.members[n].predict_codes(codes) for n in p.stack.members])
    want = p.stack.intercept + p.stack.weights @ ((members - p.stack.mean[:, None]) / p.stack.std[:, None])
    np.testing.assert_allclose(p.predict_codes(codes), want)
    assert p.members["lightgbm@fd_fp"].target.metric == "fd_fp"
    # reproducible whatever the thread count; reloading gives identical predictions and scores
    np.testing.assert_array_equal(preds[1].predict_codes(codes), p.predict_codes(codes))
    strip = lambda r: json.loads(json.dumps(r, default=str), object_hook=lambda d: {k: v for k, v in d.items() if "seconds" not in k})
    assert strip(reports[0]) == strip(reports[1])
    assert (tmp_path / "pred1" / "layer_scores.csv").read_bytes() == (tmp_path / "pred2" / "layer_scores.csv").read_bytes()
    res = search(p, mq, 3.6)
    assert res.avg_bits <= 3.6 + 1e-9
    assert "Multi-fidelity" in (tmp_path / "pred1" / "report.md").read_text()
    # --fidelity full ignores the cheap labels: 6 full labels alone are too few
    with pytest.raises(SensitivityError, match="need at least 10"):
        train(mf_cache, tmp_path / "full", model="digits-dit", predictor="lightgbm", baselines=(), folds=3,
              fidelity="full", progress=False)
    with pytest.raises(SensitivityError, match="no metric 'lpips'"):
        train(mf_cache, tmp_path / "x", model="digits-dit", predictor="lightgbm", baselines=(), folds=3,
              cheap_metrics=["lpips"], progress=False)
    assert not (tmp_path / "x").exists()
    from sensitivity.predictors.pipeline import out_of_fold_predictions

    with pytest.raises(SensitivityError, match="no fold models of its own"):
        out_of_fold_predictions(tmp_path / "pred1", mf_cache)


def test_cache_fidelity_store(tmp_path):
    from sensitivity.evaluation.cache.records import SignatureMismatchError

    path = tmp_path / "c.sqlite"
    rec = {"config": {"a": "uaq-4"}, "metrics": {"fid": 1.0}, "avg_bits": 4.0}
    with ConfigCache(path, signature="s-full", evaluation={"n": 200}, create=True) as full:
        full.add(rec)
    with ConfigCache(path, signature="s-cheap", evaluation={"n": 20}, create=True, fidelity="cheap") as cheap:
        cheap.add(dict(rec, metrics={"fid": 2.0}))
        cheap.add({"config": {"a": "uaq-3"}, "metrics": {"fid": 3.0}, "avg_bits": 3.0})
        assert cheap.fidelities() == {"cheap": "s-cheap", "full": "s-full"}
        assert [r["metrics"]["fid"] for r in cheap.records()] == [2.0, 3.0]
        with pytest.raises(SensitivityError, match="several fidelities"):
            cheap.rebind_multiquantizer("x")
    with ConfigCache(path) as c:
        assert [r["metrics"]["fid"] for r in c.records()] == [1.0] and len(c) == 3
        assert {k: len(v) for k, v in c.fidelity_records().items()} == {"cheap": 2, "full": 1}
    with pytest.raises(SignatureMismatchError, match="fidelity 'cheap'"):
        ConfigCache(path, signature="other", create=True, fidelity="cheap")
    with pytest.raises(SignatureMismatchError, match="signature of another fidelity"):
        ConfigCache(path, signature="s-full", create=True, fidelity="mid")
    with pytest.raises(SensitivityError, match="is not a name"):
        ConfigCache(path, fidelity="Cheap labels")


@pytest.mark.parametrize("extra,message", [
    (["--full-images-per-class", "4"], "--full-images-per-class needs --full-configs"),
    (["--full-configs", "20", "--full-images-per-class", "4"], "more than --num-configs 12"),
    (["--full-configs", "4"], "needs --full-images-per-class or --full-num-images"),
    (["--full-configs", "4", "--full-images-per-class", "1"], "equals the cheap one"),
    (["--full-configs", "0", "--full-images-per-class", "4"], "--full-configs"),
])
def test_sample_full_configs_bad_input(dit_random_mq, tmp_path, capsys, extra, message):
    cache = tmp_path / "bad.sqlite"
    argv = ["sample", "digits-dit", "--multiquantizer", str(dit_random_mq), "--cache", str(cache), "--weights", "random",
            "--images-per-class", "1", "--steps", "2", "--num-configs", "12", "--no-progress", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not cache.exists()


def test_cache_export_writes_one_fidelity(mf_cache, tmp_path, capsys):
    from sensitivity.evaluation.cache import read_records

    for fid, n in ((None, 6), ("cheap", 12)):
        out = tmp_path / f"{fid}.csv"
        argv = ["cache", "export", str(mf_cache), "--out", str(out)] + (["--fidelity", fid] if fid else [])
        assert cli.main(argv) == 0
        assert len(read_records(out)) == n
    assert "not exported: full" in capsys.readouterr().out
    assert cli.main(["cache", "export", str(mf_cache), "--out", str(tmp_path / "x.csv"), "--fidelity", "mid"]) == 2
    assert "no fidelity 'mid' (it has full, cheap)" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
