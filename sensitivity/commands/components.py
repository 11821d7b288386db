"""``sensitivity components MODEL``: quantize the text encoder, the denoiser and the VAE decoder one at
a time and report, per prompt, the image MSE / PSNR against full precision (the Olive workflow).

```
sensitivity components digits-sd --option int8 --out components_int8
sensitivity components sd15 --weights stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts train.txt --test-prompts test.txt \
    --option int8 --component-option denoiser=uaq-4 --config vae_decoder=vae_w4.json --out out/sd15_components
```
Writes ``OUT/components.csv`` (component x prompt), ``OUT/summary.csv``, ``OUT/components.json``,
``OUT/report.md``, ``OUT/grids/{fp,<component>}.png`` and ``OUT/multiquantizers/<component>.safetensors``
(layer rules per component: :mod:`sensitivity.components`). digits-sd uses its shipped prompt files
when ``--prompts`` / ``--test-prompts`` are not given.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_generation_arguments, add_model_arguments, add_progress_argument

    p = sub.add_parser("components", help="per-component quantization report (text encoder, denoiser, VAE decoder)",
                       description="Quantize each pipeline component alone (the others full precision), generate "
                       "every prompt with fixed seeds and write a table of image MSE and PSNR against full precision "
                       "(per prompt, averaged over train / test prompts) and an image grid per component.")
    add_model_arguments(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="train prompts, one per line (digits-sd default: its shipped prompts/train.txt)")
    p.add_argument("--test-prompts", default=None, metavar="FILE",
                   help="held-out prompts, one per line (digits-sd default: its shipped prompts/test.txt)")
    p.add_argument("--option", default=None,
                   help="quantization option for every component (any registered option: int8, uaq-3, ...)")
    p.add_argument("--component-option", action="append", default=[], metavar="COMPONENT=OPTION",
                   help="option for one component (repeatable), e.g. denoiser=uaq-4; fp16 leaves it unquantized")
    p.add_argument("--config", action="append", default=[], metavar="COMPONENT=FILE",
                   help="quantization config JSON over one component's layer names (repeatable)")
    p.add_argument("--components", default=None, metavar="NAMES",
                   help="comma-separated components to report (default: all with an option or config)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt, seeds SEED_BASE.. (default 1)")
    p.add_argument("--seed-base", type=int, default=0, help="image j of every prompt uses seed SEED_BASE + j")
    p.add_argument("--out", required=True, help="output folder")
    add_progress_argument(p)
    add_generation_arguments(p)
    p.set_defaults(func=run)


def _pairs(items, flag: str) -> dict:
    from ..errors import SensitivityError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SensitivityError(f"{flag} {item!r}: expected COMPONENT=VALUE")
        out[name.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from ..workflows.components import component_report
    from .arguments import generation_overrides

    wanted = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    res = component_report(args.model, args.out, option=args.option,
                           component_options=_pairs(args.component_option, "--component-option"),
                           configs=_pairs(args.config, "--config"), components=wanted, prompts=args.prompts,
                           test_prompts=args.test_prompts, images_per_prompt=args.images_per_prompt,
                           seed_base=args.seed_base, weights=args.weights, pipeline_class=args.pipeline_class,
                           device=args.device, dtype=args.dtype, seed=args.seed, progress=not args.no_progress,
                           **generation_overrides(args))
    summary, prompt_sets, out = res.summary, res.prompt_sets, res.out
    n = sum(len(v) for v in prompt_sets.values())
    print(f"\n{'component':<16} {'options':<12} {'avg bits':>8} " +
          " ".join(f"{s + ' MSE':>10} {s + ' PSNR':>10}" for s in prompt_sets))
    for name, d in summary["components"].items():
        cells = " ".join(f"{d[s]['mse']:>10.3f} {d[s]['psnr']:>10.2f}" for s in prompt_sets if s in d)
        print(f"{name:<16} {'+'.join(d['options']):<12} {d['avg_bits']:>8.3f} {cells}")
    if "most_sensitive" in summary:
        print(f"most sensitive: {summary['most_sensitive']['component']} ({summary['most_sensitive']['by']})")
    print(f"{len(summary['components'])} components x {n} prompts x {args.images_per_prompt} image(s) in "
          f"{res.seconds:.1f} s -> {out / 'report.md'}, {out / 'components.csv'}, {out / 'summary.csv'}, "
          f"{out / 'grids'}/")
    return 0
