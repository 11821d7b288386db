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

from .artifact import (ActivationCalibration, CalibratedArtifact, apply_calibrated, is_calibrated_dir,
                       load_calibrated, load_config_or_calibrated, remove_calibrated)
from .data import KINDS, CalibrationSet, load_calibration_set, make_calibration_set
from .observers import OBSERVERS, RangeObserver, scale_zero
from .pipeline import DEFAULT_ROUNDING, WEIGHT_METHODS, calibrate, collect_hessians, observe_ranges
from .rounding import adaround_codes, gptq_codes, output_error, refit_table

__all__ = [
    "ActivationCalibration", "CalibratedArtifact", "CalibrationSet", "DEFAULT_ROUNDING", "KINDS", "OBSERVERS",
    "RangeObserver", "WEIGHT_METHODS", "adaround_codes", "apply_calibrated", "calibrate", "collect_hessians",
    "gptq_codes", "is_calibrated_dir", "load_calibrated", "load_calibration_set", "load_config_or_calibrated",
    "make_calibration_set", "observe_ranges", "output_error", "refit_table", "remove_calibrated", "scale_zero",
]
