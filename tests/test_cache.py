"""The SQLite evaluation cache: one record per config, signatures, claims, concurrency, export/import."""

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import sqlite3
import subprocess
import sys
import time

import pytest

from sensitivity.cli import main as cli_main
from sensitivity.errors import CorruptFileError, SensitivityError
from sensitivity.evaluation.cache import (ConfigCache, SignatureMismatchError, config_hash, from_reference_names,
                                          process_owner, to_reference_name)

LAYERS = ["pos_embed.proj", "blocks.0.attn.to_q", "blocks.0.ff", "up.0.conv#main", "up.0.conv#skip"]
OPTS = ["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3"]
STATS = {n: {"fp16_bytes": 2048 * (i + 1), "options": {o: [300 * (i + 1) - 10 * j, 0.01 * (j + 1) + i]
                                                     for j, o in enumerate(OPTS)}}
         for i, n in enumerate(LAYERS)}
EVAL = {"model": "digits-dit:shipped", "multiquantizer": "abc", "steps": 10, "seeds": [0, 1, 2]}


def _record(k: int) -> dict:
    cfg = {n: OPTS[(k // 6**i) % 6] for i, n in enumerate(LAYERS)}  # distinct for k < 6**5
    if k % 7 == 3:
        cfg["blocks.0.ff"] = "fp16"
    return {"config": cfg, "avg_bits": 3.5 + k / 100, "quantized_bytes": 1000 + k, "summed_error": 0.1 * k,
            "metrics": {"fid": 10.0 + k, "accuracy": 0.5, "kid": float("nan") if k == 2 else 0.01 * k},
            "timings": {"evaluate": 1.0}}


def _open(path, sig="sig-a", evaluation=EVAL):
    return ConfigCache(path, signature=sig, evaluation=evaluation, create=True)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_records_once_and_fields(tmp_path):
    with _open(tmp_path / "c.sqlite") as c:
        run = c.register_run({"seed": 0}, planned=4)
        r0 = c.add(_record(0), run, 0)
        assert r0.inserted
        again = c.add(_record(0), run, 1)  # same config drawn at another index: linked, not duplicated
        assert again.record_id == r0.record_id and not again.inserted
        c.add(_record(1), run, 2)
        recs = c.records()
        assert len(recs) == 2 == len(c)
        r = recs[0]
        assert set(r) >= {"run_id", "index", "config_hash", "config", "avg_bits", "quantized_bytes", "summed_error",
                          "metrics", "signature", "timings", "host", "created_at"}
        assert r["run_id"] == run and r["index"] == 0 and r["signature"] == "sig-a"
        assert r["config_hash"] == config_hash(_record(0)["config"])
        assert c.done_indices(run) == {0, 1, 2}
        assert [x["index"] for x in c.records(run)] == [0, 1, 2]
        # fp16 spelled out or left out is the same config
        assert config_hash({"a": "uaq-4", "b": "fp16"}) == config_hash({"a": "mse-4"})
        assert c.verify() == []


def test_other_signature_is_refused_and_file_unchanged(tmp_path):
    path = tmp_path / "c.sqlite"
    with _open(path) as c:
        c.add(_record(0))
    before = _digest(path)
    with pytest.raises(SignatureMismatchError, match=r"steps 10 -> 20") as exc:
        ConfigCache(path, signature="sig-b", evaluation=dict(EVAL, steps=20), create=True)
    assert "\n" not in str(exc.value)
    with ConfigCache(path) as c:
        with pytest.raises(SignatureMismatchError):
            c.add(_record(1), signature="sig-b")
        assert len(c) == 1
    assert _digest(path) == before


def test_corrupted_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 50)
    with pytest.raises(CorruptFileError, match="not a sensitivity cache"):
        ConfigCache(junk, signature="s", create=True)
    assert junk.read_bytes() == b"not a database at all" * 50
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    with pytest.raises(CorruptFileError, match="not a sensitivity cache"):
        ConfigCache(other)
    # a damaged page: overwrite the middle of a real cache
    good = tmp_path / "good.sqlite"
    with _open(good) as c:
        for k in range(40):
            c.add(_record(k))
    with sqlite3.connect(good) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(good.read_bytes())
    data[4096:12288] = os.urandom(8192)
    good.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as exc:
        ConfigCache(good).records()
    assert "\n" not in str(exc.value)
    assert cli_main(["cache", "info", str(junk)]) == 2


def test_hand_edited_record_is_found(tmp_path):
    path = tmp_path / "c.sqlite"
    with _open(path) as c:
        for k in range(3):
            c.add(_record(k))
    with sqlite3.connect(path) as con:
        con.execute("UPDATE records SET metrics='{\"fid\": 1.0}' WHERE id=2")
    with ConfigCache(path) as c:
        assert c.verify() == [2]


def test_claims_dead_owner_and_lease(tmp_path):
    with _open(tmp_path / "c.sqlite") as c:
        run = c.register_run({"seed": 1}, 5)
        me = process_owner()
        # a live foreign owner (the parent of this process) holds index 0
        host = me.split("|")[0]
        parent = f"{host}|{os.getppid()}|?"
        assert c.claim(run, [0], parent) == 0
        assert c.claim(run, [0, 1], me) == 1
        assert c.foreign_claims(run, me) == 1
        # a dead process of this host: its claim is taken over at once
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        dead = f"{host}|{p.pid}|?"
        assert c.claim(run, [2], dead) == 2
        assert c.claim(run, [2], me) == 2
        # another host: its claim holds until the lease expires
        assert c.claim(run, [3], "otherhost|1|1", lease_s=0.0) == 3
        assert c.claim(run, [3], me) == 3
        assert c.claim(run, [4], "otherhost|1|1", lease_s=600) == 4
        assert c.claim(run, [4], me) is None
        c.add(_record(0), run, 1)
        assert c.claim(run, [1], "otherhost|1|1") is None  # done indices are never handed out
        c.release(me, run)
        assert c.foreign_claims(run, me) == 2


def _writer(path, start, n):
    with ConfigCache(path, signature="sig-a", evaluation=EVAL, create=True) as c:
        run = c.register_run({"seed": 0}, 200)
        for k in range(start, start + n):
            c.add(_record(k), run, k)


def test_concurrent_writers(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s, 60)) for s in (0, 30, 60)]  # overlapping ranges
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ConfigCache(path) as c:
        recs = c.records()
        assert len(recs) == len({r["config_hash"] for r in recs})
        assert sorted(c.done_indices(c.runs()[0]["run_id"])) == list(range(120))
        assert c.verify() == []


