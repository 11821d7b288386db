"""Predictors on small synthetic caches: GNN and baselines, save / reload, scores, train / predict CLI."""

import json

import numpy as np
import pytest
import torch

from sensitivity.cli import main
from sensitivity.config import config_hash
from sensitivity.errors import SensitivityError
from sensitivity.graph import build_graph
from sensitivity.options import canonical
from sensitivity.predictors import (Context, Dataset, LayerTable, Target, cross_validate, load_cache,
                                    load_predictor, ranking_metrics, save_predictors)
from sensitivity.predictors.gnn import lambdarank_loss, spearman_loss
from sensitivity.predictors.synthetic import synthetic_cache
from sensitivity.zoo import get_family

GNN_FAST = {"epochs": 4, "hidden": 16, "d0": 16, "layers": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def graph():
    fam = get_family("digits-dit")
    den = fam.load_denoiser("tiny")
    return build_graph(den, fam.find_layers(den), model_id=fam.model_id("tiny"))


@pytest.fixture(scope="module")
def caches(graph, tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    train = synthetic_cache(d / "train.sqlite", graph, n=60, seed=0)
    other = synthetic_cache(d / "other.sqlite", graph, n=30, seed=0, config_seed=5)  # same hidden model
    return train, other


def _dataset(path, target=Target("fid")):
    data = load_cache(path)
    layers = list(data.layer_stats)
    table = LayerTable.from_layer_stats(layers, data.layer_stats)
    return Dataset.from_records(data.records, table, target), table


def test_metrics():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = ranking_metrics(y, y * 10)
    assert m["spearman"] == pytest.approx(1) and m["kendall"] == pytest.approx(1) and m["ndcg@10"] == pytest.approx(1)
    assert ranking_metrics(y, -y)["kendall"] == pytest.approx(-1)
    assert np.isnan(ranking_metrics(y, np.ones(4))["kendall"])


def test_rank_losses_have_gradients():
    torch.manual_seed(0)
    s = torch.randn(12, requires_grad=True)
    y = torch.randn(12)
    for loss in (spearman_loss(s, y), lambdarank_loss(s, y)):
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # a perfect ranking is better than its reverse
    assert lambdarank_loss(y.clone(), y) < lambdarank_loss(-y, y)
    assert spearman_loss(y.clone(), y) < spearman_loss(-y, y)


def test_target_and_dataset(caches):
    ds, table = _dataset(caches[0], Target("fid", lam=2.0))
    assert len(ds) == 60 and ds.codes.shape == (60, 46)
    np.testing.assert_allclose(ds.y, -ds.metric - 2.0 * ds.avg_bits)
    # decoding gives the records' configs (canonical, fp16 left out), and encoding them gives the codes back
    recs = {config_hash(r["config"]): r["config"] for r in load_cache(caches[0]).records}
    decoded = table.decode(ds.codes[:3])
    assert decoded == [{l: canonical(o) for l, o in recs[h].items() if canonical(o) != "fp16"} for h in ds.hashes[:3]]
    assert all(len(c) > 0 for c in decoded)
    np.testing.assert_array_equal(table.encode(decoded), ds.codes[:3])
    with pytest.raises(SensitivityError, match="not a layer"):
        table.encode([{"nope": "uaq-4"}])
    with pytest.raises(SensitivityError, match="option"):
        table.encode([{table.layers[0]: "uaq-7"}])


def test_baselines_and_gnn_on_the_same_folds(caches, graph):
    ds, table = _dataset(caches[0])
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["gnn", "bits", "error", "additive", "lightgbm"], folds=3, seed=0,
                         params={"gnn": GNN_FAST}, progress=False)
    rep = res.report["predictors"]
    assert set(rep) == {"gnn", "bits", "error", "additive", "lightgbm"}
    for kind, r in rep.items():
        assert [f["n_test"] for f in r["folds"]] == [20, 20, 20]
        assert set(r["mean"]) == {"spearman", "kendall", "ndcg@10"}
    # the hidden model is mostly additive: the additive model and the summed error rank well
    assert rep["additive"]["mean"]["kendall"] > 0.6
    assert rep["error"]["mean"]["kendall"] > 0.5
    assert np.isfinite(rep["gnn"]["mean"]["kendall"])


def test_gnn_saves_and_reloads_identically(caches, graph, tmp_path):
    ds, table = _dataset(caches[0])
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["gnn", "lightgbm", "additive"], folds=2, seed=1,
                         params={"gnn": GNN_FAST}, progress=False)
    out = save_predictors(tmp_path / "p", res, "gnn", {"model_id": "digits-dit:tiny"}, ds.codes[:8],
                          compute_scores=False, progress=False)
    for kind in ("gnn", "lightgbm", "additive"):
        p = load_predictor(out, kind=kind)
        np.testing.assert_array_equal(p.predict_codes(ds.codes), res.predictors[kind].predict_codes(ds.codes))
    p = load_predictor(out)
    assert p.kind == "gnn" and len(p.models) == 2
    cfgs = table.decode(ds.codes[:5])
    np.testing.assert_array_equal(p.predict(cfgs), res.predictors["gnn"].predict_codes(ds.codes[:5]))
    with pytest.raises(SensitivityError, match="no 'bits' member"):
        load_predictor(out, kind="bits")


