"""Test-suite guards: no hub, no network. A hidden hub call fails at once instead of retrying."""

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1", "0.0.0.0")
                                  or self.family == getattr(socket, "AF_UNIX", None)):
        return _real_connect(self, address)
    raise RuntimeError(f"network access attempted in tests: {address!r} (tests must run offline)")


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(autouse=True, scope="session")
def _warm_numba_kernels():
    """Compile (or load from numba's cache) the quantization kernels once per session, on tiny inputs,
    so the first test that quantizes does not pay the compile (the install script's warm-up)."""
    from sensitivity.warmup import warm_kernels

    warm_kernels()
    yield
