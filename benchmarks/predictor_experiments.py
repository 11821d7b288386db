"""Predictor experiments of issue 14: cross-validated τ on the training cache (the only thing used to
choose) next to held-out τ and cache-restricted regret on another cache (reported, never tuned on).

    python benchmarks/predictor_experiments.py --train caches/digits-dit.sqlite \
        --heldout caches/digits-dit-seed1.sqlite \
        --member gnn=predictors/digits-dit:gnn --member lightgbm=predictors/digits-dit:lightgbm \
        --ensemble gnn,lightgbm,additive --out predictors/experiments.json

``--member NAME=FOLDER:KIND`` is one member of a trained predictor folder (``sensitivity train``);
its cross-validated τ comes from its out-of-fold predictions (each config scored by the fold model
that did not see it, the folder's folds), its held-out numbers from the fold ensemble. ``--ensemble
A,B,...`` scores the equal-weight mean of those members' predictions (target units) and their rank
average; members of one ensemble must share folds (same ``--folds``/``--seed``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, rankdata

TARGETS = (3.4, 3.6, 3.8, 4.0)


def fold_taus(y, pred, fold_of):
    return [float(kendalltau(y[fold_of == f], pred[fold_of == f])[0]) for f in np.unique(fold_of)]


def main(argv=None) -> int:
    from sensitivity.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--member", action="append", default=[], metavar="NAME=FOLDER:KIND")
    ap.add_argument("--ensemble", action="append", default=[], metavar="A,B,...")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from sensitivity.predictors.metrics import cache_regret
    from sensitivity.predictors.pipeline import evaluate_on_cache, out_of_fold_predictions

    targets = [float(t) for t in args.targets.split(",")]
    cv, ho, folds = {}, {}, {}
    y_tr = y_ho = metric = bits = None
    for item in args.member:
        name, _, rest = item.partition("=")
        folder, _, kind = rest.rpartition(":")
        o = out_of_fold_predictions(folder, args.train, kind)
        r = evaluate_on_cache(folder, args.heldout, [kind])
        y_tr, folds[name] = np.asarray(o["y"]), np.asarray(o["fold_of"])
        cv[name] = np.asarray(o["pred"])
        ho[name] = np.asarray(r["predictions"][kind])
        y_ho, metric, bits = np.asarray(r["y"]), np.asarray(r["metric"]), np.asarray(r["avg_bits"])
    for e in args.ensemble:
        parts = e.split(",")
        if any(not np.array_equal(folds[parts[0]], folds[p]) for p in parts):
            raise SystemExit(f"ensemble {e}: members trained on different folds")
        cv[f"mean({e})"] = np.mean([cv[p] for p in parts], 0)
        ho[f"mean({e})"] = np.mean([ho[p] for p in parts], 0)
        folds[f"mean({e})"] = folds[parts[0]]
        # rank average: ranks within each held-out fold (CV) / within the held-out cache
        f0 = folds[parts[0]]
        rk = np.zeros(len(y_tr))
        for f in np.unique(f0):
            idx = f0 == f
            rk[idx] = np.sum([rankdata(cv[p][idx]) for p in parts], 0)
        cv[f"rank({e})"], folds[f"rank({e})"] = rk, f0
        ho[f"rank({e})"] = np.sum([rankdata(ho[p]) for p in parts], 0)
    rows = {}
    for name in cv:
        ft = fold_taus(y_tr, cv[name], folds[name])
        reg = cache_regret(metric, bits, ho[name], targets)
        rows[name] = {"cv_kendall_mean": float(np.mean(ft)), "cv_kendall_std": float(np.std(ft, ddof=1)),
                      "cv_kendall_folds": ft, "heldout_kendall": float(kendalltau(y_ho, ho[name])[0]),
                      "heldout_regret": reg}
    print(f"training cache {args.train} (CV, {len(y_tr)} configs) / held-out {args.heldout} ({len(y_ho)} configs)\n")
    print("| predictor | CV Kendall τ (mean ± std over folds) | held-out Kendall τ | "
          + " | ".join(f"regret @{t:g}" for t in targets) + " |")
    print("|---|---:|---:|" + "---:|" * len(targets))
    for name, r in sorted(rows.items(), key=lambda x: -x[1]["cv_kendall_mean"]):
        print(f"| {name} | {r['cv_kendall_mean']:.3f} ± {r['cv_kendall_std']:.3f} | {r['heldout_kendall']:.3f} | "
              + " | ".join(f"{g['regret']:.3f}" for g in r["heldout_regret"]) + " |")
    best = {t: next(g for g in rows[next(iter(rows))]["heldout_regret"] if g["target"] == t) for t in targets}
    print("\nbest held-out FID at or under each target: "
          + ", ".join(f"{t:g}: {best[t]['best']:.3f} ({best[t]['n']} configs)" for t in targets))
    out = Path(args.out)
    atomic_write_json(out, {"train": args.train, "heldout": args.heldout, "members": args.member,
                            "ensembles": args.ensemble, "targets": targets, "results": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
