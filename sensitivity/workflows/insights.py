"""Insight tables and figures as one call: ``insights_files(out, predictor=..., configs=[...], cache=...)``.

```python
from sensitivity.workflows.insights import insights_files
files = insights_files("insights/x", predictor="predictors/x", configs=["quant_configs/x-3.9.json"],
                       cache="caches/x.sqlite", metric="fid")
```
Score box plots per block / op type (a predictor's or a scores CSV's layer and module scores), the option
mix of configs, and the Pareto view of a cache's records with the configs and uniform options
(:func:`sensitivity.insights.write_insights`). Each input adds its tables and figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


def insights_files(out: PathLike, *, predictor: Any = None, scores: Optional[PathLike] = None,
                   multiquantizer: Optional[PathLike] = None, configs: Sequence[PathLike] = (),
                   cache: Optional[PathLike] = None, metric: str = "fid", modules: bool = True) -> List[Path]:
    """Write the tables (CSV) and figures (PNG) of the inputs given into ``out``; returns the files.

    ``predictor``: a predictor folder or a loaded one (layer and, with ``modules``, module scores), or
    ``scores`` (a CSV of layer, option, score); ``multiquantizer``: default the predictor's; ``configs``:
    config files (option mix; named by their stem); ``cache``: records for the Pareto plot of ``metric``.
    """
    from .. import insights
    from ..config import QuantConfig
    from ..evaluation.cache import read_records
    from ..predictors import load_predictor
    from ..search import AdditiveScorer, load_scores_csv, multiquantizer_for, predict_results, uniform_configs
    from ..sizes import SizeTable

    if predictor is not None and scores:
        raise SensitivityError("pass either --predictor or --scores, not both")
    if isinstance(predictor, (str, os.PathLike)):
        predictor = load_predictor(predictor)
    mq = sizes = layer_scores = None
    if multiquantizer or predictor is not None:
        mq, _ = multiquantizer_for(multiquantizer, predictor)
        sizes = SizeTable.from_multiquantizer(mq)
    if scores:
        predictor = AdditiveScorer(load_scores_csv(scores), name=str(scores))
    if predictor is not None:
        layer_scores = predictor.layer_scores(mq)
    module_scores = None
    if predictor is not None and hasattr(predictor, "module_scores") and modules:
        module_scores = predictor.module_scores(mq)

    loaded = {}
    for path in configs:
        cfg = QuantConfig.load(path)
        if mq is not None:
            mq.validate(cfg.options)
        loaded[Path(path).stem] = cfg
    records = read_records(cache) if cache else None
    if layer_scores is None and not loaded and not records:
        raise SensitivityError("nothing to describe: pass --predictor/--scores, --config or --cache")

    results: list = []
    if loaded and sizes is not None:
        for name, cfg in loaded.items():
            results.append({"label": name, "source": cfg.provenance.get("method", "config"),
                            "avg_bits": sizes.avg_bits(cfg.options)})
    if sizes is not None and (records or results):
        results += uniform_configs(sizes)
    if predictor is not None:
        objs = [r for r in results if not isinstance(r, dict)]
        predict_results(predictor, objs)
        dicts = [r for r in results if isinstance(r, dict)]
        if dicts:
            preds = predictor.predict([dict(loaded[r["label"]].options) for r in dicts])
            for r, p in zip(dicts, preds):
                r["predicted"] = float(p)
        if records:
            preds = predictor.predict([r["config"] for r in records])
            records = [dict(r, predicted=float(p)) for r, p in zip(records, preds)]
    return insights.write_insights(out, layer_scores=layer_scores, configs=loaded, sizes=sizes,
                                   module_scores=module_scores, records=records, results=results, metric=metric)
