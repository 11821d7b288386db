"""Transfer (issue 25, item 4): a GNN trained on one model's cache predicts, and starts the training, on another's."""

import json

import numpy as np
import pytest

from sensitivity.cli import main
from sensitivity.errors import SensitivityError
from sensitivity.graph import build_graph
from sensitivity.predictors import LayerTable, load_cache, load_predictor, train
from sensitivity.predictors.predictor import transfer
from sensitivity.predictors.synthetic import synthetic_cache
from sensitivity.zoo import get_family

GNN_FAST = {"epochs": 3, "hidden": 16, "d0": 16, "layers": 2, "batch_size": 16}


def _graph(name):
    fam = get_family(name)
    den = fam.load_denoiser("tiny")
    return build_graph(den, fam.find_layers(den), model_id=fam.model_id("tiny"))


@pytest.fixture(scope="module")
def prior_and_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("transfer")
    src = synthetic_cache(d / "dit.sqlite", _graph("digits-dit"), n=30, seed=0)
    prior = d / "prior"
    train(src, prior, model="digits-dit", weights="tiny", predictor="ensemble", baselines=(), folds=2, seed=0,
          params={"gnn": GNN_FAST}, scores=False, progress=False)
    unet = _graph("digits-unet")
    tgt = synthetic_cache(d / "unet.sqlite", unet, n=12, seed=1)
    return prior, tgt, unet


def test_prior_predicts_on_another_models_graph(prior_and_target):
    prior, tgt, unet = prior_and_target
    data = load_cache(tgt)
    table = LayerTable.from_layer_stats(unet.weight_nodes, data.layer_stats)
    p = transfer(prior, unet, table)
    assert p.kind == "gnn" and len(p.models) == 2 and p.meta["prior"] == str(prior)
    pred = p.predict([r["config"] for r in data.records])
    assert pred.shape == (12,) and np.isfinite(pred).all() and np.std(pred) > 0
    # per-layer kinds do not transfer; an option the prior never saw is refused by name
    with pytest.raises(SensitivityError, match="per-layer parameters"):
        transfer(prior, unet, table, kind="lightgbm")
    odd = LayerTable.from_specs(unet.layers, ["uaq_g64-4"])
    with pytest.raises(SensitivityError, match="'uaq_g64-4' is unknown to the GNN's vocabulary"):
        transfer(prior, unet, odd)


def test_init_from_starts_the_training_from_the_prior(prior_and_target, tmp_path, capsys):
    prior, tgt, unet = prior_and_target
    out = tmp_path / "tuned"
    assert main(["train", str(tgt), "--model", "digits-unet", "--weights", "tiny", "--predictor", "gnn",
                 "--baselines", "", "--folds", "2", "--no-scores", "--prior", str(prior),
                 *[f"--set=gnn.{k}={v}" for k, v in GNN_FAST.items() if k not in ("hidden", "d0", "layers")],
                 "--out", str(out)]) == 0
    man = json.loads((out / "predictor.json").read_text())
    folds = man["members"]["gnn"]["folds"]
    assert [f["meta"]["prior"]["fold"] for f in folds] == [0, 1]  # fold k starts from the prior's fold k
    assert folds[0]["meta"]["arch"] == {"d0": 16, "hidden": 16, "layers": 2}  # the prior's architecture, not the defaults
    assert folds[0]["params"]["init_from"] == str(prior)
    p = load_predictor(out)
    assert np.isfinite(p.predict([r["config"] for r in load_cache(tgt).records])).all()
    # a prior without a gnn member is refused by name, before training
    capsys.readouterr()
    bits = tmp_path / "bits"
    assert main(["train", str(tgt), "--model", "digits-unet", "--weights", "tiny", "--predictor", "bits",
                 "--baselines", "", "--folds", "2", "--no-scores", "--out", str(bits)]) == 0
    assert main(["train", str(tgt), "--model", "digits-unet", "--weights", "tiny", "--predictor", "gnn",
                 "--baselines", "", "--folds", "2", "--no-scores", "--prior", str(bits),
                 "--out", str(tmp_path / "x")]) == 2
    assert "has no 'gnn' member to start from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_from_training_is_reproducible_across_thread_counts(prior_and_target, tmp_path):
    import torch

    prior, tgt, _ = prior_and_target
    weights = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = tmp_path / f"t{threads}"
            train(tgt, out, model="digits-unet", weights="tiny", predictor="gnn", baselines=(), folds=2, seed=3,
                  params={"gnn": {"init_from": str(prior), "epochs": 2}}, scores=False,
                  progress=False)
            weights.append((out / "weights.safetensors").read_bytes())
        finally:
            torch.set_num_threads(old)
    assert weights[0] == weights[1]
