"""Issue 14, predictor quality: the cache regret, the ``ensemble`` kind, the GNN's feature table."""

import numpy as np
import pandas as pd
import pytest

from sensitivity.errors import SensitivityError
from sensitivity.graph import build_graph
from sensitivity.predictors import (Context, Dataset, LayerTable, Target, cross_validate, load_cache, load_predictor,
                                    save_predictors)
from sensitivity.predictors.data import read_feature_table
from sensitivity.predictors.metrics import cache_regret
from sensitivity.predictors.pipeline import out_of_fold_predictions
from sensitivity.predictors.synthetic import synthetic_cache
from sensitivity.zoo import get_family

GNN_FAST = {"epochs": 3, "hidden": 16, "d0": 16, "layers": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    fam = get_family("digits-dit")
    den = fam.load_denoiser("tiny")
    graph = build_graph(den, fam.find_layers(den), model_id=fam.model_id("tiny"))
    path = synthetic_cache(tmp_path_factory.mktemp("c") / "train.sqlite", graph, n=40, seed=0)
    data = load_cache(path)
    table = LayerTable.from_layer_stats(list(data.layer_stats), data.layer_stats)
    ds = Dataset.from_records(data.records, table, Target("fid"))
    return graph, path, table, ds


def test_cache_regret_by_hand():
    fid = np.array([5.0, 4.0, 6.0, 3.0, 2.0])
    bits = np.array([3.0, 3.5, 3.5, 4.0, 5.0])
    score = np.array([0.0, -1.0, 1.0, 0.5, 9.0])  # prefers config 2 under 3.5, config 2 under 4.0
    r = cache_regret(fid, bits, score, [2.0, 3.0, 3.5, 4.0])
    assert r[0]["n"] == 0 and np.isnan(r[0]["regret"])
    assert (r[1]["n"], r[1]["best"], r[1]["chosen"], r[1]["regret"], r[1]["rank"]) == (1, 5.0, 5.0, 0.0, 1)
    assert (r[2]["n"], r[2]["best"], r[2]["chosen"], r[2]["regret"], r[2]["rank"]) == (3, 4.0, 6.0, 2.0, 3)
    assert (r[3]["n"], r[3]["best"], r[3]["chosen"], r[3]["regret"], r[3]["rank"]) == (4, 3.0, 6.0, 3.0, 4)
    # higher-is-better metric: best is the max, regret still >= 0
    r = cache_regret(-fid, bits, score, [4.0], lower_is_better=False)[0]
    assert (r["best"], r["chosen"], r["regret"]) == (-3.0, -6.0, 3.0)
    with pytest.raises(ValueError, match="lengths differ"):
        cache_regret(fid, bits[:3], score, [4.0])


def test_ensemble_reuses_members_and_reloads_identically(setup, tmp_path):
    graph, path, table, ds = setup
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["ensemble", "gnn", "lightgbm", "additive"], folds=2, seed=0,
                         params={"gnn": GNN_FAST}, progress=False)
    ens = res.predictors["ensemble"]
    assert all(m.info["reused"] == ["gnn", "additive"] for m in ens.models)  # the default members
    want = np.mean([res.predictors[k].predict_codes(ds.codes) for k in ("gnn", "additive")], 0)
    np.testing.assert_allclose(ens.predict_codes(ds.codes), want, rtol=1e-12)
    out = save_predictors(tmp_path / "e", res, "ensemble", {}, ds.codes[:8], compute_scores=False, progress=False)
    p = load_predictor(out)
    assert p.kind == "ensemble"
    np.testing.assert_array_equal(p.predict_codes(ds.codes), ens.predict_codes(ds.codes))
    # the out-of-fold predictions rebuild the report's fold numbers from the folder alone
    o = out_of_fold_predictions(out, path, "ensemble")
    from scipy.stats import kendalltau

    fold_of, y, pred = map(np.asarray, (o["fold_of"], o["y"], o["pred"]))
    for f, row in enumerate(res.report["predictors"]["ensemble"]["folds"]):
        assert kendalltau(y[fold_of == f], pred[fold_of == f])[0] == pytest.approx(row["kendall"])


def test_ensemble_weights_and_bad_params(setup):
    graph, _, table, ds = setup
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["additive", "bits", "ensemble"], folds=2, seed=0,
                         params={"ensemble": {"members": ["additive", "bits"], "weights": [3, 1]}}, progress=False)
    want = 0.75 * res.predictors["additive"].predict_codes(ds.codes) + 0.25 * res.predictors["bits"].predict_codes(ds.codes)
    np.testing.assert_allclose(res.predictors["ensemble"].predict_codes(ds.codes), want, rtol=1e-12)
    from sensitivity.predictors.ensemble_model import EnsembleModel

    with pytest.raises(SensitivityError, match="weights"):
        EnsembleModel(ctx, {"members": ["additive", "bits"], "weights": [1.0]})
    with pytest.raises(SensitivityError, match="distinct"):
        EnsembleModel(ctx, {"members": ["bits", "bits"]})


def _feature_csv(table, path, drop=0):
    rows = [{"layer": l, "option": o, "value": (i + 1) * 10.0 ** (-k)} for i, l in enumerate(table.layers)
            for k, o in enumerate(table.options)]
    pd.DataFrame(rows[drop:]).to_csv(path, index=False)
    return path


