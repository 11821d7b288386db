#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, transformers, accelerate, numba, ... but not
# diffusers), saved to .wheels-gpu/ at the repository root for `run`'s carry. Run on a machine with PyPI:
#     bash benchmarks/gpu/fetch_wheels.sh
# Then, on the GPU machine (carry: .wheels-gpu), the command in benchmarks/README.md "GPU checks".
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dest=.wheels-gpu
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >> "$exclude"   # never committed
mkdir -p "$dest"
# pure-Python wheels: diffusers (the version this repo is tested with) and what it needs beyond the image
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d "$dest" \
    "diffusers==0.42.1" "importlib_metadata==8.7.0"
ls -l "$dest"
