"""Compiled numba kernels cached once per machine, not once per checkout.

numba's ``cache=True`` keeps compiled kernels next to the source (``__pycache__``) or, with
``NUMBA_CACHE_DIR``, in a folder named after the *absolute path* of the source folder: a second
checkout, a fresh virtual environment or a CI workspace at another path compiles everything again
(about 15-30 s of CPU for this package's kernels). Importing this module registers a numba cache
locator for the kernels of the ``sensitivity`` package only, which stores them under

    $SENSITIVITY_CACHE_DIR/numba   (default $XDG_CACHE_HOME/sensitivity/numba, ~/.cache/sensitivity/numba)

in a folder named after the *content* of the source file (sha256): every copy of the same source,
wherever it lives, loads the same compiled code, and two versions of a file never overwrite each
other's cache. numba's own checks still apply (its version, the CPU, the argument types).
``NUMBA_CACHE_DIR``, when set, wins (numba's own locator is asked first); an unwritable folder falls
back to numba's default locators. Kernel modules import this module before their ``@njit`` lines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core import caching

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> Path:
    """Where this package's compiled kernels go (see the module docstring)."""
    root = os.environ.get("SENSITIVITY_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "numba"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "sensitivity" / "numba"


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:20]


class ContentCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator: ``cache_dir() / <module stem>-<sha256 of the source>`` for this package's files."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        stem = Path(py_file).stem
        self._cache_path = str(cache_dir() / f"{stem}-{_file_digest(py_file)}")

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        path = os.path.abspath(py_file)
        if not path.startswith(_PACKAGE_DIR + os.sep):
            return None  # someone else's kernel: numba's default locators
        return super().from_function(py_func, py_file)


def install() -> None:
    """Register :class:`ContentCacheLocator` (idempotent), right after numba's ``NUMBA_CACHE_DIR`` locator."""
    classes = caching.CacheImpl._locator_classes
    if ContentCacheLocator in classes:
        return
    at = 1 if classes and classes[0] is caching.UserProvidedCacheLocator else 0
    classes.insert(at, ContentCacheLocator)


install()
