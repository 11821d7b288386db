"""Calibration as calls: the set (``calibration_data(model, out)``) and a config calibrated on it
(``calibrate_config(model, multiquantizer, config, data, out)``).

```python
from sensitivity.workflows.calibrate import calibrate_config, calibration_data
calibration_data("digits-dit", "calib/digits-dit.safetensors", kind="timestep_aware", num=64, weights="shipped")
run = calibrate_config("digits-dit", "mq.safetensors", "w36.json", "calib/digits-dit.safetensors",
                       "quant_configs/w36-cal", weights="shipped", weights_method="gptq", act_bits=8)
run.artifact.report["calibrated_layers"], run.held_out_error      # (round-to-nearest, calibrated) or None
```
Data-aware weight rounding (GPTQ / AdaRound / table refit) and static activation ranges
(:func:`sensitivity.calibration.calibrate`), written as a calibrated config folder (an overlay on the
multiquantizer, same average bits) that ``infer`` and ``evaluate`` accept as a config. Every input is
checked before the model loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Tuple, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class CalibrateResult(NamedTuple):
    """The calibrated artifact (saved in ``out``) and the mean held-out relative output error of its weight
    layers before (round-to-nearest) and after calibration, or None without held-out data."""

    artifact: Any
    out: Path
    held_out_error: Optional[Tuple[float, float]]


def calibrate_config(model: str, multiquantizer: PathLike, config: PathLike, data: PathLike, out: PathLike, *,
                     weights: Optional[str] = None, pipeline_class: Optional[str] = None,
                     device: Optional[str] = None, dtype: Any = None, seed: int = 0, weights_method: str = "auto",
                     act_bits: Optional[int] = None, observer: str = "mse", granularity: str = "tensor",
                     attention: bool = True, percentile: float = 99.99, held_out: float = 0.25,
                     calib_seed: int = 0, adaround_iters: int = 1000, progress: bool = True,
                     overwrite: bool = False) -> CalibrateResult:
    """Calibrate ``config`` (a config .json of ``multiquantizer``) of ``model`` on the calibration set ``data``
    (``sensitivity calibrate-data``) and save the calibrated folder ``out``. ``seed``: random init of
    ``random`` / ``tiny`` weights; ``calib_seed``: the held-out split and AdaRound; the other parameters
    are those of :func:`sensitivity.calibration.calibrate`. An ``out`` that exists and is not empty is refused
    before any work unless ``overwrite`` (then the new folder replaces it whole)."""
    from ..calibration.data import load_calibration_set
    from ..calibration.pipeline import calibrate
    from ..checks import check_values
    from ..config import QuantConfig
    from ..io import check_new_folder
    from ..multiquantizer import load_family_multiquantizer
    from ..quantizers.activation import check_act_bits
    from ..zoo.resolve import resolve_model

    check_values(seed=seed, calib_seed=calib_seed, percentile=percentile, held_out=held_out,
                 adaround_iters=adaround_iters)
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    check_new_folder(out, "--out", overwrite=overwrite)
    if act_bits is not None:
        check_act_bits(act_bits)
    if weights_method == "none" and act_bits is None:
        raise SensitivityError("nothing to calibrate: --weights-method none needs --act-bits")
    mq = load_family_multiquantizer(multiquantizer, fam.name)
    cfg = QuantConfig.load(config)
    cfg.check_model(mq.model_id, str(config))
    try:
        mq.validate(cfg.options)
    except SensitivityError as exc:
        raise SensitivityError(f"{config}: {exc}") from None
    calibration_set = load_calibration_set(data)
    calibration_set.check_model(mq.model_id)
    den = fam.load_denoiser(weights, device=device, dtype=dtype, seed=seed)
    mq.check_model(den)
    art = calibrate(den, mq, cfg, calibration_set, weights_method=weights_method, act_bits=act_bits,
                    observer=observer, granularity=granularity, attention=attention, percentile=percentile,
                    held_out=held_out, seed=calib_seed, adaround_iters=adaround_iters, progress=progress,
                    family=fam.name)
    art.manifest["calibration_set"]["path"] = str(data)
    art.manifest["source_config"] = str(config)
    art.save(out, overwrite=overwrite)
    held = [v for v in art.report["layers"].values() if v.get("held_rel_error") is not None]
    errors = None
    if held:
        import numpy as np

        before = float(np.mean([v["held_rel_error_rtn"] for v in held]))
        after = float(np.mean([v["held_rel_error"] if v["kept"] else v["held_rel_error_rtn"] for v in held]))
        errors = (before, after)
    return CalibrateResult(art, Path(out), errors)


def calibration_data(model: str, out: PathLike, *, kind: str = "timestep_aware", num: int = 64,
                     timesteps: Optional[int] = None, data_seed: int = 0, prompts_file: Optional[PathLike] = None,
                     chunk: int = 32, weights: Optional[str] = None, pipeline_class: Optional[str] = None,
                     device: Optional[str] = None, dtype: Any = None, seed: int = 0, progress: bool = True,
                     **settings: Any) -> Any:
    """Capture a calibration set of ``model``'s full-precision denoiser inputs into ``out`` (.safetensors) and
    return it (:func:`sensitivity.calibration.data.make_calibration_set`: ``kind`` timestep_aware / noise /
    raw, ``num`` images, ``timesteps`` kept per trajectory, image i from seed ``data_seed + i``, resumable in
    chunks of ``chunk``). ``prompts_file``: text models' prompts, one a line; ``seed``: random init of
    ``random`` / ``tiny`` weights; ``settings``: generation settings (``batch_size`` is ignored)."""
    from ..calibration.data import make_calibration_set
    from ..captions import check_clean_caption
    from ..checks import check_values
    from ..io import check_writable
    from ..zoo.digits_sd import read_prompt_file
    from ..zoo.resolve import resolve_model

    check_values(num=num, timesteps=timesteps, data_seed=data_seed, chunk=chunk, seed=seed)
    fam, weights, device, dtype = resolve_model(model, weights, pipeline_class, device, dtype)
    if not str(out).endswith(".safetensors"):
        raise SensitivityError(f"--out {str(out)!r}: the calibration set is a .safetensors file")
    check_writable(out, "--out")  # a folder there, or a read-only folder: refused before any work
    if kind == "raw" and fam.name not in ("digits-dit", "digits-unet"):
        raise SensitivityError(f"--kind raw needs the training data: only the digits models ship it, not {fam.name!r}")
    prompts = read_prompt_file(prompts_file, what="--prompts-file") if prompts_file else None
    check_clean_caption(settings)
    settings = {k: v for k, v in settings.items() if k != "batch_size"}
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=seed)
    fam.settings(pipe, **settings)  # validate before any work
    return make_calibration_set(fam, pipe, out, kind=kind, num=num, timesteps=timesteps, seed=data_seed,
                                prompts=prompts, chunk=chunk, weights=weights, progress=progress, **settings)
