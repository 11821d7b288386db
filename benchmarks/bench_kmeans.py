"""1-D k-means and UAQ per row: speed and squared error against the exact optimum, in one run.

Rows are drawn from a realistic heavy-tailed weight (Student-t, df 4, scale 0.02; seeded). For each
row length and k in (16, 8) it prints, per row:

* time: ours (numba: CPU time on one thread, and wall time on all threads; torch back end on CPU),
  scikit-learn ``KMeans(n_init=1, max_iter=100)`` (the reference's settings, one thread),
  flash1dkmeans (``pip install flash1dkmeans``; skipped if absent), and the exact DP
  (:func:`kmeans1d_optimal`);
* the speed ratios, from CPU time of one thread (robust to other load on a shared machine);
* SSE / exact optimum (max and mean over the sample). Ours is the stored fp16 codebook; scikit-learn
  and flash1dkmeans keep their float centroids (their best case).

Then UAQ (time per row; SSE against the k-means optimum and against the reference's 10-ratio grid),
K-Means-A on a 14.7M-element tensor (time) and on a smaller one (SSE / optimum), and code packing
throughput.

    python benchmarks/bench_kmeans.py                    # default sample, about 1-2 minutes
    python benchmarks/bench_kmeans.py --rows 256 --sk-rows 32 --lengths 320 1152 2560 11520
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensitivity.quantizers import lookup  # noqa: E402
from sensitivity.quantizers import kmeans1d as km  # noqa: E402
from sensitivity.quantizers.uaq import UAQConfig, UniformAffine  # noqa: E402
from sensitivity.quantizers.packing import pack_codes, unpack_codes  # noqa: E402


def student_t(rows: int, cols: int, df: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((0.02 * rng.standard_t(df, size=(rows, cols))).astype(np.float32))


def best_time(fn, repeat: int = 3, clock=time.perf_counter) -> float:
    """Best time of ``repeat`` calls (the machine may be shared): wall clock, or ``time.process_time``."""
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def cpu_time(fn, repeat: int = 3) -> float:
    """Best CPU time (all threads of this process) of ``repeat`` calls: robust to other processes' load."""
    return best_time(fn, repeat, time.process_time)


def sse_nearest(x: np.ndarray, centroids: np.ndarray) -> float:
    """SSE of 1-D values with each value at its nearest centroid."""
    c = np.sort(np.asarray(centroids, np.float64))
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    return float(((x - c[idx]) ** 2).sum())


def stats(r: np.ndarray) -> str:
    return f"max {r.max():.4f}  mean {r.mean():.4f}"


