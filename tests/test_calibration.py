"""Calibration: observers, GPTQ / AdaRound / table refit, artifacts, CLI bad input (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity.calibration import (CalibrationSet, RangeObserver, apply_calibrated, calibrate, load_calibrated,
                                     remove_calibrated)
from sensitivity.calibration.rounding import (adaround_codes, gptq_codes, lookup_codes, nearest_codes, output_error,
                                              refit_table)
from sensitivity.errors import SensitivityError
from sensitivity.multiquantizer import apply, build_multiquantizer, restore
from sensitivity.quantizers import quantize
from sensitivity.quantizers.activation import fake_quantize_static

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- observers
def test_minmax_observer_exact_over_batches():
    obs = RangeObserver("minmax")
    obs.update(torch.tensor([[0.5, -2.0], [1.0, 0.0]]))
    obs.update(torch.tensor([[3.0, -1.0]]))
    lo, hi = obs.range()
    assert float(lo) == -2.0 and float(hi) == 3.0
    ch = RangeObserver("minmax", "channel")
    ch.update(torch.tensor([[0.5, -2.0], [1.0, 0.0]]))
    ch.update(torch.tensor([[3.0, -1.0]]))
    lo, hi = ch.range()
    assert lo.tolist() == [0.5, -2.0] and hi.tolist() == [3.0, 0.0]


def test_percentile_observer_documented_quantiles():
    x = torch.linspace(0.0, 1.0, 10001)[:, None]  # 10001 rows, < max_rows kept exactly if max_rows large
    obs = RangeObserver("percentile", percentile=99.0, max_rows=20000)
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(0.01, abs=1e-6) and float(hi) == pytest.approx(0.99, abs=1e-6)
    two = torch.cat([x, 10 * x], 1)
    ch = RangeObserver("percentile", "channel", percentile=99.0, max_rows=20000)
    ch.update(two)
    lo, hi = ch.range()
    assert hi.tolist() == pytest.approx([0.99, 9.9], abs=1e-5) and lo.tolist() == pytest.approx([0.01, 0.1], abs=1e-5)


def test_mse_observer_clips_outliers_and_keeps_uniform_range():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(4000, 1, generator=g)
    gauss[0, 0] = 60.0  # one far outlier
    obs = RangeObserver("mse", bits=4, max_rows=8000)
    obs.update(gauss)
    lo, hi = obs.range()
    assert float(hi) < 30.0  # clipped well below the outlier
    err = lambda a, b: float((fake_quantize_static(gauss, a, b, 4, 1) - gauss).square().sum())  # noqa: E731
    assert err(lo, hi) < err(gauss.min(), gauss.max())
    uni = torch.rand(4000, 1, generator=g) * 2 - 1
    u = RangeObserver("mse", bits=8, max_rows=8000)
    u.update(uni)
    lo, hi = u.range()
    assert float(hi) >= 0.98 * float(uni.max()) and float(lo) <= 0.98 * float(uni.min())


# ----------------------------------------------------------------------------- rounding
def _problem(seed=0, C=24, K=48, n=4096):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, K, generator=g)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    X = torch.randn(n, K, generator=g) @ mix  # correlated inputs
    H = (X.T.double() @ X.double()) / n
    return W, X, H


def test_gptq_equals_rtn_when_inputs_are_white():
    """Known answer: with H = I there is nothing to feed back, GPTQ is round-to-nearest."""
    W, _, _ = _problem()
    q = quantize(W, "uaq-4")
    codes = gptq_codes(W, torch.eye(W.shape[1], dtype=torch.float64), q.table(), damp=0.0)
    assert torch.equal(codes, nearest_codes(W, q.table()))


@pytest.mark.parametrize("option", ["uaq-4", "uaq-3", "kmeans_a-3"])
def test_gptq_lowers_output_error_vs_rtn(option):
    W, X, H = _problem()
    q = quantize(W, option)
    table = q.table()
    codes = gptq_codes(W, H, table)
    assert int(codes.max()) < 2 ** q.bits
    rtn = output_error(W, lookup_codes(table, q.codes), H)
    new = output_error(W, lookup_codes(table, codes), H)
    assert new < 0.8 * rtn
    # measured on the layer's outputs directly, too
    y = X @ W.T
    assert ((X @ lookup_codes(table, codes).T - y) ** 2).mean() < ((X @ lookup_codes(table, q.codes).T - y) ** 2).mean()


def test_adaround_and_refit_lower_output_error():
    W, _, H = _problem(1)
    q = quantize(W, "uaq-4")
    rtn = output_error(W, lookup_codes(q.table(), q.codes), H)
    ada = adaround_codes(W, H, q.table(), iters=150)
    assert output_error(W, lookup_codes(q.table(), ada), H) < rtn
    for opt in ("uaq-4", "kmeans_c-3", "kmeans_a-3"):
        q = quantize(W, opt)
        params = refit_table(q.method, W, H, q.codes, q.params)
        assert {k: (v.shape, v.dtype) for k, v in params.items()} == {k: (v.shape, v.dtype) for k, v in q.params.items()}
        from sensitivity.quantizers import get_method

        new = output_error(W, lookup_codes(get_method(q.method).table(params, q.bits), q.codes), H)
        assert new <= output_error(W, lookup_codes(q.table(), q.codes), H) * (1 + 1e-6)


# ----------------------------------------------------------------------------- artifacts (toy model)
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.lin = nn.Linear(16 * 4 * 4, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x, scale=None):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.lin(h))
        y = self.out(h)
        return y if scale is None else y * scale[:, None]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    den = Toy().eval()
    d = tmp_path_factory.mktemp("toy")
    mq = build_multiquantizer(den, d / "toy.safetensors", model_id="toy:0", options=["uaq-4", "kmeans_a-3"],
                              progress=False)
    g = torch.Generator().manual_seed(1)
    cs = CalibrationSet({"arg0": torch.randn(96, 8, 4, 4, generator=g), "kw.scale": torch.rand(96, generator=g) + 0.5},
                        {}, {"model_id": "toy:0", "kind": "noise"})
    return den, mq, cs, d


def test_calibrated_artifact_round_trips_and_applies_identically(toy):
    den, mq, cs, d = toy
    cfg = {"conv": "uaq-4", "lin": "kmeans_a-3", "out": "uaq-4"}
    art = calibrate(den, mq, cfg, cs, weights_method="auto", act_bits=8, observer="mse", progress=False)
    assert art.config.avg_bits == pytest.approx(mq.avg_bits(cfg))
    assert set(art.weights) <= set(cfg) and art.weights
    art.save(d / "x-cal")
    back = load_calibrated(d / "x-cal")
    assert json.loads((d / "x-cal" / "config.json").read_text())["activations"]["bits"] == 8
    for name, q in art.weights.items():
        b = back.weights[name]
        assert torch.equal(b.codes, q.codes) and b.option == q.option
        assert all(torch.equal(b.params[k], q.params[k]) for k in q.params)
        assert b.nbytes == mq.stats(name, q.option)["nbytes"] and int(b.codes.max()) < 2 ** b.bits
    assert set(back.activations.ranges) == set(art.activations.ranges)
    for p, (lo, hi) in art.activations.ranges.items():
        assert torch.equal(back.activations.ranges[p][0], lo) and torch.equal(back.activations.ranges[p][1], hi)
    x = torch.randn(5, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp = den(x)
        apply_calibrated(den, mq, back)
        y1 = den(x)
        remove_calibrated(den)
        assert torch.equal(den(x), fp)
        apply(den, mq, {"conv": "kmeans_a-3"})  # something else in between
        apply_calibrated(den, mq, back)
        y2 = den(x)
        apply(den, mq, cfg)  # the calibrated layers are rewritten to plain RTN
        y_rtn = den(x)
        remove_calibrated(den)
    assert torch.equal(y1, y2) and not torch.equal(y1, fp) and not torch.equal(y_rtn, y1)
    restore(den)


def test_calibrate_rejects_bad_input(toy):
    den, mq, cs, d = toy
    cfg = {"conv": "uaq-4"}
    with pytest.raises(SensitivityError, match="activation bits"):
        calibrate(den, mq, cfg, cs, act_bits=17, progress=False)
    other = CalibrationSet(cs.tensors, {}, {"model_id": "digits-dit:shipped"})
    with pytest.raises(SensitivityError, match="calibration set of digits-dit:shipped"):
        calibrate(den, mq, cfg, other, act_bits=8, progress=False)
    wrong = CalibrationSet({"arg0": torch.randn(4, 3, 4, 4)}, {}, {"model_id": "toy:0"})
    with pytest.raises(SensitivityError, match="do not fit the model"):
        calibrate(den, mq, cfg, wrong, act_bits=8, progress=False)
    with pytest.raises(SensitivityError, match="empty"):
        calibrate(den, mq, cfg, CalibrationSet({"arg0": torch.zeros(0, 8, 4, 4)}, {}, {"model_id": "toy:0"}),
                  progress=False)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    from sensitivity.cli import main

    from safetensors.torch import save_file

    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser(None)
    layers = fam.find_layers(den)[:2]
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", layers, model_id=fam.model_id(None),
                              options=["uaq-4"], progress=False)
    (tmp_path / "cfg.json").write_text(json.dumps({"options": {layers[0].name: "uaq-4"}}))
    other = CalibrationSet({"arg0": torch.randn(4, 4, 4, 4), "kw.timestep": torch.ones(4)}, {},
                           {"model_id": "digits-unet:shipped"})
    other.save(tmp_path / "unet.safetensors")
    shape = CalibrationSet({"arg0": torch.randn(4, 3, 5, 5), "kw.timestep": torch.ones(4),
                            "kw.class_labels": torch.zeros(4, dtype=torch.long)}, {}, {"model_id": mq.model_id})
    shape.save(tmp_path / "shape.safetensors")
    save_file({"arg0": torch.zeros(0, 1, 8, 8)}, str(tmp_path / "empty.safetensors"),
              metadata={"sensitivity.calibration": json.dumps({"format": "sensitivity.calibration-set/1",
                                                               "model_id": mq.model_id})})
    base = ["calibrate", "digits-dit", "--multiquantizer", "mq.safetensors", "--config", "cfg.json", "--no-progress"]
    cases = [(["--data", "unet.safetensors", "--act-bits", "8"], "digits-unet"),
             (["--data", "shape.safetensors", "--act-bits", "8"], "do not fit the model"),
             (["--data", "empty.safetensors", "--act-bits", "8"], "empty"),
             (["--data", "unet.safetensors", "--act-bits", "1"], "--act-bits must be in [2, 16]"),
             (["--data", "unet.safetensors", "--act-bits", "17"], "--act-bits must be in [2, 16]")]
    for i, (extra, needle) in enumerate(cases):
        monkeypatch.chdir(tmp_path)
        rc = main([*base, *extra, "--out", f"out{i}"])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, err
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
        assert not (tmp_path / f"out{i}").exists()
        assert not list(tmp_path.glob(f"out{i}*"))
