"""Allocators of issue 14: HAWQ traces, the reference's top-1 rule, SDNQ's rule, budgets."""

import numpy as np
import pandas as pd
import pytest
import torch

from sensitivity.allocators import allocate, with_fp16
from sensitivity.allocators.hawq import hessian_traces, hutchinson_trace
from sensitivity.allocators.mixdq import SingleLayerSampler, single_layer_table
from sensitivity.allocators.reference_rule import reference_allocate, top1_choice
from sensitivity.allocators.sdnq_rule import default_threshold, sdnq_choose, sdnq_losses
from sensitivity.errors import SensitivityError
from sensitivity.search import budget_bytes, build_groups, config_bytes, fp16_total, size_table

OPTIONS = ("uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3")


def toy_sizes(n_layers=12, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {f"l{i}": (int(rng.integers(8, 64)), int(rng.choice([64, 128, 256]))) for i in range(n_layers)}
    sizes = size_table(shapes, OPTIONS)
    base = {l: rng.uniform(0.5, 2.0) for l in shapes}
    bits = np.array([int(o[-1]) for o in sizes["option"]])
    meth = np.array([{"uaq": 1.0, "kmeans_c": 0.6, "kmeans_a": 1.4}[o.rsplit("-", 1)[0]] for o in sizes["option"]])
    sizes["error"] = np.array([base[l] for l in sizes["layer"]]) * meth * 4.0 ** (-bits) * rng.uniform(0.8, 1.2, len(sizes))
    sizes["sse"] = sizes["error"] * sizes["fp16_bytes"] / 2 * 1e-3
    return sizes


def test_hutchinson_matches_exact_trace_small_layer():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
    x = torch.randn(64, 5)
    with torch.no_grad():  # near a fit: the Gauss-Newton part dominates, the trace is well defined
        y = lin2(torch.tanh(lin1(x))) + 0.1 * torch.randn(64, 3)

    def loss_of(w):
        return ((torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w, lin1.bias)), lin2.weight,
                                            lin2.bias) - y) ** 2).mean()

    w0 = lin1.weight.detach().clone()
    H = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
    exact = float(torch.trace(H))

    def hvp(v):
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(w), w, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), w)
        return hv

    est, se = hutchinson_trace(hvp, w0.shape, n_samples=400, seed=1)
    assert abs(est - exact) < 4 * se + 1e-6
    assert abs(est - exact) / abs(exact) < 0.05

    # the all-layers-at-once estimator of hawq.hessian_traces on the same layer
    class Spec:
        name, module_path, tied, in_slice = "l1", "0", (), None

    model = torch.nn.Sequential(lin1, torch.nn.Tanh(), lin2)
    tr = hessian_traces(model, [Spec()], lambda: ((model(x) - y) ** 2).mean(), n_samples=400, seed=2)
    se2 = float(tr["trace_se"].iloc[0])
    assert abs(float(tr["trace"].iloc[0]) - exact) < 4 * se2 + 1e-6
    assert abs(float(tr["trace"].iloc[0]) - exact) / abs(exact) < 0.05


def test_reference_rule_reproduces_top1_on_toy_table():
    # two layers x two options; sizes: 4-bit 100 bytes, 3-bit 75 bytes, fp16 400 bytes per layer
    sizes = pd.DataFrame({"layer": ["a", "a", "b", "b"], "option": ["uaq-4", "uaq-3", "uaq-4", "uaq-3"],
                          "nbytes": [100, 75, 100, 75], "fp16_bytes": [400, 400, 400, 400]})
    scores = pd.DataFrame({"layer": ["a", "a", "b", "b"], "option": ["uaq-4", "uaq-3", "uaq-4", "uaq-3"],
                           "score": [1.0, 0.9, 1.0, 0.2]})
    groups = build_groups(scores, sizes)
    fp = fp16_total(sizes)  # 800; one layer's 25-byte saving = 0.5 avg bits
    assert top1_choice(groups, 0.0, fp) == {"a": "uaq-4", "b": "uaq-4"}
    # score loss of going 3-bit: a 0.1, b 0.8; penalty saved: lam * 0.5
    assert top1_choice(groups, 0.3, fp) == {"a": "uaq-3", "b": "uaq-4"}
    assert top1_choice(groups, 2.0, fp) == {"a": "uaq-3", "b": "uaq-3"}
    # sweeping lambda to a target: at 3.5 bits the top-1 rule lands on (a 3-bit, b 4-bit)
    res = reference_allocate(sizes, 3.5, layer_scores=scores)
    assert res.options == {"a": "uaq-3", "b": "uaq-4"} and res.avg_bits == 3.5
    assert 0.2 <= res.details["lam"] <= 1.6
    res = reference_allocate(sizes, 3.4, layer_scores=scores)
    assert res.options == {"a": "uaq-3", "b": "uaq-3"} and res.avg_bits == 3.0


