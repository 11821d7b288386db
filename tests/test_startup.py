"""Start-up: commands that need no model import neither torch nor diffusers (issue 17).

Each check runs in a fresh interpreter and looks at ``sys.modules`` after the command ran.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "numba", "safetensors.torch")

PROBE = """
import contextlib, io, json, sys
from sensitivity.cli import build_parser, main
build_parser()  # every subcommand's parser, as `sensitivity --help` builds it
runs = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's --help
            rc = exc.code
    runs[" ".join(argv)] = [rc, out.getvalue()]
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"heavy": heavy, "runs": runs}))
"""


def _probe(*argvs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argvs)), json.dumps(HEAVY)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_import_help_and_models_import_no_torch():
    res = _probe(["--help"], ["models"], ["models", "--json"])
    assert res["heavy"] == [], f"imported {res['heavy']}"
    rc, out = res["runs"]["--help"]
    assert rc == 0 and "multiquantize" in out and "models" in out
    rc, out = res["runs"]["models"]
    assert rc == 0 and "digits-dit" in out and "sd15" in out
    rc, out = res["runs"]["models --json"]
    assert rc == 0
    assert [r["name"] for r in json.loads(out)][:2] == ["sd15", "sdxl"]


def test_info_reads_a_manifest_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    from sensitivity.layers import find_layers
    from sensitivity.multiquantizer import build_multiquantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    path = tmp_path / "toy.safetensors"
    build_multiquantizer(model, path, find_layers(model), model_id="toy", options=["uaq-4", "int8"], progress=False)
    res = _probe(["info", str(path)], ["info", str(path), "--json"])
    assert res["heavy"] == [], f"imported {res['heavy']}"
    rc, out = res["runs"][f"info {path}"]
    assert rc == 0 and "toy" in out and "2 layers" in out
    rc, out = res["runs"][f"info {path} --json"]
    assert rc == 0 and [d["name"] for d in json.loads(out)["layers"]] == ["0", "2"]


def test_family_cards_match_the_families():
    """The torch-free cards of ``sensitivity models`` are the families' own ``info()``."""
    from sensitivity.zoo import BUILTIN_FAMILIES, family_cards, get_family, list_families
    from sensitivity.zoo.catalog import CARDS

    hint = "regenerate with `python -m sensitivity.zoo.catalog --write`"
    missing = [n for n in list_families() if n in BUILTIN_FAMILIES and n not in CARDS]
    assert not missing, f"built-in families without a card: {missing}; {hint}"
    for name in list_families():
        if name in BUILTIN_FAMILIES:
            assert CARDS[name] == get_family(name).info(), f"card of {name!r} is stale; {hint}"
    assert family_cards() == [get_family(n).info() for n in list_families()]
