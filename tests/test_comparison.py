"""compare_at_targets: search vs baselines under one budget, each measured by the held-out evaluator."""

import numpy as np
import pytest

from sensitivity.comparison import compare_at_targets
from sensitivity.config import config_hash
from sensitivity.options import OPTION_NAMES, QuantOption
from sensitivity.search import AdditiveScorer, size_table
from sensitivity.sizes import SizeTable

SHAPES = {f"blocks.{i}.{n}": s for i in range(4) for n, s in (("attn.to_q", (64, 64)), ("ff.net.0.proj", (256, 64)))}


class ErrorEvaluator:
    """A held-out 'measurement': FID = 10 + 100 · Σ error (lower is better), counted per call."""

    def __init__(self, sizes, offset=0.0):
        self.sizes, self.offset, self.calls = sizes, offset, []

    def evaluate(self, options):
        self.calls.append(dict(options))
        e = self.sizes.summed_error(options)
        return {"fid": 10.0 + 100.0 * e + self.offset, "psnr": 40.0 - 10 * e, "timings": {"generate": 0.0}}


@pytest.fixture()
def setup():
    rng = np.random.default_rng(0)
    frame = size_table(SHAPES, OPTION_NAMES)
    bits = frame["option"].map(lambda o: QuantOption.parse(o).bits).to_numpy()
    frame = frame.assign(error=rng.uniform(0.5, 1.5, len(frame)) * 4.0 ** (-bits))
    sizes = SizeTable.of(frame)
    scores = frame[["layer", "option"]].assign(score=-frame["error"])  # a perfect additive predictor of −FID
    records = []
    for i in range(30):
        cfg = {l: str(rng.choice(OPTION_NAMES)) for l in SHAPES}
        records.append({"index": i, "config_hash": config_hash(cfg), "config": cfg,
                        "metrics": {"fid": 10.0 + 100.0 * sizes.summed_error(cfg) + rng.normal(0, 0.5)}})
    return sizes, AdditiveScorer(scores), records


def test_compare_at_targets_measures_search_and_baselines(setup):
    sizes, predictor, records = setup
    ev, job = ErrorEvaluator(sizes), ErrorEvaluator(sizes, offset=1.0)
    comp = compare_at_targets(predictor, None, ev, [2.0, 3.6, 4.0], records, metric="fid", job_evaluator=job, sizes=sizes)
    assert comp.skipped == [2.0] and set(comp.results) == {3.6, 4.0}
    assert comp.full_precision["fid"] == 10.0 and "timings" not in comp.full_precision
    for t in (3.6, 4.0):
        rows = {r["method"].split(" (")[0].split(" of ")[0]: r for r in comp.rows if r["target"] == t}
        assert set(rows) == {"search", "best", "best uniform", "error ILP"}
        for r in rows.values():
            assert r["avg_bits"] <= t + 1e-9 and r["fid"] is not None
        # a perfect predictor: the search minimises Σ error, as the error ILP does, exactly
        assert rows["search"]["fid"] == pytest.approx(rows["error ILP"]["fid"])
        assert rows["search"]["fid"] <= min(rows["best"]["fid"], rows["best uniform"]["fid"]) + 1e-12
        assert rows["search"]["job_fid"] == pytest.approx(rows["search"]["fid"] + 1.0)
        assert rows["search"]["predicted_fid"] == pytest.approx(sizes.summed_error(comp.results[t].options))
        # the best random config is the cache's best by its own (noisy) fid at or below the target
        ok = [r for r in records if sizes.avg_bits(r["config"]) <= t]
        best = min(ok, key=lambda r: r["metrics"]["fid"])
        assert rows["best"]["job_fid"] == best["metrics"]["fid"]
        assert rows["best"]["method"] == f"best of {len(ok)} random"
    # each distinct config is measured once on the held-out images
    keys = [tuple(sorted(c.items())) for c in ev.calls]
    assert len(keys) == len(set(keys))
    assert {p["source"] for p in comp.points} >= {"search", "best random", "error-ilp", "uniform"}


