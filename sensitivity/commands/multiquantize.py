"""``sensitivity multiquantize MODEL``: build the multiquantizer file of a model's denoiser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

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
    from ..zoo.cli_args import add_pipeline_class_argument

    p.add_argument("model", help="model family (see `sensitivity models`), or 'diffusers' for any pipeline folder")
    p.add_argument("--weights", default=None, help="hub id or local diffusers folder (default: the official hub id), "
                   "or 'random', 'tiny', 'shipped' (digits)")
    add_pipeline_class_argument(p)
    p.add_argument("--out", default=None, help="output .safetensors (default: multiquantizers/<model>-<weights>.safetensors)")
    p.add_argument("--options", nargs="+", default=list(OPTION_NAMES), metavar="OPTION", help="options to compute (default: %(default)s)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="pipeline components to quantize together into one file, comma-separated: text_encoder "
                   "(text_encoder_2, text_encoder_3), denoiser, vae_decoder, or 'all' (default: the denoiser alone, "
                   "layer names unprefixed). Layer names of a pipeline file start with their component; one "
                   "component is held in fp32 memory at a time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for large layers (default: the free cores)")
    p.add_argument("--device", default=None, help="device for loading and quantizer math (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init for --weights random/tiny")
    p.add_argument("--restart", action="store_true", help="discard an unfinished build instead of resuming it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def default_out(model: str, weights: str | None) -> Path:
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", (weights or "hub").strip("/").split("/")[-1])
    return Path("multiquantizers") / f"{model}-{tag}.safetensors"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checks import check_device, check_finite_weights
    from ..errors import SensitivityError
    from ..io import check_writable
    from ..multiquantizer import build_multiquantizer
    from ..options import QuantOption
    from ..zoo import get_family

    options = [QuantOption.parse(o).name for o in args.options]  # bad names fail before the model loads
    if args.threads is not None and args.threads < 1:
        raise SensitivityError(f"--threads must be >= 1, got {args.threads}")
    check_device(args.device)
    from ..zoo.cli_args import family_name

    fam = get_family(family_name(args))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.weights if args.weights is not None else (getattr(fam, "default_weights", None) or fam.hub_id)
    out = Path(args.out) if args.out else default_out(fam.name, weights)
    check_writable(out, "--out")
    if args.components is not None:
        from ..pipeline_quant import build_pipeline_components

        mq = build_pipeline_components(fam, weights, args.components, out, options=options, device=device,
                                       seed=args.seed, threads=args.threads, resume=not args.restart,
                                       progress=not args.no_progress)
        return _summary(out, mq)
    denoiser = fam.load_denoiser(weights, device=device, dtype=torch.float32, seed=args.seed)
    layers = fam.find_layers(denoiser)
    check_finite_weights(denoiser, layers, f"--weights {weights}")  # before the build makes its resume folder
    mq = build_multiquantizer(
        denoiser,
        out,
        layers,
        model_id=fam.model_id(weights),
        options=options,
        device=device,
        threads=args.threads,
        resume=not args.restart,
        progress=not args.no_progress,
        extra={"family": fam.name, "weights": str(weights), "seed": args.seed},
    )
    return _summary(out, mq)


def _summary(out: Path, mq) -> int:
    size = out.stat().st_size
    fp16 = mq.fp16_bytes()
    if mq.components:
        print("components: " + ", ".join(f"{n} {c['layers']} layers" for n, c in mq.components.items() if c["layers"]))
    print(
        f"wrote {out}: {len(mq)} layers x {len(mq.options)} options, {size / 2**20:.1f} MiB "
        f"({size / fp16:.2f}x the fp16 weights), built in {mq.manifest['build_seconds']:.1f} s "
        f"({mq.manifest['resumed_layers']} layers resumed, {mq.manifest['recomputed_options']} options recomputed)"
    )
    return 0