def test_gnn_feature_table_is_stored_in_the_folder(setup, tmp_path):
    graph, _, table, ds = setup
    csv = _feature_csv(table, tmp_path / "f.csv")
    raw = read_feature_table(csv, table)
    assert raw.shape == (len(table.layers), 1 + len(table.options)) and (raw[:, 0] == 0).all()
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["gnn"], folds=2, seed=0,
                         params={"gnn": {**GNN_FAST, "feature_table": str(csv)}}, progress=False)
    m = res.predictors["gnn"].models[0]
    assert m.net.num.in_features == 5 and m.gt["feature"].shape == raw.shape
    out = save_predictors(tmp_path / "g", res, "gnn", {}, ds.codes[:8], compute_scores=False, progress=False)
    csv.unlink()  # reloading needs the folder only
    np.testing.assert_array_equal(load_predictor(out).predict_codes(ds.codes), res.predictors["gnn"].predict_codes(ds.codes))


def test_feature_table_bad_input(setup, tmp_path):
    _, _, table, _ = setup
    with pytest.raises(SensitivityError, match="does not exist"):
        read_feature_table(tmp_path / "none.csv", table)
    with pytest.raises(SensitivityError, match=f"no value for layer '{table.layers[0]}'"):
        read_feature_table(_feature_csv(table, tmp_path / "a.csv", drop=1), table)
    pd.DataFrame([{"layer": "nope", "option": "uaq-4", "value": 1.0}]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(SensitivityError, match="layer 'nope'"):
        read_feature_table(tmp_path / "b.csv", table)
    pd.DataFrame([{"layer": table.layers[0], "option": table.options[0], "value": -1.0}]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(SensitivityError, match="value -1.0"):
        read_feature_table(tmp_path / "c.csv", table)
    pd.DataFrame([{"layer": table.layers[0], "value": 1.0}]).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SensitivityError, match="no column 'option'"):
        read_feature_table(tmp_path / "d.csv", table)


def test_lightgbm_summed_feature_tables_reload(setup, tmp_path):
    graph, _, table, ds = setup
    csv = _feature_csv(table, tmp_path / "f.csv")
    ctx = Context(table, Target("fid"), graph)
    res = cross_validate(ds, ctx, ["lightgbm"], folds=2, seed=0,
                         params={"lightgbm": {"feature_tables": [str(csv)], "n_estimators": 20}}, progress=False)
    m = res.predictors["lightgbm"].models[0]
    X = m._features(ds.codes[:3])
    raw = read_feature_table(csv, table)
    want = np.log10(raw[np.arange(len(table.layers))[None, :], ds.codes[:3].astype(int)].sum(1) + 1e-12)
    np.testing.assert_allclose(X[:, -1], want, rtol=1e-6)
    assert X.shape[1] == len(table.layers) * (1 + len(table.options)) + 1
    out = save_predictors(tmp_path / "l", res, "lightgbm", {}, ds.codes[:8], compute_scores=False, progress=False)
    csv.unlink()
    np.testing.assert_array_equal(load_predictor(out).predict_codes(ds.codes),
                                  res.predictors["lightgbm"].predict_codes(ds.codes))


def test_train_cli_defaults_to_the_ensemble(setup, tmp_path, capsys):
    import json

    from sensitivity.cli import main

    _, path, _, _ = setup
    fast = [f"--set=gnn.{k}={v}" for k, v in GNN_FAST.items()]
    rc = main(["train", str(path), "--model", "digits-dit", "--weights", "tiny", "--folds", "2", "--baselines", "bits",
               "--no-scores", "--out", str(tmp_path / "p"), *fast])
    assert rc == 0
    man = json.loads((tmp_path / "p" / "predictor.json").read_text())
    assert man["primary"] == "ensemble" and set(man["kinds"]) == {"ensemble", "bits", "gnn", "additive"}
    ens = man["members"]["ensemble"]["folds"][0]["params"]
    assert ens["member_params"]["gnn"]["epochs"] == GNN_FAST["epochs"]  # the run's --set reaches the members
    assert "ensemble" in capsys.readouterr().out
    # members and weights from the command line, as comma lists
    rc = main(["train", str(path), "--model", "digits-dit", "--weights", "tiny", "--folds", "2", "--baselines", "",
               "--no-scores", "--out", str(tmp_path / "q"), "--set", "ensemble.members=lightgbm,additive",
               "--set", "ensemble.weights=3,1"])
    assert rc == 0
    man = json.loads((tmp_path / "q" / "predictor.json").read_text())
    assert set(man["kinds"]) == {"ensemble", "lightgbm", "additive"}
    ens = man["members"]["ensemble"]["folds"][0]["params"]
    assert ens["members"] == ["lightgbm", "additive"] and ens["weights"] == [3.0, 1.0]
    capsys.readouterr()
    assert main(["train", str(path), "--model", "digits-dit", "--weights", "tiny", "--folds", "2", "--baselines", "",
                 "--no-scores", "--out", str(tmp_path / "r"), "--set", "ensemble.weights=1,x"]) != 0
    assert "ensemble: weights" in capsys.readouterr().err and not (tmp_path / "r").exists()
