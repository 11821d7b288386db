#!/usr/bin/env python
"""Fine-tuning on digits-dit: held-out FID / KID / accuracy / PSNR before vs after vs full precision.

    python benchmarks/bench_finetune.py --configs quant_configs/digits-dit-search-3.4.json ... \
        --steps 300 --out bench_out/finetune

Every config is fine-tuned with ``sensitivity.finetune.finetune`` (digits data, output distillation,
EMA) and measured, before and after, on the demo's held-out check: 500 images (50 per class), seeds
1,000,000 + i, 10 DDIM steps, no guidance (:class:`~sensitivity.evaluation.evaluator.Evaluator`).
Writes ``OUT/results.json`` and ``OUT/table.md``; fine-tuned artifacts go to ``OUT/<config stem>/``
(rerunning skips finished ones: :func:`finetune` resumes or returns the finished record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sensitivity.config import QuantConfig  # noqa: E402
from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator  # noqa: E402
from sensitivity.finetune import DigitsData, FinetuneSettings, finetune, load_finetuned  # noqa: E402
from sensitivity.multiquantizer import load_multiquantizer  # noqa: E402
from sensitivity.zoo import get_family  # noqa: E402

CHECK_SEED = 1_000_000  # the demo's held-out seeds


def machine_speed() -> float:
    t = time.time()
    sum(range(10**7))
    return round(time.time() - t, 3)


def main() -> int:
    from sensitivity.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multiquantizer", default="multiquantizers/digits-dit.safetensors")
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--assign", default="rederive")
    ap.add_argument("--tag", default="", help="suffix of the artifact folders (e.g. -fixed)")
    ap.add_argument("--images-per-class", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/finetune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fam = get_family("digits-dit")
    pipe = fam.load_pipeline(None, device="cpu", dtype=torch.float32)
    den = fam.denoiser(pipe)
    mq = load_multiquantizer(args.multiquantizer)
    protocol = EvalProtocol.for_family(fam, None, n_per_class=args.images_per_class, seed=CHECK_SEED,
                                       multiquantizer_hash=mq.hash, dtype="float32")
    ev = Evaluator(fam, pipe, mq, protocol)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"rows": {}}
    results["speed_sum_range_1e7_s"] = machine_speed()
    if "full precision" not in results["rows"]:
        m = ev.evaluate(None)
        results["rows"]["full precision"] = {"avg_bits": 16.0, "before": {k: m[k] for k in ("fid", "kid", "accuracy")}}
    st = FinetuneSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, assign=args.assign)
    for path in args.configs:
        cfg = QuantConfig.load(path)
        name = Path(path).stem + args.tag
        row = results["rows"].get(name, {})
        if "before" not in row:
            m = ev.evaluate(cfg)
            row["before"] = {k: m[k] for k in ("fid", "kid", "accuracy", "psnr")}
        t0 = time.time()
        rec = finetune(den, mq, cfg, DigitsData("digits-dit", st.batch_size), out / name, st,
                       model_id=mq.model_id, progress=True)
        ft = load_finetuned(out / name)
        ev_ft = Evaluator(fam, pipe, ft, protocol.with_multiquantizer(ft.hash))
        ev_ft._fp_images = ev.reference_images()  # PSNR against the same full-precision images
        m = ev_ft.evaluate(ft.config)
        row.update({"config": path, "avg_bits": mq.avg_bits(cfg.options), "avg_bits_after": ft.avg_bits(),
                    "bytes": mq.quantized_bytes(cfg.options), "bytes_after": ft.quantized_bytes(),
                    "after": {k: m[k] for k in ("fid", "kid", "accuracy", "psnr")},
                    "train_seconds": rec["train_seconds"], "steps": rec["steps"], "settings": rec["settings"],
                    "val_loss_before": rec["val_loss_before"], "val_loss_after": rec["val_loss_after"]})
        results["rows"][name] = row
        atomic_write_json(res_path, results)
        print(f"{name}: {row['avg_bits']:.4f} bits, FID {row['before']['fid']:.3f} -> {row['after']['fid']:.3f}, "
              f"{rec['train_seconds']:.0f} s ({time.time() - t0:.0f} s with evaluation)", flush=True)
    lines = ["| config | avg bits (before = after) | FID before | FID after | KID before | KID after | "
             "accuracy before | accuracy after | PSNR before | PSNR after | training s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["rows"].items():
        b = r["before"]
        if "after" not in r:
            lines.append(f"| {name} | 16 | {b['fid']:.3f} | – | {b['kid']:.4f} | – | {b['accuracy']:.3f} | – | – | – | – |")
            continue
        a = r["after"]
        same = "=" if r["avg_bits_after"] == r["avg_bits"] and r["bytes_after"] == r["bytes"] else "≠"
        lines.append(f"| {name} | {r['avg_bits']:.4f} {same} {r['avg_bits_after']:.4f} | {b['fid']:.3f} | {a['fid']:.3f} | "
                     f"{b['kid']:.4f} | {a['kid']:.4f} | {b['accuracy']:.3f} | {a['accuracy']:.3f} | "
                     f"{b['psnr']:.2f} | {a['psnr']:.2f} | {r['train_seconds']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {res_path} and {out / 'table.md'} (machine speed: sum(range(1e7)) {results['speed_sum_range_1e7_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
