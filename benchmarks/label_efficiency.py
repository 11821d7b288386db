"""Label efficiency (issues 14 and 25): ground-truth Kendall τ and searched-config FID vs what the labels
cost, for random, active and paired low-image labels.

    python benchmarks/label_efficiency.py --random-cache caches/digits-dit.sqlite \
        --active-cache caches/digits-dit-active.sqlite --heldout caches/digits-dit-seed1.sqlite \
        --paired-cache caches/digits-dit-paired20.sqlite --truth caches/digits-dit-truth.sqlite \
        --strategies random,active,paired --out runs/label_efficiency

For each strategy and each N of ``--labels`` the predictor sees the first N labelled configs:
random = configs 0..N-1 of the random run (sampler index order), active = the first N of the active
run's labelling order (:func:`sensitivity.active.labelling_order`), paired = configs 0..N-1 of the random
run of ``--paired-cache`` (the same sampler seed, so the same configs as random, labelled with few images
and ``sample --paired-features``), one strategy ``paired:METRIC`` per ``--paired-metric`` (what its
predictor learns instead of FID), multifidelity = every label of ``--paired-cache`` as the cheap
fidelity plus configs 0..N-1 of the random run as the full one (:mod:`sensitivity.predictors.fidelity`:
members learning the paired metrics, a stack fitted on the N FID labels; its cost counts both). The prefix goes into a
temporary cache, :func:`sensitivity.predictors.train` fits ``--predictor`` on it (5-fold ensemble, as
``sensitivity train``); its Kendall τ is measured against the ground truth (``--truth``: its FID on 2,000
images per config; every strategy) and on the held-out cache (the FID strategies:
:func:`sensitivity.predictors.evaluate_on_cache`); :func:`sensitivity.search.search` finds the config at
each target and the held-out evaluator measures it on ``--images-per-class`` x 10 images (seeds from
``--check-seed``, 1,000,000 by default, the same for every row; each config measured once, kept in ``OUT/heldout_measured.json`` under
the protocol's signature). The cost axis is the labelling seconds of the N records (their
``timings.evaluate``: one single-threaded worker each, so CPU-seconds). Only the searched configs are
measured: :func:`sensitivity.comparison.compare_at_targets` would also measure the uniform, error-ILP and
best-cache baselines at every point, 3x the generation on a shared 2-core machine (its rows are
``benchmarks/compare_allocators.py``'s). Every (strategy, N, predictor) result is kept in ``OUT/parts/``,
so a killed run resumes. Writes ``OUT/label_efficiency.csv``, ``OUT/label_efficiency.json`` (the table, for
``python scripts/results_tables.py label-efficiency OUT/label_efficiency.json``), ``OUT/label_efficiency.md``
and the two-panel figure (x: labelling seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

CHECK_SEED = 1_000_000


class MeasuredOnce:
    """An evaluator whose ``evaluate(options)`` measures each config once (the held-out images are
    the same for every row, so a config searched twice is not generated twice). With ``path``, the
    measurements are kept in a JSON file under the protocol's signature, so a rerun reuses them."""

    def __init__(self, evaluator: Any, path: Path | None = None):
        self.evaluator = evaluator
        self.path = path
        self.signature = evaluator.protocol.signature()
        self.measured: Dict[str, Dict[str, Any]] = {}
        if path is not None and path.is_file():
            kept = json.loads(path.read_text())
            if kept.get("signature") == self.signature:
                self.measured = kept["measured"]
        self.seconds = 0.0

    def evaluate(self, options: Mapping[str, str]) -> Dict[str, Any]:
        from sensitivity.io import atomic_write_json

        key = json.dumps(sorted(dict(options).items()))
        if key not in self.measured:
            t0 = time.perf_counter()
            r = dict(self.evaluator.evaluate(dict(options)))
            self.seconds += time.perf_counter() - t0
            r.pop("timings", None)
            self.measured[key] = r
            if self.path is not None:
                atomic_write_json(self.path, {"signature": self.signature, "measured": self.measured}, indent=None)
        return dict(self.measured[key])


