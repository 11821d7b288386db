"""Test-suite guards: no hub, no network. A hidden hub call fails at once instead of retrying."""

import logging
import os
import socket
import sys

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


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of the write."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _log_handlers_follow_stderr():
    """Libraries (transformers) create their log handler on the ``sys.stderr`` of the moment; inside a test that is
    the test's capture, closed after it, and a later log line then prints '--- Logging error ---' into another
    test's stderr. After each test such handlers write to the current ``sys.stderr`` instead."""
    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and h.stream not in (sys.__stderr__, sys.__stdout__) \
                    and not isinstance(h.stream, _CurrentStderr):
                h.stream = _CurrentStderr()  # not setStream: it flushes the old, maybe closed, stream
                h.__dict__.pop("flush", None)  # transformers pins flush to that stream's own flush


@pytest.fixture(scope="session")
def dit_random_mq(tmp_path_factory):
    """A multiquantizer of every digits-dit layer (random weights), two options: seconds to build, once per run
    (the reproducibility and multi-fidelity jobs label with it)."""
    import torch

    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("random", device="cpu", dtype=torch.float32)
    path = tmp_path_factory.mktemp("dit-mq") / "digits-dit-random.safetensors"
    build_multiquantizer(den, path, fam.find_layers(den), model_id=fam.model_id("random"),
                         options=("uaq-4", "uaq-3"), progress=False)
    return path
