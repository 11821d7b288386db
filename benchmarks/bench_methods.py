"""Error vs bits of every registered method on heavy-tailed rows of several lengths and on digits-dit.

    python benchmarks/bench_methods.py [--rows 256] [--seed 0] [--json methods.json]

For each row length K (128 .. 2304, the lengths of real denoisers' Linear / Conv rows) a Student-t
(df 4) weight of ``rows x K`` is quantized with every option; printed: bits per weight (overhead
included) and relative squared error ||W - Q(W)||^2 / ||W||^2. Then the same over the shipped
digits-dit denoiser (all layers, error weighted by ||W||^2). ``--json`` writes the numbers with the
run's provenance; ``python scripts/results_tables.py methods FILE`` makes ``docs/results/methods.md``
from it (where per-group UAQ beats per-row k-means on short rows, what the least-squares refit
``uaq_ls`` gains over ``uaq``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = ["uaq-4", "uaq_ls-4", "uaq_g128-4", "uaq_g64-4", "kmeans_c-4", "kmeans_a-4",
           "uaq-3", "uaq_ls-3", "uaq_g128-3", "uaq_g64-3", "kmeans_c-3", "kmeans_a-3", "int8", "int8_c", "fp8_e4m3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results (with the run's provenance) as JSON here")
    args = ap.parse_args()
    from sensitivity.options import QuantOption
    from sensitivity.provenance import run_provenance
    from sensitivity.quantizers import quantize

    started = run_provenance()
    print(f"calibrator: sum(range(10**7)) {started['calibrator_s']:.3f} s; seed {args.seed}, {args.rows} rows")
    result = {"seed": args.seed, "rows": args.rows, "df": 4.0, "scale": 0.02, "synthetic": {}, "digits_dit": {}}
    lengths = [128, 320, 576, 1152, 2304]
    print(f"{'option':<12}" + "".join(f" {'K=' + str(k) + ' bits':>12} {'error':>10}" for k in lengths))
    torch.manual_seed(args.seed)
    weights = {k: torch.distributions.StudentT(4.0).sample((args.rows, k)) * 0.02 for k in lengths}
    for opt in OPTIONS:
        cells = []
        for k in lengths:
            q = quantize(weights[k], opt)
            bits = QuantOption.parse(opt).bits_per_weight((args.rows, k))
            result["synthetic"].setdefault(opt, {})[str(k)] = {"bits": bits, "error": q.error}
            cells.append(f" {bits:12.3f} {q.error:10.3e}")
        print(f"{opt:<12}" + "".join(cells))

    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser(None)
    layers = fam.find_layers(den)
    from sensitivity.layers import layer_weight

    print("\ndigits-dit (shipped), all layers: bits per weight, error = sum SSE / sum ||W||^2")
    for opt in OPTIONS:
        sse = norm = qb = fb = 0.0
        for spec in layers:
            w = layer_weight(den, spec).detach().float()
            q = quantize(w, opt)
            sse += q.sse
            norm += float((w.double() ** 2).sum())
            qb += q.nbytes
            fb += spec.fp16_bytes
        result["digits_dit"][opt] = {"bits": 16 * qb / fb, "error": sse / norm}
        print(f"{opt:<12} {16 * qb / fb:8.3f} {sse / norm:10.3e}")
    if args.json:
        import json

        from sensitivity.io import atomic_write_text

        result["provenance"] = run_provenance(started)
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