def random_order(cache_path: str, seed: int) -> List[Dict[str, Any]]:
    """Records of the random run of ``seed`` in ``cache_path``, in sampler index order."""
    from sensitivity.errors import SensitivityError
    from sensitivity.evaluation.cache import ConfigCache

    with ConfigCache(cache_path) as c:
        runs = [r for r in c.runs() if r["sampler"].get("algorithm", "").startswith("reference")
                and r["sampler"].get("seed") == seed]
        if len(runs) != 1:
            raise SensitivityError(f"{cache_path}: expected one random run of seed {seed}, found {len(runs)}")
        return c.records(runs[0]["run_id"])


def write_prefix(source: str, records: Sequence[Mapping[str, Any]], path: Path, label: str,
                 fidelity: str | None = None) -> None:
    """A cache holding ``records`` (one run, indices = labelling order) with ``source``'s protocol, as
    the cache's ``fidelity`` (default its own)."""
    from sensitivity.evaluation.cache import ConfigCache

    with ConfigCache(source) as src:
        sig, evaluation, stats = src.signature, src.evaluation, src.layer_stats
    with ConfigCache(path, signature=sig, evaluation=evaluation, create=True, fidelity=fidelity) as c:
        c.set_layer_stats(stats)
        run = c.register_run({"algorithm": "prefix", "of": label, "n": len(records)}, planned=len(records))
        for i, r in enumerate(records):
            c.add(r, run_id=run, index=i)


def label_seconds(records: Sequence[Mapping[str, Any]]) -> float:
    """Evaluation seconds the records cost (their ``timings.evaluate``, one worker each)."""
    return float(sum((r.get("timings") or {}).get("evaluate", 0.0) for r in records))


def run_point(strategy: str, n: int, kind: str, records: List[Dict[str, Any]], source: str, args, mq, sizes,
              evaluator: MeasuredOnce, measure: bool = True) -> Dict[str, Any]:
    """Train ``kind`` on the first ``n`` records, score it on the held-out cache, and (``measure``)
    search at every target and measure the searched configs."""
    from sensitivity.predictors import evaluate_on_cache, load_predictor, train
    from sensitivity.search import search

    prefix = records[:n]
    metric = strategy.split(":", 1)[1] if strategy.startswith("paired:") else "fid"
    cost = list(prefix)
    member = kind
    with tempfile.TemporaryDirectory(prefix="label-eff-") as tmp:
        cache = Path(tmp) / "prefix.sqlite"
        write_prefix(source, prefix, cache, f"{strategy}:{source}")
        if strategy == "multifidelity":  # every paired label as the cheap fidelity, the N FID labels as the full one
            from sensitivity.evaluation.cache import CHEAP

            cheap = random_order(args.paired_cache, args.seed)
            write_prefix(args.paired_cache, cheap, cache, f"cheap:{args.paired_cache}", fidelity=CHEAP)
            cost += cheap
            kind = "multifidelity"
        t0 = time.perf_counter()
        report = train(cache, Path(tmp) / "pred", model=mq.model_id.split(":", 1)[0], predictor=member, baselines=(),
                       folds=args.folds, seed=args.seed, metric=metric, scores=False, progress=False,
                       multiquantizer=args.multiquantizer,
                       cheap_metrics=args.cheap_list if strategy == "multifidelity" else None,
                       target_transform=args.target_transform)
        train_s = time.perf_counter() - t0
        held = evaluate_on_cache(Path(tmp) / "pred", args.heldout, kinds=[kind]) if metric == "fid" else None
        predictor = load_predictor(Path(tmp) / "pred", kind=kind)
    truth_tau = None
    if args.truth_records:
        from scipy.stats import kendalltau

        from sensitivity.evaluation.metric_specs import record_metric

        pred = predictor.predict([r["config"] for r in args.truth_records])  # higher = better
        truth_tau = float(kendalltau(pred, [-record_metric(r, "fid") for r in args.truth_records]).statistic)
    rows = []
    t1 = time.perf_counter()
    for t in (args.target_list if measure else []):
        res = search(predictor, mq, t, sizes=sizes)
        m = evaluator.evaluate(res.options)
        rows.append({"strategy": strategy, "labels": n, "predictor": member, "target": t, "config": "search",
                     "avg_bits": res.avg_bits, "predicted_fid": float(predictor.target.metric_of([res.predicted], res.avg_bits)[0]),
                     **{k: m.get(k) for k in ("fid", "kid", "accuracy", "psnr")}})
    search_s = time.perf_counter() - t1
    if strategy == "multifidelity":
        metric = "fid, stacking " + ", ".join(report["fidelity"]["n_cheap"])
    return {"strategy": strategy, "labels": n, "predictor": member, "metric": metric, "truth_tau": truth_tau,
            "truth_configs": len(args.truth_records),
            "tau": held["predictors"][kind]["kendall"] if held else None,
            "spearman": held["predictors"][kind]["spearman"] if held else None,
            "cv_tau": report["predictors"][kind]["mean"]["kendall"], "heldout_configs": held["n_configs"] if held else None,
            "label_eval_s": round(label_seconds(cost), 1), "train_s": round(train_s, 1),
            "search_and_measure_s": round(search_s, 1), "rows": rows,
            "full_precision": evaluator.evaluate({})}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if v != v else f"{v:.3f}"
    return "–" if v is None else str(v)


