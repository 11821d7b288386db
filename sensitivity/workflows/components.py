"""The per-component quantization report as one call: ``component_report(model, out, option="int8")``.

```python
from sensitivity.workflows.components import component_report
run = component_report("digits-sd", "components_int8", option="int8", weights="shipped")
run.summary["components"]["denoiser"]["train"]["psnr"], run.summary.get("most_sensitive")
component_report("sd15", "out/c", prompts="train.txt", option="int8", component_options={"denoiser": "uaq-4"},
                 configs={"vae_decoder": "vae_w4.json"})
```
Each pipeline component (text encoder, denoiser, VAE decoder) is quantized alone, every prompt is
generated with fixed seeds and compared with full precision (:func:`sensitivity.components.run_components`
writes ``components.csv``, ``summary.csv``, ``components.json``, ``report.md``, ``grids/`` and
``multiquantizers/``). Every input is checked before the model loads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class ComponentsResult(NamedTuple):
    """The report's summary (``components.json``), the prompt sets ``{"train": [...], "test": [...]}``, the
    output folder and the seconds from loading to the last file."""

    summary: Dict[str, Any]
    prompt_sets: Dict[str, List[str]]
    out: Path
    seconds: float


def component_report(model: str, out: PathLike, *, option: Optional[str] = None,
                     component_options: Optional[Mapping[str, str]] = None,
                     configs: Optional[Mapping[str, PathLike]] = None, components: Optional[Sequence[str]] = None,
                     prompts: Optional[PathLike] = None, test_prompts: Optional[PathLike] = None,
                     images_per_prompt: int = 1, seed_base: int = 0, weights: Optional[str] = None,
                     pipeline_class: Optional[str] = None, device: Optional[str] = None, dtype: Any = None,
                     seed: int = 0, progress: bool = True, **settings: Any) -> ComponentsResult:
    """Quantize each component of ``model`` alone with ``option`` (every component), ``component_options``
    ``{component: option}`` or ``configs`` ``{component: config .json}``, generate ``images_per_prompt``
    images of each prompt (seeds ``seed_base``..) of the ``prompts`` / ``test_prompts`` files (one prompt
    a line; digits-sd: its shipped files) and write the report to ``out``. ``components``: those to report
    (default: all with an option or config); ``settings``: generation settings (``steps``, ``guidance``...)."""
    from ..captions import check_clean_caption
    from ..checks import check_values
    from ..components import COMPONENT_NAMES, parse_component_configs, pipeline_components, run_components
    from ..io import check_writable
    from ..options import QuantOption
    from ..zoo.digits_sd import read_prompt_file
    from ..zoo.resolve import resolve_model

    check_values(images_per_prompt=images_per_prompt, seed_base=seed_base, seed=seed)
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    options = dict(component_options or {})
    configs = dict(configs or {})
    for name in list(options) + list(configs):
        if name not in COMPONENT_NAMES:
            raise SensitivityError(f"unknown component {name!r}; components are {', '.join(COMPONENT_NAMES)}")
    if option is None and not options and not configs:
        raise SensitivityError("give --option OPTION (or --component-option / --config per component)")
    for opt in ([option] if option else []) + list(options.values()):
        QuantOption.parse(opt)
    for name, path in configs.items():
        if not Path(path).is_file():
            raise SensitivityError(f"--config {name}={path}: file does not exist")
    train_path = prompts or getattr(fam, "default_prompts", None)
    if train_path is None:
        raise SensitivityError(f"model {fam.name!r} needs --prompts FILE (one prompt per line)")
    prompt_sets = {"train": read_prompt_file(train_path)}
    test_path = test_prompts or (getattr(fam, "default_test_prompts", None) if not prompts else None)
    if test_path is not None:
        prompt_sets["test"] = read_prompt_file(test_path)
    check_writable(out, "--out", directory=True)
    check_clean_caption(settings)
    fam.settings(None, **settings)  # unknown settings fail here

    t0 = time.time()
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=seed)
    comps = pipeline_components(fam, pipe)
    cfgs = parse_component_configs(comps, option, options, configs, only=list(components) if components else None)
    summary = run_components(fam, pipe, prompt_sets, cfgs, out, images_per_prompt=images_per_prompt,
                             seed=seed_base, model_id=fam.model_id(weights), progress=progress, **settings)
    return ComponentsResult(summary, prompt_sets, Path(out), time.time() - t0)
