"""The metric registry: each metric's name, direction, and how to read it from a cache record.

Importing this module is cheap (no torch): search, predictors and insights use it to know whether a
lower value is better. A metric not registered here is read the same way and counts as
higher-is-better. Register a new metric with :func:`register_metric`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import SensitivityError
from ..registry import Registry

#: transforms of a predictor's target: ``none`` (the metric itself) or ``log`` (positive metrics such as FID)
TARGET_TRANSFORMS = ("none", "log")
#: what training accepts: a transform, or ``auto`` (:func:`resolve_transform`)
TRAIN_TRANSFORMS = ("auto", *TARGET_TRANSFORMS)


@dataclass(frozen=True)
class MetricSpec:
    """``name`` (as stored in a record's ``metrics``), ``lower_is_better``, a one-line description;
    ``log_target``: the metric is > 0 for every config and its ratios are what matter (FID), so predictors
    learn its log by default (:func:`resolve_transform`)."""

    name: str
    lower_is_better: bool
    description: str = ""
    log_target: bool = False

    def read(self, record: Mapping[str, Any]) -> Optional[float]:
        """The metric of a cache record (see :func:`record_metric`)."""
        return record_metric(record, self.name)

    def sign(self) -> float:
        """−1 for lower-is-better metrics, +1 otherwise: ``sign · value`` is higher-is-better."""
        return -1.0 if self.lower_is_better else 1.0


#: metric name (case-insensitive) -> its :class:`MetricSpec`
METRICS: Registry[MetricSpec] = Registry("metric", normalize=str.lower, replace=True)


def register_metric(name: str, lower_is_better: bool, description: str = "", log_target: bool = False) -> MetricSpec:
    """Add (or replace) a metric; names are case-insensitive."""
    return METRICS.register(name, MetricSpec(name, bool(lower_is_better), description, bool(log_target)))


# "log": the predictors learn its log by default. FID against a reference set never reaches 0 (even full
# precision has the sampling gap); KID's unbiased estimate and the paired distances can, so they do not.
for _name, _lower, _desc, *_flags in (
    ("fid", True, "Fréchet distance of image features to the reference set", "log"),
    ("kid", True, "kernel inception distance (unbiased MMD², polynomial kernel)"),
    ("fid-gt-1k", True, "the reference implementation's FID against 1k ground-truth images", "log"),
    ("mse", True, "mean squared error of the images against the full-precision model's images"),
    ("feature_mse", True, "per-image squared feature distance to the full-precision image of the same seed, / D"),
    ("fd_fp", True, "Fréchet distance of the image features to the full-precision images' of the same seeds"),
    ("kid_fp", True, "unbiased MMD² (KID's kernel) of the image features to the full-precision images'"),
    ("lpips", True, "learned perceptual distance to the full-precision images"),
    ("loss", True, "a loss value"),
    ("bops", True, "Tera bit-operations per image (MACs x weight bits x activation bits, all steps)"),
    ("clip_score", False, "100 x cosine of CLIP image and prompt embeddings"),
    ("accuracy", False, "share of images the digits classifier labels as their class"),
    ("psnr", False, "peak signal-to-noise ratio against the full-precision images (dB)"),
):
    register_metric(_name, _lower, _desc, log_target="log" in _flags)


def metric_spec(name: str) -> MetricSpec:
    """The registered spec of ``name`` (case-insensitive); an unknown name is higher-is-better."""
    return METRICS.find(str(name)) or MetricSpec(str(name), False, "unregistered metric")


def resolve_transform(transform: str, metric: str, lam: float = 0.0) -> str:
    """The target transform ``transform`` stands for: itself, or for ``auto`` ``log`` where ``metric`` is a
    :attr:`MetricSpec.log_target` and there is no bit penalty (``lam`` = 0: the reference's λ is in metric
    units), else ``none``."""
    if transform not in TRAIN_TRANSFORMS:
        raise SensitivityError(f"unknown target transform {transform!r}; use {', '.join(TRAIN_TRANSFORMS)}")
    if transform != "auto":
        return transform
    return "log" if metric_spec(metric).log_target and float(lam) == 0.0 else "none"


def lower_is_better(name: str, override: Optional[bool] = None) -> bool:
    """Whether a lower ``name`` is better (``override``, when not None, wins)."""
    return bool(override) if override is not None else metric_spec(name).lower_is_better


def record_metric(rec: Mapping[str, Any], metric: str) -> Optional[float]:
    """``rec["metrics"][metric]`` (case-insensitive), or a top-level field; None if absent / not finite."""
    m = rec.get("metrics") or {}
    v = None
    if isinstance(m, Mapping):
        v = m.get(metric)
        if v is None:
            low = {str(k).lower(): val for k, val in m.items()}
            v = low.get(metric.lower())
    if v is None:
        v = rec.get(metric)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None