_CREATE_RACE = r"""
import multiprocessing as mp, os, sys, tempfile
from sensitivity.evaluation.cache import ConfigCache

def create(path, barrier, q):
    barrier.wait()  # all open the same new file at once
    try:
        ConfigCache(path, signature="sig-a", evaluation={"x": 1}, create=True).close()
        q.put("")
    except Exception as exc:
        q.put(str(exc))

ctx = mp.get_context("fork")
errors = []
for trial in range(int(sys.argv[2])):
    path = os.path.join(sys.argv[1], f"c{trial}.sqlite")
    barrier, q = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=create, args=(path, barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    errors += [e for e in (q.get(timeout=120) for _ in procs) if e]
    for p in procs:
        p.join()
print("\n".join(errors))
"""


def test_processes_creating_one_cache_at_once(tmp_path):
    # SQLite answers "database is locked" at once (no busy wait) when two connections race to switch a
    # new file to WAL; before the retry this failed about 1 trial in 4
    out = subprocess.run([sys.executable, "-c", _CREATE_RACE, str(tmp_path), "30"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
    for k in range(30):
        with ConfigCache(tmp_path / f"c{k}.sqlite") as c:
            assert c.signature == "sig-a"


_OPEN_RACE = r"""
import multiprocessing as mp, os, sys
from sensitivity.evaluation.cache import ConfigCache

def job(path, k, barrier, q):
    barrier.wait()  # all at once, on a file that does not exist yet
    try:
        if k % 2:  # run_job's pattern: open the cache if it exists, else create it
            c = ConfigCache(path) if os.path.exists(path) else ConfigCache(path, signature="s", evaluation={}, create=True)
        else:      # a reader (`sensitivity cache info`, a second job) that opens it the moment it appears
            while not os.path.exists(path):
                pass
            c = ConfigCache(path)
        c.close()
        q.put("")
    except Exception as exc:
        q.put(f"{type(exc).__name__}: {exc}")

ctx = mp.get_context("fork")
errors = []
for trial in range(int(sys.argv[2])):
    path = os.path.join(sys.argv[1], f"c{trial}.sqlite")
    barrier, q = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=job, args=(path, k, barrier, q)) for k in range(8)]
    for p in procs:
        p.start()
    errors += [e for e in (q.get(timeout=120) for _ in procs) if e]
    for p in procs:
        p.join()
print("\n".join(errors))
"""


def test_processes_opening_a_cache_while_it_is_created(tmp_path):
    # 8 processes x 8 new files: half create-or-open as run_job does, half open the file the moment it
    # exists. Before creation became atomic (schema built beside the file, then hard-linked into place)
    # nearly every trial failed with "no meta table" or "empty file" (48 errors in 8 trials).
    out = subprocess.run([sys.executable, "-c", _OPEN_RACE, str(tmp_path), "8"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
    for k in range(8):
        with ConfigCache(tmp_path / f"c{k}.sqlite") as c:
            assert c.signature == "s" and len(c) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporaries left


def test_a_cache_being_created_in_place_is_waited_for(tmp_path, monkeypatch):
    # where the file system has no hard links the cache is created in place; an opener that finds it
    # still empty waits for its schema instead of calling it corrupt
    import threading

    from sensitivity.evaluation.cache import store

    monkeypatch.setattr(store.os, "link", _no_link)
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"")  # what another process's sqlite3.connect leaves before its schema is in

    def create_soon():
        time.sleep(0.3)
        ConfigCache(path, signature="s", evaluation={}, create=True).close()

    t = threading.Thread(target=create_soon)
    t.start()
    with ConfigCache(path) as c:
        assert c.signature in (None, "s")
    t.join()
    # a file system without hard links: created in place, whole
    other = tmp_path / "d.sqlite"
    with ConfigCache(other, signature="s", evaluation={}, create=True) as c:
        assert c.signature == "s"
    # an old empty file is an error at once
    stale = tmp_path / "stale.sqlite"
    stale.write_bytes(b"")
    os.utime(stale, (1e9, 1e9))
    with pytest.raises(CorruptFileError, match="empty file"):
        ConfigCache(stale)


def _no_link(src, dst):
    raise OSError(1, "Operation not permitted")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "pkl"])
def test_export_import_round_trip(tmp_path, fmt):
    src = tmp_path / "a.sqlite"
    with _open(src) as c:
        c.set_layer_stats(STATS)
        run = c.register_run({"seed": 0}, 10)
        for k in range(10):
            c.add(_record(k), run, k)
        orig = c.records()
    out = tmp_path / f"export.{fmt}"
    args = ["cache", "export", str(src), "--format", fmt, "--out", str(out)]
    assert cli_main(args) == 0
    dst = tmp_path / "b.sqlite"
    if fmt == "pkl":
        assert cli_main(["cache", "import", str(dst), str(out)]) == 2  # no --trust-pickle: refused
        assert not dst.exists()
    extra = ["--trust-pickle"] if fmt == "pkl" else []
    assert cli_main(["cache", "import", str(dst), str(out)] + extra) == 0
    with ConfigCache(dst) as c:
        back = c.records()
        assert c.signature == "sig-a" and c.evaluation == EVAL
        assert c.verify() == []
    key = ("config_hash", "config", "avg_bits", "quantized_bytes", "summed_error", "signature", "run_id", "index")
    assert [{k: r[k] for k in key} for r in back] == [{k: r[k] for k in key} for r in orig]
    for a, b in zip(back, orig):
        assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])  # NaN included
    # importing again adds nothing; into a cache of another signature: refused, unchanged
    assert cli_main(["cache", "import", str(dst), str(out)] + extra) == 0
    with ConfigCache(dst) as c:
        assert len(c) == 10
    other = tmp_path / "o.sqlite"
    with _open(other, sig="sig-b") as c:
        c.add(_record(50))
    before = _digest(other)
    assert cli_main(["cache", "import", str(other), str(out)] + extra) == 2
    assert _digest(other) == before


