"""Bit-reproducible runs: the same command and seed give byte-identical cache records, predictor
folders and searched configs whatever the thread count and worker count (issue 25, item 7).

A tiny digits-dit job (random weights, two options, 2 steps, one image per class, then the same configs on
two images per class as a second fidelity) is labelled twice —
one in-process worker on one thread, then two worker processes on two threads each —, a predictor is
trained on each cache with a different torch thread count, and both search at the same target.
Everything but timings, host names and dates must be equal byte for byte.
"""

import json
from pathlib import Path

import torch

from sensitivity import cli
from sensitivity.evaluation.cache import ConfigCache
from sensitivity.multiquantizer import load_multiquantizer

N_CONFIGS = 12
JOB = ["--weights", "random", "--images-per-class", "1", "--steps", "2", "--seed", "4", "--no-progress",
       "--paired-features",  # the paired feature metrics are labels too: reproducible as the others
       "--full-configs", str(N_CONFIGS), "--full-images-per-class", "2"]  # and a second (full) fidelity
VOLATILE = ("id", "timings", "host", "created_at")  # what may differ: the row number (finishing order), times, host


def _records(cache: Path):
    """Every fidelity's records, by (fidelity, index)."""
    with ConfigCache(cache) as c:
        recs = [dict(r, fidelity=f) for f, rs in c.fidelity_records().items() for r in rs]
    recs.sort(key=lambda r: (r["fidelity"], r["index"]))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]


def _strip_seconds(obj):
    """A report without its wall-clock fields (``seconds``, ``train_seconds``, ...)."""
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _train_and_search(cache: Path, out: Path, mq_path: Path, threads: int):
    from sensitivity.predictors import load_predictor, train
    from sensitivity.search import search

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = train(cache, out, model="digits-dit", predictor="ensemble", baselines=("lightgbm",), folds=3,
                       seed=1, params={"gnn": {"epochs": 3, "hidden": 16, "d0": 8, "layers": 2}}, progress=False,
                       fidelity="full")  # the stacked training's reproducibility: tests/test_fidelity.py
        pred = load_predictor(out)
        mq = load_multiquantizer(mq_path)
        res = search(pred, mq, 3.6)
        cfg = res.to_config(model=mq.model_id, multiquantizer_hash=mq.hash).to_dict()
    finally:
        torch.set_num_threads(old)
    cfg["provenance"] = _strip_seconds(cfg["provenance"])
    return _strip_seconds(report), cfg


def test_job_training_and_search_are_bit_reproducible(dit_random_mq, tmp_path, capsys):
    caches = {}
    for name, extra in (("one", ["--workers", "1", "--threads", "1"]), ("two", ["--workers", "2", "--threads", "2"])):
        caches[name] = tmp_path / f"{name}.sqlite"
        argv = ["sample", "digits-dit", "--multiquantizer", str(dit_random_mq), "--cache", str(caches[name]),
                "--num-configs", str(N_CONFIGS), *JOB, *extra]
        assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    one, two = _records(caches["one"]), _records(caches["two"])
    assert len(one) == 2 * N_CONFIGS and {r["fidelity"] for r in one} == {"cheap", "full"}
    diff = [(a["index"], k, a[k], b[k]) for a, b in zip(one, two) for k in a if a[k] != b[k]]
    assert not diff, f"records differ (index, field, 1 worker, 2 workers): {diff[:3]}"

    rep1, cfg1 = _train_and_search(caches["one"], tmp_path / "p1", dit_random_mq, threads=1)
    rep2, cfg2 = _train_and_search(caches["two"], tmp_path / "p2", dit_random_mq, threads=2)
    rep1.pop("cache"), rep2.pop("cache")
    assert json.dumps(rep1, sort_keys=True) == json.dumps(rep2, sort_keys=True)
    for f in ("weights.safetensors", "layer_scores.csv", "module_scores.csv"):
        assert (tmp_path / "p1" / f).read_bytes() == (tmp_path / "p2" / f).read_bytes(), f
    assert cfg1 == cfg2
