"""Atomic output: every file or folder a command writes appears whole or not at all.

```python
with atomic_path("quant_configs/x.json") as tmp:      # tmp: a fresh path in the same folder
    tmp.write_text(...)                                # renamed to x.json on success, removed on error
with atomic_dir("out/w39") as tmp:                     # tmp: an empty folder beside out/w39
    (tmp / "00000.png").write_bytes(...)               # moved into out/w39 on success, removed on error
with atomic_dir("exports/x", replace=True) as tmp:     # the whole folder replaces exports/x on success
    ...
with atomic_dir("exports/x", replace=True, overwrite=False) as tmp:   # ... unless it exists (even if a
    ...                                                # concurrent run created it meanwhile)
atomic_write_text("run.json", text)                   # the one-liners
atomic_write_json("run.json", obj)
check_writable("caches/x.sqlite")                      # refuse a path that cannot be written, before any work
parts = resume_parts("out/x.safetensors", plan)        # out/x.safetensors.parts/: finished pieces of a long job
```
Failures to write (read-only folder, a folder where a file should go, full disk) become one-line
:class:`~sensitivity.errors.SensitivityError` naming the path. Temporaries are named
``.<stem>.<host>-<pid>-<random>.tmp<suffix>`` in the target's folder (the same file system, so the
final rename is atomic); a run removes the temporaries of its own target left by a process of this
host that no longer runs (a killed run). What appears is created with the user's umask (files
``0o666 & ~umask``, folders ``0o777 & ~umask``), whatever mode the writer's library chose.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from .errors import SensitivityError

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it, racing threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# ------------------------------------------------------------------------------------ temporaries
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _tmp_name(stem: str, suffix: str = "") -> str:
    """``.<stem>.<host>-<pid>-<random>.tmp<suffix>``: the writer's host and pid say when it is stale."""
    return f".{stem}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_temporaries(path: PathLike) -> int:
    """Remove the temporaries of ``path`` (file or folder) that a process of this host left and that no
    longer runs (e.g. after ``kill -9``). Those of live processes and of other hosts are kept.
    Returns how many were removed."""
    p = Path(path)
    tag = r"\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp"
    patterns = [re.compile(rf"^\.{re.escape(p.stem)}{tag}{re.escape(p.suffix)}$"),  # atomic_path's
                re.compile(rf"^\.{re.escape(p.name)}{tag}$")]  # atomic_dir's
    host, removed = _host(), 0
    try:
        entries = list(p.parent.iterdir()) if p.parent.is_dir() else []
    except OSError:
        return 0
    for entry in entries:
        m = next(filter(None, (pat.match(entry.name) for pat in patterns)), None)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
    return removed


def _apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain ``open``/``mkdir`` would."""
    mask = _umask()

    def fix(q: Path) -> None:
        st = q.lstat()
        if q.is_symlink():
            return
        if q.is_dir():
            os.chmod(q, 0o777 & ~mask)
        else:
            os.chmod(q, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)

    if not path.exists():
        return
    fix(path)
    if path.is_dir() and not path.is_symlink():
        for q in path.rglob("*"):
            fix(q)


# ------------------------------------------------------------------------------------ checks
def check_writable(path: PathLike, what: str = "output", directory: bool = False) -> Path:
    """Raise SensitivityError unless ``path`` can be created or replaced (a file, or a folder with
    ``directory=True``). Missing parent folders are fine if the nearest existing one is writable."""
    p = Path(path)
    if p.exists():
        if directory and not p.is_dir():
            raise SensitivityError(f"{what} {str(p)!r} exists and is not a folder")
        if not directory and p.is_dir():
            raise SensitivityError(f"{what} {str(p)!r} is a folder, expected a file path")
        if directory and not _can_create_in(p):
            raise SensitivityError(f"{what} folder {str(p)!r} is not writable")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SensitivityError(f"{what} {str(p)!r}: {str(parent)!r} is not a folder")
    if not _can_create_in(parent):
        raise SensitivityError(f"{what} {str(p)!r}: folder {str(parent)!r} is not writable")
    return p


def check_new_folder(path: PathLike, what: str = "--out", overwrite: bool = False) -> Path:
    """:func:`check_writable` for a folder, and refuse one that exists and is not empty unless ``overwrite``."""
    p = check_writable(path, what, directory=True)
    if not overwrite and p.is_dir() and any(p.iterdir()):
        raise SensitivityError(f"{what} {str(p)!r} already exists and is not empty (pass --overwrite to replace it)")
    return p


def _can_create_in(folder: Path) -> bool:
    """Try it (``os.access`` says yes to root on read-only mounts and sysfs)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _make_parent(p: Path, what: str) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)} ({p.parent})") from None


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


