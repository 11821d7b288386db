"""Evaluation-job throughput with and without one competing CPU-bound process.

Runs ``sensitivity sample digits-dit`` (a fresh cache each time, ``--num-configs`` random configs of
``--images-per-class`` x 10 images) with ``--workers`` 1 and 2, first as the machine is, then with
one extra process spinning on a core (``python -c "while True: pass"``), and reports configs/hour:

* **steady** = workers x 3600 / mean per-config ``evaluate`` seconds (from the cache's timings: the
  throughput once the workers are up, start-up excluded);
* **job** = configs x 3600 / wall seconds of the whole command (start-up included).

Threads per worker are the runner's default (``--threads`` unset): since issue 17 the free cores
(affinity minus load average) shared out among the workers; before, CPU cores // workers, and
torch's default (all cores) for the in-process worker. ``--root`` runs another checkout.

    python benchmarks/bench_contention.py --multiquantizer multiquantizers/digits-dit.safetensors
    python benchmarks/bench_contention.py --root /tmp/old --multiquantizer ... --json before.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_job(root: Path, mq: str, workers: int, configs: int, per_class: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sens-contention-") as tmp:
        cache = os.path.join(tmp, "job.sqlite")
        cmd = [sys.executable, "-m", "sensitivity", "sample", "digits-dit", "--multiquantizer", mq, "--cache", cache,
               "--num-configs", str(configs), "--seed", "0", "--images-per-class", str(per_class),
               "--workers", str(workers), "--no-progress"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
        load = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"job failed ({proc.returncode}): {proc.stderr[-1500:]}")
        sys.path.insert(0, str(root))
        from sensitivity.evaluation.cache import ConfigCache

        with ConfigCache(cache) as c:
            recs = c.records()
    per_config = [float(r["timings"]["evaluate"]) for r in recs]
    return {"workers": workers, "configs": len(recs), "wall_s": round(wall, 1), "load_at_start": round(load, 2),
            "mean_evaluate_s": round(statistics.mean(per_config), 3),
            "steady_configs_per_hour": round(workers * 3600 / statistics.mean(per_config)),
            "job_configs_per_hour": round(len(recs) * 3600 / wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to run")
    ap.add_argument("--multiquantizer", required=True, help="digits-dit multiquantizer (sensitivity multiquantize)")
    ap.add_argument("--num-configs", type=int, default=16)
    ap.add_argument("--images-per-class", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    mq = str(Path(args.multiquantizer).resolve())
    t = time.time()
    sum(range(10**7))
    print(f"checkout {root}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
          f"sum(range(10**7)) {time.time() - t:.3f} s")
    rows = []
    for competitor in (False, True):
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
        try:
            if spin is not None:
                time.sleep(5)  # let it show in the load average a little, as a running job would
            for w in args.workers:
                r = run_job(root, mq, w, args.num_configs, args.images_per_class)
                r["competitor"] = competitor
                rows.append(r)
                print(f"workers {w} {'+1 competitor' if competitor else 'as is       '}: steady "
                      f"{r['steady_configs_per_hour']:>6} configs/h, job {r['job_configs_per_hour']:>6} configs/h "
                      f"({r['configs']} configs in {r['wall_s']} s, load at start {r['load_at_start']})", flush=True)
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
    for w in args.workers:
        base = next(r for r in rows if r["workers"] == w and not r["competitor"])
        comp = next(r for r in rows if r["workers"] == w and r["competitor"])
        print(f"workers {w}: with one competitor {100 * comp['steady_configs_per_hour'] / base['steady_configs_per_hour']:.0f} % "
              f"of the throughput without (steady), {100 * comp['job_configs_per_hour'] / base['job_configs_per_hour']:.0f} % (job)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