def test_reference_pickle_layout(tmp_path):
    src = tmp_path / "a.sqlite"
    with _open(src) as c:
        c.set_layer_stats(STATS)
        c.add(_record(3))
    out = tmp_path / "quant_cache.pkl"
    with ConfigCache(src) as c:
        c.export(out)
    with open(out, "rb") as fh:
        data = pickle.load(fh)
    (e,) = data
    assert set(e) >= {"config", "quantized_size", "avg_bits", "quantized_error", "FID-GT-1k", "bops"}
    assert e["FID-GT-1k"] == 13.0 and e["quantized_size"] == 1003 and e["avg_bits"] == pytest.approx(3.53)
    assert e["config"]["model.up.0.conv.weight_quantizer_0"][0] in ("mse-4", "mse-3", "kmeans-4", "kmeans-3",
                                                                    "kmeans_all-4", "kmeans_all-3")
    ff = e["config"]["model.blocks.0.ff.weight_quantizer"]  # k=3 keeps blocks.0.ff in fp16
    assert ff == ["fp16", STATS["blocks.0.ff"]["fp16_bytes"], STATS["blocks.0.ff"]["fp16_bytes"], 0.0]
    q = e["config"]["model.blocks.0.attn.to_q.weight_quantizer"]
    opt = _record(3)["config"]["blocks.0.attn.to_q"]
    assert q[1:] == [STATS["blocks.0.attn.to_q"]["fp16_bytes"]] + STATS["blocks.0.attn.to_q"]["options"][opt]
    # a pickle as the reference writes it (no 'sensitivity' key): needs --model, gets its own signature
    ref = [{"config": {"model.a.weight_quantizer": ["mse-4", 100, 30, 0.5],
                       "model.up.conv.weight_quantizer": ["kmeans_all-3", 50, 12, 0.7],
                       "model.up.conv.weight_quantizer_0": ["kmeans-3", 50, 14, 0.9]},
            "quantized_size": 56, "avg_bits": 4.48, "quantized_error": 2.1, "FID-GT-1k": 97.5, "bops": 1.2}]
    rp = tmp_path / "ref.pkl"
    rp.write_bytes(pickle.dumps(ref))
    dst = tmp_path / "r.sqlite"
    assert cli_main(["cache", "import", str(dst), str(rp), "--trust-pickle"]) == 2
    assert cli_main(["cache", "import", str(dst), str(rp), "--trust-pickle", "--model", "pixart-alpha"]) == 0
    with ConfigCache(dst) as c:
        (r,) = c.records()
        assert r["config"] == {"a": "uaq-4", "up.conv#main": "kmeans_a-3", "up.conv#skip": "kmeans_c-3"}
        assert r["metrics"]["fid"] == 97.5 and r["quantized_bytes"] == 56
        assert c.evaluation["model"] == "pixart-alpha"
        assert c.layer_stats["up.conv#skip"] == {"fp16_bytes": 50, "options": {"kmeans_c-3": [14, 0.9]}}


