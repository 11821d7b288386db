"""Exact multiple-choice knapsack, bit budgets, score/module groups and the baselines of sensitivity.search."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from sensitivity.config import QuantConfig
from sensitivity.errors import SensitivityError
from sensitivity.options import OPTION_NAMES, QuantOption
from sensitivity.search import (
    InfeasibleTargetError,
    brute_force_mckp,
    budget_bytes,
    cache_best,
    config_avg_bits,
    error_ilp,
    min_avg_bits,
    parse_sweep,
    predict_results,
    search,
    search_scores,
    size_table,
    solve_mckp,
    uniform_configs,
    uniform_config,
)

METHODS = ("auto", "milp", "dp")


def _instance(rng, groups, options, cost_hi, kind):
    costs = [rng.integers(0, cost_hi, size=int(rng.integers(1, options + 1))) for _ in range(groups)]
    if kind == "correlated":  # value tracks cost: the hard case for knapsacks
        values = [c * 0.1 + rng.normal(size=c.size) * 0.01 for c in costs]
    elif kind == "ties":  # many exactly equal values
        values = [np.round(rng.normal(size=c.size), 1) for c in costs]
    else:
        values = [rng.normal(size=c.size) for c in costs]
    lo = sum(int(c.min()) for c in costs)
    hi = sum(int(c.max()) for c in costs)
    return costs, values, int(rng.integers(lo, hi + 1))


@pytest.mark.parametrize("kind", ["independent", "correlated", "ties"])
def test_solver_matches_brute_force(kind):
    rng = np.random.default_rng({"independent": 0, "correlated": 1, "ties": 2}[kind])
    for trial in range(60):
        costs, values, budget = _instance(rng, int(rng.integers(1, 7)), 5, [6, 60, 100_000][trial % 3], kind)
        ref = brute_force_mckp(costs, values, budget)
        for method in METHODS:
            sol = solve_mckp(costs, values, budget, method=method)
            assert sol.cost <= budget
            assert sol.value == pytest.approx(ref.value, abs=1e-9), (method, trial)
            # the reported totals are those of the returned choice
            assert sol.cost == sum(int(c[k]) for c, k in zip(costs, sol.choice))
            assert sol.value == pytest.approx(sum(float(v[k]) for v, k in zip(values, sol.choice)))


def test_solver_methods_agree_on_medium_instances():
    rng = np.random.default_rng(3)
    for trial in range(6):
        costs, values, budget = _instance(rng, 40, 6, 400, "correlated" if trial % 2 else "independent")
        sols = {m: solve_mckp(costs, values, budget, method=m) for m in METHODS}
        for m, sol in sols.items():
            assert sol.cost <= budget
            assert sol.value == pytest.approx(sols["dp"].value, abs=1e-9), m


def test_solver_budget_edges_and_infeasible():
    costs = [np.array([3, 5, 9]), np.array([2, 4]), np.array([1, 8])]
    values = [np.array([0.0, 1.0, 3.0]), np.array([0.0, 0.5]), np.array([0.0, 2.0])]
    for method in METHODS:
        sol = solve_mckp(costs, values, 6, method=method)  # exactly the minimum: all cheapest
        assert list(sol.choice) == [0, 0, 0] and sol.cost == 6
        sol = solve_mckp(costs, values, 100, method=method)  # everything fits: all best
        assert list(sol.choice) == [2, 1, 1] and sol.value == pytest.approx(5.5)
        with pytest.raises(InfeasibleTargetError) as exc:
            solve_mckp(costs, values, 5, method=method)
        assert exc.value.min_cost == 6


def test_solver_rejects_bad_input():
    with pytest.raises(SensitivityError):
        solve_mckp([np.array([1.5, 2])], [np.array([0.0, 1.0])], 10)
    with pytest.raises(SensitivityError):
        solve_mckp([np.array([1, 2])], [np.array([0.0])], 10)
    with pytest.raises(SensitivityError):
        solve_mckp([np.array([1, 2])], [np.array([0.0, np.nan])], 10)
    with pytest.raises(SensitivityError):
        solve_mckp([np.array([1, 2])], [np.array([0.0, 1.0])], 10, method="greedy")


# ------------------------------------------------------------------ sizes, budgets, search on score tables

SHAPES = {
    "pos_embed.proj": (128, 4, 2, 2),
    "transformer_blocks.0.attn1.to_q": (128, 128),
    "transformer_blocks.0.attn1.to_k": (128, 128),
    "transformer_blocks.0.ff.net.0.proj": (512, 128),
    "transformer_blocks.0.ff.net.2": (128, 512),
    "transformer_blocks.1.attn1.to_q": (128, 128),
    "transformer_blocks.1.ff.net.2": (128, 512),
    "proj_out_2": (16, 128),
}


@pytest.fixture()
def sizes():
    return size_table(SHAPES, OPTION_NAMES)


def _additive_scores(sizes, seed=0):
    """A simple additive scorer: per (layer, option) penalty that grows with layer size and lower bits."""
    rng = np.random.default_rng(seed)
    bits = sizes["option"].map(lambda o: QuantOption.parse(o).bits).to_numpy()
    sens = {l: rng.lognormal() for l in sizes["layer"].unique()}
    score = -np.array([sens[l] for l in sizes["layer"]]) * 2.0 ** (-bits) * rng.uniform(0.5, 1.5, len(sizes))
    return sizes[["layer", "option"]].assign(score=score)


class AdditivePredictor:
    """Implements the search protocol: layer_scores + whole-config predict as the sum of layer scores."""

    def __init__(self, scores):
        self.scores = scores
        self.lut = {(l, o): s for l, o, s in zip(scores["layer"], scores["option"], scores["score"])}

    def layer_scores(self, mq):
        return self.scores

    def predict(self, configs):
        return np.array([sum(self.lut[(l, o)] for l, o in c.items()) for c in configs])


def _brute_force_config(sizes, scores, target):
    """Best summed score over every config of the table with 16·Σbytes/Σfp16 ≤ target (enumeration)."""
    layers = list(dict.fromkeys(sizes["layer"]))
    nbytes = {(l, o): b for l, o, b in zip(sizes["layer"], sizes["option"], sizes["nbytes"])}
    lut = {(l, o): s for l, o, s in zip(scores["layer"], scores["option"], scores["score"])}
    fp = sizes.drop_duplicates("layer")["fp16_bytes"].sum()
    grid_b = np.array(np.meshgrid(*[[nbytes[(l, o)] for o in OPTION_NAMES] for l in layers], indexing="ij"))
    grid_s = np.array(np.meshgrid(*[[lut[(l, o)] for o in OPTION_NAMES] for l in layers], indexing="ij"))
    tot_b, tot_s = grid_b.sum(axis=0).ravel(), grid_s.sum(axis=0).ravel()
    ok = 16 * tot_b <= target * fp
    return float(tot_s[ok].max()) if ok.any() else None


def test_budget_bytes_is_exact_decimal():
    assert budget_bytes(4.0, 1000) == 250
    assert budget_bytes(3.9, 1000) == 243  # floor(243.75)
    assert budget_bytes("3.2", 160) == 32
    with pytest.raises(SensitivityError):
        budget_bytes(-1, 100)


def test_search_scores_exact_and_within_target(sizes):
    scores = _additive_scores(sizes)
    small = sizes[sizes["layer"].isin(list(SHAPES)[:5])]
    sc_small = scores[scores["layer"].isin(small["layer"])]
    for target in (3.2, 3.5, 3.8, 4.1):
        res = search_scores(sc_small, small, target)
        assert res.avg_bits <= target
        assert res.quantized_bytes <= res.budget_bytes
        assert res.objective == pytest.approx(_brute_force_config(small, sc_small, target), abs=1e-9)
    # a larger target can only help
    objs = [search_scores(scores, sizes, t).objective for t in (3.3, 3.6, 3.9, 4.2)]
    assert all(a <= b + 1e-12 for a, b in zip(objs, objs[1:]))


def test_infeasible_target_names_smallest_feasible(sizes):
    scores = _additive_scores(sizes)
    lo = min_avg_bits(sizes)
    with pytest.raises(InfeasibleTargetError) as exc:
        search_scores(scores, sizes, 2.5)
    assert f"{exc.value.min_avg_bits:.4f}" in str(exc.value)
    assert exc.value.min_avg_bits >= lo
    # the value named in the message is feasible
    res = search_scores(scores, sizes, exc.value.min_avg_bits)
    assert res.avg_bits <= exc.value.min_avg_bits


def test_search_with_protocol_predictor_rescores(sizes):
    pred = AdditivePredictor(_additive_scores(sizes, seed=4))
    res = search(pred, None, 3.7, sizes=sizes)
    assert res.predicted == pytest.approx(res.objective)  # additive predictor: whole = sum of parts
    assert set(res.options) == set(SHAPES) and res.avg_bits <= 3.7
    cfg = res.to_config(model="digits-dit:test", multiquantizer_hash="abc")
    assert isinstance(cfg, QuantConfig) and cfg.avg_bits == pytest.approx(res.avg_bits)
    assert cfg.provenance["target_bits"] == 3.7 and cfg.provenance["predicted"] == pytest.approx(res.predicted)
    json.dumps(cfg.to_dict())  # serialisable


def test_module_groups_use_combinations(sizes):
    scores = _additive_scores(sizes, seed=5)
    lut = {(l, o): s for l, o, s in zip(scores["layer"], scores["option"], scores["score"])}
    mod_layers = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k")
    rows = []
    for combo in itertools.product(["uaq-4", "uaq-3", "kmeans_a-3"], repeat=2):
        # an interaction: q and k at different bit widths is penalised
        inter = -0.5 if combo[0][-1] != combo[1][-1] else 0.0
        rows.append({"module": "block0.attn", "layers": mod_layers, "options": combo,
                     "score": sum(lut[(l, o)] for l, o in zip(mod_layers, combo)) + inter})
    mods = pd.DataFrame(rows)
    for target in (3.3, 3.6, 3.9):
        res = search_scores(scores, sizes, target, module_scores=mods)
        assert res.details["level"] == "module" and res.avg_bits <= target
        q, k = res.options[mod_layers[0]], res.options[mod_layers[1]]
        assert (q, k) in [tuple(c) for c in mods["options"]]
        assert q[-1] == k[-1]  # the interaction penalty is avoided
    # too many combinations: the module falls back to layer groups
    res = search_scores(scores, sizes, 3.6, module_scores=mods, max_combinations=4)
    assert res.details["level"] == "layer"
    bad = mods.assign(module=["m1"] * 4 + ["m2"] * 5)
    with pytest.raises(SensitivityError, match="two modules"):
        search_scores(scores, sizes, 3.6, module_scores=bad)


def test_missing_layer_score_is_named(sizes):
    scores = _additive_scores(sizes)
    scores = scores[scores["layer"] != "proj_out_2"]
    with pytest.raises(SensitivityError, match="proj_out_2"):
        search_scores(scores, sizes, 3.8)


def test_parse_sweep():
    assert parse_sweep("3.2:4.0:0.1") == [3.2, 3.3, 3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0]
    assert parse_sweep("3.5,3.9") == [3.5, 3.9]
    for bad in ("4:3:0.1", "3:4", "a:b:c", "3:4:0"):
        with pytest.raises(SensitivityError):
            parse_sweep(bad)


# ------------------------------------------------------------------ baselines


def test_uniform_baselines(sizes):
    res = uniform_config(sizes, "mse-4")
    assert set(res.options.values()) == {"uaq-4"} and res.method == "uniform-uaq-4"
    all_u = uniform_configs(sizes)
    assert len(all_u) == len(OPTION_NAMES)
    kc4 = next(r for r in all_u if r.method == "uniform-kmeans_c-4")
    assert kc4.avg_bits > 4.0  # per-channel codebooks cost more than 4 bits
    under = uniform_configs(sizes, target_bits=4.0)
    assert all(r.avg_bits <= 4.0 for r in under) and "uniform-kmeans_c-4" not in {r.method for r in under}


def test_error_ilp_baseline_is_exact(sizes):
    rng = np.random.default_rng(6)
    bits = sizes["option"].str[-1].astype(int)
    st = sizes.assign(error=rng.uniform(0.5, 1.5, len(sizes)) * 4.0 ** (-bits))
    small = st[st["layer"].isin(list(SHAPES)[:4])].reset_index(drop=True)
    res = error_ilp(small, 3.6)
    lut = {(l, o): e for l, o, e in zip(small["layer"], small["option"], small["error"])}
    best = -_brute_force_config(small, small[["layer", "option"]].assign(score=-small["error"]), 3.6)
    assert res.objective == pytest.approx(best, abs=1e-12)
    assert res.objective == pytest.approx(sum(lut[(l, o)] for l, o in res.options.items()))
    assert res.avg_bits <= 3.6
    with pytest.raises(SensitivityError, match="error"):
        error_ilp(sizes, 3.6)  # no error column


def test_cache_best_baseline(sizes):
    layers = list(SHAPES)
    rng = np.random.default_rng(7)
    records = []
    for i in range(30):
        cfg = {l: OPTION_NAMES[int(rng.integers(len(OPTION_NAMES)))] for l in layers}
        records.append({"index": i, "config_hash": f"h{i}", "config": cfg, "metrics": {"fid": float(rng.uniform(5, 50)),
                                                                                     "accuracy": float(rng.uniform())}})
    target = 3.7
    res = cache_best(records, sizes, target, metric="fid")
    ok = [r for r in records if config_avg_bits(r["config"], sizes) <= target]
    assert res.details["metric_value"] == min(r["metrics"]["fid"] for r in ok)
    assert res.avg_bits <= target and res.details["candidates"] == len(ok)
    res_acc = cache_best(records, sizes, target, metric="accuracy")
    assert res_acc.details["metric_value"] == max(r["metrics"]["accuracy"] for r in ok)
    with pytest.raises(InfeasibleTargetError, match="lowest cached"):
        cache_best(records, sizes, 2.0)


def test_predict_results_batches(sizes):
    pred = AdditivePredictor(_additive_scores(sizes, seed=8))
    res = predict_results(pred, uniform_configs(sizes))
    assert all(r.predicted is not None for r in res)
    u3 = next(r for r in res if r.method == "uniform-uaq-3")
    u4 = next(r for r in res if r.method == "uniform-uaq-4")
    assert u4.predicted > u3.predicted


def test_size_table_from_cache_layer_stats(sizes):
    st = sizes.assign(error=np.linspace(0.1, 0.2, len(sizes)))
    stats = {l: {"fp16_bytes": int(df["fp16_bytes"].iloc[0]),
                 "options": {o: [int(b), float(e)] for o, b, e in zip(df["option"], df["nbytes"], df["error"])}}
             for l, df in st.groupby("layer", sort=False)}
    back = size_table(stats)
    pd.testing.assert_frame_equal(back[["layer", "option", "nbytes", "fp16_bytes", "error"]],
                                  st[["layer", "option", "nbytes", "fp16_bytes", "error"]].reset_index(drop=True))
    assert list(size_table(stats, ["uaq-4"])["option"].unique()) == ["uaq-4"]


def test_result_records_the_solver_that_ran():
    costs = [np.array([3, 5, 9]), np.array([2, 4]), np.array([1, 8])]
    values = [np.array([0.0, 1.0, 3.0]), np.array([0.0, 0.5]), np.array([0.0, 2.0])]
    assert solve_mckp(costs, values, 100).solver == "unconstrained"
    assert solve_mckp(costs, values, 8, method="dp").solver == "dp"
    assert solve_mckp(costs, values, 8, method="milp").solver in ("milp-highs", "lp-bounds")
    assert solve_mckp(costs, values, 8).solver in ("bounded-dp", "milp-highs", "lp-bounds")
    sizes = size_table(SHAPES, OPTION_NAMES)
    res = search_scores(_additive_scores(sizes), sizes, 3.6)
    assert res.details["solver"] in ("bounded-dp", "milp-highs", "lp-bounds")
    assert res.to_config().provenance["solver"] == res.details["solver"]
