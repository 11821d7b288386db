"""``sensitivity multiquantize MODEL``: build the multiquantizer file of a model's denoiser."""

from __future__ import annotations

import argparse

from ..options import OPTION_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "multiquantize",
        help="quantize every layer with every option and save the multiquantizer",
        description="Quantize every quantizable layer of MODEL's denoiser with every option "
        "(default: the reference's uaq / kmeans_c / kmeans_a at 4 and 3 bits) and save codes + tables in one "
        "safetensors file. Other options: uaq_ls-B (least-squares refit), uaq_g<N>-B (per group of N), "
        "int8, int8_c, fp8_e4m3. A killed build resumes when rerun; options whose method settings changed "
        "are recomputed.",
    )
    from .arguments import add_device_argument, add_pipeline_class_argument, add_progress_argument, add_weights_argument

    p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    add_weights_argument(p, help="hub id or local diffusers folder (default: the official hub id), or 'random', "
                         "'tiny', 'shipped' (digits)")
    add_pipeline_class_argument(p)
    p.add_argument("--out", default=None, help="output .safetensors (default: multiquantizers/<model>-<weights>.safetensors)")
    p.add_argument("--options", nargs="+", default=list(OPTION_NAMES), metavar="OPTION", help="options to compute (default: %(default)s)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="pipeline components to quantize together into one file, comma-separated: text_encoder "
                   "(text_encoder_2, text_encoder_3), denoiser, vae_decoder, or 'all' (default: the denoiser alone, "
                   "layer names unprefixed). Layer names of a pipeline file start with their component; one "
                   "component is held in fp32 memory at a time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for large layers (default: the free cores)")
    add_device_argument(p, help="device for loading and quantizer math (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init for --weights random/tiny")
    p.add_argument("--restart", action="store_true", help="discard an unfinished build instead of resuming it")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.multiquantize import describe_build, multiquantize

    mq, out = multiquantize(args.model, weights=args.weights, pipeline_class=args.pipeline_class, out=args.out,
                            options=args.options, device=args.device, threads=args.threads, seed=args.seed,
                            resume=not args.restart, progress=not args.no_progress, components=args.components)
    print(describe_build(mq, out))
    return 0
