"""notebooks/sensitivity_insights.ipynb runs headless (nbclient) top to bottom in its quick mode.

The notebook is copied into a temporary working copy whose default artifact paths do not exist, so
it must fall back to the quick stand-in (synthetic cache + additive predictor) by itself and say which
files were missing. The kernel is a ``python3`` kernelspec written to a temporary JUPYTER_PATH that
runs this interpreter, so the test does not depend on the machine's installed kernels.
"""

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow  # executes the whole notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sensitivity_insights.ipynb"
CELL_TIMEOUT_S = 180
TARGET_BITS = 3.9  # the notebook's TARGET_BITS


def _python3_kernelspec(root: Path) -> Path:
    """Write ``root/kernels/python3/kernel.json`` launching ipykernel with ``sys.executable``."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sensitivity tests)", "language": "python"}))
    return root


def _outputs(nb) -> list:
    return [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(nb) -> str:
    parts = []
    for _, out in _outputs(nb):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Execute a working copy of the notebook; return (notebook, work folder, working-copy root, seconds)."""
    root = tmp_path_factory.mktemp("nbcopy")
    (root / "notebooks").mkdir()
    nb_path = root / "notebooks" / NOTEBOOK.name
    shutil.copy(NOTEBOOK, nb_path)
    work = root / "work"
    env = {
        "JUPYTER_PATH": str(_python3_kernelspec(root / "jupyter")),
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "SENSITIVITY_NOTEBOOK_WORKDIR": str(work),
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k in ("SENSITIVITY_NOTEBOOK_QUICK", "SENSITIVITY_MULTIQUANTIZER", "SENSITIVITY_CACHE",
                  "SENSITIVITY_PREDICTOR"):
            mp.delenv(k, raising=False)  # defaults inside the working copy: missing -> automatic quick mode
        for k, v in env.items():
            mp.setenv(k, v)
        nb = nbformat.read(nb_path, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                         resources={"metadata": {"path": str(nb_path.parent)}})
        t0 = time.perf_counter()
        client.execute()  # raises CellExecutionError on the first failing cell
        seconds = time.perf_counter() - t0
    return nb, work, root, seconds


def test_notebook_runs_without_errors(executed):
    nb, _, _, _ = executed
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    errors = [(i, out.get("ename"), out.get("evalue")) for i, out in _outputs(nb) if out.output_type == "error"]
    assert not errors, errors
    stderr = [out.text for _, out in _outputs(nb) if out.output_type == "stream" and out.name == "stderr"]
    assert not any("Traceback" in s for s in stderr), stderr
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_notebook_falls_back_to_quick_mode_naming_the_default_paths(executed):
    nb, work, root, _ = executed
    text = _text(nb)
    assert "mode: quick stand-in" in text
    for rel in ("multiquantizers/digits-dit.safetensors", "caches/digits-dit.sqlite", "predictors/digits-dit"):
        assert str(root / rel) in text, f"missing-file line does not name {rel}"
    assert f"work folder: {work}" in text


def test_notebook_search_summary_and_config(executed):
    nb, work, _, _ = executed
    text = _text(nb)
    m = re.search(r"search-layer: avg bits ([0-9.]+) \(target ([0-9.]+)\); summed score (\S+); predicted (\S+); mix: (.+)",
                  text)
    assert m, "no search summary in the outputs"
    assert float(m.group(2)) == TARGET_BITS
    assert 3.0 < float(m.group(1)) <= TARGET_BITS
    assert re.search(r"refused: target 2\.5 avg bits is infeasible.*smallest feasible target is 3\.\d+", text)
    cfg = json.loads((work / f"search-{TARGET_BITS}.json").read_text())
    assert len(cfg["options"]) == 46  # every digits-dit weight layer
    assert abs(cfg["avg_bits"] - float(m.group(1))) < 1e-3
    assert cfg["provenance"]["target_bits"] == TARGET_BITS
    for method in ("search-layer", "cache-best", "error-ilp", "uniform-uaq-4"):
        assert method in text, method


def test_notebook_figures_and_insight_files(executed):
    nb, work, _, _ = executed
    pngs = [out for _, out in _outputs(nb) if "image/png" in out.get("data", {})]
    assert len(pngs) >= 7, f"expected >= 7 figures, got {len(pngs)}"
    written = {p.name for p in (work / "insights").iterdir()}
    for name in ("scores.csv", "pareto.csv", "pareto_predicted.png", "pareto_fid.png", "mix_search_op_type.png",
                 "box_block.png"):
        assert name in written, name
