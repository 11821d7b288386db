"""Calibrated post-training quantization (q-diffusion style), on top of any config.

Stage: after ``multiquantizer`` and ``zoo``, before ``evaluation`` (which applies calibrated
artifacts; nothing here imports evaluation).

```python
from sensitivity.calibration import make_calibration_set, load_calibration_set, calibrate, load_calibrated
cs = make_calibration_set(fam, pipe, "calib/digits-dit.safetensors", kind="timestep_aware", num=64)
art = calibrate(den, mq, config, cs, weights_method="auto", act_bits=8, observer="mse")
art.save("quant_configs/X-cal")
art = load_calibrated("quant_configs/X-cal"); apply_calibrated(den, mq, art); ...; remove_calibrated(den)
```
"""

# name -> submodule; imported on first use (PEP 562), so the CLI can read option names without torch
_NAMES = {
    'ActivationCalibration': 'artifact',
    'CalibratedArtifact': 'artifact',
    'apply_calibrated': 'artifact',
    'is_calibrated_dir': 'artifact',
    'load_calibrated': 'artifact',
    'load_config_or_calibrated': 'artifact',
    'remove_calibrated': 'artifact',
    'KINDS': 'data',
    'CalibrationSet': 'data',
    'load_calibration_set': 'data',
    'make_calibration_set': 'data',
    'OBSERVERS': 'observers',
    'RangeObserver': 'observers',
    'scale_zero': 'observers',
    'DEFAULT_ROUNDING': 'pipeline',
    'WEIGHT_METHODS': 'pipeline',
    'calibrate': 'pipeline',
    'collect_hessians': 'pipeline',
    'observe_ranges': 'pipeline',
    'adaround_codes': 'rounding',
    'gptq_codes': 'rounding',
    'output_error': 'rounding',
    'refit_table': 'rounding',
}

__all__ = [
    "ActivationCalibration", "CalibratedArtifact", "CalibrationSet", "DEFAULT_ROUNDING", "KINDS", "OBSERVERS",
    "RangeObserver", "WEIGHT_METHODS", "adaround_codes", "apply_calibrated", "calibrate", "collect_hessians",
    "gptq_codes", "is_calibrated_dir", "load_calibrated", "load_calibration_set", "load_config_or_calibrated",
    "make_calibration_set", "observe_ranges", "output_error", "refit_table", "remove_calibrated", "scale_zero",
]


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
