"""benchmarks/label_noise.py: class-balanced subsets, the noise / tau summary, one tiny seed set, its page."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("label_noise", ROOT / "benchmarks" / "label_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_subsets_are_class_balanced_prefixes(bench):
    idx = bench._subset(20, per_class_max=5)
    assert idx == [0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31, 35, 36, 40, 41, 45, 46]
    assert bench._subset(50, per_class_max=5) == list(range(50))


def test_summary_noise_to_signal_and_tau_direction(bench):
    """A lower-is-better metric that follows the truth exactly ranks with tau 1; pure noise has noise/signal
    near 1 or more; a higher-is-better metric is sign-corrected."""
    rng = np.random.default_rng(0)
    truth = list(np.linspace(1.0, 3.0, 12))
    noisy = {"fid": [list(np.array(truth) + rng.normal(0, 0.01, 12)) for _ in range(3)],
             "accuracy": [list(1.0 - np.array(truth) / 10) for _ in range(3)]}
    sets = [{"values": {"10": {m: noisy[m][s] if m in noisy else list(rng.normal(0, 1, 12)) for m in bench.METRICS}}}
            for s in range(3)]
    rows = {r["metric"]: r for r in bench.summarize(sets, truth, [10], {"10": 0.5})}
    assert rows["fid"]["tau"] > 0.95 and rows["fid"]["noise_to_signal"] < 0.05
    assert rows["accuracy"]["tau"] == pytest.approx(1.0) and rows["accuracy"]["noise_to_signal"] < 1e-9
    assert rows["kid"]["noise_to_signal"] > 0.7 and rows["kid"]["cpu_seconds"] == 0.5


def test_one_tiny_seed_set_and_its_page(bench, tmp_path):
    """Two configs, 10 images, 2 steps: every metric at every size, the paired ones 0 at full precision."""
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("shipped")
    mq = tmp_path / "mq.safetensors"
    build_multiquantizer(den, mq, fam.find_layers(den)[:4], model_id=fam.model_id("shipped"),
                         options=("uaq-3",), progress=False)
    names = [s.name for s in fam.find_layers(den)[:4]]
    configs = [{}, {n: "uaq-3" for n in names}]
    got = bench.seed_set({"model": "digits-dit", "seed": 7, "sizes": [10, 20], "configs": configs, "steps": 2,
                          "multiquantizer": str(mq), "threads": 1})
    assert set(got["values"]) == {"10", "20"} and set(got["values"]["10"]) == set(bench.METRICS)
    fp, q = (got["values"]["20"]["feature_mse"][i] for i in (0, 1))
    assert fp == 0.0 and q > 0 and got["values"]["20"]["psnr"][0] == 100.0
    rows = bench.summarize([got, got], [1.0, 2.0], [10, 20], {"10": 0.1, "20": 0.2})
    d = {"models": [{"model": "digits-dit", "configs": 2, "truth": "t.sqlite", "seed_sets": [7, 7], "steps": 2,
                     "rows": rows}]}
    text = bench.markdown(d)
    assert "## digits-dit: 2 configs of `t.sqlite`" in text and "| feature_mse | 20 | 0.20 |" in text
    assert "Best metric at each size" in text


def test_label_efficiency_table_renders_from_its_json():
    """benchmarks/label_efficiency.py's page is rendered from the JSON it writes (missing values as dashes)."""
    spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "benchmarks" / "label_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = {"caption": "cap.", "columns": ["predictor", "strategy", "labels", "truth τ", "held-out τ"],
         "table": [{"predictor": "lightgbm", "strategy": "paired", "labels": 40, "truth τ": 0.71234, "held-out τ": None}]}
    lines = mod.markdown(d).splitlines()
    assert lines[2:5] == ["| predictor | strategy | labels | truth τ | held-out τ |",
                          "|---|---|---|---|---|", "| lightgbm | paired | 40 | 0.712 | – |"]
    assert "predates `--target-transform`" in lines[-1]  # a run that did not record its target
    assert mod.markdown({**d, "target": "-log(fid)"}).splitlines()[-1] == (
        "The FID strategies' predictors learn `-log(fid)` (`--target-transform`).")