def bench_rows(w: torch.Tensor, k: int, sk_rows: int, seed: int, flash) -> dict:
    R, n = w.shape
    x64 = w.double().numpy()
    res: dict = {}
    # exact optimum
    km.kmeans1d_optimal(x64[0, :64], k)  # load the compiled kernel before timing
    t = time.process_time()
    opt = np.array([km.kmeans1d_optimal(x64[i], k)[0] for i in range(R)])
    res["exact_us"] = (time.process_time() - t) / R * 1e6

    def ours(backend="numba"):
        return km.kmeans1d_rows(w, k, backend=backend)

    ours()  # compile / warm up
    threads = numba.get_num_threads()
    res["ours_us"] = best_time(ours) / R * 1e6
    numba.set_num_threads(1)
    res["ours_1t_us"] = cpu_time(ours) / R * 1e6
    numba.set_num_threads(threads)
    with threadpool_limits(1):
        res["ours_torch_us"] = cpu_time(lambda: ours("torch"), repeat=1) / R * 1e6
    codes, cb = ours()
    sse = ((torch.gather(cb.float(), 1, codes.long()).double() - w.double()) ** 2).sum(1).numpy()
    res["ours_ratio"] = sse / opt

    # scikit-learn, the reference's settings
    from sklearn.cluster import KMeans

    m = min(sk_rows, R)
    inertia, t = [], time.process_time()
    with threadpool_limits(1):
        for i in range(m):
            fit = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed + i).fit(x64[i].reshape(-1, 1))
            inertia.append(fit.inertia_)
    res["sk_us"] = (time.process_time() - t) / m * 1e6
    res["sk_ratio"] = np.array(inertia) / opt[:m]

    if flash is not None:
        flash.kmeans_1d(x64[0], k, random_state=seed)  # compile
        t = time.process_time()
        cents = [flash.kmeans_1d(x64[i], k, random_state=seed + i)[0] for i in range(R)]
        res["flash_us"] = (time.process_time() - t) / R * 1e6
        res["flash_ratio"] = np.array([sse_nearest(x64[i], cents[i]) for i in range(R)]) / opt
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128, help="rows per length (ours, flash, exact)")
    ap.add_argument("--sk-rows", type=int, default=12, help="rows per length for scikit-learn (slow)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[320, 1152, 2560])
    ap.add_argument("--df", type=float, default=4.0, help="Student-t degrees of freedom")
    ap.add_argument("--tensor", type=int, nargs=2, default=[1280, 11520], help="K-Means-A timing tensor shape")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    try:
        import flash1dkmeans as flash
    except ImportError:
        flash = None
        print("flash1dkmeans not installed (pip install flash1dkmeans): skipped")
    print(f"torch {torch.__version__}, numba {numba.__version__} ({numba.get_num_threads()} threads), "
          f"Student-t df={args.df}, {args.rows} rows per length (scikit-learn: {args.sk_rows})")

    t0 = time.perf_counter()
    threads = numba.get_num_threads()
    results = {}
    jobs = [(n, k) for n in args.lengths for k in (16, 8)]
    for n, k in tqdm(jobs, desc="k-means rows", leave=False):
        w = student_t(args.rows, n, args.df, args.seed + n)
        results[n, k] = bench_rows(w, k, args.sk_rows, args.seed, flash)

    print("\n== kmeans_c: CPU time per row on one thread (us), speed-ups, SSE / exact optimum ==")
    print(f"(ours on {threads} threads: wall time per row; everything else: CPU time of one thread)")
    for (n, k), r in results.items():
        print(f"n={n:5d} k={k:2d} | ours {r['ours_1t_us']:6.1f} (wall {r['ours_us']:.1f} on {threads} threads; "
              f"torch back end {r['ours_torch_us']:.0f}) | sklearn {r['sk_us']:6.0f} | "
              + (f"flash {r['flash_us']:6.1f} | " if flash else "")
              + f"exact DP {r['exact_us']:6.0f}")
        line = f"               ours vs sklearn {r['sk_us'] / r['ours_1t_us']:5.0f}x faster"
        if flash:
            line += f", vs flash {r['flash_us'] / r['ours_1t_us']:.1f}x faster"
        line += f", vs exact DP {r['exact_us'] / r['ours_1t_us']:.1f}x faster"
        print(line)
        line = f"               SSE/opt: ours {stats(r['ours_ratio'])} | sklearn {stats(r['sk_ratio'])}"
        if flash:
            line += f" | flash {stats(r['flash_ratio'])}"
        print(line)

    print("\n== UAQ (per-row clipping search, squared error, fp16 scale/zero); CPU time of one thread ==")
    for n in args.lengths:
        w = student_t(args.rows, n, args.df, args.seed + n)
        for bits in (4, 3):
            q = UniformAffine("uaq")
            q.quantize_rows(w[:2], bits)
            numba.set_num_threads(1)
            with threadpool_limits(1):
                tn = cpu_time(lambda: q.quantize_rows(w, bits)) / args.rows * 1e6
                tt = cpu_time(lambda: UniformAffine("uaq", backend="torch").quantize_rows(w, bits), 1)
            numba.set_num_threads(threads)
            tt *= 1e6 / args.rows
            codes, params = q.quantize_rows(w, bits)
            sse = ((lookup(q.table(params, bits), codes).double() - w.double()) ** 2).sum(1).numpy()
            ref = UniformAffine("uaq", UAQConfig(clip_ratios=tuple(float(r) for r in np.linspace(1.0, 0.1, 10))))
            rc, rp = ref.quantize_rows(w, bits)
            ref_sse = ((lookup(ref.table(rp, bits), rc).double() - w.double()) ** 2).sum(1).numpy()
            opt = np.array([km.kmeans1d_optimal(x, 2**bits)[0] for x in w.double().numpy()])
            rel = sse.sum() / float((w.double() ** 2).sum())
            print(f"n={n:5d} {bits}-bit | {tn:6.1f} us/row (torch back end {tt:.0f}) | rel. error {rel:.4f} | "
                  f"SSE / k-means optimum: mean {np.mean(sse / opt):.3f} | "
                  f"SSE / reference 10-ratio grid: {sse.sum() / ref_sse.sum():.4f}")

    print("\n== kmeans_a (one codebook per tensor) ==")
    R, K = args.tensor
    big = student_t(R, K, args.df, args.seed + 1)
    for k in (16, 8):
        km.kmeans1d_tensor(big[:8], k)
        tb = best_time(lambda: km.kmeans1d_tensor(big, k), repeat=2)
        small = student_t(256, 1024, args.df, args.seed + 2)
        codes, cb = km.kmeans1d_tensor(small, k)
        sse = float(((cb[0].float()[codes.long()].double() - small.double()) ** 2).sum())
        opt, _ = km.kmeans1d_optimal(small.reshape(-1), k)
        print(f"k={k:2d} | {R}x{K} ({R * K / 1e6:.1f}M values): {tb:.2f} s wall | 256x1024: SSE / optimum {sse / opt:.5f}")

    print("\n== code packing (MB of codes per second) ==")
    codes = np.random.default_rng(args.seed).integers(0, 8, 64 << 20, dtype=np.uint8)
    for bits in (3, 4):
        c = codes & np.uint8(2**bits - 1)
        packed = pack_codes(c[:64], bits)
        tp = best_time(lambda: pack_codes(c, bits))
        packed = pack_codes(c, bits)
        tu = best_time(lambda: unpack_codes(packed, bits, c.size))
        print(f"{bits}-bit: pack {c.size / tp / 1e6:.0f} MB/s, unpack {c.size / tu / 1e6:.0f} MB/s")
    print(f"\nbench_kmeans done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
