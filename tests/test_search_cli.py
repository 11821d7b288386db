"""`sensitivity search` and `sensitivity insights` on a tiny multiquantizer (UAQ options, built in the test)."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.cli import main
from sensitivity.config import QuantConfig
from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer

OPTIONS = ("uaq-4", "uaq-3")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        for n in ("to_q", "to_k", "to_v"):
            setattr(self.attn1, n, nn.Linear(128, 128))
        self.attn1.to_out = nn.ModuleList([nn.Linear(128, 128)])
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(256, 128)])
        self.ff.net[0].proj = nn.Linear(128, 256)


class _TinyDiT(nn.Module):
    """DiT-style layer names, 13 layers of 128-long rows."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Conv2d(32, 128, 2, 2)
        self.transformer_blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.proj_out_2 = nn.Linear(128, 16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("search_cli")
    torch.manual_seed(0)
    mq_path = d / "tiny.safetensors"
    build_multiquantizer(_TinyDiT(), mq_path, model_id="tiny-dit:test", options=OPTIONS, progress=False)
    mq = load_multiquantizer(mq_path)
    st = mq.stats_frame()
    rng = np.random.default_rng(0)
    scores = st[["layer", "option"]].assign(score=-st["error"] * rng.uniform(0.5, 1.5, len(st)))
    scores_path = d / "scores.csv"
    scores.to_csv(scores_path, index=False)
    return d, mq_path, mq, scores_path


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_search_writes_config_within_target(files, capsys):
    d, mq_path, mq, scores = files
    out = d / "cfg" / "s39.json"
    rc, text, err = _run(capsys, "search", "--scores", scores, "--multiquantizer", mq_path, "--target-bits", 3.9, "--out", out)
    assert rc == 0, err
    cfg = QuantConfig.load(out)
    assert set(cfg.options) == set(mq.layer_names)
    assert cfg.model == "tiny-dit:test" and cfg.multiquantizer_hash == mq.hash
    assert cfg.avg_bits == pytest.approx(mq.avg_bits(cfg.options), abs=1e-6) and cfg.avg_bits <= 3.9
    assert cfg.provenance["target_bits"] == 3.9 and cfg.provenance["command"] == "search"
    assert f"avg bits {cfg.avg_bits:.4f}" in text and "option mix:" in text and "predicted score" in text


def test_search_refuses_infeasible_target_with_minimum(files, capsys):
    d, mq_path, mq, scores = files
    rc, text, err = _run(capsys, "search", "--scores", scores, "--multiquantizer", mq_path, "--target-bits", 3.0,
                         "--out", d / "bad.json")
    assert rc == 2 and not (d / "bad.json").exists()
    m = re.search(r"smallest feasible target is ([0-9.]+)", err)
    assert m and str(mq_path) in err
    lo = float(m.group(1))
    uaq3 = mq.avg_bits({l: "uaq-3" for l in mq.layer_names})
    assert uaq3 <= lo < uaq3 + 1e-4
    rc, _, err = _run(capsys, "search", "--scores", scores, "--multiquantizer", mq_path, "--target-bits", lo,
                      "--out", d / "lo.json")
    assert rc == 0, err


def test_search_sweep_writes_configs_and_pareto(files, capsys):
    d, mq_path, mq, scores = files
    out = d / "sweep"
    rc, text, err = _run(capsys, "search", "--scores", scores, "--multiquantizer", mq_path, "--sweep", "3.3:4.1:0.2",
                         "--out", out, "--json")
    assert rc == 0, err
    reports = json.loads(text)
    assert [r["target_bits"] for r in reports] == [3.3, 3.5, 3.7, 3.9, 4.1]
    assert all(r["avg_bits"] <= r["target_bits"] for r in reports)
    preds = [r["predicted"] for r in reports]
    assert preds == sorted(preds)  # more bits never predicts worse
    assert len(list(out.glob("search-layer-*.json"))) == 5
    assert (out / "pareto_predicted.png").stat().st_size > 5_000 and (out / "sweep.csv").exists()


def test_search_baselines(files, capsys, tmp_path):
    d, mq_path, mq, scores = files
    rc, _, err = _run(capsys, "search", "--baseline", "uniform", "--option", "mse-3", "--multiquantizer", mq_path,
                      "--out", tmp_path / "u.json")
    assert rc == 0, err
    assert set(QuantConfig.load(tmp_path / "u.json").options.values()) == {"uaq-3"}
    rc, text, err = _run(capsys, "search", "--baseline", "error-ilp", "--multiquantizer", mq_path, "--target-bits", 3.6,
                         "--out", tmp_path / "e.json", "--json")
    assert rc == 0, err
    rep = json.loads(text)
    cfg = QuantConfig.load(tmp_path / "e.json")
    assert rep["avg_bits"] <= 3.6 and rep["objective"] == pytest.approx(mq.summed_error(cfg.options))
    # cache baseline: the best cached config at or below the target
    from sensitivity.evaluation.cache import ConfigCache

    rng = np.random.default_rng(1)
    cache_path = tmp_path / "c.sqlite"
    with ConfigCache(cache_path, signature="sig-test", evaluation={"model": "tiny"}, create=True) as cache:
        for i in range(12):
            p3 = i / 11  # from all 4-bit to all 3-bit
            cfg_i = {l: "uaq-3" if rng.uniform() < p3 else "uaq-4" for l in mq.layer_names}
            cache.add({"config": cfg_i, "avg_bits": mq.avg_bits(cfg_i), "metrics": {"fid": float(rng.uniform(5, 50))}})
        recs = cache.records()
    rc, text, err = _run(capsys, "search", "--baseline", "cache", "--cache", cache_path, "--multiquantizer", mq_path,
                         "--target-bits", 3.8, "--out", tmp_path / "c.json", "--json")
    ok = [r for r in recs if mq.avg_bits(r["config"]) <= 3.8]
    assert 0 < len(ok) < len(recs)
    assert rc == 0, err
    assert json.loads(text)["metric_value"] == min(r["metrics"]["fid"] for r in ok)
    rc, _, err = _run(capsys, "search", "--baseline", "cache", "--cache", cache_path, "--multiquantizer", mq_path,
                      "--target-bits", 3.1, "--out", tmp_path / "c2.json")
    assert rc == 2 and "lowest cached" in err


def test_search_argument_errors(files, capsys):
    d, mq_path, _, scores = files
    for argv, msg in [
        (["search", "--multiquantizer", mq_path, "--target-bits", 3.9, "--out", d / "x.json"], "--predictor"),
        (["search", "--scores", scores, "--multiquantizer", mq_path, "--out", d / "x.json"], "--target-bits"),
        (["search", "--scores", scores, "--multiquantizer", mq_path, "--sweep", "3.3:3.9:0.1", "--out", d / "x.json"], "folder"),
        (["search", "--baseline", "uniform", "--multiquantizer", mq_path, "--out", d / "x.json"], "--option"),
        (["search", "--scores", d / "missing.csv", "--multiquantizer", mq_path, "--target-bits", 3.9, "--out", d / "x.json"], "missing.csv"),
    ]:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and msg in err, (argv, err)


def test_insights_command(files, capsys, tmp_path):
    d, mq_path, mq, scores = files
    cfg = d / "cfg" / "i37.json"
    assert _run(capsys, "search", "--scores", scores, "--multiquantizer", mq_path, "--target-bits", 3.7, "--out", cfg)[0] == 0
    rc, text, err = _run(capsys, "insights", "--scores", scores, "--multiquantizer", mq_path, "--config", cfg,
                         "--out", tmp_path / "ins")
    assert rc == 0, err
    made = {p.name for p in (tmp_path / "ins").iterdir()}
    assert {"scores.csv", "box_block.png", "box_op_type.png", "config_i37.csv", "mix_i37_op_type.png",
            "pareto.csv", "pareto_predicted.png"} <= made
    rc, _, err = _run(capsys, "insights", "--out", tmp_path / "none")
    assert rc == 2 and "nothing to describe" in err


def test_search_configs_takes_a_scorer_object_and_refuses_two_budgets(files, tmp_path):
    """The library call behind `search`: any object with the search protocol, options as a list."""
    from sensitivity.errors import SensitivityError
    from sensitivity.search import AdditiveScorer, load_scores_csv
    from sensitivity.workflows.search import search_configs

    d, mq_path, mq, scores_path = files
    scorer = AdditiveScorer(load_scores_csv(scores_path))
    run = search_configs(tmp_path / "x.json", predictor=scorer, multiquantizer=mq_path, target_bits=3.5,
                         options=["uaq-4", "uaq-3"])
    (c,) = run.configs
    assert c.path == tmp_path / "x.json" and not run.sweep and c.result.avg_bits <= 3.5
    assert c.report["predicted"] == pytest.approx(float(scorer.predict([c.result.options])[0]))
    cfg = QuantConfig.load(c.path)
    assert cfg.options == c.result.options and cfg.provenance["options"] == "uaq-4,uaq-3"
    assert "predictor" not in cfg.provenance  # an object without a folder: no path to record
    with pytest.raises(SensitivityError, match="--target-bits and --sweep are two budgets"):
        search_configs(tmp_path / "y.json", predictor=scorer, multiquantizer=mq_path, target_bits=3.5, sweep="3.4,3.6")
    assert not (tmp_path / "y.json").exists()


def test_search_whole_predictor_rerank_and_refine(files, tmp_path, capsys):
    """--whole-predictor: refined_search's configs under the same exact budget, recorded in the provenance."""
    from sensitivity.errors import SensitivityError
    from sensitivity.search import AdditiveScorer, load_scores_csv, rate, refined_search, search
    from sensitivity.sizes import SizeTable
    from sensitivity.workflows.search import search_configs

    d, mq_path, mq, scores_path = files
    layers = list(mq.layer_names)

    class Interacting(AdditiveScorer):  # additive layer scores plus an interaction the knapsack cannot see
        def predict(self, configs):
            bonus = [0.05 * sum(c.get(a) == c.get(b) for a, b in zip(layers, layers[1:])) for c in configs]
            return np.asarray(super().predict(configs), dtype=np.float64) + np.array(bonus)

    p = Interacting(load_scores_csv(scores_path))
    sizes = SizeTable.of(mq, None)
    plain = search(p, mq, 3.6, sizes=sizes)
    for mode in ("rerank", "refine"):
        run = search_configs(tmp_path / f"{mode}.json", predictor=p, multiquantizer=mq_path, target_bits=3.6,
                             whole_predictor=mode)
        (c,) = run.configs
        want = refined_search(p, mq, 3.6, sizes=sizes, local=mode == "refine")
        cfg = QuantConfig.load(c.path)
        assert cfg.options == want.options and cfg.avg_bits <= 3.6 and cfg.provenance["whole_predictor"] == mode
        assert rate(p, [cfg.options])[0] >= rate(p, [plain.options])[0]
        assert c.report["method"] == {"rerank": "search-reranked", "refine": "search-refined"}[mode]
    assert c.report["moves"] > 0  # refine moved beyond the knapsack's candidates
    for kw, msg in [({"baseline": "error-ilp"}, "no --baseline"), ({"target_memory": "1MB", "target_bits": None},
                                                                    "bits budgets"),
                    ({"whole_predictor": "local"}, "unknown --whole-predictor")]:
        args = dict(predictor=p, multiquantizer=mq_path, target_bits=3.6, whole_predictor="refine")
        args.update(kw)
        with pytest.raises(SensitivityError, match=msg):
            search_configs(tmp_path / "bad.json", **args)
    rc, _, err = _run(capsys, "search", "--scores", scores_path, "--multiquantizer", mq_path, "--target-bits", 3.6,
                      "--whole-predictor", "rerank", "--out", tmp_path / "s.json")
    assert rc == 2 and "--whole-predictor rerank re-rates with a --predictor DIR" in err
