"""Where and when a measurement ran: the commit, the date and the machine's speed, for results files.

A results page (``docs/results/``) is generated from the JSON a run wrote; ``run_provenance()`` is what
that JSON records about the run, so the page can say which commit, date and machine produced its
numbers. The machine's speed is the calibrator: the seconds ``sum(range(10**7))`` takes in this
interpreter (about 0.1-0.2 s on an idle current x86 core; more on a loaded machine). Standard library only.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parents[1]


def calibrator_seconds() -> float:
    """Seconds (wall) this interpreter takes for ``sum(range(10**7))``: the machine's speed yardstick."""
    t0 = time.perf_counter()
    sum(range(10 ** 7))
    return round(time.perf_counter() - t0, 3)


def git_commit(root: Path = ROOT) -> Optional[str]:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_provenance(started: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a results JSON records about its run: commit, UTC date, command, machine, calibrator, load.

    Call it once at the start of a run and pass that dict as ``started`` at the end: the result then
    holds the start and end date, calibrator seconds and load average (``[start, end]`` pairs).
    """
    now = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "calibrator_s": calibrator_seconds(), "load_average": _load()}
    prog = Path(sys.argv[0])
    prog_name = (f"python -m {prog.parent.name}" if prog.name == "__main__.py"
                 else prog.name if prog.is_absolute() else f"python {sys.argv[0]}" if prog.suffix == ".py"
                 else sys.argv[0])
    out: Dict[str, Any] = {
        # the code that ran is the checkout at the start (a commit made during a long run is not it)
        "commit": started.get("commit") if started is not None and "commit" in started else git_commit(),
        "command": " ".join([prog_name] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "calibrator": "seconds of sum(range(10**7)) in the run's interpreter",
    }
    if started is None:
        out.update(now)
    else:
        out.update({"date": started["date"], "finished": now["date"],
                    "calibrator_s": [started["calibrator_s"], now["calibrator_s"]],
                    "load_average": [started["load_average"], now["load_average"]]})
    return out
