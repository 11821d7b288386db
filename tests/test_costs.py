"""Cost table (``sensitivity costs``) and the latency budget of ``search`` on digits-dit, measured here.

The table is measured once on this machine (one thread, short loops); resuming and re-measuring are
checked with a counting stand-in for the timer. ``search --target-latency`` must return a config whose
summed measured layer latency is within the budget, exactly as the knapsack counts it (integer ns).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sensitivity.cli import main
from sensitivity.config import QuantConfig
from sensitivity.costs import CostTable
from sensitivity.errors import SensitivityError


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from sensitivity.export.costs import measure_costs
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("shipped")
    d = tmp_path_factory.mktemp("costs")
    mq = build_multiquantizer(den, d / "mq.safetensors", fam.find_layers(den), model_id=fam.model_id("shipped"),
                              options=("uaq-4", "uaq-3"), progress=False)
    table = measure_costs(den, mq, repeats=3, warmup=1, min_seconds=2e-4, threads=1, progress=False)
    scores = d / "scores.csv"  # error-based scores: any (layer, option, score) table drives the search
    pd.DataFrame([(s.name, o, -mq.stats(s.name, o)["error"]) for s in mq.layers for o in mq.options],
                 columns=["layer", "option", "score"]).to_csv(scores, index=False)
    return den, mq, table, scores, d


def test_table_is_keyed_complete_and_beside_the_multiquantizer(measured):
    import torch

    den, mq, table, _, d = measured
    path = d / "mq.costs"
    assert [p.name for p in path.iterdir()] == [table.meta["path"].rsplit("/", 1)[1]]
    key = table.meta["key"]
    assert key["multiquantizer"] == mq.hash and key["torch"] == torch.__version__ and key["threads"] == 1
    assert key["device"].startswith("cpu:") and "pack_module" in key["runtime"]
    assert {"sum_range_1e7_s", "loadavg_1m"} <= set(table.meta["calibrator"])
    assert table.layers == mq.layer_names and table.options == list(mq.options)
    assert np.all(table.seconds >= 0) and np.all(table.fp_seconds > 0)
    modules = dict(den.named_modules())
    for i, s in enumerate(mq.layers):
        assert table.fp_runtime_bytes[i] == s.numel * 4  # fp32 weight
        for j, o in enumerate(table.options):  # at least the stored bytes (its kernel may hold padded codes, tables)
            assert mq.stats(s.name, o)["nbytes"] <= table.runtime_bytes[i, j] < table.fp_runtime_bytes[i]
        assert table.calls[i] >= 1
        record = json.loads(open(table.meta["path"]).read())["layers"][s.name]
        assert record["input_shape"][-1] == modules[s.module_path].in_features
    # the timestep embedder is shared by every block: one call per block
    assert table.calls.max() > 1


def test_resume_and_remeasure(measured, tmp_path, monkeypatch):
    from sensitivity.export import costs as costs_mod

    den, mq, table, _, _ = measured
    timed = []

    def fake(fns, x, repeats, warmup, min_seconds):
        timed.append(len(fns))
        return [1e-4 * (k + 1) for k in range(len(fns))]

    monkeypatch.setattr(costs_mod, "_time_calls", fake)
    out = tmp_path / "c.json"
    first = costs_mod.measure_costs(den, mq, out=out, threads=1, progress=False)
    assert len(timed) == len({s.module_path for s in mq.layers})
    np.testing.assert_allclose(first.seconds[:, 0], 2e-4)
    # a crash after some modules: drop layers from the file, rerun: only those are timed
    record = json.loads(out.read_text())
    dropped = mq.layer_names[5:9]
    for name in dropped:
        del record["layers"][name]
    out.write_text(json.dumps(record))
    timed.clear()
    again = costs_mod.measure_costs(den, mq, out=out, threads=1, progress=False)
    assert len(timed) == len({s.module_path for s in mq.layers if s.name in dropped})
    assert again.layers == mq.layer_names
    timed.clear()
    costs_mod.measure_costs(den, mq, out=out, threads=1, progress=False)
    assert timed == []
    costs_mod.measure_costs(den, mq, out=out, threads=1, remeasure=True, progress=False)
    assert len(timed) == len({s.module_path for s in mq.layers})
    with pytest.raises(SensitivityError, match="another key"):
        costs_mod.measure_costs(den, mq, out=out, threads=2, progress=False)


def test_search_target_latency_within_the_measured_budget(measured, tmp_path, capsys):
    from sensitivity.search import AdditiveScorer, search_cost

    den, mq, table, scores, _ = measured
    fastest = min(table.config_latency_ms({l: o for l in table.layers}) for o in table.options)
    lo = table.unit_table("latency").min_bytes() / 1e6
    hi = table.unit_table("latency").max_bytes() / 1e6
    target = round((lo + hi) / 2, 4)
    out = tmp_path / "lat.json"
    assert main(["search", "--scores", str(scores), "--multiquantizer", str(mq.path), "--target-latency", str(target),
                 "--out", str(out)]) == 0
    assert "summed layer latency" in capsys.readouterr().out
    cfg = QuantConfig.load(out)
    assert cfg.multiquantizer_hash == mq.hash
    got = CostTable.load(table.meta["path"], mq.hash).config_latency_ms(cfg.options)
    assert got <= target and fastest <= got + 1e-9
    units = table.unit_table("latency")
    assert units.quantized_bytes(cfg.options) <= int(target * 1e6)
    # the same exact optimum as HiGHS on the same instance
    scorer = AdditiveScorer(pd.read_csv(scores))
    a = search_cost(scorer, mq, table, target, method="auto")
    b = search_cost(scorer, mq, table, target, method="milp")
    assert a.options == cfg.options and a.objective == pytest.approx(b.objective, abs=1e-9)
    with pytest.raises(SensitivityError, match="smallest feasible target"):
        search_cost(scorer, mq, table, lo * 0.5)


def test_latency_sweep_plots_latency_and_bits_searches(measured, tmp_path):
    den, mq, table, scores, _ = measured
    lo = table.unit_table("latency").min_bytes() / 1e6
    hi = table.unit_table("latency").max_bytes() / 1e6
    step = round((hi - lo) / 3, 4)
    sweep = f"{lo + step / 2:.4f}:{hi:.4f}:{step}"
    out = tmp_path / "sweep"
    assert main(["search", "--scores", str(scores), "--multiquantizer", str(mq.path), "--latency-sweep", sweep,
                 "--costs", table.meta["path"], "--out", str(out)]) == 0
    pt = pd.read_csv(out / "pareto_latency.csv")
    for src in ("search-latency", "search-layer", "uniform"):
        rows = pt[pt["source"] == src]
        assert len(rows) and rows["latency_ms"].notna().all() and rows["predicted"].notna().all(), src
    lat = pt[pt["source"] == "search-latency"]
    targets = pd.read_csv(out / "sweep.csv")["target_latency_ms"]
    assert (lat["latency_ms"].to_numpy() <= targets.to_numpy() + 1e-9).all()
    assert (out / "pareto_latency.png").stat().st_size > 10_000


def test_costs_cli_resumes_the_saved_table(measured, capsys):
    den, mq, table, _, _ = measured
    assert main(["costs", "digits-dit", "--weights", "shipped", "--multiquantizer", str(mq.path), "--threads", "1",
                 "--repeats", "3", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == table.meta["path"] and summary["layers"] == len(mq.layers)
    assert summary["fp16_ms"] == pytest.approx(table.config_latency_ms({}), abs=1e-4)


def test_runtime_memory_is_the_target_memory(measured, tmp_path, capsys):
    """One meaning of a memory budget: the cost table's run-time bytes are --target-memory's memory model
    ``runtime`` (quantized options at their measured bytes, full precision at fp16 as every unquantized
    tensor), solved by the same path from search_cost(..., "memory") and from the CLI."""
    from sensitivity.costs import register_runtime_memory_model
    from sensitivity.search import AdditiveScorer, InfeasibleTargetError, config_memory, search_cost
    from sensitivity.sizes import memory_table

    den, mq, table, scores, _ = measured
    model = register_runtime_memory_model(table)
    stored = mq.size_table()
    mem = memory_table(stored, model)
    assert np.array_equal(mem.fp16_bytes, stored.fp16_bytes)  # not the fp32 weight the table was timed with
    assert np.array_equal(mem.nbytes, table.runtime_bytes) and np.all(mem.nbytes >= stored.nbytes)
    lo, hi = mem.min_bytes(), mem.max_bytes()
    target = (lo + hi) // 2
    res = search_cost(AdditiveScorer(pd.read_csv(scores)), mq, table, target, "memory")
    assert res.details["memory_model"] == "runtime" and res.details["target_memory"] == target
    assert res.details["memory_bytes"] == config_memory(mq, res.options, model=model) <= target
    out = tmp_path / "mem.json"
    assert main(["search", "--scores", str(scores), "--multiquantizer", str(mq.path), "--target-memory", str(target),
                 "--memory-model", "runtime", "--costs", table.meta["path"], "--out", str(out)]) == 0
    capsys.readouterr()
    assert QuantConfig.load(out).options == res.options
    with pytest.raises(InfeasibleTargetError, match="--target-memory"):
        search_cost(AdditiveScorer(pd.read_csv(scores)), mq, table, lo - 1, "memory")
    # --costs belongs to the run-time memory model (and the latency budget) only
    assert main(["search", "--scores", str(scores), "--multiquantizer", str(mq.path), "--target-memory", str(target),
                 "--costs", table.meta["path"], "--out", str(tmp_path / "x.json")]) == 2
    assert "--memory-model runtime" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