def markdown(d: Mapping[str, Any]) -> str:
    """The run's table from its JSON (``OUT/label_efficiency.json``; stdlib only: the results page renders it)."""
    cols = list(d["columns"])
    lines = [d["caption"], "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in d["table"]]
    lines += ["", target_line(d, "The FID strategies' predictors")]
    return "\n".join(lines) + "\n"


def target_line(d: Mapping[str, Any], who: str = "The predictors") -> str:
    """What a run's predictors learnt, from its JSON's ``target`` (runs made before ``--target-transform``
    existed did not record it: they learnt the FID itself)."""
    if d.get("target"):
        return f"{who} learn `{d['target']}` (`--target-transform`)."
    return (f"{who} learn `-fid`: this run predates `--target-transform` (its default is now `auto`, "
            "`-log(fid)`); `--target-transform none` reruns it as it was.")


def main(argv=None) -> int:
    from sensitivity.io import atomic_path, atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-cache", default="caches/digits-dit.sqlite")
    ap.add_argument("--active-cache", default="caches/digits-dit-active.sqlite")
    ap.add_argument("--heldout", default="caches/digits-dit-seed1.sqlite", help="cache of another sampler seed (τ)")
    ap.add_argument("--paired-cache", default="caches/digits-dit-paired20.sqlite",
                    help="the random run labelled with few images and --paired-features (strategy 'paired')")
    ap.add_argument("--paired-metric", default="psnr,fd_fp",
                    help="what the paired strategy's predictors learn (comma-separated: one strategy 'paired:METRIC' each)")
    ap.add_argument("--cheap-targets", default="", help="multifidelity: the paired metrics its members learn "
                    "(comma-separated; default: feature_mse, fd_fp, psnr)")
    ap.add_argument("--truth", default="caches/digits-dit-truth.sqlite",
                    help="ground-truth cache: every predictor's τ against its FID ('' to skip)")
    ap.add_argument("--truth-replicate", default="caches/digits-dit-truth-seed2.sqlite",
                    help="some of the truth's configs on another image-seed set: the FID noise of one measurement "
                         "at the truth's size ('' to skip)")
    ap.add_argument("--multiquantizer", default="multiquantizers/digits-dit.safetensors")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed of both runs, and the folds' seed")
    ap.add_argument("--labels", default="40,80,160,320")
    ap.add_argument("--strategies", default="random,active", help="which orders to run (the table and figure "
                    "show every part in OUT/parts)")
    ap.add_argument("--targets", default="3.4,3.6,3.8,4.0")
    ap.add_argument("--predictor", default="lightgbm", help="predictor kind(s) trained at every N, comma-separated")
    ap.add_argument("--tau-only", default="", help="predictor kind(s) of which only the held-out τ is measured "
                    "(no search), e.g. additive")
    ap.add_argument("--gnn-at", default="", help="also train the GNN at these N (comma-separated, e.g. 320)")
    ap.add_argument("--folds", type=int, default=5)
    from sensitivity.evaluation.metric_specs import TRAIN_TRANSFORMS

    ap.add_argument("--target-transform", choices=TRAIN_TRANSFORMS, default="auto",
                    help="the predictors' target: the metric or its log (sensitivity train --target-transform)")
    ap.add_argument("--images-per-class", type=int, default=20, help="held-out images per class (10 classes)")
    ap.add_argument("--check-seed", type=int, default=CHECK_SEED,
                    help="first image seed of the searched configs' measurement (2000000 with --images-per-class "
                         "200: the ground truth's protocol)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="runs/label_efficiency")
    ap.add_argument("--figure", default=None, help="figure path (default OUT/label_efficiency.png)")
    args = ap.parse_args(argv)
    args.target_list = [float(t) for t in args.targets.split(",") if t.strip()]
    args.cheap_list = [m.strip() for m in args.cheap_targets.split(",") if m.strip()] or None
    labels = [int(n) for n in args.labels.split(",") if n.strip()]
    kinds = [k.strip() for k in args.predictor.split(",") if k.strip()]
    gnn_at = {int(n) for n in args.gnn_at.split(",") if n.strip()}
    tau_only = [k.strip() for k in args.tau_only.split(",") if k.strip() and k.strip() not in kinds]

    import pandas as pd
    import torch

    from sensitivity.active import labelling_order
    from sensitivity.errors import SensitivityError
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.sizes import SizeTable
    from sensitivity.zoo import get_family

    from sensitivity.provenance import run_provenance

    started = run_provenance()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if not set(strategies) <= {"random", "active", "paired", "multifidelity"}:
        raise SensitivityError(f"--strategies {args.strategies!r}: use random, active, paired, multifidelity")
    from sensitivity.evaluation.cache import read_records

    args.truth_records = sorted(read_records(args.truth), key=lambda r: r["index"]) if args.truth else []
    orders = {}
    if "random" in strategies:
        orders["random"] = (args.random_cache, random_order(args.random_cache, args.seed))
    if "paired" in strategies:
        paired = random_order(args.paired_cache, args.seed)
        for metric in [m.strip() for m in args.paired_metric.split(",") if m.strip()]:
            orders[f"paired:{metric}"] = (args.paired_cache, paired)
    if "multifidelity" in strategies:  # N FID labels of the random run + every label of the paired cache
        orders["multifidelity"] = (args.random_cache, random_order(args.random_cache, args.seed))
    if "active" in strategies:
        orders["active"] = (args.active_cache, labelling_order(args.active_cache, seed=args.seed, limit=max(labels)))
    for name, (path, recs) in orders.items():
        if len(recs) < min(labels):
            raise SensitivityError(f"{path}: the {name} run has {len(recs)} labelled configs, fewer than {min(labels)}")
        if len(recs) < max(labels):
            print(f"note: {path}: the {name} run has {len(recs)} labelled configs: its points stop there")
    mq = load_multiquantizer(args.multiquantizer)
    sizes = SizeTable.from_multiquantizer(mq)
    fam_name, _, weights = mq.model_id.partition(":")
    fam = get_family(fam_name)
    pipe = fam.load_pipeline(weights or None)
    check = EvalProtocol.for_family(fam, weights or None, n_per_class=args.images_per_class, seed=args.check_seed,
                                    multiquantizer_hash=mq.hash, dtype="float32")
    evaluator = MeasuredOnce(Evaluator(fam, pipe, mq, check), out / "heldout_measured.json")
    t_start = time.time()
    fits = {s: [n for n in labels if n <= len(orders[s][1])] for s in orders}
    todo = [(s, n, k) for k in kinds for s in orders for n in fits[s]]
    todo += [(s, n, "gnn") for s in orders for n in fits[s] if n in gnn_at and "gnn" not in kinds]
    todo += [(s, n, k) for k in tau_only for s in orders for n in fits[s]]
    for strategy, n, kind in todo:
        part = out / "parts" / f"{strategy.replace(':', '_')}-{n}-{kind}.json"
        if part.is_file():
            print(f"{strategy} {n} {kind}: done before ({part})", flush=True)
            continue
        src, recs = orders[strategy]
        p = run_point(strategy, n, kind, recs, src, args, mq, sizes, evaluator, measure=kind not in tau_only)
        p.update({"images": check.num_images, "image_seeds": f"{args.check_seed}..{args.check_seed + check.num_images - 1}",
                  "seed": args.seed})
        atomic_write_json(part, p)
        fids = "–" if not p["rows"] else ", ".join(f"{r['target']:g}: {r['fid']:.3f}" for r in p["rows"] if r["config"] == "search")
        taus = f"truth tau {p['truth_tau']:.3f}" if p.get("truth_tau") is not None else ""
        taus += f", held-out tau {p['tau']:.3f}" if p.get("tau") is not None else ""
        print(f"{strategy} {n} {kind}: {taus}, labels {p['label_eval_s']:.0f} s, searched FID {fids} "
              f"(train {p['train_s']:.0f} s, search+measure {p['search_and_measure_s']:.0f} s)", flush=True)

    points = [json.loads(f.read_text()) for f in sorted((out / "parts").glob("*.json"))]
    points = [p for p in points if p["labels"] in labels and p.get("seed") == args.seed
              and p.get("images") == check.num_images and p["strategy"] in orders]
    rows = [{k: v for k, v in p.items() if k not in ("rows", "full_precision")} | r for p in points for r in p["rows"]]
    df = pd.DataFrame(rows)
    summary = pd.DataFrame([{k: v for k, v in p.items() if k not in ("rows", "full_precision")} for p in points])
    search = df[df["config"] == "search"].pivot_table(index=["predictor", "strategy", "labels"], columns="target",
                                                      values="fid").add_prefix("FID@")
    for col in ("truth_tau", "metric"):
        if col not in summary:
            summary[col] = None
    summary["metric"] = summary["metric"].fillna("fid")
    table = summary.set_index(["predictor", "strategy", "labels"])[
        ["metric", "label_eval_s", "truth_tau", "tau", "cv_tau"]].join(search)
    table["mean searched FID"] = search.mean(axis=1)
    rank = {k: i for i, k in enumerate(kinds + ["gnn"] + tau_only)}
    table = table.reset_index()
    table = table.assign(_k=table["predictor"].map(rank)).sort_values(["_k", "labels", "strategy"]).drop(columns="_k")
    table = table.rename(columns={"tau": "held-out τ", "cv_tau": "5-fold CV τ", "truth_tau": "truth τ",
                                  "label_eval_s": "labelling s", "metric": "learns"})
    fp = points[0]["full_precision"]
    with atomic_path(out / "label_efficiency.csv") as tmp:
        df.to_csv(tmp, index=False)
    caption = (f"Kendall τ against the ground truth's FID ({args.truth}, {len(args.truth_records)} configs; "
               f"`truth τ`) and on {args.heldout} (`held-out τ`, the FID strategies), and held-out FID "
               f"({points[0]['images']} images, seeds {points[0]['image_seeds']}; full precision {fp['fid']:.3f}) of "
               f"the searched config, by strategy and labelled configs (`labelling s`: the labels' single-worker "
               f"evaluation seconds), seed {args.seed}.")
    truth_seeds = []
    if args.truth:
        from sensitivity.evaluation.cache import ConfigCache

        with ConfigCache(args.truth) as c:
            truth_seeds = list((c.evaluation or {}).get("seeds") or [])
    if args.truth_replicate and truth_seeds == list(check.seeds):  # the searched configs measured as the truth
        import numpy as np

        from sensitivity.evaluation.metric_specs import record_metric

        first = {r["config_hash"]: record_metric(r, "fid") for r in args.truth_records}
        diffs = [first[r["config_hash"]] - record_metric(r, "fid") for r in read_records(args.truth_replicate)
                 if r["config_hash"] in first]
        if len(diffs) >= 3:
            sigma = float(np.std(diffs, ddof=1) / np.sqrt(2))
            caption += (f" Noise: one FID measurement of the truth's protocol varies by σ = {sigma:.3f} between "
                        f"image-seed sets (the spread of the paired differences of {len(diffs)} configs measured "
                        f"on two sets, / √2), so two searched configs' FIDs closer than 2√2·σ = "
                        f"{2 * np.sqrt(2) * sigma:.2f} are a tie.")
    from sensitivity.evaluation.metric_specs import resolve_transform
    from sensitivity.predictors import Target

    fid_target = Target("fid", transform=resolve_transform(args.target_transform, "fid"))
    report = {"caption": caption, "model": fam_name, "columns": [str(c) for c in table.columns],
              "table": json.loads(table.to_json(orient="records")), "full_precision": fp,
              "target": fid_target.describe(),
              "command": "python benchmarks/label_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "provenance": run_provenance(started)}
    atomic_write_json(out / "label_efficiency.json", report)
    md = markdown(report)
    with atomic_path(out / "label_efficiency.md") as tmp:
        Path(tmp).write_text(md)
    print(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    palette = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"])
    colors = {"random": "tab:blue", "active": "tab:orange"}
    colors.update({s: next(palette, "tab:gray") for s in table["strategy"].unique() if s not in colors})
    tau_col = "truth τ" if table["truth τ"].notna().any() else "held-out τ"
    for (kind, strategy), g in table.groupby(["predictor", "strategy"], sort=False):  # noqa: B007
        g = g.sort_values("labels")
        ls = "-" if kind == kinds[0] else ":"
        lab = f"{strategy} ({kind})"
        a1.plot(g["labelling s"], g[tau_col], marker="o", ls=ls, color=colors[strategy], label=lab)
        if g["mean searched FID"].notna().any():
            a2.plot(g["labelling s"], g["mean searched FID"], marker="o", ls=ls, color=colors[strategy], label=lab)
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("labelling seconds (one single-threaded worker)")
        a.grid(alpha=0.3)
    a1.set_ylabel("Kendall τ vs the ground truth's FID" if tau_col == "truth τ"
                  else f"held-out Kendall τ ({points[0]['heldout_configs']} configs, seed 1)")
    a2.set_ylabel(f"held-out FID, mean over {', '.join(f'{t:g}' for t in args.target_list)} bits")
    a2.axhline(fp["fid"], color="grey", lw=0.8, ls="--", label="full precision")
    a1.legend(fontsize=8)
    a2.legend(fontsize=7)
    fig.suptitle(f"{fam_name}: labels by cost ({points[0]['images']} held-out images)", fontsize=10)
    fig.tight_layout()
    figure = Path(args.figure) if args.figure else out / "label_efficiency.png"
    with atomic_path(figure, "--figure") as tmp:
        fig.savefig(tmp, dpi=110)
    print(f"wrote {out}/label_efficiency.csv, label_efficiency.md, {figure} in {time.time() - t_start:.0f} s "
          f"({evaluator.seconds:.0f} s measuring {len(evaluator.measured)} configs; {platform.node()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
