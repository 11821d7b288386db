"""sensitivity.io, the one place that writes: modes, stale temporaries of killed runs, races, resume,
and no other module of the package, the benchmarks or the scripts renaming files into place itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sensitivity.errors import SensitivityError
from sensitivity.io import (atomic_dir, atomic_path, atomic_write_json, check_new_folder, clear_stale_temporaries,
                            resume_parts)

ROOT = Path(__file__).resolve().parents[1]


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_files_get_the_umask_not_the_writers_mode(tmp_path):
    """safetensors, mkstemp... create 0600 files; what appears through io.py has the user's umask (case 15)."""
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        with atomic_dir(tmp_path / "exp", replace=True) as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == 0o640
    assert _mode(tmp_path / "exp") == 0o750 and _mode(tmp_path / "exp" / "sub") == 0o750
    assert _mode(tmp_path / "exp" / "sub" / "w.safetensors") == 0o640


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_run_are_cleared(tmp_path):
    """A run killed mid-write leaves `.OUT.<host>-<pid>-<rand>.tmp/`; the next write of OUT removes it (case 12),
    but not a live writer's, another host's, or another target's."""
    from sensitivity.io import _host, _tmp_name

    dead = _dead_pid()
    stale_dir = tmp_path / f".exp.{_host()}-{dead}-0123abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".cfg.{_host()}-{dead}-89abcdef.tmp.json"
    stale_file.write_text("{")
    live = tmp_path / _tmp_name("exp")  # this process: alive
    live.mkdir()
    other_host = tmp_path / f".exp.elsewhere-{dead}-0123abcd.tmp"
    other_host.mkdir()
    other_target = tmp_path / f".exp2.{_host()}-{dead}-0123abcd.tmp"
    other_target.mkdir()
    with atomic_dir(tmp_path / "exp", replace=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"y")
    atomic_write_json(tmp_path / "cfg.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stale_dir.name not in names and stale_file.name not in names
    assert {live.name, other_host.name, other_target.name, "exp", "cfg.json"} == set(names)
    assert clear_stale_temporaries(tmp_path / "exp") == 0


def test_a_killed_writer_leaves_only_what_the_next_run_clears(tmp_path):
    """kill -9 in the middle of atomic_dir: the target never appears half-written; the rerun clears the debris."""
    code = textwrap.dedent(f"""
        import os, signal
        from sensitivity.io import atomic_dir
        with atomic_dir({str(tmp_path / "exp")!r}, replace=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    rc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    assert rc == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".exp.") and not (tmp_path / "exp").exists()
    with atomic_dir(tmp_path / "exp", replace=True) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_two_runs_racing_for_one_folder_cannot_both_win(tmp_path):
    """Both checked that OUT was free before working; the one that finishes second is refused (case 11)."""
    out = tmp_path / "exp"
    first = atomic_dir(out, "--out", replace=True, overwrite=False)
    second = atomic_dir(out, "--out", replace=True, overwrite=False)
    a, b = first.__enter__(), second.__enter__()  # both pass the existence check
    (a / "model.onnx").write_bytes(b"first")
    (b / "model.onnx").write_bytes(b"second")
    first.__exit__(None, None, None)
    with pytest.raises(SensitivityError, match="already exists.*--overwrite"):
        second.__exit__(None, None, None)
    assert (out / "model.onnx").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]
    with pytest.raises(SensitivityError, match="already exists and is not empty"):
        check_new_folder(out)
    with atomic_dir(out, "--out", replace=True, overwrite=True) as tmp:  # --overwrite: replaced whole
        (tmp / "model.onnx").write_bytes(b"third")
    assert (out / "model.onnx").read_bytes() == b"third"


def test_resume_parts_keeps_pieces_of_the_same_plan_only(tmp_path):
    out = tmp_path / "x.safetensors"
    parts = resume_parts(out, {"num": 4})
    (parts / "chunk-0").write_text("done")
    assert (resume_parts(out, {"num": 4}) / "chunk-0").exists()  # same plan: resumed
    with pytest.raises(SensitivityError, match="x.safetensors.parts holds another build"):
        resume_parts(out, {"num": 5}, mismatch="holds another build")
    assert not (resume_parts(out, {"num": 5}) / "chunk-0").exists()  # another plan: started over
    (parts / "chunk-0").write_text("done")
    assert not (resume_parts(out, {"num": 5}, restart=True) / "chunk-0").exists()


def test_os_replace_only_in_io():
    """Every write goes through sensitivity/io.py: no other module renames a temporary into place."""
    offenders = []
    files = [p for d in ("sensitivity", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        if path == ROOT / "sensitivity" / "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} os.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    any(a.name in ("replace", "rename") for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from os import ...")
    assert not offenders, "rename into place through sensitivity.io instead:\n" + "\n".join(offenders)
