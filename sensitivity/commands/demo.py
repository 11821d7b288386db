"""``sensitivity demo``: the whole pipeline on the embedded digits model, offline, on a laptop.

The steps are :class:`sensitivity.workflows.demo.DemoRun`'s; this command parses and runs them.

Steps (each prints what it does and the command a user would run for it):

1. multiquantizer of ``digits-dit`` (six options per layer);
2. a few configs evaluated for real: full precision, all ``uaq-4``, all ``kmeans_a-3``, one random
   mixed config (``results.json``, a PNG grid per config in ``images/``);
3. the evaluation job: random configs into a crash-safe cache (resumable: rerun the same command);
4. a predictor trained with k-fold cross-validation next to its baselines (``predictor/report.md``);
5. search at each target (3.4 / 3.6 / 3.8 / 4.0 bits), each searched config evaluated for real next to
   the best random cache config at the same or fewer bits, the best uniform config, the
   per-layer-error ILP (MixDQ / HAWQ style), SDNQ's rule and the reference's top-1 rule at the same
   target (the allocators that need no labels beyond the job's: ``sensitivity.allocators``);
6. insight tables and figures (``insights/``) and the summary table (``summary.md``, ``summary.json``).

``--quick`` runs a smaller job (fewer configs and images) to see every step in a few minutes.
"""

from __future__ import annotations

import argparse

from ..workflows.demo import DIGITS_MODELS, FULL, QUICK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on the embedded digits model (offline)",
        description=__doc__.split("\n\n")[0] + " Writes everything under --out; rerunning resumes.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--model", default="digits-dit", choices=DIGITS_MODELS, help="embedded model (default digits-dit)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="quantize these pipeline components together (multiquantize --components: text_encoder, "
                   "denoiser, vae_decoder or 'all'; digits-sd) and search them under one budget (default: the denoiser)")
    p.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                   help="options of the multiquantizer (default: the six of the reference)")
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK['num_configs']} configs x {10 * QUICK['images_per_class']} images "
                        f"(default {FULL['num_configs']} x {10 * FULL['images_per_class']})")
    p.add_argument("--num-configs", type=int, default=None, help="random configs of the evaluation job")
    p.add_argument("--images-per-class", type=int, default=None, help="images per digit class in every evaluation")
    p.add_argument("--targets", default="3.4,3.6,3.8,4.0", help="average-bit targets of the search (comma list)")
    p.add_argument("--predictor", default=None,
                   help="predictor kind to train and search with (default ensemble: gnn + additive)")
    p.add_argument("--check-images-per-class", type=int, default=None,
                   help="images per class of the held-out check that measures searched and baseline configs on "
                        f"other seeds (default {FULL['check_images_per_class']}, --quick "
                        f"{QUICK['check_images_per_class']})")
    p.add_argument("--metric", default="fid",
                   help="quality metric the predictor learns and the search optimises (default fid; psnr, kid, "
                        "accuracy work too)")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds of the predictor")
    p.add_argument("--workers", type=int, default=None, help="evaluation worker processes (default: min(2, cores))")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process and of each evaluation worker (default: the cores here, and "
                        "`sample`'s default per worker); the results do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random configs and of training (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.demo import demo_settings, run_demo

    settings = demo_settings(args.out, model=args.model, quick=args.quick, num_configs=args.num_configs,
                             images_per_class=args.images_per_class, targets=args.targets, predictor=args.predictor,
                             check_images_per_class=args.check_images_per_class, metric=args.metric,
                             folds=args.folds, workers=args.workers, seed=args.seed, components=args.components,
                             options=args.options, threads=args.threads)
    run = run_demo(settings)
    print("\n" + run.table)
    print("\n" + run.describe())
    return 0
