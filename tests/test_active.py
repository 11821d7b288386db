"""Active sampling (issue 14): fixed-list runs and the disagreement rule."""

import numpy as np
import pytest

pytest.importorskip("lightgbm")

from sensitivity.active import ListSampler, choose_batch, onehot  # noqa: E402
from sensitivity.errors import SensitivityError  # noqa: E402


def test_list_sampler_is_a_run_of_fixed_configs():
    cfgs = [{"a": "uaq-3"}, {"a": "uaq-4", "b": "uaq-3"}]
    s = ListSampler.from_configs(cfgs, seed=0, round=1)
    assert [s.sample(None, i) for i in range(2)] == cfgs
    d = s.to_dict()
    assert d["algorithm"] == "active/v1" and d["round"] == 1 and d["configs"] == 2
    assert ListSampler.from_configs(cfgs[::-1], seed=0, round=1).to_dict()["configs_hash"] != d["configs_hash"]
    with pytest.raises(SensitivityError):
        s.check_layers(["a"])


def test_choose_batch_picks_near_target_configs_the_folds_disagree_on():
    rng = np.random.default_rng(0)
    layers, options = [f"l{i}" for i in range(6)], ["uaq-4", "uaq-3"]
    X = [{l: options[int(rng.integers(2))] for l in layers} for _ in range(60)]
    y = np.array([sum(c[l] == "uaq-3" for l in layers) for c in X], dtype=float)
    y += np.array([3.0 * (c["l0"] == "uaq-3") * rng.standard_normal() for c in X])  # noisy where l0 is 3-bit
    pool = [{l: options[int(rng.integers(2))] for l in layers} for _ in range(200)]
    bits = rng.uniform(3.0, 4.0, len(pool))
    picks = choose_batch(X, y, pool, bits, layers, options, targets=[3.5], batch=10, window=0.2, seed=0)
    assert len(picks) == 10 and len(set(picks)) == 10
    assert all(abs(bits[i] - 3.5) <= 0.2 for i in picks)
    assert picks == choose_batch(X, y, pool, bits, layers, options, targets=[3.5], batch=10, window=0.2, seed=0)
    with pytest.raises(SensitivityError):
        choose_batch(X, y, pool, bits, layers, options, targets=[9.0], batch=10)
    assert onehot([{"l0": "uaq-3"}], ["l0"], options).tolist() == [[0.0, 0.0, 1.0]]
