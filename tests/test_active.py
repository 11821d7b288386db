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


# ---------------------------------------------------------------------------- the real command
@pytest.fixture(scope="module")
def tiny_mq(tmp_path_factory):
    """A multiquantizer of the first 6 layers of digits-dit (random weights, 2 options): seconds."""
    import torch

    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("random", device="cpu", dtype=torch.float32)
    path = tmp_path_factory.mktemp("amq") / "digits-dit-random6.safetensors"
    build_multiquantizer(den, path, fam.find_layers(den)[:6], model_id=fam.model_id("random"),
                         options=("uaq-4", "uaq-3"), progress=False)
    return path


def _active(mq, cache, n, capsys):
    import json as _json

    from sensitivity.cli import main as cli_main

    argv = ["sample", "digits-dit", "--weights", "random", "--images-per-class", "1", "--steps", "2",
            "--multiquantizer", str(mq), "--cache", str(cache), "--strategy", "active", "--num-configs", str(n),
            "--initial", "8", "--batch", "4", "--pool", "60", "--window", "0.3", "--seed", "5", "--no-progress",
            "--json"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("{"))
    return _json.loads(line)


def test_active_command_resumes_and_its_prefixes_are_the_labelling_order(tiny_mq, tmp_path, capsys):
    from sensitivity.active import labelling_order
    from sensitivity.evaluation.cache import ConfigCache

    whole = tmp_path / "whole.sqlite"
    _active(tiny_mq, whole, 16, capsys)  # 8 random + rounds of 4, 4
    order = [r["config_hash"] for r in labelling_order(whole)]
    assert len(order) == 16  # a tiny space: the random start may draw a config twice; the rounds never re-pick
    assert len(set(order[8:])) == 8 and not set(order[8:]) & set(order[:8])
    with ConfigCache(whole) as c:
        assert len(c) == len(set(order))
        rounds = sorted(r["sampler"]["round"] for r in c.runs() if r["sampler"].get("algorithm") == "active/v1")
        assert rounds == [1, 2]
        start = next(r for r in c.runs() if r["sampler"].get("algorithm") != "active/v1")
        assert order[:8] == [r["config_hash"] for r in c.records(start["run_id"])]  # the random run's indices 0..7

    parts = tmp_path / "parts.sqlite"  # stopped after round 1, then continued: the same rounds
    _active(tiny_mq, parts, 12, capsys)
    assert [r["config_hash"] for r in labelling_order(parts)] == order[:12]
    assert [r["config_hash"] for r in labelling_order(parts, limit=10)] == order[:10]
    more = _active(tiny_mq, parts, 16, capsys)
    assert more["evaluated"] == 4  # only round 2 was new
    assert [r["config_hash"] for r in labelling_order(parts)] == order
    again = _active(tiny_mq, parts, 16, capsys)  # complete: nothing to do, same order
    assert again["evaluated"] == 0 and [r["config_hash"] for r in labelling_order(parts, seed=5)] == order
    with pytest.raises(SensitivityError, match="no active run"):
        labelling_order(parts, seed=6)
