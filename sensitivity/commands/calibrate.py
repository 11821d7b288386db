"""``sensitivity calibrate MODEL --multiquantizer MQ --config X.json --data calib/S.safetensors --out quant_configs/X-cal/``.

Data-aware weight rounding (GPTQ / AdaRound / least-squares table refit) and static activation
ranges (min-max / percentile / MSE observers) for a config; writes a calibrated config folder (an
overlay on the multiquantizer, same average bits) that ``infer`` and ``evaluate`` accept as ``--config``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..calibration.names import GRANULARITIES, OBSERVERS, WEIGHT_METHODS  # torch-free (--help)
    from .arguments import add_model_arguments, add_multiquantizer_argument, add_progress_argument

    p = sub.add_parser("calibrate", help="calibrate a config on a calibration set (weights rounding + activation ranges)",
                       description="Round a config's weights with calibration data (GPTQ, AdaRound, least-squares "
                                   "table refit) and observe static activation ranges; write a calibrated config "
                                   "folder that infer / evaluate accept as --config.")
    add_model_arguments(p)
    add_multiquantizer_argument(p)
    p.add_argument("--config", required=True, help="quantization config .json")
    p.add_argument("--data", required=True, help="calibration set (sensitivity calibrate-data)")
    p.add_argument("--weights-method", default="auto", choices=WEIGHT_METHODS,
                   help="weight rounding (default auto: the measured best per quantization method)")
    p.add_argument("--act-bits", type=int, default=None, help="static activation bits, 2-16 (8 or 6; default: "
                   "weights only)")
    p.add_argument("--observer", default="mse", choices=OBSERVERS, help="activation range observer (default mse)")
    p.add_argument("--granularity", default="tensor", choices=GRANULARITIES,
                   help="one range per tensor or per channel (default tensor)")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile observer's p (default 99.99)")
    p.add_argument("--no-attention", action="store_true", help="do not quantize attention Q/K/V outputs")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction of the set held out of the weight fit")
    p.add_argument("--adaround-iters", type=int, default=1000)
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the held-out split and AdaRound")
    p.add_argument("--out", required=True, help="output folder, e.g. quant_configs/X-cal/")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.calibrate import calibrate_config

    res = calibrate_config(args.model, args.multiquantizer, args.config, args.data, args.out, weights=args.weights,
                           pipeline_class=args.pipeline_class, device=args.device, dtype=args.dtype, seed=args.seed,
                           weights_method=args.weights_method, act_bits=args.act_bits, observer=args.observer,
                           granularity=args.granularity, attention=not args.no_attention, percentile=args.percentile,
                           held_out=args.held_out, calib_seed=args.calib_seed, adaround_iters=args.adaround_iters,
                           progress=not args.no_progress, overwrite=args.overwrite)
    art, r = res.artifact, res.artifact.report
    msg = ""
    if res.held_out_error is not None:
        msg = "; mean held-out relative output error {:.4g} -> {:.4g}".format(*res.held_out_error)
    acts = f", A{args.act_bits} {args.observer}/{args.granularity} ranges of {len(art.activations.ranges)} points" \
        if art.activations is not None else ""
    print(f"wrote {args.out}: {r['calibrated_layers']} of {r['quantized_layers']} layers rounded "
          f"({args.weights_method}){acts}{msg}; avg bits {art.config.avg_bits:.3f} (unchanged); "
          f"{r['seconds']['total']:.1f} s")
    return 0
