"""`sensitivity demo`: the whole pipeline on digits-dit at a tiny size, its outputs, and its resume."""

import json

import pytest

from sensitivity.cli import main

pytestmark = pytest.mark.slow  # the whole pipeline end to end

TINY = ["--num-configs", "10", "--images-per-class", "2", "--targets", "3.5,4.0", "--predictor", "additive",
        "--folds", "2", "--workers", "1", "--check-images-per-class", "3"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from test_install import run_without_extras

    out = tmp_path_factory.mktemp("demo") / "out"
    # as on a core install: a fresh interpreter in which every extra (and pytest) is hidden
    assert run_without_extras(["demo", "--out", out] + TINY) == {"rc": 0, "loaded": []}
    return out


def test_demo_outputs(demo):
    results = json.loads((demo / "results.json").read_text())
    assert [r["config"] for r in results][:3] == ["fp16", "uaq-4", "kmeans_a-3"] and len(results) == 4
    for r in results:
        assert set(r) == {"config", "avg_bits", "fid", "kid", "accuracy", "psnr"}
        assert (demo / "images" / f"{r['config']}.png").stat().st_size > 0
    fp, u4, a3 = results[:3]
    assert fp["avg_bits"] == 16.0 and fp["psnr"] > u4["psnr"] > a3["psnr"]
    assert a3["avg_bits"] < u4["avg_bits"] < 16.0
    s = json.loads((demo / "summary.json").read_text())
    assert s["seed"] == 0 and s["num_configs"] == 10 and s["images_per_config"] == 20
    assert s["metric"] == "fid" and s["check_images"] == 30 and s["check_seed"] >= 10_000  # held-out seeds
    assert s["check_fp16"]["psnr"] == 100.0 and s["check_fp16"]["fid"] > 0
    searched = [r for r in s["rows"] if r["method"] == "search"]
    assert [r["target"] for r in searched] == [3.5, 4.0]
    for r in searched:
        assert r["avg_bits"] <= r["target"] + 1e-9 and r["psnr"] > 0 and r["fid"] > 0 and r["job_fid"] > 0
    assert any(r["method"] == "error ILP" for r in s["rows"])
    # noise: every measured row carries its bootstrap se; ties are marked, not ranked
    assert s["noise"]["bootstrap_replicates"] == 200 and "tie" in s["noise"]["note"]
    measured = [r for r in s["rows"] if r.get("fid") is not None]
    assert all(r["fid_se"] > 0 and r["psnr_se"] >= 0 for r in measured)
    for t in (3.5, 4.0):
        marks = [r["verdict"] for r in measured if r["target"] == t]
        assert marks.count("best") == 1 and set(marks) <= {"best", "tie", "worse"}
    assert all(r["vs_search"] in ("better", "tie", "worse") for r in measured if r["method"] != "search")
    assert "±" in (demo / "summary.md").read_text()
    for src in ("SDNQ rule", "reference top-1"):  # the allocators that need no extra labels
        got = [r for r in s["rows"] if r.get("source") == src]
        assert [r["target"] for r in got] == [3.5, 4.0], src
        assert all(r["avg_bits"] <= r["target"] and r["fid"] > 0 and r["configs_labelled"] is not None for r in got)
    assert (demo / "summary.md").read_text().startswith("# sensitivity demo on digits-dit")
    for name in ("search-3.50.json", "search-4.00.json"):
        cfg = json.loads((demo / "search" / name).read_text())
        assert len(cfg["options"]) == 46
    assert (demo / "insights" / "pareto_psnr.png").is_file() and (demo / "insights" / "pareto_fid.png").is_file()
    assert (demo / "predictor" / "report.json").is_file()


def test_demo_rerun_resumes(demo, capsys):
    before = (demo / "cache.sqlite").stat().st_size
    rows = json.loads((demo / "summary.json").read_text())["rows"]
    assert main(["demo", "--out", str(demo)] + TINY) == 0
    out = capsys.readouterr().out
    assert "0 evaluated now" in out and "reusing it" in out
    assert (demo / "cache.sqlite").stat().st_size == before
    # the held-out comparison is not measured again: same rows from the stored measurements
    assert "job measurements from an earlier run" in out and "reusing them" in out
    # apart from the timings: an allocator's label_cpu_s is the seconds its rule takes now (0.3 vs 0.0 s seen)
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "label_cpu_s"} for r in rs]  # noqa: E731
    again = json.loads((demo / "summary.json").read_text())["rows"]
    assert untimed(again) == untimed(rows) and [("label_cpu_s" in r) for r in again] == [("label_cpu_s" in r) for r in rows]


def test_demo_summary_is_the_same_with_other_workers_and_threads(demo, tmp_path, capsys):
    """The same demo with 2 workers on 1 thread each: summary.json equal to the 1-worker run's apart from its
    timings and its own paths (issue 25: bit-reproducible whatever the thread and worker counts)."""
    out = tmp_path / "other"
    argv = ["demo", "--out", str(out)] + TINY[:TINY.index("--workers")] + ["--workers", "2", "--threads", "1"] \
        + TINY[TINY.index("--workers") + 2:]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]

    def untimed(path):
        s = json.loads(path.read_text())
        for k in ("seconds", "provenance", "multiquantizer", "cache", "predictor_dir"):
            s.pop(k)
        s["rows"] = [{k: v for k, v in r.items() if k != "label_cpu_s"} for r in s["rows"]]
        return s

    assert untimed(out / "summary.json") == untimed(demo / "summary.json")
    assert (out / "results.json").read_bytes() == (demo / "results.json").read_bytes()


def test_demo_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "--targets", "3.5,abc"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for bad, opt in ((["--threads", "0"], "--threads"), (["--workers", "0"], "--workers")):
        assert main(["demo", "--out", str(tmp_path / "x")] + bad) == 2
        assert opt in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_demo_digits_sd_whole_pipeline(tmp_path, capsys):
    """--model digits-sd --components all: text encoder, UNet and VAE decoder searched under one budget."""
    out = tmp_path / "out"
    argv = ["demo", "--out", str(out), "--model", "digits-sd", "--components", "all", "--options", "uaq-4", "uaq-3",
            "--quick"] + TINY
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "digits-sd" and s["rows"]
    searched = [json.loads(p.read_text()) for p in sorted((out / "search").glob("search-*.json"))]
    assert searched and all({k.split(".", 1)[0] for k in c["options"]} <= {"text_encoder", "denoiser", "vae_decoder"}
                            for c in searched)
    assert (out / "insights" / "scores_by_component.csv").is_file()