def test_compare_at_targets_takes_allocators_costs_and_a_second_seed_set(setup):
    from sensitivity.allocators import AllocatorSpec, allocate_at_targets
    from sensitivity.search import budget_bytes

    sizes, predictor, records = setup
    frame = sizes.frame()
    hawq = frame[["layer", "option"]].assign(sensitivity=frame["error"] * 2.0)
    specs = [AllocatorSpec("SDNQ rule (threshold {threshold:.3g})", "sdnq", source="SDNQ rule"),
             AllocatorSpec("HAWQ (trace)", "hawq", {"sensitivity": hawq}, configs_labelled=0, label_cpu_s=3.0),
             AllocatorSpec("reference top-1 (λ {lam:.3g})", "reference", {"layer_scores": predictor.layer_scores(None)},
                           configs_labelled=30, label_cpu_s=12.0, source="reference top-1")]
    allocated = allocate_at_targets(specs, frame, [2.0, 3.6])
    by = {(a["target"], a["source"]): a for a in allocated}
    assert by[(2.0, "SDNQ rule")]["options"] is None and "cheapest" in by[(2.0, "SDNQ rule")]["note"]
    assert by[(3.6, "SDNQ rule")]["method"].startswith("SDNQ rule (threshold 0.")
    ev, ev2 = ErrorEvaluator(sizes), ErrorEvaluator(sizes, offset=0.25)
    records = [dict(r, timings={"evaluate": 2.0}) for r in records]
    comp = compare_at_targets(predictor, None, ev, [3.6], records, sizes=sizes, allocated=allocated,
                              costs={"search": (30, 99.0)}, repeat_evaluator=ev2)
    rows = {r["source"]: r for r in comp.rows}
    assert set(rows) == {"search", "best random", "uniform", "error-ilp", "SDNQ rule", "HAWQ (trace)", "reference top-1"}
    fp16 = sizes.fp16_total
    for r in rows.values():  # every config at or under the exact byte budget (avg_bits = 16 · bytes / fp16 bytes)
        assert round(r["avg_bits"] * fp16 / 16) <= budget_bytes(3.6, fp16) and r["avg_bits"] <= 3.6, r["method"]
    assert (rows["search"]["configs_labelled"], rows["search"]["label_cpu_s"]) == (30, 99.0)
    assert (rows["best random"]["configs_labelled"], rows["best random"]["label_cpu_s"]) == (30, 60.0)  # the cache's job
    assert (rows["HAWQ (trace)"]["configs_labelled"], rows["HAWQ (trace)"]["label_cpu_s"]) == (0, 3.0)
    assert rows["error-ilp"]["configs_labelled"] == 0
    # HAWQ's sensitivity is 2 x the error: its ILP is the error ILP, measured once
    assert rows["HAWQ (trace)"]["fid"] == pytest.approx(rows["error-ilp"]["fid"])
    # the second seed set: only the searched config, offset by that evaluator's 0.25
    assert rows["search"]["fid_2"] == pytest.approx(rows["search"]["fid"] + 0.25)
    assert all("fid_2" not in r for s, r in rows.items() if s != "search")
    assert len(ev2.calls) == 1


def test_compare_at_targets_refuses_a_config_over_budget(setup):
    from sensitivity.errors import SensitivityError

    sizes, predictor, records = setup
    over = [{"target": 3.6, "method": "too big", "options": {l: "uaq-4" for l in SHAPES}}]  # 4+ bits
    with pytest.raises(SensitivityError, match="too big at target 3.6: .* over the budget"):
        compare_at_targets(predictor, None, ErrorEvaluator(sizes), [3.6], records, sizes=sizes, allocated=over)


