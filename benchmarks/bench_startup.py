"""CLI start-up: `sensitivity --help` and `sensitivity models`, cold and warm, and what they import.

Runs each command in fresh interpreters (``python -m sensitivity ...`` from this checkout) and reports

* **cold**: the first run with an empty bytecode cache (``PYTHONPYCACHEPREFIX`` set to a new empty
  folder, so every module is compiled from source, as after a fresh install; the OS file cache is
  left alone);
* **warm**: the median of ``--repeat`` runs with a filled bytecode cache;
* wall seconds and the CPU seconds (user + sys) of the child: on a shared machine, CPU seconds are
  about what the wall time would be on an idle one (start-up is single-threaded);
* whether torch / diffusers were imported, and the top ``-X importtime`` offenders: the top-level
  packages by their summed self time, and the slowest first-level imports (cumulative).

    python benchmarks/bench_startup.py                      # --help and models, 5 warm runs each
    python benchmarks/bench_startup.py --repeat 9 --top 12 --json startup.json
    python benchmarks/bench_startup.py --command "info multiquantizers/x.safetensors"
    python benchmarks/bench_startup.py --root /tmp/old-checkout  # time another checkout (before/after)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "numba", "scipy", "pandas", "numpy")
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _env(**extra: str) -> dict:
    """The environment of a timed run: offline, this checkout first on the path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run_once(argv: list, env: dict, importtime: bool = False) -> dict:
    """One ``python -m sensitivity ARGV`` in a fresh interpreter: wall s, child CPU s, stderr."""
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-m", "sensitivity"] + argv
    before = os.times()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode != 0:
        tail = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("import time:"))[-500:]
        raise SystemExit(f"`sensitivity {' '.join(argv)}` exited {proc.returncode}: {tail}")
    return {"wall_s": wall, "cpu_s": cpu, "stderr": proc.stderr}


def parse_importtime(stderr: str) -> list:
    """``[(self_us, cumulative_us, depth, module)]`` from ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    return rows


def offenders(rows: list, top: int) -> dict:
    by_package = defaultdict(int)
    for self_us, _, _, mod in rows:
        by_package[mod.split(".")[0]] += self_us
    first_level = sorted((r for r in rows if r[2] == 0), key=lambda r: -r[1])
    return {
        "total_s": sum(r[0] for r in rows) / 1e6,
        "packages": [(p, us / 1e6) for p, us in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]],
        "imports": [(mod, cum / 1e6) for _, cum, _, mod in first_level[:top]],
        "heavy": [h for h in HEAVY if any(r[3] == h for r in rows)],
    }


def machine_speed() -> float:
    """Seconds of ``sum(range(10**7))`` in this interpreter (the calibrator of every results page)."""
    t = time.time()
    sum(range(10**7))
    return time.time() - t


def bench(argv: list, repeat: int, top: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sens-pycache-") as tmp:
        cold = run_once(argv, _env(PYTHONPYCACHEPREFIX=tmp))
    env = _env()
    run_once(argv, env)  # fill the bytecode cache of this checkout
    warm = [run_once(argv, env) for _ in range(repeat)]
    prof = offenders(parse_importtime(run_once(argv, env, importtime=True)["stderr"]), top)
    return {
        "command": "sensitivity " + " ".join(argv),
        "cold_wall_s": cold["wall_s"], "cold_cpu_s": cold["cpu_s"],
        "warm_wall_s": statistics.median(r["wall_s"] for r in warm),
        "warm_cpu_s": statistics.median(r["cpu_s"] for r in warm),
        "warm_runs": repeat, **prof,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", action="append", default=None,
                    help="subcommand line to time (repeatable; default: '--help' and 'models')")
    ap.add_argument("--repeat", type=int, default=5, help="warm runs per command (median reported)")
    ap.add_argument("--top", type=int, default=8, help="offenders listed per command")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--root", default=None, help="checkout to time (default: the one holding this script)")
    args = ap.parse_args()
    global ROOT
    if args.root:
        ROOT = Path(args.root).resolve()
    commands = args.command or ["--help", "models"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sensitivity.provenance import run_provenance  # stdlib only: importing it times nothing here

    started = run_provenance()
    load = os.getloadavg()[0]
    speed = machine_speed()
    print(f"checkout: {ROOT}")
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f}, sum(range(10**7)) {speed:.3f} s, "
          f"python {sys.version.split()[0]}")
    results = []
    for line in commands:
        r = bench(shlex.split(line), args.repeat, args.top)
        results.append(r)
        print(f"\n{r['command']}")
        print(f"  cold (empty bytecode cache): {r['cold_wall_s']:.2f} s wall, {r['cold_cpu_s']:.2f} s CPU")
        print(f"  warm (median of {r['warm_runs']}):          {r['warm_wall_s']:.2f} s wall, {r['warm_cpu_s']:.2f} s CPU")
        print(f"  imports: {r['total_s']:.2f} s self time in all; heavy packages: {', '.join(r['heavy']) or 'none'}")
        print("  top packages (self time): " + ", ".join(f"{p} {s:.3f}" for p, s in r["packages"]))
        print("  top first-level imports (cumulative): " + ", ".join(f"{m} {s:.3f}" for m, s in r["imports"]))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        from sensitivity.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"provenance": run_provenance(started), "checkout": str(ROOT),
                                                 "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
