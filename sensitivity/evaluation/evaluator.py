"""Evaluate quantization configs: apply, generate a fixed image set, score, restore.

```python
fam = get_family("digits-dit")
pipe = fam.load_pipeline()                                   # shipped weights
mq = load_multiquantizer("multiquantizers/digits-dit.safetensors")
protocol = EvalProtocol.for_family(fam, n_per_class=50, multiquantizer_hash=mq.hash)
ev = Evaluator(fam, pipe, mq, protocol)
ev.evaluate({"transformer_blocks.0.attn1.to_q": "uaq-3"})
# {'fid': ..., 'kid': ..., 'accuracy': ..., 'psnr': ..., 'mse': ..., 'seconds': ...}
```

The protocol fixes everything that decides the numbers: model id, multiquantizer hash, conditions
(class ids or prompts), seeds, steps, guidance, scheduler, dtype, feature network, reference set and
metric versions. ``protocol.signature()`` hashes its description (:meth:`EvalProtocol.to_dict`) with
:func:`sensitivity.evaluation.cache.evaluation_signature`; a cache holds the records of one signature.

Metrics per config:

* ``fid`` / ``kid`` — against the real digits (digits families: features of the shipped classifier)
  or against ``reference_dir`` (real models: clean-fid Inception, reference features cached in
  ``cache_dir``; needs ``sensitivity[cleanfid]``; omitted when no ``reference_dir`` is given);
* ``accuracy`` — digits families: fraction of images the classifier assigns to the requested class;
* ``psnr`` / ``mse`` — paired with the full-precision images of the same seeds (computed once);
* ``seconds`` — wall time of apply + generate + score.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checks import check_finite_weights
from ..config import QuantConfig, as_options
from ..errors import SensitivityError
from ..multiquantizer import apply, load_multiquantizer, restore
from ..zoo import get_family
from ..zoo.base import ModelFamily
from . import metrics as M

DIGITS_REFERENCE = "sklearn-digits-1797"


@dataclass(frozen=True)
class EvalProtocol:
    """What an evaluation measures; two evaluations with equal ``signature()`` are comparable.

    ``conditions``: class ids (class families) or prompts; image ``i`` uses ``seeds[i]``.
    ``feature_net``: identity of the FID feature network (digits: ``digits-classifier:<sha12>``).
    ``reference``: the FID reference set (``sklearn-digits-1797`` or a folder path + fingerprint).
    """

    model_id: str
    conditions: Tuple[Any, ...]
    seeds: Tuple[int, ...]
    steps: int
    guidance: float
    scheduler: Optional[str] = None
    dtype: Optional[str] = None
    multiquantizer_hash: Optional[str] = None
    feature_net: str = ""
    reference: str = ""
    metrics: Tuple[str, ...] = ("fid", "kid", "accuracy", "psnr", "mse")
    kid_subsets: int = 100
    metrics_version: str = M.METRICS_VERSION

    def __post_init__(self):
        if len(self.conditions) != len(self.seeds):
            raise SensitivityError(f"protocol: {len(self.conditions)} conditions but {len(self.seeds)} seeds")
        if len(self.seeds) < 2:
            raise SensitivityError("protocol: needs at least 2 images (FID/KID need a covariance)")
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @classmethod
    def for_family(cls, family: Union[str, ModelFamily], weights: Optional[str] = None, *,
                   conditions: Optional[Sequence] = None, n_per_class: int = 50, seed: int = 0,
                   steps: Optional[int] = None, guidance: Optional[float] = None,
                   scheduler: Optional[str] = None, dtype: Union[None, str, torch.dtype] = None,
                   multiquantizer_hash: Optional[str] = None, reference_dir: Union[str, Path, None] = None,
                   feature_net: Optional[str] = None, kid_subsets: int = 100) -> "EvalProtocol":
        """The default protocol of ``family``: for class families ``n_per_class`` images of every class
        (class-major: 0,0,..,1,1,..), seeds ``seed, seed+1, ...``; text families need ``conditions``
        (prompts). Unset steps/guidance/scheduler take the family's defaults; unset ``dtype`` and
        ``multiquantizer_hash`` are filled in by the :class:`Evaluator` from its model and multiquantizer.
        """
        fam = get_family(family)
        if conditions is None:
            if fam.conditioning != "class" or not fam.num_classes:
                raise SensitivityError(f"model {fam.name!r}: give the prompts (conditions) of the protocol")
            conditions = [c for c in range(fam.num_classes) for _ in range(int(n_per_class))]
        conditions = fam.check_conditions(conditions)
        seeds = [int(seed) + i for i in range(len(conditions))]
        d = fam.defaults
        digits = is_digits_family(fam)
        if feature_net is None:
            if digits:
                feature_net = M.DigitsFeatures().name
            else:
                feature_net = "clean-fid:inception-2015-12-05" if reference_dir is not None else ""
        if digits:
            reference, wanted = DIGITS_REFERENCE, ("fid", "kid", "accuracy", "psnr", "mse")
        elif reference_dir is not None:
            fp, n = M._folder_fingerprint(Path(reference_dir).resolve())
            reference, wanted = f"{Path(reference_dir).resolve()}|{n}|{fp[:16]}", ("fid", "kid", "psnr", "mse")
        else:
            reference, wanted = "", ("psnr", "mse")
        dt = None if dtype is None else str(dtype).replace("torch.", "")
        return cls(model_id=fam.model_id(weights), conditions=tuple(conditions), seeds=tuple(seeds),
                   steps=int(steps if steps is not None else d.steps),
                   guidance=float(guidance if guidance is not None else d.guidance),
                   scheduler=scheduler if scheduler is not None else d.scheduler, dtype=dt,
                   multiquantizer_hash=multiquantizer_hash, feature_net=feature_net, reference=reference,
                   metrics=wanted, kid_subsets=int(kid_subsets))

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able description (the cache's ``evaluation``); ``signature()`` is its hash."""
        d = asdict(self)
        d["conditions"] = list(self.conditions)
        d["seeds"] = list(self.seeds)
        d["metrics"] = list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalProtocol":
        d = dict(d)
        for key in ("conditions", "seeds", "metrics"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def signature(self) -> str:
        from .cache import evaluation_signature

        return evaluation_signature(self.to_dict())

    def with_multiquantizer(self, mq_hash: str) -> "EvalProtocol":
        return replace(self, multiquantizer_hash=mq_hash)


def is_digits_family(family: ModelFamily) -> bool:
    return family.name in ("digits-dit", "digits-unet")


class Evaluator:
    """Scores quantization configs of one pipeline under one :class:`EvalProtocol`.

    ``mq`` may be ``None`` (only full precision can then be evaluated). ``reference_dir`` /
    ``cache_dir`` / ``extractor``: real models' FID reference folder, cache folder for its features,
    and a :class:`~sensitivity.evaluation.metrics.CleanFIDInception` (built on first use if omitted).
    The full-precision images of the protocol are generated once, on first need.
    """

    def __init__(self, family: Union[str, ModelFamily], pipe, mq, protocol: EvalProtocol, *,
                 batch_size: Optional[int] = None, reference_dir: Union[str, Path, None] = None,
                 cache_dir: Union[str, Path, None] = None, extractor=None, progress: bool = False,
                 check_model: bool = True):
        self.family = get_family(family)
        self.pipe = pipe
        self.denoiser = self.family.denoiser(pipe)
        self.mq = mq
        self.batch_size = batch_size
        self.progress = progress
        if mq is not None:
            if protocol.multiquantizer_hash is None:
                protocol = protocol.with_multiquantizer(mq.hash)
            elif protocol.multiquantizer_hash != mq.hash:
                raise SensitivityError(f"protocol is for multiquantizer {protocol.multiquantizer_hash[:12]}, "
                                       f"not {mq.hash[:12]} ({mq.model_id})")
            if check_model:
                mq.check_model(self.denoiser)
        dt = str(self.denoiser.dtype).replace("torch.", "")
        if protocol.dtype is None:
            protocol = replace(protocol, dtype=dt)
        elif dt != protocol.dtype:
            raise SensitivityError(f"protocol dtype {protocol.dtype} but the model runs in {dt}")
        self.protocol = protocol
        self.digits = is_digits_family(self.family)
        self.device = self.denoiser.device
        self._features = None
        self.reference_dir = reference_dir
        self.cache_dir = cache_dir
        self._extractor = extractor
        if self.digits:
            self._features = M.DigitsFeatures(device=self.device)
            if protocol.feature_net and protocol.feature_net != self._features.name:
                raise SensitivityError(f"protocol feature network {protocol.feature_net} differs from the "
                                       f"installed classifier {self._features.name}")
        elif any(m in protocol.metrics for m in ("fid", "kid")):
            if reference_dir is None:
                raise SensitivityError(f"model {self.family.name!r}: FID/KID need a reference image folder "
                                       "(reference_dir)")
            if extractor is not None and protocol.feature_net and extractor.name != protocol.feature_net:
                raise SensitivityError(f"protocol feature network {protocol.feature_net} differs from the "
                                       f"extractor's {extractor.name}")
        self._fp_images: Optional[np.ndarray] = None
        self._labels = np.asarray(protocol.conditions) if self.digits else None

    # ----------------------------------------------------------------------------- generation
    def generate(self) -> np.ndarray:
        """The protocol's images with the model as it is now: uint8 ``[N, H, W, C]``."""
        p = self.protocol
        return self.family.generate(self.pipe, list(p.conditions), list(p.seeds), batch_size=self.batch_size,
                                    progress=self.progress, steps=p.steps, guidance=p.guidance,
                                    scheduler=p.scheduler)

    def reference_images(self) -> np.ndarray:
        """Full-precision images of the protocol (generated once; the model is restored first)."""
        if self._fp_images is None:
            restore(self.denoiser)
            self._fp_images = self.generate()
            self._fp_images.setflags(write=False)
        return self._fp_images

    # ----------------------------------------------------------------------------- scoring
    def score(self, images: np.ndarray) -> Dict[str, float]:
        """The protocol's metrics of ``images`` (uint8 ``[N, H, W, C]``, in protocol order)."""
        p = self.protocol
        out: Dict[str, float] = {}
        want = set(p.metrics)
        if self.digits:
            feats, pred = self._features.features_and_predictions(images)
            ref = self._features.reference_features()
            if "fid" in want:
                out["fid"] = M.frechet_distance(*M.feature_statistics(feats), *self._features.reference_statistics())
            if "kid" in want:
                out["kid"] = M.kid_from_features(feats, ref, num_subsets=p.kid_subsets, seed=0)
            if "accuracy" in want:
                out["accuracy"] = M.class_accuracy(pred, self._labels)
        elif want & {"fid", "kid"}:
            if self._extractor is None:
                self._extractor = M.CleanFIDInception(device=self.device)
            rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
            feats = self._extractor.image_features(rgb)
            ref = M.reference_folder_features(self.reference_dir, self.cache_dir or Path(".sensitivity-cache"),
                                              self._extractor)
            if "fid" in want:
                out["fid"] = M.fid_from_features(feats, ref)
            if "kid" in want:
                out["kid"] = M.kid_from_features(feats, ref, num_subsets=p.kid_subsets, seed=0)
        if want & {"psnr", "mse"}:
            fp = self.reference_images()
            if "psnr" in want:
                out["psnr"] = M.psnr(images, fp)
            if "mse" in want:
                out["mse"] = M.mse(images, fp)
        return out

    def evaluate(self, config: Union[None, QuantConfig, Mapping[str, str]] = None,
                 return_images: bool = False) -> Dict[str, Any]:
        """Apply ``config`` (``None``/``{}`` = full precision; a calibrated artifact of
        :mod:`sensitivity.calibration` with its overlay and activation ranges), generate, score, restore.

        Returns ``{"fid", "kid", "accuracy", "psnr", "mse", "seconds"}`` (the protocol's metrics) and
        ``"timings"`` (seconds of apply / generate / score); with ``return_images`` also ``"images"``.
        """
        from ..calibration.artifact import CalibratedArtifact, apply_calibrated, remove_calibrated

        calibrated = config if isinstance(config, CalibratedArtifact) else None
        if calibrated is not None:
            config = calibrated.config
        options = as_options(config) if config is not None else {}
        if options and self.mq is None:
            raise SensitivityError("Evaluator: no multiquantizer given, only full precision can be evaluated")
        self.reference_images()  # before applying: the full-precision images of the same seeds
        t0 = time.perf_counter()
        try:
            if calibrated is not None:
                apply_calibrated(self.denoiser, self.mq, calibrated)
            elif options:
                apply(self.denoiser, self.mq, options)
            t1 = time.perf_counter()
            images = self.generate()
        finally:
            if calibrated is not None:
                remove_calibrated(self.denoiser)
            restore(self.denoiser)
        t2 = time.perf_counter()
        out: Dict[str, Any] = dict(self.score(images))
        t3 = time.perf_counter()
        out["seconds"] = t3 - t0
        out["timings"] = {"apply": t1 - t0, "generate": t2 - t1, "score": t3 - t2}
        if return_images:
            out["images"] = images
        return out

    def worker(self) -> Callable[[int, Dict[str, str]], Dict[str, Any]]:
        """``evaluate(index, options) -> metrics`` for :mod:`sensitivity.evaluation.runners`."""

        def evaluate(index: int, options: Dict[str, str]) -> Dict[str, Any]:
            return self.evaluate(options)

        return evaluate


@dataclass
class EvaluatorFactory:
    """Picklable factory of an evaluation worker (for runners): loads the pipeline and the
    multiquantizer once in the worker and returns :meth:`Evaluator.worker`."""

    family: str
    multiquantizer: Optional[str]
    protocol: Dict[str, Any]
    weights: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Optional[int] = None
    reference_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    threads: Optional[int] = None

    def build(self) -> Evaluator:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        fam = get_family(self.family)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = fam.load_pipeline(self.weights, device=device, dtype=self.dtype)
        check_finite_weights(fam.denoiser(pipe), None, f"--weights {self.weights or fam.resolve_weights(None)}")
        mq = load_multiquantizer(self.multiquantizer) if self.multiquantizer else None
        return Evaluator(fam, pipe, mq, EvalProtocol.from_dict(self.protocol), batch_size=self.batch_size,
                         reference_dir=self.reference_dir, cache_dir=self.cache_dir)

    def __call__(self) -> Callable[[int, Dict[str, str]], Dict[str, Any]]:
        return self.build().worker()