def test_reference_names():
    names = ["a.b", "up.conv#main", "up.conv#skip"]
    ref = [to_reference_name(n) for n in names]
    assert ref == ["model.a.b.weight_quantizer", "model.up.conv.weight_quantizer", "model.up.conv.weight_quantizer_0"]
    assert list(from_reference_names(ref).values()) == names


def test_cache_info_cli(tmp_path, capsys):
    path = tmp_path / "c.sqlite"
    with _open(path) as c:
        run = c.register_run({"seed": 3, "bits": [3, 4]}, 5)
        for k in range(3):
            c.add(_record(k), run, k)
    assert cli_main(["cache", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 records" in out and "3/5 done" in out and "all checksums verified" in out
    assert cli_main(["cache", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 3 and info["ranges"]["fid"]["max"] == 12.0
    assert cli_main(["cache", "info", str(tmp_path / "missing.sqlite")]) == 2
    with pytest.raises(SensitivityError, match="does not exist"):
        ConfigCache(tmp_path / "missing.sqlite")


def test_rebind_multiquantizer_keeps_records(tmp_path):
    """`cache rebind`: a rebuilt multiquantizer with the same tensors takes over the records; another is refused."""
    import shutil
    from pathlib import Path

    from sensitivity.cli import main
    from sensitivity.evaluation.cache import ConfigCache

    src = Path(__file__).resolve().parents[1] / "caches" / "digits-dit.sqlite"
    cache = tmp_path / "c.sqlite"
    shutil.copyfile(src, cache)
    with ConfigCache(cache) as c:
        before = {r["config_hash"]: r["metrics"] for r in c.records()}
        old_sig = c.signature
        new_sig = c.rebind_multiquantizer("0" * 32)
        assert new_sig != old_sig and c.signature == new_sig and c.evaluation["multiquantizer_hash"] == "0" * 32
        assert c.verify() == []
        assert {r["config_hash"]: r["metrics"] for r in c.records()} == before
        assert all(r["signature"] == new_sig for r in c.records())
        assert c.done_indices(c.runs()[0]["run_id"]) == set(range(320))
    # through the CLI, a multiquantizer with other options is refused in one line
    from sensitivity.layers import find_layers
    from sensitivity.multiquantizer import build_multiquantizer
    from torch import nn

    other = build_multiquantizer(nn.Sequential(nn.Linear(8, 8)), tmp_path / "o.safetensors",
                                 find_layers(nn.Sequential(nn.Linear(8, 8))), options=["uaq-4"], progress=False)
    assert main(["cache", "rebind", str(cache), "--multiquantizer", str(other.path)]) == 2


def test_a_config_drawn_twice_keeps_its_lowest_index_whatever_finished_first(tmp_path):
    """Two workers may finish a run's later draw of a config before its earlier one: the record still
    carries the earlier index, as a one-worker job writes it (the record is the same whatever the timing)."""
    from sensitivity.evaluation.cache import ConfigCache

    rec = {"config": {"a": "uaq-4"}, "metrics": {"fid": 1.0}, "avg_bits": 4.0}
    other = {"config": {"a": "uaq-3"}, "metrics": {"fid": 2.0}, "avg_bits": 3.0}
    with ConfigCache(tmp_path / "c.sqlite", signature="s", create=True) as c:
        run = c.register_run({"seed": 0}, planned=6)
        c.add(rec, run, 5)                    # the later draw finished first
        assert c.records()[0]["index"] == 5
        assert not c.add(rec, run, 0).inserted  # the earlier one: same config, kept once, lowest index
        c.add(other, run, 1)
        rid = c.add(other, run, 4).record_id
        c.link(run, 3, rid)                     # a claim that found the record done
        got = sorted((r["index"], r["metrics"]["fid"]) for r in c.records())
        assert got == [(0, 1.0), (1, 2.0)]
        assert sorted(r["index"] for r in c.records(run)) == [0, 1, 3, 4, 5]
        assert c.verify() == []  # the checksum does not cover the index
