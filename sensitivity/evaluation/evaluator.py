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

import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checks import check_finite_weights, check_values
from ..config import QuantConfig, as_options
from ..errors import SensitivityError
from ..multiquantizer import apply, load_multiquantizer, restore
from ..pipeline_quant import is_pipeline_multiquantizer, quantization_root
from ..zoo import get_family
from ..zoo.base import DIGITS_CLASSIFIER, ModelFamily
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
    # fields below are left out of to_dict() (and so of the signature) while at their default, so the
    # signatures of evaluations made before they existed do not change
    act_bits: Optional[int] = None          # activation bits (8 or 6) or None = full-precision activations
    act_mode: Optional[str] = None          # "online" (token-wise min/max) | "static" (ranges from act_calibration)
    act_calibration: Optional[str] = None   # static: content hash of the calibration set (+ observer)
    height: Optional[int] = None            # image size (None: the model's default)
    width: Optional[int] = None
    extra: Tuple[Tuple[str, Any], ...] = ()  # further pipeline settings, sorted (key, value) pairs
    clip_model: str = ""                    # identity of the CLIP model of "clip_score"
    lpips_net: str = ""                     # identity of the LPIPS network of "lpips"

    def __post_init__(self):
        if len(self.conditions) != len(self.seeds):
            raise SensitivityError(f"protocol: {len(self.conditions)} conditions but {len(self.seeds)} seeds")
        if len(self.seeds) < 2:
            raise SensitivityError("protocol: needs at least 2 images (FID/KID need a covariance)")
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        extra = self.extra.items() if isinstance(self.extra, Mapping) else self.extra
        object.__setattr__(self, "extra", tuple(sorted((str(k), v) for k, v in extra)))
        if self.act_bits is not None:
            from ..quantizers.activation import ACT_BITS

            if int(self.act_bits) not in ACT_BITS:
                raise SensitivityError(f"protocol: act_bits {self.act_bits} not one of {', '.join(map(str, ACT_BITS))}")
            object.__setattr__(self, "act_bits", int(self.act_bits))
            mode = self.act_mode or ("static" if self.act_calibration else "online")
            if mode not in ("online", "static"):
                raise SensitivityError(f"protocol: act_mode {mode!r}: use 'online' or 'static'")
            if mode == "static" and not self.act_calibration:
                raise SensitivityError("protocol: static activation quantization needs a calibration set")
            object.__setattr__(self, "act_mode", mode)
        elif self.act_mode or self.act_calibration:
            raise SensitivityError("protocol: act_mode / act_calibration given without act_bits")

    @classmethod
    def for_family(cls, family: Union[str, ModelFamily], weights: Optional[str] = None, *,
                   conditions: Optional[Sequence] = None, n_per_class: int = 50, seed: int = 0,
                   steps: Optional[int] = None, guidance: Optional[float] = None,
                   scheduler: Optional[str] = None, dtype: Union[None, str, torch.dtype] = None,
                   multiquantizer_hash: Optional[str] = None, reference_dir: Union[str, Path, None] = None,
                   feature_net: Optional[str] = None, kid_subsets: int = 100,
                   act_bits: Optional[int] = None, act_calibration: Optional[str] = None,
                   height: Optional[int] = None, width: Optional[int] = None,
                   extra: Optional[Mapping[str, Any]] = None, inception: Union[str, Path, None] = None,
                   reference_features: Optional[np.ndarray] = None, clip_model: str = "",
                   lpips_net: str = "", paired_features: bool = False) -> "EvalProtocol":
        """The default protocol of ``family``: for class families ``n_per_class`` images of every class
        (class-major: 0,0,..,1,1,..), seeds ``seed, seed+1, ...``; text families need ``conditions``
        (prompts). Unset steps/guidance/scheduler take the family's defaults; unset ``dtype`` and
        ``multiquantizer_hash`` are filled in by the :class:`Evaluator` from its model and multiquantizer.

        Real models with ``reference_dir``: the reference is keyed by content (file list and sizes, and
        with ``reference_features`` a hash of their FID statistics), the feature network by the
        ``inception`` file's content. ``act_bits`` (8 | 6): activations quantized online token-wise, or
        statically with the ranges of a calibration set (``act_calibration``: its identity).
        ``clip_model`` / ``lpips_net``: identities from :mod:`.extra_metrics` add ``clip_score`` / ``lpips``.
        ``paired_features``: add ``feature_mse`` / ``fd_fp`` / ``kid_fp``, the feature network's distance to
        the full-precision images of the same seeds (digits classifier, or the ``inception`` file of a real
        model, which then needs no ``reference_dir``).
        """
        extra = dict(extra or {})
        given = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "height": height, "width": width}
        for key in [k for k in extra if k in given]:  # a setting given as an extra one (--set steps=20) is that setting
            if given[key] is not None and given[key] != extra[key]:
                raise SensitivityError(f"{key} given twice: {given[key]!r} and {extra[key]!r} (--set {key}=...)")
            given[key] = extra.pop(key)
        for key in ("batch_size", "scheduler_kwargs"):
            if key in extra:
                raise SensitivityError(f"setting {key!r} is not part of an evaluation protocol"
                                       + (" (use --batch-size: it does not change the images)" if key == "batch_size" else ""))
        steps, guidance, scheduler, height, width = (given[k] for k in ("steps", "guidance", "scheduler", "height", "width"))
        check_values(steps=steps, guidance=guidance, height=height, width=width, seed=seed, kid_subsets=kid_subsets)
        fam = get_family(family)
        if conditions is None and hasattr(fam, "default_conditions"):  # digits-sd: shipped eval prompts
            conditions = fam.default_conditions(int(n_per_class))
        if conditions is None:
            if fam.conditioning != "class" or not fam.num_classes:
                raise SensitivityError(f"model {fam.name!r}: give the prompts (conditions) of the protocol")
            conditions = [c for c in range(fam.num_classes) for _ in range(int(n_per_class))]
        conditions = fam.check_conditions(conditions)
        seeds = [int(seed) + i for i in range(len(conditions))]
        d = fam.defaults
        digits = fam.feature_network == DIGITS_CLASSIFIER
        if feature_net is None:
            if digits:
                feature_net = M.DigitsFeatures().name
            elif reference_dir is not None or paired_features:
                feature_net = M.inception_name(M.resolve_inception(inception))
            else:
                feature_net = ""
        if digits:
            reference, wanted = DIGITS_REFERENCE, ("fid", "kid", "accuracy", "psnr", "mse")
        elif reference_dir is not None:
            reference, wanted = M.reference_identity(reference_dir, reference_features), ("fid", "kid", "psnr", "mse")
        else:
            reference, wanted = "", ("psnr", "mse")
        if clip_model:
            if fam.conditioning != "text":
                raise SensitivityError(f"model {fam.name!r}: CLIP score needs a text-conditional model")
            wanted = wanted + ("clip_score",)
        if lpips_net:
            wanted = wanted + ("lpips",)
        if paired_features:
            wanted = wanted + M.PAIRED_FEATURE_METRICS
        dt = None if dtype is None else str(dtype).replace("torch.", "")
        return cls(model_id=fam.model_id(weights), conditions=tuple(conditions), seeds=tuple(seeds),
                   steps=int(steps if steps is not None else d.steps),
                   guidance=float(guidance if guidance is not None else d.guidance),
                   scheduler=scheduler if scheduler is not None else d.scheduler, dtype=dt,
                   multiquantizer_hash=multiquantizer_hash, feature_net=feature_net, reference=reference,
                   metrics=wanted, kid_subsets=int(kid_subsets), act_bits=act_bits,
                   act_calibration=act_calibration, height=height, width=width, extra=tuple(extra.items()),
                   clip_model=clip_model, lpips_net=lpips_net)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able description (the cache's ``evaluation``); ``signature()`` is its hash."""
        d = asdict(self)
        d["conditions"] = list(self.conditions)
        d["seeds"] = list(self.seeds)
        d["metrics"] = list(self.metrics)
        d["extra"] = dict(self.extra)
        for key, default in _OPTIONAL_FIELDS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalProtocol":
        d = dict(d)
        for key in ("conditions", "seeds", "metrics"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("extra"), Mapping):
            d["extra"] = tuple(d["extra"].items())
        return cls(**d)

    def generation_overrides(self) -> Dict[str, Any]:
        """Settings for ``family.generate``: steps, guidance, scheduler, size and the extra settings."""
        out: Dict[str, Any] = {"steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler}
        if self.height is not None:
            out["height"] = self.height
        if self.width is not None:
            out["width"] = self.width
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def signature(self) -> str:
        from .cache import evaluation_signature

        return evaluation_signature(self.to_dict())

    def with_multiquantizer(self, mq_hash: str) -> "EvalProtocol":
        return replace(self, multiquantizer_hash=mq_hash)


#: fields of EvalProtocol left out of its description while at these defaults
_OPTIONAL_FIELDS: Dict[str, Any] = {"act_bits": None, "act_mode": None, "act_calibration": None, "height": None,
                                    "width": None, "extra": {}, "clip_model": "", "lpips_net": ""}


def condition_labels(family: ModelFamily, conditions: Sequence) -> np.ndarray:
    """Class labels of a protocol's conditions: the class ids, or the family's ``class_labels(prompts)``."""
    if hasattr(family, "class_labels"):
        return np.asarray(family.class_labels(list(conditions)), dtype=np.int64)
    return np.asarray(conditions)


class Evaluator:
    """Scores quantization configs of one pipeline under one :class:`EvalProtocol`.

    ``mq`` may be ``None`` (only full precision can then be evaluated). ``reference_dir`` /
    ``cache_dir`` / ``extractor``: real models' FID reference folder, cache folder for its features,
    and a :class:`~sensitivity.evaluation.metrics.CleanFIDInception` (built on first use if omitted).
    The full-precision images of the protocol are generated once, on first need; with ``fp_images_dir``
    (a job's: ``fp-images/`` beside its cache file) and a multiquantizer they are stored there and shared
    by every worker of the job and by reruns (:mod:`sensitivity.evaluation.fp_reference`). ``batch_size``: images per generation batch, ``None``
    (the model's default) or ``"auto"`` (:mod:`sensitivity.evaluation.batching`; resolved on the first
    generation, halved if a later batch runs out of memory). Images stay in memory for every metric.
    """

    def __init__(self, family: Union[str, ModelFamily], pipe, mq, protocol: EvalProtocol, *,
                 batch_size: Optional[int] = None, reference_dir: Union[str, Path, None] = None,
                 cache_dir: Union[str, Path, None] = None, extractor=None, progress: bool = False,
                 check_model: bool = True, inception: Union[str, Path, None] = None,
                 clip_model: Optional[str] = None, lpips_net: Optional[str] = None,
                 act_calibration: Union[str, Path, None] = None, reference_images=None,
                 fp_images_dir: Union[str, Path, None] = None, bootstrap: int = 0, bootstrap_seed: int = 0):
        self.family = get_family(family)
        if int(bootstrap) < 0:
            raise SensitivityError(f"Evaluator: bootstrap must be >= 0 replicates, got {bootstrap}")
        #: replicates of each metric over images resampled with this seed (0: none); not part of the protocol
        self.bootstrap, self.bootstrap_seed = int(bootstrap), int(bootstrap_seed)
        self.pipe = pipe
        self.denoiser = self.family.denoiser(pipe)
        # what configs are applied to: the denoiser, or every component for a pipeline multiquantizer
        self.quant_root = quantization_root(self.family, pipe, mq)
        self.mq = mq
        from .batching import parse_batch_size

        self.batch_size = parse_batch_size(batch_size)
        self.progress = progress
        #: how this worker generates (device, resolved batch size, compile); in every record's timings["worker"]
        self.worker_info: Dict[str, Any] = {}
        if mq is not None:
            if protocol.multiquantizer_hash is None:
                protocol = protocol.with_multiquantizer(mq.hash)
            elif protocol.multiquantizer_hash != mq.hash:
                raise SensitivityError(f"protocol is for multiquantizer {protocol.multiquantizer_hash[:12]}, "
                                       f"not {mq.hash[:12]} ({mq.model_id})")
            if check_model:
                mq.check_model(self.quant_root)
        dt = str(self.denoiser.dtype).replace("torch.", "")
        if protocol.dtype is None:
            protocol = replace(protocol, dtype=dt)
        elif dt != protocol.dtype:
            raise SensitivityError(f"protocol dtype {protocol.dtype} but the model runs in {dt}")
        if mq is not None and is_pipeline_multiquantizer(mq) and protocol.act_bits is not None:
            raise SensitivityError("activation quantization (act_bits) applies to the denoiser: it cannot be "
                                   f"combined with the pipeline multiquantizer {mq.path.name}")
        self.protocol = protocol
        self.digits = self.family.feature_network == DIGITS_CLASSIFIER
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
        self.inception = inception
        self._ref_features: Optional[np.ndarray] = None
        self._clip = self._lpips = None
        if "clip_score" in protocol.metrics:
            from .extra_metrics import ClipScore

            if not clip_model:
                raise SensitivityError("protocol has clip_score: give the CLIP model (clip_model)")
            self._clip = ClipScore(clip_model, device=self.device)
            if self._clip.name != protocol.clip_model:
                raise SensitivityError(f"CLIP model {clip_model} is {self._clip.name}, the protocol's is "
                                       f"{protocol.clip_model}")
        if "lpips" in protocol.metrics:
            from .extra_metrics import Lpips

            self._lpips = Lpips(lpips_net or "alex", device=self.device)
        self._act_data = None
        if protocol.act_mode == "static":
            from ..calibration.data import load_calibration_set

            if act_calibration is None:
                raise SensitivityError("protocol quantizes activations statically: give the calibration set "
                                       "(act_calibration)")
            if calibration_identity(act_calibration) != protocol.act_calibration:
                raise SensitivityError(f"{act_calibration}: not the protocol's calibration set "
                                       f"({protocol.act_calibration})")
            self._act_data = load_calibration_set(act_calibration)
        self._fp_images: Optional[np.ndarray] = None
        self._fp_features: Optional[np.ndarray] = None  # features of the full-precision images (paired metrics)
        self._fp_features_lock = threading.Lock()
        self._fp_mutex = threading.Lock()
        self._shared_fp = None
        if fp_images_dir is not None and mq is not None and check_model and reference_images is None:
            from .fp_reference import SharedImages

            self._shared_fp = SharedImages(fp_images_dir, protocol.to_dict())
        if reference_images is not None:  # shared by the job (generated once): checked for shape only
            ref = np.asarray(reference_images)
            if len(ref) != protocol.num_images:
                raise SensitivityError(f"{len(ref)} shared full-precision images, the protocol has "
                                       f"{protocol.num_images}")
            ref.setflags(write=False)
            self._fp_images = ref
        self._device_stage = threading.Lock()
        self._labels = condition_labels(self.family, protocol.conditions) if self.digits else None

    # ----------------------------------------------------------------------------- generation
    def resolved_batch_size(self) -> Optional[int]:
        """The batch size generation uses (``auto`` is resolved here, once, by trial generations)."""
        if self.batch_size == "auto":
            from .batching import auto_batch_size

            p = self.protocol
            self.batch_size = auto_batch_size(self.family, self.pipe, p.conditions, p.seeds, self.device,
                                              **p.generation_overrides())
            self._auto_batch = True
        bs = self.batch_size or self.family.settings(self.pipe).batch_size
        self.worker_info["batch_size"] = int(bs)
        return bs

    def _generate_batched(self) -> np.ndarray:
        p = self.protocol
        while True:
            bs = self.resolved_batch_size()
            try:
                return self.family.generate(self.pipe, list(p.conditions), list(p.seeds), batch_size=bs,
                                            progress=self.progress, **p.generation_overrides())
            except BaseException as exc:  # noqa: BLE001 - auto batches halve on out-of-memory
                from .batching import is_out_of_memory

                if not (getattr(self, "_auto_batch", False) and is_out_of_memory(exc) and bs > 1):
                    raise
                import warnings

                torch.cuda.empty_cache()
                self.batch_size = max(1, int(bs) // 2)
                warnings.warn(f"--batch-size auto: {bs} images ran out of memory; {self.batch_size} from now on")

    def generate(self) -> np.ndarray:
        """The protocol's images with the model as it is now: uint8 ``[N, H, W, C]``."""
        if getattr(self, "_macs", None) is not None or self.mq is None:
            return self._generate_batched()
        from .bops import count_macs  # MACs per image of every layer, counted on the first generation

        with count_macs(self.quant_root, self.mq.layers) as macs:
            images = self._generate_batched()
        self._macs = {k: v / max(1, len(images)) for k, v in macs.items()}
        return images

    def _generate_fp(self) -> np.ndarray:
        """Generate the full-precision images now (the caller holds the device stage)."""
        restore(self.quant_root)
        images = self.generate()
        images.setflags(write=False)
        return images

    def _prepare_reference(self, timings: Dict[str, float]) -> None:
        """Before a config is applied (device stage held): have the full-precision images, unless another
        worker is generating the shared copy (then :meth:`reference_images` waits for it at scoring)."""
        if self._fp_images is not None or not self._fp_mutex.acquire(blocking=False):
            return  # held: another thread of this worker is fetching them (it may wait for this device stage)
        try:
            if self._fp_images is not None:
                return
            t0 = time.perf_counter()
            shared = self._shared_fp
            if shared is None:
                self._fp_images = self._generate_fp()
                timings["fp_generate"] = time.perf_counter() - t0
                return
            arr = shared.load()
            if arr is None and shared.try_lock():
                try:
                    arr = shared.load()
                    if arr is None:
                        shared.save(self._generate_fp())
                        self._fp_images = shared.load()
                        timings["fp_generate"] = time.perf_counter() - t0
                        return
                finally:
                    shared.unlock()
            if arr is not None:
                self._fp_images = arr
                timings["fp_load"] = time.perf_counter() - t0
        finally:
            self._fp_mutex.release()

    def reference_images(self, timings: Optional[Dict[str, float]] = None) -> np.ndarray:
        """Full-precision images of the protocol (generated once, or loaded from the job's shared copy;
        the model is restored first)."""
        timings = {} if timings is None else timings
        if self._fp_images is None and self._shared_fp is not None:
            t0 = time.perf_counter()
            with self._fp_mutex:  # another worker holds the lock: wait for its file
                if self._fp_images is None:
                    arr, made = self._shared_fp.get_or_make(self._generate_fp_staged)
                    self._fp_images = arr
                    timings["fp_generate" if made else "fp_load"] = time.perf_counter() - t0
        if self._fp_images is None:
            with self._device_stage:
                self._prepare_reference(timings)
        return self._fp_images

    def _generate_fp_staged(self) -> np.ndarray:
        with self._device_stage:  # the model may hold another config (pipelined worker): wait for its turn
            return self._generate_fp()

    # ----------------------------------------------------------------------------- scoring
    def score(self, images: np.ndarray, timings: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        """The protocol's metrics of ``images`` (uint8 ``[N, H, W, C]``, in protocol order).

        ``timings``: gets ``fp_load`` / ``fp_generate`` seconds if the full-precision images are fetched here."""
        p = self.protocol
        out: Dict[str, Any] = {}
        want = set(p.metrics)
        boot: Dict[str, Any] = {}  # per-image quantities for the bootstrap replicates
        if self.digits:
            feats, pred = self._features.features_and_predictions(images)
            ref = self._features.reference_features()
            boot.update(features=feats, reference_features=ref if "kid" in want else None,
                        reference_stats=self._features.reference_statistics() if "fid" in want else None,
                        correct=(np.asarray(pred) == self._labels) if "accuracy" in want else None)
            if "fid" in want:
                out["fid"] = M.frechet_distance(*M.feature_statistics(feats), *self._features.reference_statistics())
            if "kid" in want:
                out["kid"] = M.kid_from_features(feats, ref, num_subsets=p.kid_subsets, seed=0)
            if "accuracy" in want:
                out["accuracy"] = M.class_accuracy(pred, self._labels)
        elif want & {"fid", "kid", *M.PAIRED_FEATURE_METRICS}:
            feats = self._image_features(images)
        if not self.digits and want & {"fid", "kid"}:
            if self._ref_features is None:
                self._ref_features = M.reference_folder_features(
                    self.reference_dir, self.cache_dir or Path(".sensitivity-cache"), self._extractor)
            ref = self._ref_features
            if "fid" in want:
                out["fid"] = M.fid_from_features(feats, ref)
            if "kid" in want:
                out["kid"] = M.kid_from_features(feats, ref, num_subsets=p.kid_subsets, seed=0)
            boot.update(features=feats, reference_features=ref if "kid" in want else None,
                        reference_stats=M.feature_statistics(ref) if "fid" in want and self.bootstrap else None)
        if want & set(M.PAIRED_FEATURE_METRICS):
            fp_feats = self._reference_features(timings)
            paired = M.paired_feature_metrics(feats, fp_feats)
            out.update({k: v for k, v in paired.items() if k in want})
            if self.bootstrap:
                boot.update(features=feats, fp_features=fp_feats)
        if want & {"psnr", "mse", "lpips"}:
            fp = self.reference_images(timings)
            if want & {"psnr", "mse"} and self.bootstrap:
                boot["image_mse"] = M.per_image_mse(images, fp)
            if "psnr" in want:
                out["psnr"] = M.psnr(images, fp)
            if "mse" in want:
                out["mse"] = M.mse(images, fp)
            if "lpips" in want:
                out["lpips"] = self._lpips(images, fp)
        if "clip_score" in want:
            out["clip_score"] = self._clip(images, list(p.conditions))
        if self.bootstrap:
            idx = M.bootstrap_indices(len(images), self.bootstrap, self.bootstrap_seed)
            reps = M.bootstrap_replicates(idx, **boot)
            out["bootstrap"] = {k: v.tolist() for k, v in reps.items() if k in want}
        return out

    def _image_features(self, images: np.ndarray) -> np.ndarray:
        """Feature-network features ``[N, D]`` of uint8 images (digits classifier, else clean-fid's Inception)."""
        if self.digits:
            return self._features.features(images)
        if self._extractor is None:
            self._extractor = M.CleanFIDInception(device=self.device, model=self.inception)
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        return self._extractor.image_features(rgb)

    def _reference_features(self, timings: Dict[str, float]) -> np.ndarray:
        """Features of the full-precision images (computed once per worker, read-only)."""
        fp = self.reference_images(timings)
        with self._fp_features_lock:
            if self._fp_features is None:
                feats = np.asarray(self._image_features(np.array(fp)))  # a writable copy for torch
                feats.setflags(write=False)
                self._fp_features = feats
        return self._fp_features

    def _quantize_activations(self) -> None:
        """Switch on the protocol's activation quantization on the model as it is now (weights applied)."""
        p = self.protocol
        if p.act_bits is None:
            return
        from ..quantizers.activation import enable_activation_quant, enable_static_activation_quant

        layers = self.mq.layers if self.mq is not None else self.family.find_layers(self.denoiser)
        if p.act_mode == "static":
            from ..calibration.pipeline import observe_ranges

            ranges = observe_ranges(self.denoiser, layers, self._act_data, p.act_bits, observer="minmax")
            enable_static_activation_quant(self.denoiser, layers, ranges, p.act_bits)
        else:
            enable_activation_quant(self.denoiser, layers, p.act_bits)

    def evaluate(self, config: Union[None, QuantConfig, Mapping[str, str]] = None,
                 return_images: bool = False) -> Dict[str, Any]:
        """Apply ``config`` (``None``/``{}`` = full precision; a calibrated artifact of
        :mod:`sensitivity.calibration` with its overlay and activation ranges), generate, score, restore.

        Returns ``{"fid", "kid", "accuracy", "psnr", "mse", "seconds"}`` (the protocol's metrics; with
        the evaluator's ``bootstrap`` also ``"bootstrap": {metric: [replicates]}``, see
        :func:`~sensitivity.evaluation.metrics.bootstrap_replicates`) and
        ``"timings"`` (seconds of apply / generate / score); with ``return_images`` also ``"images"``.
        """
        from ..calibration.artifact import CalibratedArtifact, apply_calibrated, remove_calibrated

        from ..quantizers.activation import disable_activation_quant

        calibrated = config if isinstance(config, CalibratedArtifact) else None
        if calibrated is not None and self.quant_root is not self.denoiser:
            raise SensitivityError("a calibrated artifact is of the denoiser; this evaluator holds a pipeline multiquantizer")
        if calibrated is not None:
            if self.protocol.act_bits is not None and calibrated.activations is not None:
                raise SensitivityError("a calibrated config with activation ranges cannot be evaluated under a "
                                       "protocol with act_bits (it brings its own)")
            config = calibrated.config
        options = as_options(config) if config is not None else {}
        if options and self.mq is None:
            raise SensitivityError("Evaluator: no multiquantizer given, only full precision can be evaluated")
        ref_timings: Dict[str, float] = {}
        with self._device_stage:  # one config on the model at a time; scoring below may overlap the next
            self._prepare_reference(ref_timings)  # before applying: the full-precision images of the same seeds
            t0 = time.perf_counter()
            try:
                if calibrated is not None:
                    apply_calibrated(self.denoiser, self.mq, calibrated)
                elif options:
                    apply(self.quant_root, self.mq, options)
                self._quantize_activations()
                t1 = time.perf_counter()
                images = self.generate()
            finally:
                if calibrated is not None:
                    remove_calibrated(self.denoiser)
                disable_activation_quant(self.denoiser)
                restore(self.quant_root)
            t2 = time.perf_counter()
        out: Dict[str, Any] = dict(self.score(images, ref_timings))  # may wait for the shared fp images
        if getattr(self, "_macs", None):
            from .bops import tera_bops

            out["bops"] = tera_bops(options, self._macs, self.protocol.act_bits)
        t3 = time.perf_counter()
        out["seconds"] = t3 - t0
        out["timings"] = {"apply": t1 - t0, "generate": t2 - t1, "score": t3 - t2, **ref_timings,
                          "worker": dict(self.worker_info, device=self.worker_info.get("device", str(self.device)))}
        if return_images:
            out["images"] = images
        return out

    def worker(self, concurrency: int = 1) -> Callable[[int, Dict[str, str]], Dict[str, Any]]:
        """``evaluate(index, options) -> metrics`` for :mod:`sensitivity.evaluation.runners`.

        ``concurrency=2`` lets a worker run two configs at once: the device stage (apply, generate,
        restore) stays one config at a time, so the scoring of one (feature network and metric math,
        on the CPU) overlaps the generation of the next. Metrics are the same either way.
        """

        def evaluate(index: int, options: Dict[str, str]) -> Dict[str, Any]:
            return self.evaluate(options)

        evaluate.concurrency = int(concurrency)
        return evaluate


@dataclass
class EvaluatorFactory:
    """Picklable factory of an evaluation worker (for runners): loads the pipeline and the
    multiquantizer once in the worker and returns :meth:`Evaluator.worker`.

    ``fp_images_dir``: where the job's full-precision images are shared (``None``: each worker keeps its own).
    ``batch_size``: ``None`` | N | ``"auto"``. ``compile``: ``False``, ``True`` (``torch.compile`` with
    its default backend) or a backend name (``"eager"`` in tests). ``device_label``: the device as the
    job names it (a pinned worker process sees its GPU as ``cuda:0``). Neither is part of the protocol.
    """

    family: str
    multiquantizer: Optional[str]
    protocol: Dict[str, Any]
    weights: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Union[None, int, str] = None
    reference_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    threads: Optional[int] = None
    inception: Optional[str] = None
    clip_model: Optional[str] = None
    lpips_net: Optional[str] = None
    act_calibration: Optional[str] = None
    compile: Union[bool, str] = False
    device_label: Optional[str] = None
    fp_images_dir: Optional[str] = None

    def with_device(self, device: str) -> "EvaluatorFactory":
        """This factory for a worker on ``device`` (a pinned process's ``cuda:0``, labelled as the job's device)."""
        return replace(self, device=device, device_label=self.device_label or self.device)

    def build(self) -> Evaluator:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        fam = get_family(self.family)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = fam.load_pipeline(self.weights, device=device, dtype=self.dtype)
        check_finite_weights(fam.denoiser(pipe), None, f"--weights {self.weights or fam.resolve_weights(None)}")
        mq = load_multiquantizer(self.multiquantizer) if self.multiquantizer else None
        if self.compile:
            compile_denoiser(fam, pipe, backend=None if self.compile is True else str(self.compile))
        ev = Evaluator(fam, pipe, mq, EvalProtocol.from_dict(self.protocol), batch_size=self.batch_size,
                       reference_dir=self.reference_dir, cache_dir=self.cache_dir, inception=self.inception,
                       clip_model=self.clip_model, lpips_net=self.lpips_net,
                       act_calibration=self.act_calibration, fp_images_dir=self.fp_images_dir)
        ev.worker_info.update(device=device_description(device, self.device_label),
                              compile=(self.compile if isinstance(self.compile, str) else
                                       ("inductor" if self.compile else False)))
        return ev

    def __call__(self) -> Callable[[int, Dict[str, str]], Dict[str, Any]]:
        return self.build().worker()


def calibration_identity(path: Union[str, Path]) -> str:
    """Identity of a calibration set file for a protocol: ``sha256[:16]`` of its content + the observer."""
    return f"{M._digest_cached(str(Path(path).resolve()))[:16]}:minmax"


def compile_denoiser(family: Union[str, ModelFamily], pipe, backend: Optional[str] = None) -> None:
    """``torch.compile`` the denoiser's forward in place (``module.compile()``: parameters stay the module's,
    so applying configs rewrites the weights the compiled graph reads). Activation-quant hooks and a new
    config's weights cause recompiles at most once per distinct hook set. ``backend``: torch.compile's
    (default ``inductor``)."""
    den = get_family(family).denoiser(pipe)
    den.compile(dynamic=False, **({"backend": backend} if backend else {}))


def device_description(device: Union[str, torch.device, None], label: Optional[str] = None) -> str:
    """``cuda:1 (NVIDIA H100 80GB HBM3)`` / ``cpu``: ``label`` (default the device) with the GPU model of
    ``device`` where it is a CUDA device."""
    dev = torch.device(device or "cpu")
    name = label or str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        try:
            return f"{name} ({torch.cuda.get_device_name(dev.index or 0)})"
        except (RuntimeError, AssertionError):
            return name
    return name