def test_sdnq_rule_cheapest_option_under_threshold_else_fp16():
    sizes = pd.DataFrame({"layer": ["a"] * 3 + ["b"] * 3,
                          "option": ["uaq-3", "kmeans_c-3", "uaq-4"] * 2,
                          "nbytes": [75, 80, 100] * 2, "fp16_bytes": [400] * 6,
                          "error": [0.05, 0.02, 0.005, 0.2, 0.1, 0.05]})
    losses = sdnq_losses(sizes)
    assert default_threshold(sizes) == pytest.approx(10 ** -1.5)
    assert sdnq_choose(losses, 0.03) == {"a": "kmeans_c-3", "b": "fp16"}
    assert sdnq_choose(losses, 0.06) == {"a": "uaq-3", "b": "uaq-4"}
    assert sdnq_choose(losses, 1.0) == {"a": "uaq-3", "b": "uaq-3"}


@pytest.mark.parametrize("target", [3.1, 3.6, 4.2])
def test_every_allocator_respects_the_budget(target):
    sizes = toy_sizes()
    rng = np.random.default_rng(1)
    budget = budget_bytes(target, fp16_total(sizes))
    hawq = sizes[["layer", "option"]].assign(sensitivity=sizes["sse"] * rng.uniform(0.1, 10, len(sizes)))
    hawq.attrs["mode"] = "trace"
    mix = sizes[["layer", "option"]].assign(value=sizes["error"] * 3, seconds=1.0)
    mix["damage"] = mix["value"]
    pred = sizes[["layer", "option"]].assign(score=-sizes["error"] * rng.uniform(0.5, 2, len(sizes)))
    kws = {"sdnq": {}, "hawq": {"sensitivity": hawq}, "mixdq": {"table": mix}, "reference": {"layer_scores": pred}}
    for name, kw in kws.items():
        res = allocate(name, sizes, target, **kw)
        q, _ = config_bytes(res.options, sizes)
        assert q == res.quantized_bytes <= budget, name
        assert res.avg_bits <= target + 1e-12, name
    # and the search's own baselines (uniform, best cached, error ILP) and the search itself
    from sensitivity.search import AdditiveScorer, cache_best, error_ilp, search, uniform_configs

    cfgs = [{l: str(rng.choice(OPTIONS)) for l in sizes["layer"].unique()} for _ in range(40)]
    records = [{"index": i, "config_hash": f"h{i}", "config": c, "metrics": {"fid": float(rng.uniform(1, 9))}}
               for i, c in enumerate(cfgs)]
    others = {"error-ilp": error_ilp(sizes, target), "search": search(AdditiveScorer(pred), None, target, sizes=sizes)}
    if min(config_bytes(c, sizes)[0] for c in cfgs) <= budget:
        others["cache"] = cache_best(records, sizes, target)
    others.update({u.method: u for u in uniform_configs(sizes, target_bits=target)})
    assert len(others) >= 3
    for name, res in others.items():
        assert config_bytes(res.options, sizes)[0] <= budget, name
    # the ILPs are exact: nothing cheaper-or-equal has a lower summed sensitivity than hawq's choice
    res = allocate("hawq", sizes, target, sensitivity=hawq)
    assert res.objective <= allocate("hawq", sizes, target - 0.05, sensitivity=hawq).objective + 1e-12 if target > 3.1 else True


def test_single_layer_sampler_and_table():
    s = SingleLayerSampler(("a", "b"), ("uaq-4", "uaq-3", "fp16"))
    assert s.num_configs == 4
    assert [s.sample(["a", "b"], i) for i in range(4)] == [{"a": "uaq-4"}, {"a": "uaq-3"}, {"b": "uaq-4"}, {"b": "uaq-3"}]
    with pytest.raises(SensitivityError):
        s.check_layers(["a"])
    recs = [{"config": s.sample(None, i), "metrics": {"mse": 0.001 * (i + 1)}, "timings": {"evaluate": 2.0}}
            for i in range(4)] + [{"config": {"a": "uaq-3", "b": "uaq-3"}, "metrics": {"mse": 1.0}}]
    t = single_layer_table(recs, "mse")
    assert len(t) == 4 and t["damage"].tolist() == pytest.approx([0.001, 0.002, 0.003, 0.004])
    with pytest.raises(SensitivityError):
        single_layer_table(recs[-1:], "mse")


def test_with_fp16_adds_full_precision_rows():
    sizes = toy_sizes(3)
    full = with_fp16(sizes)
    fp = full[full["option"] == "fp16"]
    assert len(fp) == 3 and (fp["nbytes"] == fp["fp16_bytes"]).all() and (fp["error"] == 0).all()
