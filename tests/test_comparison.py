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