# ------------------------------------------------------------------------------------ writers
@contextlib.contextmanager
def atomic_path(path: PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    The temporary does not exist yet and keeps ``path``'s suffix (writers that pick a format from it keep working).
    """
    p = Path(path)
    check_writable(p, what)
    _make_parent(p, what)
    clear_stale_temporaries(p)
    tmp = p.parent / _tmp_name(p.stem, p.suffix)  # not created: the writer creates it
    try:
        yield tmp
        _apply_umask(tmp)
        os.replace(tmp, p)
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)}") from None
    finally:
        _remove(tmp)


def atomic_write_text(path: PathLike, text: str, what: str = "output", encoding: str = "utf-8") -> Path:
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "output") -> Path:
    """``data`` written atomically (a temporary beside ``path``, renamed into place)."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, what: str = "output", indent: Optional[int] = 1, **kw: Any) -> Path:
    """``obj`` as JSON (plus a final newline), atomically; ``kw`` go to :func:`json.dumps`."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kw) + "\n", what)


@contextlib.contextmanager
def atomic_dir(path: PathLike, what: str = "output folder", replace: bool = False,
               overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success its entries move into ``path``
    (created if missing; same-named entries are replaced, others kept), on any error it is removed.

    ``replace=True``: the whole folder replaces ``path`` instead (entries only the old folder had are
    gone), in two renames: the old folder aside, the new one into place, then the old one removed.
    If ``path`` did not exist, it appears in one rename, whole. ``overwrite=False`` (with ``replace``):
    refuse a ``path`` that exists and is not empty, before the work and again at the final rename,
    which cannot replace a non-empty folder (so of two concurrent runs, the later one fails).
    """
    p = Path(path)
    if not overwrite:
        check_new_folder(p, what)
    check_writable(p, what, directory=True)
    _make_parent(p, what)
    clear_stale_temporaries(p)
    tmp = p.parent / _tmp_name(p.name)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)}") from None
    old = p.parent / _tmp_name(p.name)
    try:
        yield tmp
        _apply_umask(tmp)
        if not overwrite:
            try:
                os.rename(tmp, p)  # replaces only a missing or empty folder
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise SensitivityError(f"{what} {str(p)!r} already exists and is not empty (another run "
                                           "wrote it meanwhile; pass --overwrite to replace it)") from None
                raise
        elif not p.exists():
            os.replace(tmp, p)
        elif replace:
            os.replace(p, old)
            os.replace(tmp, p)
        else:
            for entry in sorted(tmp.iterdir()):
                dest = p / entry.name
                if dest.is_dir() and not entry.is_dir():
                    raise SensitivityError(f"{what} {str(p)!r}: {entry.name!r} is a folder there, expected a file")
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)}") from None
    finally:
        _remove(tmp)
        _remove(old)


# ------------------------------------------------------------------------------------ resume
def resume_parts(out: PathLike, plan: Mapping[str, Any], *, restart: bool = False,
                 mismatch: Optional[str] = None) -> Path:
    """The folder ``<out>.parts/`` where a long job keeps its finished pieces until ``out`` is written.

    ``plan`` (JSON-able) says what the pieces are of; it is kept in ``plan.json``. Pieces of another
    plan, or all of them with ``restart``, are removed first, unless ``mismatch`` is given: then a
    folder of another plan is refused with SensitivityError(``"<folder> " + mismatch``) (``restart``
    still clears it). Pieces are written with :func:`atomic_path`; remove the folder once ``out`` is whole.
    """
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    plan_file = parts / "plan.json"
    plan = json.loads(json.dumps(dict(plan)))  # as it reads back
    if parts.exists():
        try:
            old = json.loads(plan_file.read_text()) if plan_file.exists() else None
        except (ValueError, OSError):
            old = None
        if not restart and old is not None and old != plan and mismatch:
            raise SensitivityError(f"{parts} {mismatch}")
        if restart or old != plan:
            shutil.rmtree(parts, ignore_errors=True)
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SensitivityError(f"cannot write {str(parts)!r}: {_reason(exc)}") from None
    if not plan_file.exists():
        atomic_write_json(plan_file, plan, indent=None)
    return parts
