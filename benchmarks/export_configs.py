"""The multiquantizer and configs ``bench_export.py`` measures on a full-size model (seeded random weights).

    python benchmarks/export_configs.py --model sd15 --out-dir caches/export-sd15

Writes ``OUT_DIR/mq.safetensors`` (``--options``, default ``uaq-4 uaq-3 kmeans_c-4 kmeans_c-3 int8_c``: the
per-tensor ``kmeans_a`` options are left out to keep a full-size build under an hour on two cores; resumable)
and the ``--configs`` (default all three): ``uaq.json`` (the error ILP over ``uaq-4`` / ``uaq-3`` at ``--bits``),
``kmeans.json`` (the error ILP over every option below 8 bits at ``--bits``, k-means included) and ``w8a8.json``
(every layer ``--w8a8-option``, default ``int8_c``: symmetric per-channel int8 weights, the W8A8 every int8
kernel takes; ``act_bits: 8``). ``--options int8_c --configs w8a8`` builds the W8A8 case alone in minutes.
The split ``#main`` / ``#skip`` halves of a layer
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
    ap.add_argument("--options", nargs="+", default=["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "int8_c"])
    ap.add_argument("--configs", default="uaq,kmeans,w8a8", help="which configs to write (comma-separated)")
    ap.add_argument("--w8a8-option", default="int8_c", help="the option of every layer of w8a8.json")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()

    from sensitivity.config import QuantConfig
    from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer
    from sensitivity.search.budgets import size_table
    from sensitivity.search.predictor_free import error_ilp
    from sensitivity.zoo import get_family

    wanted = [c for c in args.configs.split(",") if c]
    needs = {"uaq": ["uaq-4", "uaq-3"], "kmeans": ["uaq-4"], "w8a8": [args.w8a8_option]}
    for name in wanted:
        if name not in needs:
            raise SystemExit(f"--configs: unknown config {name!r}; use uaq, kmeans, w8a8")
        missing = [o for o in needs[name] if o not in args.options]
        if missing:
            raise SystemExit(f"--configs {name} needs option {missing[0]!r} in --options")
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
    from sensitivity.options import QuantOption

    low = [o for o in args.options if QuantOption.parse(o).bits < 8]
    for name, options in (("uaq", ("uaq-4", "uaq-3")), ("kmeans", low)):
        if name not in wanted:
            continue
        sizes = size_table(mq, options)
        sizes = sizes[~sizes["layer"].str.contains("#")]  # split halves stay fp16: SDNQ cannot carry them
        res = error_ilp(sizes, args.bits, what=f"{args.model} {name}")
        configs[name] = res.to_config(model=model_id, multiquantizer_hash=mq.hash)
    if "w8a8" in wanted:
        configs["w8a8"] = QuantConfig({n: args.w8a8_option for n in mq.layer_names if "#" not in n}, model=model_id,
                                      multiquantizer_hash=mq.hash, act_bits=8)
    for name, cfg in configs.items():
        cfg.save(out / f"{name}.json")
        print(f"{out / name}.json: {len(cfg.options)} layers, "
              f"{sum(1 for o in cfg.options.values() if o.startswith('kmeans'))} k-means", file=sys.stderr)


if __name__ == "__main__":
    main()
