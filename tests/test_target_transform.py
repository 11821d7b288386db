"""Target transforms: train on -log(FID), read predictions back as FID."""

import math
from pathlib import Path

import numpy as np
import pytest

from sensitivity.errors import SensitivityError
from sensitivity.predictors.data import Target

CACHE = Path(__file__).resolve().parents[1] / "caches" / "digits-dit.sqlite"


def test_log_target_values_and_inverse():
    t = Target("fid", transform="log")
    y = t.values([1.0, math.e, 4.0], [3.0, 3.0, 4.0])
    assert np.allclose(y, [0.0, -1.0, -math.log(4.0)])
    assert np.allclose(t.metric_of(y, [3.0, 3.0, 4.0]), [1.0, math.e, 4.0])
    assert t.describe() == "-log(fid)" and Target.from_dict(t.to_dict()) == t
    penalised = Target("fid", lam=0.5, transform="log")
    assert np.allclose(penalised.metric_of(penalised.values([2.0], [3.5]), [3.5]), [2.0])
    assert Target.from_dict({"metric": "fid", "lam": 0.0}).transform == "none"  # predictors saved before transforms
    plain = Target("psnr")
    assert np.allclose(plain.metric_of(plain.values([30.0], [4.0]), [4.0]), [30.0])
    with pytest.raises(SensitivityError, match="fid > 0, got 0"):
        t.values([1.0, 0.0], [3.0, 3.0])
    with pytest.raises(SensitivityError, match="unknown target transform 'sqrt'"):
        Target("fid", transform="sqrt")


def test_auto_transform_is_log_for_fid_without_a_bit_penalty():
    from sensitivity.evaluation.metric_specs import resolve_transform

    assert resolve_transform("auto", "fid") == "log" and resolve_transform("auto", "FID") == "log"
    assert resolve_transform("auto", "fid", lam=150.0) == "none"  # the reference's lambda is in FID units
    assert resolve_transform("auto", "kid") == "none"  # unbiased KID can be negative
    assert resolve_transform("auto", "psnr") == "none" and resolve_transform("none", "fid") == "none"
    with pytest.raises(SensitivityError, match="unknown target transform 'sqrt'"):
        resolve_transform("sqrt", "fid")


def test_train_on_log_fid_and_compare_in_fid(tmp_path):
    from sensitivity.comparison import compare_at_targets
    from sensitivity.predictors import load_predictor
    from sensitivity.predictors.pipeline import train

    rep = train(CACHE, tmp_path / "p", model="digits-dit", predictor="lightgbm",
                baselines=("additive",), folds=3, progress=False)  # the default: auto -> log for FID
    assert rep["target"]["transform"] == "log" and rep["target"]["formula"] == "-log(fid)"
    pred = load_predictor(tmp_path / "p")
    assert pred.target.transform == "log"
    with pytest.raises(SensitivityError, match="unknown target transform"):
        train(CACHE, tmp_path / "q", model="digits-dit", predictor="lightgbm", baselines=(),
              target_transform="rank", progress=False)
    assert not (tmp_path / "q").exists()
    plain = train(CACHE, tmp_path / "r", model="digits-dit", predictor="additive", baselines=(), folds=3,
                  progress=False, target_transform="none")
    assert plain["target"]["formula"] == "-fid"

    class Evaluator:
        def evaluate(self, options):
            return {"fid": 1.0}

    sizes = pred.table.sizes
    comp = compare_at_targets(pred, None, Evaluator(), [3.6], [], metric="fid", sizes=sizes)
    row = next(r for r in comp.rows if r["method"].startswith("search"))
    y = float(pred.predict([comp.results[3.6].options])[0])
    assert row["predicted_fid"] == pytest.approx(math.exp(-y)) and row["predicted_fid"] > 0
    point = next(p for p in comp.points if p["source"] == "search")
    assert point["predicted"] == pytest.approx(y)  # the Pareto points keep the target's units (-log FID)
