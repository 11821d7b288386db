"""numba kernels are cached per machine, keyed by the source's content, not its path (issue 17)."""

import shutil

import pytest

numba_cache = pytest.importorskip("sensitivity.numba_cache")


def test_kernels_use_the_content_locator():
    if numba_cache.os.environ.get("NUMBA_CACHE_DIR"):
        pytest.skip("NUMBA_CACHE_DIR is set: numba's own locator wins, as documented")
    from sensitivity.quantizers import kmeans1d, packing, uniform

    for kernel in (kmeans1d._fit_sorted_rows_nb, uniform._grid_errors_sorted_nb, packing._pack_groups):
        locator = kernel._cache._impl._locator
        assert isinstance(locator, numba_cache.ContentCacheLocator)
        assert locator.get_cache_path().startswith(str(numba_cache.cache_dir()))


def test_same_source_elsewhere_shares_the_cache_and_an_edit_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSITIVITY_CACHE_DIR", str(tmp_path / "cache"))
    from sensitivity.quantizers import packing

    func = packing._pack_groups.py_func
    a, b, c = (tmp_path / d / "packing.py" for d in ("checkout1", "checkout2", "checkout3"))
    for p in (a, b, c):
        p.parent.mkdir()
        shutil.copy(packing.__file__, p)
    c.write_text(c.read_text() + "\n# edited\n")
    paths = [numba_cache.ContentCacheLocator(func, str(p)).get_cache_path() for p in (a, b, c)]
    assert paths[0] == paths[1]
    assert paths[2] != paths[0]
    assert all(p.startswith(str(tmp_path / "cache" / "numba")) for p in paths)


def test_other_packages_kernels_are_left_to_numba(tmp_path):
    src = tmp_path / "elsewhere.py"
    src.write_text("def f(x):\n    return x\n")
    ns = {}
    exec(compile(src.read_text(), str(src), "exec"), ns)
    assert numba_cache.ContentCacheLocator.from_function(ns["f"], str(src)) is None


def test_install_is_idempotent():
    from numba.core import caching

    numba_cache.install()
    numba_cache.install()
    assert caching.CacheImpl._locator_classes.count(numba_cache.ContentCacheLocator) == 1