def test_stored_evaluator_resumes_and_refuses_another_protocol(setup, tmp_path):
    from sensitivity.comparison import StoredEvaluator, markdown_table
    from sensitivity.errors import SensitivityError

    sizes, _, _ = setup
    inner = ErrorEvaluator(sizes)
    path = tmp_path / "m.jsonl"
    cfg = {l: "uaq-3" for l in SHAPES}
    first = StoredEvaluator(inner, path, {"seed": 1}).evaluate(cfg)
    with open(path, "a") as f:
        f.write('{"key": "cut')  # a line cut by a kill
    again = StoredEvaluator(inner, path, {"seed": 1})
    assert again.evaluate(cfg) == first and len(inner.calls) == 1 and again.reused == 1
    with pytest.raises(SensitivityError, match="another protocol"):
        StoredEvaluator(inner, path, {"seed": 2})
    md = markdown_table([{"method": "search", "fid": 1.23456, "configs_labelled": 1200, "x": None}],
                        ["method", "fid", "configs_labelled", "x"])
    assert md.splitlines()[2] == "| search | 1.235 | 1,200 | – |"


def test_reranked_search_keeps_the_candidate_the_whole_predictor_rates_best(setup):
    from sensitivity.comparison import reranked_search
    from sensitivity.search import budget_bytes, search

    sizes, predictor, _ = setup

    class Folds:  # two fold models: the mean is the additive score plus a bonus for fewer bytes
        def __init__(self, inner):
            self.inner, self.models = inner, [self, self]

        def layer_scores(self, mq=None):
            return self.inner.layer_scores(mq)

        def encode(self, configs):
            return list(configs)

        def predict_codes(self, configs):
            return np.array([self.inner.predict([c])[0] + 1e-5 * (sizes.fp16_total - sizes.quantized_bytes(c))
                             for c in configs])

        def predict(self, configs):
            return self.predict_codes(configs)

    plain = search(predictor, None, 3.8, sizes=sizes)
    res = reranked_search(Folds(predictor), None, 3.8, sizes=sizes, offsets=(0.0, 0.1, 0.3))
    assert len(res.details["rerank"]) >= 2 and sizes.quantized_bytes(res.options) <= budget_bytes(3.8, sizes.fp16_total)
    means = [c["mean"] for c in res.details["rerank"]]
    assert res.details["rerank_choice"] == int(np.argmax(means))
    assert Folds(predictor).predict([res.options])[0] >= Folds(predictor).predict([plain.options])[0]


class BootstrapEvaluator(ErrorEvaluator):
    """ErrorEvaluator with paired bootstrap replicates: a large image noise shared by every config
    (the same resampled images) plus a small one of its own."""

    def __init__(self, sizes, shared=2.0, own=0.01, n=400):
        super().__init__(sizes)
        self.shared = np.random.default_rng(1).normal(0, shared, n)
        self.own, self.n = own, n

    def evaluate(self, options):
        r = super().evaluate(options)
        seed = int(config_hash(dict(options))[:8], 16) if options else 0
        own = np.random.default_rng(seed).normal(0, self.own, self.n)
        r["bootstrap"] = {"fid": (r["fid"] + self.shared + own).tolist(), "psnr": [r["psnr"]] * self.n}
        return r


def test_comparison_marks_ties_by_a_paired_bootstrap(setup):
    from sensitivity.comparison import markdown_table, paired_marks

    sizes, predictor, records = setup
    comp = compare_at_targets(predictor, None, BootstrapEvaluator(sizes), [3.6], records, sizes=sizes)
    rows = [r for r in comp.rows if r.get("fid") is not None]
    assert all(r["fid_se"] > 1.5 for r in rows)  # each FID alone is noisy (the shared noise)...
    best = min(rows, key=lambda r: r["fid"])
    assert best["verdict"] == "best"
    for r in rows:  # ...but differences are not: they are ranked unless within the small own noise
        if r is not best:
            gap = r["fid"] - best["fid"]
            assert r["verdict"] == ("tie" if gap < 0.005 else "worse" if gap > 0.05 else r["verdict"])
        assert ("vs_search" in r) == (r["source"] != "search")
    assert any(r.get("verdict") == "worse" for r in rows)
    assert "±" in markdown_table(rows, ["method", "fid"])
    # unpaired-looking replicates (independent large noise) make a small gap a tie
    rng = np.random.default_rng(0)
    reps = [rng.normal(0, 1, 500), rng.normal(0, 1, 500) + 0.05]
    assert paired_marks([10.0, 10.05], reps, sign=-1.0, reference=0) == [None, "tie"]
    assert paired_marks([10.0, 13.0], [r + 0 for r in (reps[0], reps[0] + 3.0)], sign=-1.0, reference=0) == [None, "worse"]


