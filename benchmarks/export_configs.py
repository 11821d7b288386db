"""The multiquantizer and configs ``bench_export.py`` measures on a full-size model (seeded random weights).

    python benchmarks/export_configs.py --model sd15 --out-dir caches/export-sd15

Writes ``OUT_DIR/mq.safetensors`` (``--options``, default ``uaq-4 uaq-3 kmeans_c-4 kmeans_c-3 uaq-8``: the
per-tensor ``kmeans_a`` options are left out to keep a full-size build under an hour on two cores; resumable)
and three configs: ``uaq.json`` (the error ILP over ``uaq-4`` / ``uaq-3`` at ``--bits``), ``kmeans.json`` (the
error ILP over every option but ``uaq-8`` at ``--bits``, k-means included) and ``w8a8.json`` (every layer ``uaq-8``, ``act_bits: 8``). The split ``#main`` / ``#skip`` halves of a layer
stay fp16 in all three (SDNQ quantizes a module's weight as one, so it cannot carry them). The error ILP is
:func:`sensitivity.search.predictor_free.error_ilp` (minimum summed ``||W - Ŵ||² / ||W||²`` under the byte budget).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=float, default=3.9, help="average bits of the uaq and kmeans configs")
    ap.add_argument("--options", nargs="+", default=["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "uaq-8"])
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()

    from sensitivity.config import QuantConfig
    from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer
    from sensitivity.search.budgets import size_table
    from sensitivity.search.predictor_free import error_ilp
    from sensitivity.zoo import get_family

    fam = get_family(args.model)
    weights = fam.resolve_weights(args.weights)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    den = fam.load_denoiser(weights, seed=args.seed)
    model_id = fam.model_id(weights)
    mq_path = out / "mq.safetensors"
    if mq_path.is_file():
        mq = load_multiquantizer(mq_path)
    else:
        mq = build_multiquantizer(den, mq_path, fam.find_layers(den), model_id=model_id, options=tuple(args.options))
    configs = {}
    low = [o for o in args.options if o != "uaq-8"]
    for name, options in (("uaq", ("uaq-4", "uaq-3")), ("kmeans", low)):
        sizes = size_table(mq, options)
        sizes = sizes[~sizes["layer"].str.contains("#")]  # split halves stay fp16: SDNQ cannot carry them
        res = error_ilp(sizes, args.bits, what=f"{args.model} {name}")
        configs[name] = res.to_config(model=model_id, multiquantizer_hash=mq.hash)
    configs["w8a8"] = QuantConfig({n: "uaq-8" for n in mq.layer_names if "#" not in n}, model=model_id, multiquantizer_hash=mq.hash,
                                  act_bits=8)
    for name, cfg in configs.items():
        cfg.save(out / f"{name}.json")
        print(f"{out / name}.json: {len(cfg.options)} layers, "
              f"{sum(1 for o in cfg.options.values() if o.startswith('kmeans'))} k-means", file=sys.stderr)


if __name__ == "__main__":
    main()
