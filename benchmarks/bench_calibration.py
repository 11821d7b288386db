"""The q-diffusion table on the embedded digits models: no calibration vs activations only vs + weight rounding.

For digits-dit and digits-unet (shipped weights): a timestep-aware calibration set (64 images x all
10 DDIM steps, seeds 0..63), then for W8A8 (every layer uaq-8), W4A8 (every layer uaq-4) and a
searched 4.0-bit config (digits-dit: an additive per-layer model of FID fitted on
caches/digits-dit.sqlite, exact search at 4.0 bits; digits-unet has no cache: the error-ILP config at
4.0 bits) three rows are measured on 500 held-out images (seeds 10000..10499, other seeds than the
calibration set's):

* ``none``: round-to-nearest weights, activations quantized online (the existing token-wise dynamic
  min/max hooks, ``--act-bits 8``), no calibration data;
* ``acts``: static per-tensor A8 ranges observed on the calibration set (``--observer``), weights RTN;
* ``acts+weights``: the same ranges + data-aware weight rounding (``--weights-method``, default auto).

Also the weight-rounding comparison (A16, weights only) that sets the per-method default: every
layer ``uaq-4`` / ``kmeans_c-4`` / ``kmeans_a-4`` under each rounding method, held-out FID and the
mean held-out relative output error of the layers. Writes ``OUT/results.json`` and ``OUT/table.md``.

    python benchmarks/bench_calibration.py --out bench_out/calibration [--models digits-dit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensitivity.calibration import calibrate, load_calibration_set, make_calibration_set  # noqa: E402
from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator  # noqa: E402
from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer  # noqa: E402
from sensitivity.quantizers.activation import disable_activation_quant, enable_activation_quant  # noqa: E402

OPTIONS = ["uaq-8", "uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3"]
SEARCH_OPTIONS = ["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3"]


def searched_config(model: str, mq, cache_path: Path):
    from sensitivity.search import AdditiveScorer, error_ilp, search, size_table

    sizes = size_table(mq, SEARCH_OPTIONS)
    if model == "digits-dit" and cache_path.is_file():
        import pandas as pd

        from sensitivity.evaluation.cache import ConfigCache

        recs = ConfigCache(str(cache_path)).records()
        cols = {}
        rows = []
        for r in recs:
            rows.append({cols.setdefault((l, o), len(cols)) for l, o in r["config"].items()})
        X = np.zeros((len(recs), len(cols)))
        for i, s in enumerate(rows):
            X[i, list(s)] = 1.0
        y = -np.array([r["metrics"]["fid"] for r in recs])
        lam = 1.0
        A = np.c_[X, np.ones(len(y))]
        coef = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ y)
        scores = [{"layer": l, "option": o, "score": coef[j]} for (l, o), j in cols.items()]
        have = {(d["layer"], d["option"]) for d in scores}
        for l in mq.layer_names:
            for o in SEARCH_OPTIONS:
                if (l, o) not in have:  # never sampled: worst score of the layer
                    scores.append({"layer": l, "option": o,
                                   "score": min(d["score"] for d in scores if d["layer"] == l) - 1.0})
        res = search(AdditiveScorer(pd.DataFrame(scores), "ridge-additive"), mq, 4.0, sizes=sizes)
        return res.options, f"search (additive ridge on {len(recs)} cached configs)"
    res = error_ilp(sizes, 4.0)
    return res.options, "error ILP (no cache for this model)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out/calibration")
    ap.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"])
    ap.add_argument("--num", type=int, default=64, help="calibration images (x 10 steps)")
    ap.add_argument("--observer", default="mse")
    ap.add_argument("--weights-method", default="auto")
    ap.add_argument("--adaround-iters", type=int, default=500)
    ap.add_argument("--rounding-comparison", action="store_true", default=True)
    ap.add_argument("--skip-rounding-comparison", dest="rounding_comparison", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sensitivity.zoo import get_family

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    from sensitivity.provenance import run_provenance

    started = run_provenance()
    for model in args.models:
        fam = get_family(model)
        pipe = fam.load_pipeline(None)
        den = fam.denoiser(pipe)
        mq_path = out / f"{model}.safetensors"
        if not mq_path.exists():
            build_multiquantizer(den, mq_path, fam.find_layers(den), model_id=fam.model_id(None), options=OPTIONS)
        mq = load_multiquantizer(mq_path)
        cs_path = out / f"{model}-calib.safetensors"
        if not cs_path.exists():
            make_calibration_set(fam, pipe, cs_path, kind="timestep_aware", num=args.num, seed=0)
        cs = load_calibration_set(cs_path)
        protocol = EvalProtocol.for_family(fam, n_per_class=50, seed=10_000)
        ev = Evaluator(fam, pipe, mq, protocol)
        mres = results.setdefault(model, {"rows": {}, "calibration_set_seconds": cs.meta.get("seconds")})

        def record(key, fn):
            if key in mres["rows"]:
                return mres["rows"][key]
            r = fn()
            r = {k: v for k, v in r.items() if k not in ("images", "timings")}
            mres["rows"][key] = r
            res_path.write_text(json.dumps(results, indent=1, default=str))
            print(model, key, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            return r

        def plain(cfg, act_bits=None):
            def fn():
                ev.reference_images()
                if act_bits:
                    enable_activation_quant(den, mq.layers, act_bits)
                try:
                    return dict(ev.evaluate(cfg))
                finally:
                    disable_activation_quant(den)
            return fn

        def calibrated(cfg, wm, act_bits):
            def fn():
                t0 = time.perf_counter()
                art = calibrate(den, mq, cfg, cs, weights_method=wm, act_bits=act_bits, observer=args.observer,
                                adaround_iters=args.adaround_iters, progress=False)
                secs = time.perf_counter() - t0
                r = dict(ev.evaluate(art))
                r["calibration_seconds"] = secs
                held = [v for v in art.report["layers"].values() if v.get("held_rel_error") is not None]
                if held:
                    r["held_rel_error_rtn"] = float(np.mean([v["held_rel_error_rtn"] for v in held]))
                    r["held_rel_error"] = float(np.mean([v["held_rel_error"] if v["kept"] else v["held_rel_error_rtn"]
                                                         for v in held]))
                    r["layers_kept"] = sum(v["kept"] for v in held)
                return r
            return fn

        record("fp", plain({}))
        search_cfg, search_label = searched_config(model, mq, Path("caches") / f"{model}.sqlite")
        mres["searched_config"] = {"label": search_label, "avg_bits": mq.avg_bits(search_cfg), "options": search_cfg}
        configs = {"W8A8 uaq-8": {n: "uaq-8" for n in mq.layer_names},
                   "W4A8 uaq-4": {n: "uaq-4" for n in mq.layer_names},
                   "W4A8 searched 4.0": search_cfg}
        for name, cfg in configs.items():
            mres.setdefault("avg_bits", {})[name] = mq.avg_bits(cfg)
            record(f"{name} | none", plain(cfg, 8))
            record(f"{name} | acts", calibrated(cfg, "none", 8))
            record(f"{name} | acts+weights", calibrated(cfg, args.weights_method, 8))
            record(f"{name} | weights only (A16)", calibrated(cfg, args.weights_method, None))
            record(f"{name} | RTN (A16)", plain(cfg))
        if args.rounding_comparison:
            for opt in ("uaq-4", "kmeans_c-4", "kmeans_a-4"):
                cfg = {n: opt for n in mq.layer_names}
                record(f"round {opt} | none", plain(cfg))
                for wm in ("gptq", "adaround", "refine", "gptq+refine"):
                    if wm == "adaround" and not opt.startswith("uaq"):
                        continue
                    record(f"round {opt} | {wm}", calibrated(cfg, wm, None))
    results.pop("machine_seconds_sum_range_1e7", None)
    results["provenance"] = run_provenance(started)  # of the run that finished the table (rows resume)
    res_path.write_text(json.dumps(results, indent=1, default=str))
    lines = []
    for model, m in results.items():
        if not isinstance(m, dict) or model == "provenance":
            continue
        lines += [f"### {model}", "", "| config | calibration | FID | accuracy | PSNR dB | calibration s |",
                  "|---|---|---:|---:|---:|---:|"]
        for key, r in m["rows"].items():
            cfg, _, how = key.partition(" | ")
            lines.append(f"| {cfg} | {how or '-'} | {r.get('fid', float('nan')):.3f} | {r.get('accuracy', float('nan')):.3f} | "
                         f"{r.get('psnr', float('nan')):.2f} | {r.get('calibration_seconds', 0):.1f} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {res_path} and {out / 'table.md'} (calibrator sum(range(10**7)): {results['provenance']['calibrator_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
