"""The predictor of any kind: k-fold training, the report, and the predictor folder (safetensors + JSON).

:func:`cross_validate` trains every requested kind on the *same* folds (seeded ``KFold``) and scores
each fold model on its held-out configs (Spearman, Kendall τ, NDCG@10). The ``k`` fold models of a
kind make its :class:`Predictor` (their mean prediction), as in the reference.

Folder layout written by :func:`save_predictors` (``predictors/NAME/``)::

    predictor.json        manifest: primary kind, target, model, layer table, folds, per-kind fold meta
    graph.json            the traced graph (sensitivity.graph JSON)
    weights.safetensors   tensors of every fold model: "<kind>/fold<k>/<name>"
    texts/<kind>.fold<k>.<name>.txt   text states (LightGBM models)
    report.json, report.md             the cross-validation report
    layer_scores.csv, module_scores.csv   scores of the primary predictor (see .scores)

No pickle anywhere; reloading gives identical predictions.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import SensitivityError
from .base import Context, FoldModel, get_kind
from .data import Dataset, LayerTable, Target
from .metrics import mean_std, ranking_metrics
from . import scores as S

FORMAT = "sensitivity.predictor/1"
METRICS = ("spearman", "kendall", "ndcg@10")
DEFAULT_TABULAR_KINDS = ("bits", "error", "additive", "lightgbm")
# the kind `sensitivity train` / `demo` fit unless told: best held-out Kendall tau on digits-dit (docs/guide/predictors.md)
DEFAULT_PREDICTOR = "ensemble"


# ------------------------------------------------------------------------------------------ predictor
class Predictor:
    """The ensemble of one kind's fold models. Higher predictions = better (see :class:`.data.Target`).

    Search protocol (:mod:`sensitivity.search`): :meth:`predict`, :meth:`layer_scores`,
    :meth:`module_scores`; attributes ``model_id``, ``multiquantizer_hash``, ``multiquantizer_path``.
    """

    def __init__(self, kind: str, models: List[FoldModel], ctx: Context, meta: Optional[Dict[str, Any]] = None,
                 path: Optional[Path] = None):
        self.kind = kind
        self.models = models
        self.ctx = ctx
        self.meta = dict(meta or {})
        self.path = path
        self._layer_scores: Optional[pd.DataFrame] = None
        self._module_scores: Optional[pd.DataFrame] = None

    # ---- description ---------------------------------------------------------------------------
    @property
    def table(self) -> LayerTable:
        return self.ctx.table

    @property
    def target(self) -> Target:
        return self.ctx.target

    @property
    def graph(self):
        return self.ctx.graph

    @property
    def layers(self) -> List[str]:
        return list(self.ctx.table.layers)

    @property
    def model_id(self) -> Optional[str]:
        return self.meta.get("model_id")

    @property
    def multiquantizer_hash(self) -> Optional[str]:
        return self.meta.get("multiquantizer_hash")

    @property
    def multiquantizer_path(self) -> Optional[str]:
        return self.meta.get("multiquantizer_path")

    def __repr__(self) -> str:
        return (f"Predictor({self.kind!r}, {len(self.models)} folds, target {self.target.describe()!r}, "
                f"{len(self.layers)} layers)")

    # ---- predictions ---------------------------------------------------------------------------
    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        """Mean of the fold models' predictions, ``float64 [n]`` (target units, higher = better)."""
        codes = np.asarray(codes)
        if len(codes) == 0:
            return np.zeros(0)
        return np.mean([m.predict_codes(codes) for m in self.models], axis=0)

    def encode(self, configs: Sequence[Mapping[str, str]]) -> np.ndarray:
        return self.table.encode(configs)

    def predict(self, configs: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Predicted target ``y`` of each config ``{layer: option}`` (absent layers fp16): ``[n]``, higher = better."""
        return self.predict_codes(self.encode(configs))

    # ---- scores --------------------------------------------------------------------------------
    def _check_mq(self, mq: Any) -> None:
        if mq is None:
            return
        names = list(getattr(mq, "layer_names", []))
        missing = [l for l in names if l not in self.table.index]
        if missing:
            raise SensitivityError(f"layer {missing[0]!r} of the multiquantizer is unknown to predictor "
                                   f"{self.path or self.kind} ({len(missing)} layers)")
        h = self.multiquantizer_hash
        if h and getattr(mq, "hash", None) and mq.hash != h:
            raise SensitivityError(f"multiquantizer {getattr(mq, 'path', '')} (hash {mq.hash[:12]}) is not the one "
                                   f"predictor {self.path or self.kind} was trained with ({h[:12]})")

    def background(self) -> np.ndarray:
        bg = self.meta.get("background_codes")
        if bg is None:
            raise SensitivityError(f"predictor {self.path or self.kind} has no background configs for scoring")
        return np.asarray(bg, dtype=np.int16)

    def compute_scores(self, n_background: int = 16, n_background_modules: int = 4,
                       max_combinations: int = S.MAX_COMBINATIONS, max_module_configs: int = S.MAX_MODULE_CONFIGS,
                       progress: bool = True) -> None:
        """(Re)compute :meth:`layer_scores` and :meth:`module_scores` from the predictor itself.

        Modules are scored combination by combination up to the largest size that keeps the cost
        within ``max_module_configs`` predictions (see :func:`.scores.combination_limit`)."""
        bg = self.background()
        b1 = S.background(bg, n_background, seed=1)
        self._layer_scores = S.layer_scores(self.predict_codes, self.table, self.target, b1, progress=progress)
        self._module_scores = None
        limit = 0
        b2 = S.background(bg, n_background_modules, seed=2)
        if self.graph is not None:
            modules = self.graph.modules()
            limit = S.combination_limit(modules, len(self.table.options), len(b2), max_combinations, max_module_configs)
            self._module_scores = S.module_scores(self.predict_codes, self.table, self.target, modules,
                                                  b2, max_combinations=limit, progress=progress)
        self.meta["scores"] = {"n_background": int(len(b1)), "n_background_modules": int(len(b2)),
                               "max_combinations": int(limit),
                               "units": f"predicted {'-' if self.target.sign < 0 else ''}"
                                        f"{'log(' + self.target.metric + ')' if self.target.transform == 'log' else self.target.metric} "
                                        f"relative to the mean over options (higher = better)"}

    def layer_scores(self, mq: Any = None) -> pd.DataFrame:
        """``DataFrame(layer, option, score)``: predicted quality change per option (higher = better)."""
        self._check_mq(mq)
        if self._layer_scores is None:
            self.compute_scores(progress=False)
        return self._layer_scores.copy()

    def module_scores(self, mq: Any = None, max_combinations: int = S.MAX_COMBINATIONS) -> pd.DataFrame:
        """``DataFrame(module, module_type, layers, options, score)``, modules with ≤ ``max_combinations``."""
        self._check_mq(mq)
        if self._module_scores is None:
            if self.graph is None:
                raise SensitivityError(f"predictor {self.path or self.kind} has no graph, so no modules")
            self.compute_scores(max_combinations=max_combinations, progress=False)
        df = self._module_scores
        sizes = df.groupby("module")["score"].transform("size")
        return df[sizes <= max_combinations].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ training
@dataclass
class CVResult:
    """Output of :func:`cross_validate`: ensembles per kind, the report, the fold assignment."""

    predictors: Dict[str, Predictor]
    report: Dict[str, Any]
    fold_of: np.ndarray
    oof: Dict[str, np.ndarray] = field(default_factory=dict)


def kfold_assignment(n: int, k: int, seed: int) -> np.ndarray:
    """Fold id per sample: ``sklearn.model_selection.KFold(k, shuffle=True, random_state=seed)``."""
    if k < 2:
        raise SensitivityError(f"--folds must be at least 2, got {k}")
    if n < k:
        raise SensitivityError(f"{n} configs cannot be split into {k} folds")
    from sklearn.model_selection import KFold

    fold = np.empty(n, np.int64)
    for f, (_, test) in enumerate(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros((n, 1)))):
        fold[test] = f
    return fold


def cross_validate(ds: Dataset, ctx: Context, kinds: Sequence[str], folds: int = 5, seed: int = 0,
                   params: Optional[Mapping[str, Mapping[str, Any]]] = None, progress: bool = True) -> CVResult:
    """Train each of ``kinds`` on the same ``folds``; report held-out metrics per fold (see module doc)."""
    params = dict(params or {})
    fold_of = kfold_assignment(len(ds), folds, seed)
    report: Dict[str, Any] = {"target": ctx.target.to_dict(), "n_configs": len(ds), "folds": folds, "seed": seed,
                              "metrics": list(METRICS), "predictors": {}, "skipped": {}}
    out: Dict[str, Predictor] = {}
    oof: Dict[str, np.ndarray] = {}
    # kinds made of other kinds (``ensemble``) go last, so they reuse the members' fold models
    kinds = sorted(kinds, key=lambda k: hasattr(get_kind(k), "members_of"))
    for kind in kinds:
        cls = get_kind(kind)
        kparams = dict(params.get(kind) or {})
        if hasattr(cls, "members_of"):
            mp = dict(kparams.get("member_params") or {})
            for k in cls.members_of(kparams):
                mp.setdefault(k, dict(params.get(k) or {}))
            kparams["member_params"] = mp
        why = cls.available(ctx, ds)
        if why is not None:
            report["skipped"][kind] = why
            continue
        models, rows = [], []
        pred_oof = np.full(len(ds), np.nan)
        t_kind = time.perf_counter()
        bar = tqdm(range(folds), desc=f"train {kind}", unit="fold", disable=not progress, leave=False)
        for f in bar:
            tr, te = np.where(fold_of != f)[0], np.where(fold_of == f)[0]
            t0 = time.perf_counter()
            m = cls(ctx, kparams)
            if hasattr(cls, "members_of"):
                m.fit(ds.subset(tr), seed=seed * 1000 + f, fitted={k: out[k].models[f] for k in m.members if k in out})
            else:
                m.fit(ds.subset(tr), seed=seed * 1000 + f)
            secs = time.perf_counter() - t0
            p = m.predict_codes(ds.codes[te])
            pred_oof[te] = p
            met = ranking_metrics(ds.y[te], p)
            rows.append({"fold": f, "n_train": int(len(tr)), "n_test": int(len(te)), **met,
                         "seconds": round(secs, 3), **({"info": m.info} if m.info else {})})
            bar.set_postfix(kendall=f"{met['kendall']:.3f}")
            models.append(m)
        bar.close()
        summary = {k: mean_std(r[k] for r in rows) for k in METRICS}
        report["predictors"][kind] = {
            "description": cls.description,
            "params": {k: v for k, v in models[0].params.items()},
            "folds": rows,
            "mean": {k: summary[k]["mean"] for k in METRICS},
            "std": {k: summary[k]["std"] for k in METRICS},
            "pooled": ranking_metrics(ds.y, pred_oof),
            "train_seconds": round(time.perf_counter() - t_kind, 2),
        }
        out[kind] = Predictor(kind, models, ctx)
        oof[kind] = pred_oof
    if not out:
        raise SensitivityError("no predictor could be trained: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    return CVResult(out, report, fold_of, oof)


# ------------------------------------------------------------------------------------------ report
def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def report_markdown(report: Mapping[str, Any], title: str = "Predictor report") -> str:
    """The report as Markdown: a mean ± std table over folds, then Kendall τ per fold."""
    lines = [f"# {title}", ""]
    info = []
    for key in ("model_id", "cache", "n_configs", "folds", "seed"):
        if report.get(key) is not None:
            info.append(f"{key}: `{report[key]}`")
    info.append(f"target: `{report['target']['formula']}` (higher = better)")
    lines += ["; ".join(info), ""]
    preds = report["predictors"]
    lines += ["Held-out ranking quality, mean ± std over the folds (every predictor on the same folds):", "",
              "| predictor | Spearman | Kendall τ | NDCG@10 | pooled Kendall τ | train s |",
              "|---|---|---|---|---|---|"]
    for kind, r in preds.items():
        cells = [f"{_fmt(r['mean'][m])} ± {_fmt(r['std'][m])}" for m in METRICS]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {_fmt(r['pooled']['kendall'])} | {r['train_seconds']:.1f} |")
    k = report["folds"]
    lines += ["", "Kendall τ per fold:", "", "| predictor | " + " | ".join(f"fold {i}" for i in range(k)) + " |",
              "|---|" + "---|" * k]
    for kind, r in preds.items():
        lines.append(f"| {kind} | " + " | ".join(_fmt(row["kendall"]) for row in r["folds"]) + " |")
    fid = report.get("fidelity")
    if fid:
        lines += ["", f"Multi-fidelity: the members learnt cheap labels ({', '.join(f'{m}: {n} configs' for m, n in fid['n_cheap'].items())}); "
                  f"the rows above rank them, their stack and the baselines on the {fid['n_full']} configs with full labels. "
                  "The members on their own cheap labels (held-out, same folds seed):", "",
                  "| member | configs | Kendall τ | pooled Kendall τ |", "|---|---|---|---|"]
        for name, r in fid["cheap"].items():
            lines.append(f"| {name} | {r['n_configs']} | {_fmt(r['mean']['kendall'])} ± {_fmt(r['std']['kendall'])} | "
                         f"{_fmt(r['pooled']['kendall'])} |")
        st = fid.get("stack")
        if st:
            lines += ["", "Stack weights (per standardised member prediction): " + ", ".join(
                f"{m} {w:.3f}" for m, w in zip(st["members"], st["weights"])) + f"; ridge alpha {st['alpha']:g}"]
    if report.get("skipped"):
        lines += ["", "Not trained: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    lines += ["", "Spearman / Kendall τ: rank correlation of predicted vs true target on the held-out fold; "
              "NDCG@10: top-10 ranking quality with the reference's relevance (bottom 20 % = 0); pooled: "
              "over all out-of-fold predictions.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ persistence
def _versions() -> Dict[str, str]:
    import torch

    v = {"torch": torch.__version__, "numpy": np.__version__}
    try:
        import lightgbm

        v["lightgbm"] = lightgbm.__version__
    except ImportError:  # pragma: no cover
        pass
    from .. import __version__

    v["sensitivity"] = __version__
    return v


def json_clean(obj: Any) -> Any:
    """``obj`` made JSON-ready: NaN / Inf floats -> None, numpy numbers and arrays -> Python ones, keys -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return json_clean(float(obj))
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    return obj


def save_predictors(out: str | os.PathLike, result: CVResult, primary: str, meta: Mapping[str, Any],
                    background_codes: np.ndarray, compute_scores: bool = True, progress: bool = True,
                    max_module_configs: int = S.MAX_MODULE_CONFIGS, stack: Any = None,
                    ctx: Optional[Context] = None) -> Path:
    """Write the folder (see the module docstring) atomically (temp folder, then rename).

    ``max_module_configs``: predictions per fold model spent on module scores (see :meth:`Predictor.compute_scores`).
    ``stack`` (a :class:`.fidelity.Stack`) with ``ctx`` (the full target's context): a multi-fidelity
    folder, primary ``multifidelity``, whose members keep their own (cheap) targets."""
    from safetensors.numpy import save_file

    out = Path(out)
    if stack is None and primary not in result.predictors:
        raise SensitivityError(f"primary predictor {primary!r} was not trained ({result.report['skipped'].get(primary, '')})")
    from ..io import atomic_dir

    with atomic_dir(out, "predictor folder", replace=True) as tmp:
        ctx = ctx or result.predictors[primary].ctx
        tensors: Dict[str, np.ndarray] = {}
        members: Dict[str, Any] = {}
        (tmp / "texts").mkdir()
        for kind, p in result.predictors.items():
            fold_meta = []
            for f, m in enumerate(p.models):
                meta_f, tens, texts = m.get_state()
                for k, v in tens.items():
                    tensors[f"{kind}/fold{f}/{k}"] = np.ascontiguousarray(v)
                for k, txt in texts.items():
                    (tmp / "texts" / f"{kind}.fold{f}.{k}.txt").write_text(txt)
                fold_meta.append({"meta": meta_f, "tensors": sorted(tens), "texts": sorted(texts), "params": m.params})
            members[kind] = {"folds": fold_meta}
        if tensors:
            save_file(tensors, str(tmp / "weights.safetensors"), metadata={"format": FORMAT})
        if ctx.graph is not None:
            ctx.graph.save(tmp / "graph.json")
        manifest = {
            "format": FORMAT,
            "primary": primary,
            "kinds": ([primary] if stack is not None else []) + list(result.predictors),
            "target": ctx.target.to_dict(),
            **({"stack": stack.to_dict(), "member_targets": {
                k: p.ctx.target.to_dict() for k, p in result.predictors.items() if p.ctx.target != ctx.target}}
               if stack is not None else {}),
            "table": ctx.table.to_dict(),
            "folds": {"k": int(result.report["folds"]), "seed": int(result.report["seed"]),
                      "fold_of": result.fold_of.tolist()},
            "members": members,
            "background_codes": np.asarray(background_codes, dtype=np.int64).tolist(),
            "versions": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: v for k, v in meta.items()},
        }
        (tmp / "predictor.json").write_text(json.dumps(json_clean(manifest), indent=1))
        report = dict(result.report)
        report.update({k: meta[k] for k in ("model_id", "cache") if k in meta})
        report["primary"] = primary
        (tmp / "report.json").write_text(json.dumps(json_clean(report), indent=1))
        (tmp / "report.md").write_text(report_markdown(report, title=f"Predictor report: {out.name}"))
        if compute_scores:
            p = load_predictor(tmp, device=ctx.device)
            p.compute_scores(max_module_configs=max_module_configs, progress=progress)
            p._layer_scores.to_csv(tmp / "layer_scores.csv", index=False)
            if p._module_scores is not None:
                S.module_scores_to_csv(p._module_scores, tmp / "module_scores.csv")
            man = json.loads((tmp / "predictor.json").read_text())
            man["scores"] = json_clean(p.meta["scores"])
            (tmp / "predictor.json").write_text(json.dumps(man, indent=1))
    return out


def read_manifest(path: str | os.PathLike) -> Dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SensitivityError(f"predictor {str(path)!r} does not exist")
    f = p / "predictor.json" if p.is_dir() else p
    if not f.is_file():
        raise SensitivityError(f"predictor {str(path)!r}: no predictor.json (not a predictor folder)")
    try:
        man = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise SensitivityError(f"{f}: damaged JSON ({exc})") from None
    if man.get("format") != FORMAT:
        raise SensitivityError(f"{f}: not a {FORMAT} file (format {man.get('format')!r})")
    return man


def load_predictor(path: str | os.PathLike, kind: Optional[str] = None, device: Optional[str] = None) -> Predictor:
    """The predictor saved in folder ``path`` (its primary kind, or ``kind``), on ``device``."""
    from safetensors.numpy import load_file

    from ..graph import DenoiserGraph

    p = Path(path)
    man = read_manifest(p)
    kind = kind or man["primary"]
    if "stack" in man and kind == man["primary"]:
        from .fidelity import MultiFidelityPredictor, Stack

        stack = Stack.from_dict(man["stack"])
        members = {n: load_predictor(p, kind=n, device=device) for n in stack.members}
        first = next(iter(members.values()))
        ctx = Context(first.table, Target.from_dict(man["target"]), first.graph, device)
        meta = {k: v for k, v in man.items() if k not in ("members", "table")}
        pred = MultiFidelityPredictor(members, stack, ctx, meta, p)
        _read_scores(pred, p)
        return pred
    if kind not in man["members"]:
        raise SensitivityError(f"predictor {str(path)!r} has no {kind!r} member (it has {', '.join(man['members'])})")
    graph = DenoiserGraph.load(p / "graph.json") if (p / "graph.json").is_file() else None
    target = (man.get("member_targets") or {}).get(kind) or man["target"]
    ctx = Context(LayerTable.from_dict(man["table"]), Target.from_dict(target), graph, device)
    weights = p / "weights.safetensors"
    try:
        tensors = load_file(str(weights)) if weights.is_file() else {}
    except Exception as exc:  # safetensors' own errors: truncated, not a safetensors file...
        raise SensitivityError(f"predictor {str(path)!r}: {weights.name} is damaged ({type(exc).__name__}); "
                               "train it again") from None
    cls = get_kind(kind.split("@", 1)[0])  # a multi-fidelity member KIND@METRIC is a fold ensemble of KIND
    models = []
    for f, fm in enumerate(man["members"][kind]["folds"]):
        m = cls(ctx, fm.get("params"))
        keys = {k: f"{kind}/fold{f}/{k}" for k in fm["tensors"]}
        lost = [key for key in keys.values() if key not in tensors]
        if lost:
            what = f"has no {weights.name}" if not weights.is_file() else f"{weights.name} lacks {lost[0]!r}"
            raise SensitivityError(f"predictor {str(path)!r} {what} (an incomplete folder); train it again")
        tens = {k: tensors[key] for k, key in keys.items()}
        text_files = {k: p / "texts" / f"{kind}.fold{f}.{k}.txt" for k in fm["texts"]}
        for file in text_files.values():
            if not file.is_file():
                raise SensitivityError(f"predictor {str(path)!r} lacks {file.relative_to(p)} (an incomplete folder); "
                                       "train it again")
        texts = {k: file.read_text() for k, file in text_files.items()}
        m.set_state(fm["meta"], tens, texts)
        models.append(m)
    meta = {k: v for k, v in man.items() if k not in ("members", "table")}
    pred = Predictor(kind, models, ctx, meta, p)
    if kind == man["primary"]:
        _read_scores(pred, p)
    return pred


def _member_folds(man: Mapping[str, Any], path: Any, kind: str) -> List[Dict[str, Any]]:
    """The fold entries of member ``kind`` in a manifest; one line naming the folder when it has none."""
    if kind not in man["members"]:
        raise SensitivityError(f"predictor {str(path)!r} has no {kind!r} member to start from "
                               f"(it has {', '.join(man['members'])}); train one with --predictor {kind} or ensemble")
    return man["members"][kind]["folds"]


def read_fold_state(path: str | os.PathLike, kind: str, index: int) -> "tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, Any]]":
    """``(meta, tensors, params)`` of fold model ``index % k`` of member ``kind`` in predictor folder ``path``
    (``meta["fold"]``: the fold read). One line naming the folder when it has no such member."""
    from safetensors import safe_open

    folds = _member_folds(read_manifest(path), path, kind)
    f = int(index) % len(folds)
    weights = Path(path) / "weights.safetensors"
    fm = folds[f]
    keys = {k: f"{kind}/fold{f}/{k}" for k in fm["tensors"]}
    try:  # only this fold's tensors are read
        with safe_open(str(weights), framework="np") as fh:
            have = set(fh.keys())
            if any(key not in have for key in keys.values()):
                raise SensitivityError(f"predictor {str(path)!r}: {weights.name} lacks fold {f} of {kind} "
                                       "(an incomplete folder)")
            tensors = {k: fh.get_tensor(key) for k, key in keys.items()}
    except SensitivityError:
        raise
    except Exception as exc:
        raise SensitivityError(f"predictor {str(path)!r}: {weights.name} is unreadable ({type(exc).__name__})") from None
    return dict(fm["meta"], fold=f), tensors, dict(fm.get("params") or {})


def transfer(path: str | os.PathLike, graph: Any, table: LayerTable, kind: str = "gnn",
             device: Optional[str] = None) -> Predictor:
    """The ``kind`` member of predictor folder ``path`` (trained on another model) on ``graph`` / ``table``
    of this one, unchanged: a prediction with zero labels of this model. Only kinds whose state holds no
    per-layer parameters transfer (``FoldModel.transferable``: the GNN); predictions are in the prior's
    target units (its ranking is what transfers)."""
    cls = get_kind(kind)
    if not getattr(cls, "transferable", False):
        raise SensitivityError(f"predictor kind {kind!r} has per-layer parameters: it cannot transfer to another "
                               "model (the gnn can)")
    man = read_manifest(path)
    ctx = Context(table, Target.from_dict(man["target"]), graph, device)
    models = []
    for f in range(len(_member_folds(man, path, kind))):
        meta, tensors, params = read_fold_state(path, kind, f)
        m = cls(ctx, params)
        m.set_state({k: v for k, v in meta.items() if k != "fold"}, tensors, {})
        models.append(m)
    return Predictor(kind, models, ctx, {"prior": str(path), "prior_model_id": man.get("model_id")})


def _read_scores(pred: Predictor, folder: Path) -> None:
    """The primary predictor's saved layer / module scores (computed once, at save time)."""
    if (folder / "layer_scores.csv").is_file():
        pred._layer_scores = pd.read_csv(folder / "layer_scores.csv", dtype={"layer": str, "option": str})
    if (folder / "module_scores.csv").is_file():
        pred._module_scores = S.module_scores_from_csv(folder / "module_scores.csv")
