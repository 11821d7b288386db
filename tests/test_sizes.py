"""One size table: every stage's bytes / avg bits / summed error agree with sums done by hand.

The shipped cache (``caches/digits-dit.sqlite``, 320 configs) stores each record's avg bits, bytes and
summed error as the evaluation job computed them; the table must give exactly those numbers, and so
must every call site that used to count them itself (search, predictors, insights, evaluate).
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sensitivity.config import QuantConfig, config_hash
from sensitivity.errors import SensitivityError
from sensitivity.evaluation.cache import ConfigCache, build_record
from sensitivity.evaluation.metric_specs import lower_is_better, metric_spec, record_metric
from sensitivity.options import QuantOption
from sensitivity.sizes import SizeTable

CACHE = Path(__file__).resolve().parents[1] / "caches" / "digits-dit.sqlite"


@pytest.fixture(scope="module")
def shipped():
    with ConfigCache(CACHE) as c:
        return c.records(), c.layer_stats


def _by_hand(config, stats):
    """(avg bits, bytes, summed error) from the layer stats, absent layers at fp16."""
    q = fp = 0
    err = 0.0
    for layer, st in stats.items():
        fp += st["fp16_bytes"]
        opt = config.get(layer, "fp16")
        if opt == "fp16":
            q += st["fp16_bytes"]
        else:
            nb, e = st["options"][opt]
            q += nb
            err += e
    return 16.0 * q / fp, q, err


def test_table_matches_shipped_records_and_sums_by_hand(shipped):
    records, stats = shipped
    table = SizeTable.from_layer_stats(stats)
    assert len(records) == 320 and len(table) == len(stats) == 46
    for rec in records:
        avg, q, err = _by_hand(rec["config"], stats)
        assert table.config_stats(rec["config"]) == (avg, q, err)
        # the values the evaluation job stored with the record
        assert (rec["avg_bits"], rec["quantized_bytes"]) == (avg, q)
        assert rec["summed_error"] == pytest.approx(err, rel=1e-12)


def test_every_stage_uses_the_table(shipped):
    from sensitivity import insights as I
    from sensitivity.predictors.data import Dataset, LayerTable, Target
    from sensitivity.search import cache_best, config_avg_bits, config_bytes, max_avg_bits, min_avg_bits, size_table

    records, stats = shipped
    table = SizeTable.from_layer_stats(stats)
    frame = size_table(stats)
    by_hand = [_by_hand(r["config"], stats) for r in records]
    # search (DataFrame view and table alike)
    for rec, (avg, q, _) in zip(records[:40], by_hand):
        assert config_bytes(rec["config"], frame) == (q, table.fp16_total)
        assert config_avg_bits(rec["config"], table) == avg
    lo = 16.0 * sum(min(v[0] for v in st["options"].values()) for st in stats.values()) / table.fp16_total
    hi = 16.0 * sum(max(v[0] for v in st["options"].values()) for st in stats.values()) / table.fp16_total
    assert min_avg_bits(frame) == table.min_avg_bits() == lo and max_avg_bits(frame) == hi
    best = cache_best(records, frame, 3.8, metric="fid")
    ok = [(r["metrics"]["fid"], a) for r, (a, _, _) in zip(records, by_hand) if a <= 3.8]
    assert best.details["metric_value"] == min(ok)[0] and best.avg_bits <= 3.8
    # predictors: the code-matrix path
    lt = LayerTable.from_layer_stats(list(stats), stats)
    ds = Dataset.from_records(records, lt, Target("fid"))
    assert len(ds) == len(records)
    want = {config_hash(r["config"]): h for r, h in zip(records, by_hand)}
    for h, a, e in zip(ds.hashes, ds.avg_bits, ds.summed_error):
        assert a == want[h][0]
        assert e == pytest.approx(want[h][2], rel=1e-12)
    # insights: the Pareto table recomputes bits from the table
    pt = I.pareto_table(records[:20], metric="fid", sizes=table)
    assert list(pt["avg_bits"]) == [h[0] for h in by_hand[:20]]
    # a cache record is built from the table
    rec = build_record(records[0]["config"], stats, records[0]["metrics"])
    assert (rec["avg_bits"], rec["quantized_bytes"], rec["config_hash"]) == \
        (records[0]["avg_bits"], records[0]["quantized_bytes"], records[0]["config_hash"])


def test_shapes_frame_and_errors():
    shapes = {"a": (8, 16), "b": (4, 4), "c": (3, 3)}
    t = SizeTable.from_shapes(shapes, ["uaq-4", "kmeans_a-3"])
    assert t.fp16_total == 2 * (128 + 16 + 9)
    assert t.quantized_bytes({"a": "uaq-4"}) == QuantOption.parse("uaq-4").nbytes((8, 16)) + 2 * (16 + 9)
    assert t.avg_bits({"a": "fp16"}) == 16.0 == t.avg_bits({})
    assert not t.has_errors and "error" not in t.frame().columns
    back = SizeTable.from_frame(t.frame())
    assert back.layers == t.layers and back.options == t.options and np.array_equal(back.nbytes, t.nbytes)
    codes = np.array([[0, 1, 2], [2, 2, 2]])
    want = [t.avg_bits({"b": "uaq-4", "c": "kmeans_a-3"}), t.avg_bits({l: "kmeans_a-3" for l in shapes})]
    assert list(t.avg_bits_of_codes(codes)) == want
    assert t.restrict(["uaq-4"]).options == ["uaq-4"]
    for bad in ({"zz": "uaq-4"}, {"a": "kmeans_c-4"}):
        with pytest.raises(SensitivityError, match="zz|kmeans_c-4"):
            t.avg_bits(bad)
    dup = pd.concat([t.frame(), t.frame().iloc[:1]])
    with pytest.raises(SensitivityError, match="duplicate row for layer 'a'"):
        SizeTable.from_frame(dup)


def test_config_hash_is_one_function(shipped):
    records, _ = shipped
    # fp16 entries, aliases and key order do not change the hash, in configs and in the cache alike
    cfg = {"b": "mse-4", "a": "kmeans-3"}
    h = config_hash({"a": "kmeans_c-3", "b": "uaq-4"})
    assert config_hash(cfg) == h == config_hash({**cfg, "c": "fp16"}) == QuantConfig({**cfg, "c": "fp16"}).config_hash
    # the shipped cache's stored hashes are still those of its configs (it has no fp16 entries)
    assert all("fp16" not in r["config"].values() for r in records)
    assert all(config_hash(r["config"]) == r["config_hash"] == QuantConfig(r["config"]).config_hash for r in records)
    with ConfigCache(CACHE) as c:
        assert c.verify() == []
        rid = c.lookup(QuantConfig(records[5]["config"]).config_hash)
        assert rid == records[5]["id"]


def test_metric_registry():
    assert lower_is_better("FID") and lower_is_better("fid-gt-1k") and lower_is_better("kid")
    assert not lower_is_better("accuracy") and not lower_is_better("psnr") and not lower_is_better("something-new")
    assert lower_is_better("accuracy", override=True)
    assert metric_spec("fid").sign() == -1.0 and metric_spec("psnr").sign() == 1.0
    rec = {"metrics": {"FID": 3.5, "kid": float("nan")}, "psnr": 20.0}
    assert record_metric(rec, "fid") == 3.5 and record_metric(rec, "kid") is None and record_metric(rec, "psnr") == 20.0
    assert math.isfinite(metric_spec("fid").read(rec))


def test_sizes_and_metric_registry_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, sensitivity.sizes, sensitivity.evaluation.metric_specs; "
            "bad = [m for m in ('torch', 'diffusers', 'sensitivity.zoo') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
