"""Joint whole-pipeline search vs denoiser-only search at equal whole-pipeline bytes (digits-sd).

One run, through the library API (every step resumes from what an earlier run left in ``--work``):

1. multiquantizers of digits-sd with the same options (the reference's six + ``int8``): the whole
   pipeline (``--components all``: text encoder, denoiser, VAE decoder) and the denoiser alone;
2. labels: ``--num-configs`` random configs of each (configs sampled over every component of its file)
   x ``--images`` images of the shipped eval prompts (seeds ``0..``), ``--steps`` DDIM steps, into
   two SQLite caches (``sensitivity sample``);
3. one predictor per cache (``sensitivity train``, ``--predictor`` kind, k-fold);
4. at each whole-pipeline byte budget (weights in memory: layers as stored + unquantized tensors at fp16,
   as ``search --target-memory``), four configs, each with memory <= the budget:

   * **joint**: the pipeline predictor's ``--target-memory`` search over all layers;
   * **(a) denoiser-only, rest fp16**: the denoiser predictor's search with the budget left after the
     text encoder and VAE decoder layers at fp16;
   * **(b) denoiser-only, rest int8**: the same with the text encoder and VAE decoder layers at ``int8``;
   * **(c) best uniform per component**: one option (or fp16) per component, all 8^3 assignments
     enumerated, the one the *pipeline predictor* rates best among those that fit (no held-out data);

   Added after the first run's held-out results were seen (the four above and their numbers unchanged):

   * **joint + refinement**: :func:`sensitivity.search.refined_search` on the same pipeline predictor and
     byte budget: the knapsack's configs as starts, then exact-budget local moves rated by the *whole*
     predictor (not its additive per-layer scores);
   * **joint error-ILP**: no predictor: the exact knapsack minimising the summed per-layer relative
     weight error ``||W-Q(W)||^2/||W||^2`` over all three components (``search --baseline error-ilp
     --target-memory``);

   and one budget below (b)'s smallest (``p-all4``: every quantized layer of the pipeline at 4 average
   bits), where only the joint configs and (c) fit;

5. every config measured on held-out images: prompts of the held-out caption templates (forms never
   used in training or labelling) from ``--heldout-prompt-seed``, image seeds ``--heldout-seed..``
   (disjoint from the labels' 0..), FID / KID / class accuracy with the shipped digits classifier,
   each with its bootstrap standard error and a paired bootstrap verdict against the joint config.

Budgets (fixed from the sizes before any label): (a)'s denoiser layers at 3.5 / 4.0 / 4.5 average bits
(the range where all four exist), and one lower budget, (b)'s denoiser at 4.0 bits, where (a) cannot fit;
added after the first run (from the sizes too): the whole pipeline's layers at 4.0 average bits.

    PYTHONPATH=. nice -n 5 python benchmarks/joint_pipeline_search.py --out joint_pipeline.json
    python scripts/results_tables.py joint-pipeline joint_pipeline.json   # docs/results/joint-pipeline.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

MODEL, WEIGHTS = "digits-sd", "shipped"
OPTIONS = ("uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3", "int8")
COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")
OTHERS = ("text_encoder", "vae_decoder")
BOOTSTRAP = 200
METHODS = {"joint": "joint search (all components)", "den_fp16": "(a) denoiser-only search, rest fp16",
           "den_int8": "(b) denoiser-only search, rest int8", "uniform": "(c) best uniform per component",
           # added after the first run's held-out results were seen
           "joint_refined": "joint search + whole-predictor refinement", "joint_error_ilp": "joint error-ILP (no predictor)"}
FIRST_RUN = ("joint", "den_fp16", "den_int8", "uniform")
# budget rules: (name, which denoiser-only baseline fixes the rest, the denoiser layers' average bits)
# ("all": every quantized layer of the pipeline at the average bits; added after the first run)
BUDGETS = (("b-den4", "int8", 4.0), ("a-den3.5", "fp16", 3.5), ("a-den4", "fp16", 4.0), ("a-den4.5", "fp16", 4.5),
           ("p-all4", "all", 4.0))
ADDED_BUDGETS = ("p-all4",)


def log(text: str) -> None:
    print(text, flush=True)


def component_layers(table, comp: str) -> List[str]:
    return [l for l in table.layers if l.split(".", 1)[0] == comp]


def layer_bytes(table, layers, option: str) -> int:
    """Stored bytes of ``layers`` all at ``option`` (fp16: their fp16 bytes)."""
    if option == "fp16":
        return int(sum(int(table.fp16_bytes[table.index[l]]) for l in layers))
    j = table.opt_index[option]
    return int(sum(int(table.nbytes[table.index[l], j]) for l in layers))


def budgets(mq) -> List[Dict[str, Any]]:
    """The byte budgets of the comparison (from the sizes alone)."""
    from sensitivity.search.memory import fixed_bytes

    t = mq.size_table()
    fixed = fixed_bytes(mq)
    den = component_layers(t, "denoiser")
    out = []
    for name, rest, bits in BUDGETS:
        if rest == "all":
            b = fixed + int(t.fp16_total * bits / 16)
            rule = f"unquantized + every quantized layer of the three components at {bits:g} average bits"
        else:
            others = sum(layer_bytes(t, component_layers(t, c), rest) for c in OTHERS)
            b = fixed + others + int(layer_bytes(t, den, "fp16") * bits / 16)
            rule = (f"unquantized + text encoder and VAE decoder layers at {rest} + denoiser layers at {bits:g} "
                    "average bits")
        out.append({"name": name, "bytes": int(b), "rule": rule, "added": name in ADDED_BUDGETS})
    return out


def smallest(mq) -> Dict[str, int]:
    """The smallest whole-pipeline bytes of the joint configs and of (a) / (b) (denoiser at its smallest)."""
    from sensitivity.search.memory import fixed_bytes

    t = mq.size_table()
    fixed = fixed_bytes(mq)
    den_min = int(sum(int(t.nbytes[t.index[l]].min()) for l in component_layers(t, "denoiser")))
    return {"joint": fixed + int(t.min_bytes()),
            **{f"den_{rest}": fixed + den_min + sum(layer_bytes(t, component_layers(t, c), rest) for c in OTHERS)
               for rest in ("fp16", "int8")}}


def describe(mq, options: Mapping[str, str]) -> Dict[str, Any]:
    """Memory, per-component bytes and per-component average bits of the layers of a pipeline config."""
    from sensitivity.config import config_hash
    from sensitivity.search.memory import component_bytes, config_memory

    t = mq.size_table()
    opts = {l: o for l, o in options.items() if o != "fp16"}
    comp_bits, mix = {}, {}
    for c in COMPONENTS:
        layers = component_layers(t, c)
        fp = layer_bytes(t, layers, "fp16")
        q = sum(layer_bytes(t, [l], opts.get(l, "fp16")) for l in layers)
        comp_bits[c] = round(16.0 * q / fp, 4)
        counts: Dict[str, int] = {}
        for l in layers:
            counts[opts.get(l, "fp16")] = counts.get(opts.get(l, "fp16"), 0) + 1
        mix[c] = dict(sorted(counts.items()))
    q, fp = t.config_bytes(opts)
    return {"memory_bytes": config_memory(mq, opts), "component_bytes": component_bytes(mq, opts),
            "avg_bits": round(16.0 * q / fp, 4), "component_avg_bits": comp_bits, "option_mix": mix,
            "config_hash": config_hash(opts)}


def best_uniform(mq, predictor, budget: int) -> Optional[Dict[str, str]]:
    """The per-component uniform assignment the predictor rates best among those within ``budget``."""
    import numpy as np

    from sensitivity.search.memory import config_memory

    t = mq.size_table()
    layers = {c: component_layers(t, c) for c in COMPONENTS}
    fitting = []
    for combo in itertools.product(("fp16",) + tuple(mq.options), repeat=len(COMPONENTS)):
        cfg = {l: o for c, o in zip(COMPONENTS, combo) if o != "fp16" for l in layers[c]}
        if config_memory(mq, cfg) <= budget:
            fitting.append((combo, cfg))
    if not fitting:
        return None
    pred = np.asarray(predictor.predict([cfg for _, cfg in fitting]), dtype=np.float64)
    return fitting[int(np.argmax(pred))][1]


def run(args) -> Dict[str, Any]:
    import torch

    from sensitivity.comparison import StoredEvaluator, cache_cost, mark_rows, paired_marks
    from sensitivity.evaluation.metric_specs import resolve_transform
    from sensitivity.evaluation.cache import read_records
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import load_multiquantizer
    from sensitivity.predictors import load_predictor, train
    from sensitivity.provenance import run_provenance
    from sensitivity.search import InfeasibleTargetError, error_ilp, memory_budget, refined_search, search
    from sensitivity.search.memory import memory_result
    from sensitivity.workflows.multiquantize import multiquantize
    from sensitivity.workflows.sample import sample
    from sensitivity.zoo import digits_sd as S
    from sensitivity.zoo import get_family

    started = run_provenance()
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    seconds: Dict[str, float] = {}

    # 1. multiquantizers ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    paths = {"joint": work / "pipeline.safetensors", "den": work / "denoiser.safetensors"}
    log(f"[1/5] multiquantizers of {MODEL}: {paths['joint']} (--components all), {paths['den']} (denoiser)")
    mq, _ = multiquantize(MODEL, weights=WEIGHTS, out=paths["joint"], options=OPTIONS, components="all",
                          threads=args.threads, progress=False)
    mq_den, _ = multiquantize(MODEL, weights=WEIGHTS, out=paths["den"], options=OPTIONS, threads=args.threads,
                              progress=False)
    t, td = mq.size_table(), mq_den.size_table()
    den_layers = component_layers(t, "denoiser")
    if sorted(f"denoiser.{l}" for l in mq_den.layer_names) != sorted(den_layers):
        raise SystemExit("error: the denoiser-only multiquantizer's layers differ from the pipeline's denoiser")
    same = all(abs(float(td.error[td.index[l], td.opt_index[o]]) - float(t.error[t.index["denoiser." + l], t.opt_index[o]]))
               <= 1e-6 for l in mq_den.layer_names for o in OPTIONS)
    seconds["multiquantize"] = round(time.perf_counter() - t0, 1)

    # 2. labels -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    caches = {"joint": work / "joint.sqlite", "den": work / "denoiser.sqlite"}
    proto = dict(num_images=args.images, steps=args.steps, weights=WEIGHTS, device="cpu")
    resumed: Dict[str, Dict[str, Any]] = {}
    for key in ("joint", "den"):
        log(f"[2/5] labels: {args.num_configs} configs of seed {args.seed} x {args.images} images, {args.steps} "
            f"steps -> {caches[key]}")
        res = sample(MODEL, str(paths[key]), caches[key], num_configs=args.num_configs, seed=args.seed, workers=1,
                     threads=args.threads, progress=not args.no_progress, **proto)
        if res.summary.failed:
            raise SystemExit(f"error: labelling {caches[key]} failed; rerun to resume")
        resumed[key] = {"labelled_before": int(res.summary.done_before), "labelled_now": int(res.summary.evaluated)}
    torch.set_num_threads(args.threads)
    seconds["label"] = round(time.perf_counter() - t0, 1)

    # 3. predictors ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    preds, cv, label_cost = {}, {}, {}
    for key in ("joint", "den"):
        out = work / f"predictor-{key}"
        records = read_records(caches[key])
        label_cost[key] = cache_cost(records)
        stamp = {"configs": len(records), "predictor": args.predictor, "folds": args.folds, "seed": args.seed,
                 "metric": "fid", "target_transform": resolve_transform("auto", "fid")}
        stamp_path = out / "trained_on.json"
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            report = json.loads((out / "report.json").read_text())
            resumed[key]["predictor_reused"] = True
        else:
            resumed[key]["predictor_reused"] = False
            log(f"[3/5] train {args.predictor} on {caches[key]} ({len(records)} configs, {args.folds}-fold)")
            report = train(caches[key], out, model=MODEL, predictor=args.predictor, baselines=("bits",),
                           folds=args.folds, seed=args.seed, metric="fid", multiquantizer=str(paths[key]),
                           progress=not args.no_progress)
            from sensitivity.io import atomic_write_json

            atomic_write_json(stamp_path, stamp, "the training stamp")
        cv[key] = {k: (r.get("mean") or {}) for k, r in (report.get("predictors") or {}).items() if isinstance(r, dict)}
        preds[key] = load_predictor(out)
    seconds["train"] = round(time.perf_counter() - t0, 1)

    # 4. configs at each budget ---------------------------------------------------------------------
    t0 = time.perf_counter()
    from sensitivity.search.memory import fixed_bytes

    fixed = fixed_bytes(mq)
    plan = budgets(mq)
    configs: Dict[str, Dict[str, Optional[Dict[str, str]]]] = {}
    predicted: Dict[str, Dict[str, Optional[float]]] = {}
    search_details: Dict[str, Dict[str, Dict[str, Any]]] = {}
    refine_kw = dict(starts=args.refine_starts, rounds=args.refine_rounds, pairs=args.refine_pairs, kappa=0.0,
                     offsets=(0.0, 0.02, 0.05, 0.1), levels=("layer", "module"), consensus=True)
    for b in plan:
        row: Dict[str, Optional[Dict[str, str]]] = {}
        extra: Dict[str, Dict[str, Any]] = {}
        mb = memory_budget(mq, b["bytes"], what="the pipeline multiquantizer")
        res = memory_result(search(preds["joint"], mq, None, sizes=mb.table, budget=mb.budget), mq, None, mb)
        row["joint"] = dict(res.options)
        log(f"[4/5] {b['name']}: refined search (starts {args.refine_starts}, rounds {args.refine_rounds})")
        rr = memory_result(refined_search(preds["joint"], mq, None, sizes=mb.table, budget=mb.budget, **refine_kw),
                           mq, None, mb)
        extra["joint_refined"] = {k: rr.details[k] for k in ("start", "moves", "rated", "gain", "knapsack_rating",
                                                             "rating")}
        extra["joint_refined"].update(candidates=len(rr.details["candidates"]), seconds=round(rr.seconds, 1))
        re = memory_result(error_ilp(mb.table, None, error="error", what="the pipeline multiquantizer",
                                     budget=mb.budget), mq, None, mb)
        extra["joint_error_ilp"] = {"summed_error": float(re.objective)}
        for key, rest in (("den_fp16", "fp16"), ("den_int8", "int8")):
            other = {l: rest for c in OTHERS for l in component_layers(t, c)}
            left = b["bytes"] - fixed - sum(layer_bytes(t, component_layers(t, c), rest) for c in OTHERS)
            try:
                mbd = memory_budget(mq_den, left, what="the denoiser multiquantizer")
                rd = memory_result(search(preds["den"], mq_den, None, sizes=mbd.table, budget=mbd.budget), mq_den,
                                   None, mbd)
                row[key] = {**{l: o for l, o in other.items() if o != "fp16"},
                            **{f"denoiser.{l}": o for l, o in rd.options.items()}}
            except InfeasibleTargetError:
                row[key] = None
        row["uniform"] = best_uniform(mq, preds["joint"], b["bytes"])
        row["joint_refined"], row["joint_error_ilp"] = dict(rr.options), dict(re.options)
        configs[b["name"]] = row
        search_details[b["name"]] = extra
        predicted[b["name"]] = {k: (None if c is None else float(preds["joint"].predict([c])[0])) for k, c in row.items()}
    seconds["search"] = round(time.perf_counter() - t0, 1)

    # 5. held-out measurement -----------------------------------------------------------------------
    t0 = time.perf_counter()
    fam = get_family(MODEL)
    heldout_prompts = S.prompt_list(S.TEST_TEMPLATES, args.heldout_images, seed=args.heldout_prompt_seed)
    label_prompts = set(S.read_prompt_file(fam.eval_prompts, args.images))
    overlap = sorted(set(heldout_prompts) & label_prompts)
    if overlap:
        raise SystemExit(f"error: held-out prompt {overlap[0]!r} is also a labelling prompt")
    if args.heldout_seed < args.images:
        raise SystemExit("error: --heldout-seed overlaps the labelling image seeds 0..")
    pipe = fam.load_pipeline(WEIGHTS)
    check = EvalProtocol.for_family(fam, WEIGHTS, conditions=heldout_prompts, seed=args.heldout_seed, steps=args.steps,
                                    multiquantizer_hash=mq.hash, dtype="float32")
    ev = Evaluator(fam, pipe, mq, check, bootstrap=BOOTSTRAP, bootstrap_seed=args.seed)
    stored = StoredEvaluator(ev, work / "heldout.jsonl", {**check.to_dict(), "bootstrap": BOOTSTRAP,
                                                          "bootstrap_seed": args.seed})
    log(f"[5/5] held-out: {check.num_images} images (held-out templates, prompt seed {args.heldout_prompt_seed}; "
        f"image seeds {args.heldout_seed}..), {args.steps} steps")
    fp = stored.evaluate({})
    keys = ("fid", "kid", "accuracy", "psnr")

    def metrics(m: Mapping[str, Any]) -> Dict[str, Any]:
        out = {k: m.get(k) for k in keys}
        boot = m.get("bootstrap") or {}
        for k in keys:
            if boot.get(k):
                import numpy as np

                out[f"{k}_se"] = float(np.std(np.asarray(boot[k], dtype=np.float64), ddof=1))
        return out

    results = []
    for b in plan:
        rows, reps = [], []
        for key, label in METHODS.items():
            cfg = configs[b["name"]][key]
            row: Dict[str, Any] = {"method": label, "key": key, "source": "search" if key == "joint" else key}
            if cfg is None:
                row["infeasible"] = True
                rows.append(row)
                reps.append(None)
                continue
            d = describe(mq, cfg)
            assert d["memory_bytes"] <= b["bytes"], (b, key, d["memory_bytes"])
            m = stored.evaluate(cfg)
            y = predicted[b["name"]][key]
            row.update(d, predicted_fid=None if y is None else float(preds["joint"].target.metric_of([y])[0]),
                       **metrics(m))
            if key not in FIRST_RUN:
                row.update(added=True, search=search_details[b["name"]].get(key, {}))
            rows.append(row)
            reps.append((m.get("bootstrap") or {}).get("fid"))
            fp_reps = (fp.get("bootstrap") or {}).get("fid")
            if reps[-1] is not None and fp_reps is not None:
                row["vs_full_precision"] = paired_marks([fp["fid"], m["fid"]], [fp_reps, reps[-1]], -1.0, 0)[1]
            log(f"  {b['name']} ({b['bytes']} B) {label}: {d['memory_bytes']} B, FID {m['fid']:.3f}, "
                f"accuracy {m['accuracy']:.3f}")
        # verdict over all rows (added ones included) and vs the joint config, then the first run's verdict
        # over its four configs alone (unchanged by the added rows)
        mark_rows(rows, reps, "fid", -1.0)
        for r in rows:
            if "verdict" in r:
                r["verdict_all"] = r.pop("verdict")
        first = [i for i, r in enumerate(rows) if r["key"] in FIRST_RUN]
        mark_rows([rows[i] for i in first], [reps[i] for i in first], "fid", -1.0)
        for r in rows:
            r.pop("source", None)
            if "vs_search" in r:
                r["vs_joint"] = r.pop("vs_search")
        results.append({**b, "rows": rows})
    seconds["heldout"] = round(time.perf_counter() - t0, 1)
    resumed["heldout"] = {"reused": int(stored.reused), "measured": int(stored.measured)}

    return {
        "model": MODEL, "weights": WEIGHTS, "options": list(OPTIONS), "seed": args.seed,
        "num_configs": args.num_configs, "images": args.images, "steps": args.steps,
        "label_prompts": f"the first {args.images} lines of the shipped eval prompts (training caption templates)",
        "label_image_seeds": [0, args.images - 1],
        "heldout": {"images": args.heldout_images, "prompt_seed": args.heldout_prompt_seed,
                    "prompts": "held-out caption templates (sensitivity.zoo.digits_sd.TEST_TEMPLATES)",
                    "image_seeds": [args.heldout_seed, args.heldout_seed + args.heldout_images - 1],
                    "bootstrap": BOOTSTRAP, "bootstrap_seed": args.seed},
        "predictor": args.predictor, "target": preds["joint"].target.describe(), "folds": args.folds, "predictor_cv": cv,
        "labels": {k: {"configs": n, "evaluate_s": round(s, 1)} for k, (n, s) in label_cost.items()},
        "refine": {k: list(v) if isinstance(v, tuple) else v for k, v in refine_kw.items()},
        "smallest_bytes": smallest(mq),
        "uniform_rule": "every assignment of one option (or fp16) per component that fits, rated by the joint "
                        "predictor (trained on the labelled cache); the best rated is measured",
        "denoiser_multiquantizers_agree": bool(same),
        "fixed_bytes": fixed, "fp16_pipeline_bytes": int(fixed + t.fp16_total),
        "full_precision": metrics(fp), "budgets": results, "seconds": seconds, "resumed": resumed,
        "total_seconds": round(time.perf_counter() - t_start, 1), "work": str(work),
        "provenance": run_provenance(started),
    }


# ------------------------------------------------------------------------------------------- report
def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _pm(row: Mapping[str, Any], k: str, digits: int = 3) -> str:
    if row.get(k) is None:
        return "–"
    se = row.get(f"{k}_se")
    return f"{row[k]:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{row[k]:.{digits}f}"


def _resumed(r: Mapping[str, Any]) -> str:
    """`` (this run resumed: ...)`` from a run's ``resumed`` record."""
    parts = [f"{k}: {v['labelled_now']} configs labelled now ({v['labelled_before']} before), predictor "
             + ("reused" if v.get("predictor_reused") else "trained") for k, v in r.items() if k != "heldout"]
    h = r.get("heldout") or {}
    parts.append(f"held-out: {h.get('measured', 0)} configs measured now, {h.get('reused', 0)} measurements reused")
    return " (this run in its work folder: " + "; ".join(parts) + ")"


def markdown(d: Mapping[str, Any]) -> str:
    """The results page body of a run's JSON (used by ``scripts/results_tables.py joint-pipeline``)."""
    h = d["heldout"]
    fp = d["full_precision"]
    kb = lambda b: f"{b / 1e3:,.1f}"  # noqa: E731
    lines = [
        f"`{d['model']}` ({d['weights']} weights), options {', '.join(f'`{o}`' for o in d['options'])} on every "
        f"quantized layer. Labels: {d['num_configs']} random configs per multiquantizer (seed {d['seed']}) x "
        f"{d['images']} images ({d['label_prompts']}; image seeds {d['label_image_seeds'][0]}.."
        f"{d['label_image_seeds'][1]}), {d['steps']} DDIM steps; predictor `{d['predictor']}` on FID, "
        f"{d['folds']}-fold. Held-out: {h['images']} images of {h['prompts']}, prompt seed {h['prompt_seed']}, "
        f"image seeds {h['image_seeds'][0]}..{h['image_seeds'][1]}, the same steps. {d['total_seconds'] / 60:.1f} "
        f"minutes in all" + (_resumed(d["resumed"]) if d.get("resumed") else "") + ".",
        "",
        "Distinct configs labelled (a repeated draw is labelled once): "
        + ", ".join(f"{k} {v['configs']}" for k, v in d["labels"].items())
        + f"; the predictors' {d['folds']}-fold Kendall τ on FID: "
        + ", ".join(f"{k} {(cv.get(d['predictor']) or {}).get('kendall', float('nan')):.3f}"
                    for k, cv in d["predictor_cv"].items()) + " (`joint`: the whole pipeline, `den`: the denoiser alone).",
        "",
        "Memory: whole-pipeline weight bytes as `search --target-memory` counts them (every quantized layer as "
        f"stored, everything else at fp16: {kb(d['fixed_bytes'])} kB of embeddings, norms, biases and the VAE "
        f"encoder); the whole pipeline at fp16 is {kb(d['fp16_pipeline_bytes'])} kB. Every config below is at or "
        "under its budget.",
        "",
        "- **joint**: the predictor trained on configs sampled over all three components, `search --target-memory`.",
        "- **(a)** / **(b)**: the predictor trained on denoiser-only configs (its own labels, same count and "
        "protocol), searched with the bytes left after the text encoder and VAE decoder layers at fp16 / `int8`.",
        f"- **(c)**: {d['uniform_rule']}.",
        "",
    ]
    rf = d.get("refine")
    if rf:
        sm = d["smallest_bytes"]
        lines += [
            "**Added after the first run's held-out results were seen** (the four configs above keep their "
            "configs and numbers; their `verdict` is still among those four):",
            "",
            "- **joint + refinement**: `sensitivity.search.refined_search` with the same pipeline predictor and byte "
            f"budget: the knapsack's configs at the budget less {', '.join(f'{o:g}' for o in rf['offsets'])} average "
            f"bits ({' and '.join(rf['levels'])} scores) as candidates, the {rf['starts']} the whole predictor rates "
            f"best climbed by single-layer and paired ({rf['pairs']} x {rf['pairs']}) moves within the budget, at most "
            f"{rf['rounds']} moves each, every move rated by the whole predictor (kappa {rf['kappa']:g}).",
            "- **joint error-ILP**: no predictor and no labels: the same exact knapsack over all three components "
            "minimising the summed per-layer relative weight error ||W-Q(W)||²/||W||² (`search --baseline error-ilp "
            "--target-memory`).",
            "- budget **p-all4** (every quantized layer of the pipeline at 4 average bits), below the smallest "
            f"(b) config ({kb(sm['den_int8'])} kB; (a): {kb(sm['den_fp16'])} kB), above the smallest pipeline "
            f"({kb(sm['joint'])} kB): only the joint configs and (c) fit.",
            "- `verdict (all)`: best / tie / worse against the lowest FID of every row of the budget, added ones "
            "included; `vs full precision`: better / tie / worse than the unquantized pipeline's held-out FID (the "
            "same paired bootstrap).",
            "",
        ]
    lines += [
        f"Full precision on the held-out images: FID {_pm(fp, 'fid')}, accuracy {_pm(fp, 'accuracy')}. "
        f"`± se`: bootstrap standard error over the held-out images ({h['bootstrap']} replicates, seed "
        f"{h['bootstrap_seed']}); `verdict` best / tie / worse against the budget's lowest FID and `vs joint` "
        "against the joint config, both by a paired bootstrap (tie: the 95 % interval of the difference holds 0).",
        "",
    ]
    wins = []
    for b in d["budgets"]:
        added = any(r.get("added") for r in b["rows"])
        lines += [f"## Budget {b['name']}: {kb(b['bytes'])} kB" + (" (added after the first run)" if b.get("added") else ""),
                  "", f"{b['rule']}.", "",
                  "| config | memory kB | text enc. kB (bits) | denoiser kB (bits) | VAE dec. kB (bits) | FID predicted (joint) | "
                  "held-out FID | accuracy | KID | verdict | vs joint |" + (" verdict (all) | vs full precision |" if added else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|" + ("---|---|" if added else "")]
        for r in b["rows"]:
            if r.get("infeasible"):
                lines.append(f"| {r['method']} | infeasible: does not fit | | | | | | | | | |" + (" | |" if added else ""))
                continue
            cb, bits = r["component_bytes"], r["component_avg_bits"]
            comp = " | ".join(f"{kb(cb[c])} ({bits[c]:.2f})" for c in ("text_encoder", "denoiser", "vae_decoder"))
            lines.append(f"| {r['method']} | {kb(r['memory_bytes'])} | {comp} | {_f(r.get('predicted_fid'))} | "
                         f"{_pm(r, 'fid')} | {_pm(r, 'accuracy')} | {_f(r.get('kid'), 4)} | {r.get('verdict', '–')} | "
                         f"{r.get('vs_joint', '–')} |"
                         + (f" {r.get('verdict_all', '–')} | {r.get('vs_full_precision', '–')} |" if added else ""))
        first = [r for r in b["rows"] if not r.get("added") and not r.get("infeasible")]
        if not b.get("added"):
            best = min(first, key=lambda r: r["fid"])
            joint = next(r for r in b["rows"] if r["key"] == "joint")
            wins.append((b["name"], best["key"] == "joint", best["method"], joint.get("verdict") in ("best", "tie")))
        lines.append("")
    n = sum(w for _, w, _, _ in wins)
    tied = sum(t for _, _, _, t in wins)
    lines += ["## Summary", "",
              f"The joint search has the lowest held-out FID at {n} of {len(wins)} budgets"
              + ("" if n == len(wins) else " (" + "; ".join(f"{name}: {m} lower" for name, w, m, _ in wins if not w) + ")")
              + f"; it is the best or tied with the best (paired bootstrap) at {tied} of {len(wins)}. "
              "The predicted FIDs are the joint predictor's, trained on the labelling images (a different image "
              "set and number than the held-out one, so their scale differs from the held-out FIDs)."]
    lines += _why_joint_loses(d, wins)
    if rf:
        lines += ["", "Added after the first run (every config and budget above):", ""]
        for b in d["budgets"]:
            measured = [r for r in b["rows"] if not r.get("infeasible")]
            best = min(measured, key=lambda r: r["fid"])
            ties = [r["method"] for r in measured if r is not best and r.get("verdict_all") == "tie"]
            used = "; ".join(f"{r['method']} {100.0 * r['memory_bytes'] / b['bytes']:.1f} %" for r in measured
                             if r["key"] in ("joint", "joint_refined", "joint_error_ilp"))
            ref = next((r for r in measured if r["key"] == "joint_refined"), None)
            rs = (ref or {}).get("search") or {}
            moves = "" if rs.get("knapsack_rating") is None else (
                f"; the refinement made {rs['moves']} moves"
                + (" (the cap)" if rs["moves"] >= rf["rounds"] else "")
                + f", rated (predicted `{d.get('target', '-fid')}`) {rs['knapsack_rating']:.3f} "
                f"(the knapsack's) -> {rs['rating']:.3f}")
            lines.append(f"- {b['name']}: lowest held-out FID {best['method']} ({best['fid']:.3f})"
                         + (f", tied (paired bootstrap) with {', '.join(ties)}" if ties else "")
                         + f". Budget used: {used}{moves}.")
    return "\n".join(lines) + "\n"


def _why_joint_loses(d: Dict[str, Any], wins) -> List[str]:
    """Where the joint search is not the lowest: what its rows show (same config at several budgets, budget used,
    per-component bits), computed from the run's data."""
    if all(w for _, w, _, _ in wins):
        return []
    firsts = [b for b in d["budgets"] if not b.get("added")]
    joint = [(b, next(r for r in b["rows"] if r["key"] == "joint")) for b in firsts]
    used = [100.0 * r["memory_bytes"] / b["bytes"] for b, r in joint]
    bits = {c: sorted({round(r["component_avg_bits"][c], 2) for _, r in joint}) for c in ("text_encoder", "vae_decoder")}
    below8 = {c: sorted({sum(n for o, n in r["option_mix"][c].items() if o not in ("int8", "fp16")) for _, r in joint})
              for c in ("text_encoder", "vae_decoder")}
    total = {c: sum(joint[0][1]["option_mix"][c].values()) for c in ("text_encoder", "vae_decoder")}

    def span(v, unit=""):
        return f"{v[0]}{unit}" if len(v) == 1 else f"{v[0]}-{v[-1]}{unit}"

    slack = [(b["name"], r["config_hash"], u) for (b, r), u in zip(joint, used) if u < 99.0]
    if slack:
        same = len({h for _, h, _ in slack}) == 1
        where = (f"At the {len(slack)} budget{'s' if len(slack) > 1 else ''} where its budget does not bind "
                 f"({', '.join(n for n, _, _ in slack)}) it returns {'the same config' if same and len(slack) > 1 else 'configs'} "
                 f"using {min(u for *_, u in slack):.1f}-{max(u for *_, u in slack):.1f} % of the bytes, although `int8` "
                 "is an option of every layer: the exact search maximises the joint predictor's additive per-layer "
                 "scores, and those rate no further upgrade as an improvement. ")
    else:
        where = f"Its configs use {min(used):.1f}-{max(used):.1f} % of the budget. "
    return ["", "Why the joint search loses here (read off the rows above). " + where + "Its text encoder stays at " + span(bits["text_encoder"], " bits")
            + f" ({span(below8['text_encoder'])} of {total['text_encoder']} layers below 8 bits) and its VAE decoder at "
            + span(bits["vae_decoder"], " bits") + f" ({span(below8['vae_decoder'])} of {total['vae_decoder']} layers), "
            "where (b) holds both at `int8` and spends the rest on the denoiser. With the same number of labels spread "
            "over three components, the joint predictor's scores for the text encoder and VAE decoder layers are not "
            "good enough to see what 8 bits there is worth on held-out images."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="joint_pipeline.json", help="the run's JSON")
    ap.add_argument("--work", default="runs/joint_pipeline", help="multiquantizers, caches, predictors (resumable)")
    ap.add_argument("--num-configs", type=int, default=200)
    ap.add_argument("--images", type=int, default=100, help="images per labelled config")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--heldout-images", type=int, default=1000)
    ap.add_argument("--heldout-seed", type=int, default=1_000_000)
    ap.add_argument("--heldout-prompt-seed", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictor", default="lightgbm", help="predictor kind (the GNN of the default ensemble trains for minutes here)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--refine-starts", type=int, default=2, help="refined_search: knapsack candidates climbed from")
    ap.add_argument("--refine-rounds", type=int, default=100, help="refined_search: local moves at most per start")
    ap.add_argument("--refine-pairs", type=int, default=16, help="refined_search: up / down moves paired per round")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown of a result file and exit")
    args = ap.parse_args(argv)
    if args.table:
        sys.stdout.write(markdown(json.loads(Path(args.table).read_text())))
        return 0
    from sensitivity.io import atomic_write_text

    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1, default=float) + "\n")
    sys.stdout.write(markdown(report))
    log(f"wrote {args.out} (work files in {args.work}); page: python scripts/results_tables.py joint-pipeline {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