def test_additive_scores_are_its_centred_weights(caches, graph, tmp_path):
    ds, table = _dataset(caches[0])
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["additive"], folds=2, seed=0, progress=False)
    out = save_predictors(tmp_path / "a", res, "additive", {}, ds.codes, progress=False)
    p = load_predictor(out)
    ls = p.layer_scores()
    assert len(ls) == 46 * 6
    w = np.mean([m.weights for m in p.models], axis=0)[:, 1:]
    w = w - w.mean(1, keepdims=True)
    got = ls.pivot(index="layer", columns="option", values="score").loc[table.layers, table.options].to_numpy()
    np.testing.assert_allclose(got, w, atol=1e-9)
    ms = p.module_scores()
    assert set(ms["module_type"]) >= {"ffn", "embedding"}
    ffn = ms[ms["module"] == "transformer_blocks.0.ff"]
    assert len(ffn) == 36  # 6 options x 6 options
    assert (tmp_path / "a" / "module_scores.csv").is_file()


def test_train_and_predict_cli(caches, tmp_path, capsys):
    train, other = caches
    out = tmp_path / "pred"
    rc = main(["train", str(train), "--model", "digits-dit", "--weights", "tiny", "--predictor", "gnn",
               "--baselines", "bits,additive", "--folds", "3", "--seed", "3", "--no-scores",
               "--set", "gnn.epochs=3", "--set", "gnn.hidden=16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["seed"] == 3 and rep["folds"] == 3 and set(rep["predictors"]) == {"gnn", "bits", "additive"}
    md = (out / "report.md").read_text()
    assert "| gnn |" in md and "| additive |" in md and "NDCG@10" in md
    assert main(["predict", "--predictor", str(out), "--cache", str(other), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_configs"] == 30 and set(res["predictors"]) == {"gnn", "bits", "additive"}
    assert res["predictors"]["additive"]["kendall"] > 0.3
    assert len(res["predictions"]["gnn"]) == 30


def test_cli_bad_inputs(caches, tmp_path, capsys):
    train, _ = caches
    cases = [
        (["train", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "x")], "does not exist"),
        (["train", str(train), "--predictor", "magic", "--out", str(tmp_path / "x")], "unknown predictor 'magic'"),
        (["train", str(train), "--set", "gnn.nope=1", "--out", str(tmp_path / "x")], "gnn.nope"),
        (["train", str(train), "--folds", "1", "--out", str(tmp_path / "x")], "--folds"),
        (["train", str(train), "--target", "kid", "--baselines", "", "--predictor", "bits",
          "--out", str(tmp_path / "x")], "metric 'kid'"),
        (["predict", "--predictor", str(tmp_path), "--cache", str(train)], "predictor.json"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (argv, err)
        assert not (tmp_path / "x").exists()


def test_predict_rejects_another_models_cache(caches, tmp_path, capsys):
    train, _ = caches
    out = tmp_path / "p"
    assert main(["train", str(train), "--model", "digits-dit", "--weights", "tiny", "--predictor", "bits",
                 "--baselines", "", "--folds", "2", "--out", str(out)]) == 0
    fam = get_family("digits-unet")
    den = fam.load_denoiser("tiny")
    g = build_graph(den, fam.find_layers(den))
    foreign = synthetic_cache(tmp_path / "unet.sqlite", g, n=10)
    capsys.readouterr()
    assert main(["predict", "--predictor", str(out), "--cache", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "not a layer of this predictor's model" in err


def test_training_does_not_depend_on_the_caches_row_order(caches, tmp_path):
    # parallel workers write records in the order they finish: the same records must train the same way
    from sensitivity.evaluation.cache import ConfigCache

    train, _ = caches
    with ConfigCache(train) as src:
        recs, sig, ev, stats = src.records(), src.signature, src.evaluation, src.layer_stats
    with ConfigCache(tmp_path / "reversed.sqlite", signature=sig, evaluation=ev, create=True) as rev:
        rev.set_layer_stats(stats)
        for r in reversed(recs):
            rev.add({k: r[k] for k in ("config", "avg_bits", "summed_error", "quantized_bytes", "metrics")})
    reports = []
    for k, cache in enumerate((train, tmp_path / "reversed.sqlite")):
        out = tmp_path / f"pred{k}"
        assert main(["train", str(cache), "--model", "digits-dit", "--weights", "tiny", "--predictor", "additive",
                     "--baselines", "bits", "--folds", "3", "--seed", "0", "--no-scores", "--out", str(out)]) == 0
        reports.append(_without_timings(json.loads((out / "report.json").read_text())["predictors"]))
    assert reports[0] == reports[1]


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj
