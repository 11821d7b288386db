"""A model's cost table measured as one call: ``measure_model_costs(model, multiquantizer, ...)``.

```python
from sensitivity.workflows.costs import measure_model_costs
run = measure_model_costs("digits-dit", "mq.safetensors", weights="shipped", threads=1)
run.summary["fp16_ms"], run.summary["uniform_ms"]     # summed layer ms: full precision, every layer at one option
run.table.config_latency_ms(config.options)
```
Each layer's run-time module is timed at every option (:func:`sensitivity.export.costs.measure_costs`); the
table is written beside the multiquantizer (``<stem>.costs/``) or to ``out``, keyed by device, torch,
multiquantizer, dtype, batch, threads and run-time module; a rerun resumes, ``remeasure`` starts over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class CostsResult(NamedTuple):
    """The cost table and its summary (path, layers, options, ``fp16_ms``, ``uniform_ms`` {option: ms}, key,
    calibrator, seconds: what ``sensitivity costs --json`` prints)."""

    table: Any
    summary: Dict[str, Any]


def measure_model_costs(model: str, multiquantizer: PathLike, *, out: Optional[PathLike] = None,
                        options: Optional[Sequence[str]] = None, batch: int = 1, repeats: int = 7, warmup: int = 2,
                        threads: Optional[int] = None, remeasure: bool = False, weights: Optional[str] = None,
                        pipeline_class: Optional[str] = None, device: Optional[str] = None, dtype: Any = None,
                        seed: int = 0, progress: bool = True) -> CostsResult:
    """Measure the cost table of ``multiquantizer`` on ``model``'s denoiser (``options``: those to time, default
    all; ``batch`` samples per forward, median of ``repeats`` rounds after ``warmup`` calls, ``threads`` torch
    threads); ``seed``: random init of ``random`` / ``tiny`` weights and the example inputs."""
    from ..checks import check_values
    from ..export.costs import measure_costs
    from ..io import check_writable
    from ..multiquantizer import load_multiquantizer
    from ..zoo.resolve import resolve_model

    t0 = time.time()
    check_values(batch=batch, repeats=repeats, warmup=warmup, threads=threads, seed=seed)
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    if not Path(multiquantizer).is_file():
        raise SensitivityError(f"--multiquantizer {str(multiquantizer)!r} does not exist")
    if out is not None:
        if Path(out).suffix != ".json":
            raise SensitivityError(f"--out must be a .json file, got {out}")
        check_writable(out, "--out")
    mq = load_multiquantizer(multiquantizer)
    model_id = fam.model_id(weights)
    if mq.model_id and mq.model_id != model_id:
        raise SensitivityError(f"multiquantizer {Path(multiquantizer).name} was built for {mq.model_id}, "
                               f"not for {model_id}")
    den = fam.load_denoiser(weights, device=device, dtype=dtype, seed=seed)
    table = measure_costs(den, mq, out=out, options=list(options) if options else None, batch=batch,
                          repeats=repeats, warmup=warmup, seed=seed, threads=threads, remeasure=remeasure,
                          progress=progress)
    per_option = {o: round(table.config_latency_ms({l: o for l in table.layers}), 4) for o in table.options}
    summary = {"path": table.meta["path"], "layers": len(table.layers), "options": table.options,
               "fp16_ms": round(table.config_latency_ms({}), 4), "uniform_ms": per_option,
               "key": table.meta.get("key"), "calibrator": table.meta.get("calibrator"),
               "seconds": round(time.time() - t0, 1)}
    return CostsResult(table, summary)
