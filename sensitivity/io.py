"""Atomic output: every file or folder a command writes appears whole or not at all.

```python
with atomic_path("quant_configs/x.json") as tmp:      # tmp: a fresh path in the same folder
    tmp.write_text(...)                                # renamed to x.json on success, removed on error
with atomic_dir("out/w39") as tmp:                     # tmp: an empty folder beside out/w39
    (tmp / "00000.png").write_bytes(...)               # moved into out/w39 on success, removed on error
with atomic_dir("exports/x", replace=True) as tmp:     # the whole folder replaces exports/x on success
    ...
atomic_write_text("run.json", text)                   # the one-liner
check_writable("caches/x.sqlite")                      # refuse a path that cannot be written, before any work
```
Failures to write (read-only folder, a folder where a file should go, full disk) become one-line
:class:`~sensitivity.errors.SensitivityError` naming the path. Temporaries are named
``.<stem>.<random>.tmp<suffix>`` in the target's folder (the same file system, so ``os.replace`` is atomic).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import SensitivityError

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


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


@contextlib.contextmanager
def atomic_path(path: PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    The temporary does not exist yet and keeps ``path``'s suffix (writers that pick a format from it keep working).
    """
    p = Path(path)
    check_writable(p, what)
    _make_parent(p, what)
    tmp = p.parent / f".{p.stem}.{secrets.token_hex(4)}.tmp{p.suffix}"  # not created: the writer creates it
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def atomic_write_text(path: PathLike, text: str, what: str = "output", encoding: str = "utf-8") -> Path:
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "output") -> Path:
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike, what: str = "output folder", replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success its entries move into ``path``
    (created if missing; same-named entries are replaced, others kept), on any error it is removed.

    ``replace=True``: the whole folder replaces ``path`` instead (entries only the old folder had are
    gone), in two renames: the old folder aside, the new one into place, then the old one removed.
    If ``path`` did not exist, it appears in one rename, whole.
    """
    p = Path(path)
    check_writable(p, what, directory=True)
    _make_parent(p, what)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    except OSError as exc:
        raise SensitivityError(f"cannot write {what} {str(p)!r}: {_reason(exc)}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the folder should look like any other
    old = p.with_name(f".{p.name}.old-{os.getpid()}.tmp")
    try:
        yield tmp
        if not p.exists():
            os.replace(tmp, p)
        elif replace:
            shutil.rmtree(old, ignore_errors=True)
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
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