def test_refined_search_uses_the_whole_predictor_within_the_exact_budget(setup):
    from sensitivity.search import budget_bytes, rate, refined_search, search

    sizes, predictor, _ = setup
    layers = list(SHAPES)

    class Interacting:  # additive scores plus an interaction the additive proxy cannot see
        def __init__(self, inner):
            self.inner, self.models = inner, [self]

        def layer_scores(self, mq=None):
            return self.inner.layer_scores(mq)

        def encode(self, configs):
            return list(configs)

        def predict_codes(self, configs):
            bonus = [0.05 * sum(c.get(a, "fp16") == c.get(b, "fp16") for a, b in zip(layers, layers[1:]))
                     for c in configs]
            return self.inner.predict(configs) + np.array(bonus)

        def predict(self, configs):
            return self.predict_codes(configs)

    p = Interacting(predictor)
    for t in (3.4, 3.8):
        plain = search(p, None, t, sizes=sizes)
        res = refined_search(p, None, t, sizes=sizes)
        assert sizes.quantized_bytes(res.options) <= budget_bytes(t, sizes.fp16_total)
        assert rate(p, [res.options])[0] >= rate(p, [plain.options])[0]
        assert res.details["rating"] == pytest.approx(rate(p, [res.options])[0])
        assert refined_search(p, None, t, sizes=sizes).options == res.options  # deterministic
        # a byte budget (--target-memory's share of the layers) instead of the bits target: the same search
        by_bytes = refined_search(p, None, None, sizes=sizes, budget=budget_bytes(t, sizes.fp16_total))
        assert by_bytes.options == res.options and by_bytes.target_bits is None
    assert res.details["moves"] > 0 and res.details["gain"] > 0
    rer = refined_search(p, None, 3.8, sizes=sizes, local=False)
    assert rer.method == "search-reranked" and rer.details["moves"] == 0


def test_refined_search_takes_only_moves_every_fold_model_agrees_on(setup):
    from sensitivity.search import refined_search
    from sensitivity.search.refine import fold_predictions, rate

    sizes, predictor, _ = setup
    layers = list(SHAPES)

    def bonus(configs):  # an interaction one fold model likes and the other dislikes
        return np.array([0.05 * sum(c.get(a, "fp16") == c.get(b, "fp16") for a, b in zip(layers, layers[1:]))
                         for c in configs])

    class Fold:
        def __init__(self, w):
            self.w = w

        def predict_codes(self, configs):
            return predictor.predict(configs) + self.w * bonus(configs)

    class Folds:
        models = [Fold(2.0), Fold(-1.0)]

        def layer_scores(self, mq=None):
            return predictor.layer_scores(mq)

        def encode(self, configs):
            return list(configs)

        def predict(self, configs):
            return np.mean([m.predict_codes(configs) for m in self.models], 0)

    p = Folds()
    free = refined_search(p, None, 3.8, sizes=sizes, consensus=False)
    agreed = refined_search(p, None, 3.8, sizes=sizes)
    assert agreed.details["consensus"] and not free.details["consensus"]
    assert free.details["moves"] > agreed.details["moves"]
    assert rate(p, [free.options])[0] > rate(p, [agreed.options])[0]  # the mean alone favours the free climb...
    assert fold_predictions(p, [free.options])[1, 0] < fold_predictions(p, [agreed.options])[1, 0]  # ...fold 2 does not
