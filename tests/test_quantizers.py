"""Quantizer math: UAQ clipping search, 1-D k-means near the exact optimum, stored-fp16 semantics."""

import numpy as np
import pytest
import torch

from sensitivity.errors import SensitivityError
from sensitivity.options import OPTION_NAMES
from sensitivity.quantizers import QuantizedWeight, get_method, lookup, quantize
from sensitivity.quantizers.uaq import UAQConfig, UniformAffine
from sensitivity.quantizers import kmeans1d as km
from sensitivity.quantizers import uniform as un


def student_t(rows, cols, df=4.0, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    # Student-t = normal / sqrt(chi2/df), from a seeded generator
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).pow(2).sum(-1)
    return (scale * z / torch.sqrt(chi2 / df)).to(torch.float32)


def exact_dp_sse(x: np.ndarray, k: int) -> float:
    """Brute-force O(k n^2) dynamic programme: the optimal 1-D k-means SSE of ``x``."""
    x = np.sort(np.asarray(x, np.float64))
    n = x.size
    p1 = np.concatenate([[0.0], np.cumsum(x)])
    p2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cnt = (j - i).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (p2[j] - p2[i]) - (p1[j] - p1[i]) ** 2 / cnt
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)
    d = np.full(n + 1, np.inf)
    d[0] = 0.0
    for _ in range(min(k, n)):
        d = (d[:, None] + cost).min(0)
    return float(d[n])


def row_sse(q: QuantizedWeight, w: torch.Tensor) -> np.ndarray:
    rows = w.reshape(w.shape[0], -1).double()
    return ((q.dequantize().reshape(rows.shape).double() - rows) ** 2).sum(1).numpy()


# --------------------------------------------------------------------------------------------------
# all methods
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", OPTION_NAMES)
def test_codes_params_and_values(option):
    w = student_t(24, 96, seed=1)
    q = quantize(w, option)
    bits = q.bits
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, 96)
    assert int(q.codes.max()) < 2**bits
    assert all(p.dtype == torch.float16 for p in q.params.values())
    table = q.table()
    assert table.dtype == torch.float32 and table.shape[1] == 2**bits
    assert table.shape[0] in (1, 24)
    deq = q.dequantize()
    assert deq.shape == w.shape and torch.isfinite(deq).all()
    # every dequantized value is an entry of its row's table
    rows_table = table.expand(24, -1) if table.shape[0] == 1 else table
    assert torch.equal(deq, torch.gather(rows_table, 1, q.codes.long()))
    assert ((rows_table[:, :, None] == deq[:, None, :]).any(1)).all()
    # error is the relative squared error of what is stored
    sse = float(((deq.double() - w.double()) ** 2).sum())
    assert q.sse == pytest.approx(sse, rel=1e-6)
    assert q.error == pytest.approx(sse / float((w.double() ** 2).sum()), rel=1e-6)
    assert 0 < q.error < 0.2


@pytest.mark.parametrize("method", ["uaq", "kmeans_c", "kmeans_a"])
def test_three_bits_worse_than_four(method):
    w = student_t(32, 256, seed=2)
    e4 = quantize(w, f"{method}-4").error
    e3 = quantize(w, f"{method}-3").error
    assert e3 >= e4 > 0


def test_method_ranking_on_heavy_tails():
    w = student_t(32, 256, seed=3)
    err = {o: quantize(w, o).error for o in ("uaq-4", "kmeans_c-4", "kmeans_a-4")}
    # a per-row optimal codebook beats one per tensor and a uniform grid
    assert err["kmeans_c-4"] < err["kmeans_a-4"]
    assert err["kmeans_c-4"] < err["uaq-4"]


@pytest.mark.parametrize("option", ["uaq-3", "kmeans_c-4", "kmeans_a-3"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_a_user_error(option, bad):
    w = student_t(4, 16)
    w[2, 5] = bad
    with pytest.raises(SensitivityError, match="NaN or Inf"):
        quantize(w, option)


def test_one_dim_weight_is_a_user_error():
    with pytest.raises(SensitivityError):
        quantize(torch.ones(8), "uaq-4")


@pytest.mark.parametrize("option", ["uaq-4", "kmeans_c-3", "kmeans_a-4"])
def test_conv_weight_is_per_output_channel(option):
    w = student_t(6, 4 * 9, seed=4).reshape(6, 4, 3, 3)
    q = quantize(w, option)
    assert q.codes.shape == (6, 36) and q.dequantize().shape == (6, 4, 3, 3)
    flat = quantize(w.reshape(6, -1), option)
    assert torch.equal(q.codes, flat.codes)
    if option.startswith("kmeans_a"):
        assert q.params["codebook"].shape == (1, 2**q.bits)
        return
    # per channel: rescaling channel 0 does not change the other channels' codes
    w2 = w.clone()
    w2[0] *= 50.0
    q2 = quantize(w2, option)
    assert torch.equal(q.codes[1:], q2.codes[1:])
    key = "scale" if option.startswith("uaq") else "codebook"
    assert q.params[key].shape[0] == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("option", ["uaq-4", "kmeans_c-3", "kmeans_a-4"])
def test_dequantize_keeps_dtype_and_shape(dtype, option):
    w = student_t(8, 40, seed=5).reshape(8, 5, 8).to(dtype)
    q = quantize(w, option)
    deq = q.dequantize()
    assert deq.dtype == dtype and deq.shape == w.shape
    assert q.dtype == dtype and q.shape == (8, 5, 8)
    assert q.error < 0.1


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_deterministic(option):
    w = student_t(16, 80, seed=6)
    a, b = quantize(w, option), quantize(w.clone(), option)
    assert torch.equal(a.codes, b.codes)
    assert all(torch.equal(a.params[p], b.params[p]) for p in a.params)


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_degenerate_rows(option):
    w = torch.zeros(5, 40)
    w[1] = 0.375  # constant row
    w[2] = -1.5  # constant negative row
    w[3, ::2] = 0.25  # two values
    w[4, :10], w[4, 10:20], w[4, 20:] = -0.5, 0.125, 1.0  # three values
    q = quantize(w, option)
    deq = q.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(q.table()).all()
    assert q.codes.max() < 2**q.bits
    if not option.startswith("uaq"):
        # fewer distinct values than entries: duplicate centroids, exact reconstruction
        assert torch.equal(deq, w)
    else:
        # a constant row is reproduced exactly (its value is fp16-representable)
        assert torch.equal(deq[:3], w[:3])


def test_all_zero_weight():
    w = torch.zeros(3, 7)
    for option in OPTION_NAMES:
        q = quantize(w, option)
        assert torch.equal(q.dequantize(), w) and q.error == 0.0


# --------------------------------------------------------------------------------------------------
# UAQ
# --------------------------------------------------------------------------------------------------
def brute_force_uaq(rows: torch.Tensor, bits: int):
    """Per row: the clipping ratio of CLIP_RATIOS with the least squared error of the stored fp16 params."""
    L = 2**bits - 1
    best = []
    for w in rows:
        w64 = w.double()
        errs = []
        for r in un.CLIP_RATIOS:
            r32 = torch.tensor(r, dtype=torch.float32)
            lo, hi = w.min() * r32, w.max() * r32
            d = ((hi - lo) / L).to(torch.float16).float()
            if d == 0:
                d = torch.maximum(w.min().abs(), w.max().abs()).to(torch.float16).float()
                d = d if d > 0 else torch.tensor(1.0)
            z = torch.round(-lo / d).to(torch.float16).float()
            q = torch.clamp(torch.round(w / d) + z, 0, L)
            errs.append(float((((q - z) * d).double() - w64).pow(2).sum()))
        i = int(np.argmin(errs))
        best.append((errs[i], i))
    return best


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_uaq_equals_brute_force_search(bits, backend):
    rows = torch.cat([student_t(6, 50, seed=7), torch.randn(4, 50, generator=torch.Generator().manual_seed(8)) * 0.1])
    rows[0, 3] = 0.9  # an outlier
    ref = brute_force_uaq(rows, bits)
    quantizer = UniformAffine("uaq", backend=backend)
    codes, params = quantizer.quantize_rows(rows, bits)
    values = lookup(quantizer.table(params, bits), codes)
    got = ((values.double() - rows.double()) ** 2).sum(1)
    for r, (err, _) in enumerate(ref):
        assert float(got[r]) == pytest.approx(err, rel=1e-6, abs=1e-12)
    _, _, idx = un.uaq_params(rows, bits, backend=backend)
    assert [i for _, i in ref] == idx.tolist()
    assert (idx > 0).any()  # some rows are clipped
    # the table is the stored grid (q - z) * scale
    table = quantizer.table(params, bits)
    expected = (torch.arange(2**bits)[None, :] - params["zero"].float()[:, None]) * params["scale"].float()[:, None]
    assert torch.equal(table, expected)


def test_uaq_backends_agree():
    rows = student_t(20, 300, seed=9, df=3.0)
    for bits in (4, 3):
        e1, s1, z1 = un.uaq_grid_errors(rows, bits, backend="numba")
        e2, s2, z2 = un.uaq_grid_errors(rows, bits, backend="torch")
        assert torch.equal(s1, s2) and torch.equal(z1, z2)
        assert torch.allclose(e1, e2, rtol=1e-6, atol=1e-12)


def test_uaq_grid_is_finer_than_reference():
    ratios = np.array(un.CLIP_RATIOS)
    assert ratios[0] == 1.0 and np.all(np.diff(ratios) < 0) and ratios.min() <= 0.15
    w = student_t(32, 512, seed=10)
    ours = quantize(w, "uaq-3").sse
    ref_grid = UniformAffine("uaq", UAQConfig(clip_ratios=tuple(float(r) for r in np.linspace(1.0, 0.1, 10))))
    codes, params = ref_grid.quantize_rows(w, 3)
    ref = float(((lookup(ref_grid.table(params, 3), codes).double() - w.double()) ** 2).sum())
    assert ours <= ref


# --------------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------------
def _kmeans_rows():
    g = torch.Generator().manual_seed(11)
    rows = [student_t(6, 150, seed=12, df=3.0), student_t(4, 200, seed=13, df=2.5), torch.randn(4, 180, generator=g)]
    rows.append(torch.rand(4, 170, generator=g))
    return rows


def test_exact_optimum_matches_brute_force_dp():
    for rows in _kmeans_rows():
        for x in rows[:2]:
            for k in (8, 16):
                sse, c = km.kmeans1d_optimal(x, k)
                assert sse == pytest.approx(exact_dp_sse(x.numpy(), k), rel=1e-9, abs=1e-15)
                assert c.shape == (k,) and np.all(np.diff(c) >= 0)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bits", [4, 3])
def test_kmeans_c_within_one_percent_of_optimum(backend, bits):
    k = 2**bits
    worst = 0.0
    for rows in _kmeans_rows():
        codes, cb = km.kmeans1d_rows(rows, k, backend=backend)
        assert cb.dtype == torch.float16 and cb.shape == (rows.shape[0], k)
        assert torch.all(cb[:, 1:] >= cb[:, :-1])
        values = torch.gather(cb.float(), 1, codes.long()).double()
        sse = ((values - rows.double()) ** 2).sum(1)
        for r, x in enumerate(rows):
            opt = exact_dp_sse(x.numpy(), k)
            ratio = float(sse[r]) / opt
            assert ratio >= 1 - 1e-9  # never below the optimum
            worst = max(worst, ratio)
    assert worst <= 1.01


def test_kmeans_c_long_heavy_tailed_rows_vs_exact():
    rows = student_t(48, 1152, seed=14, df=4.0)
    for k in (16, 8):
        codes, cb = km.kmeans1d_rows(rows, k)
        sse = ((torch.gather(cb.float(), 1, codes.long()).double() - rows.double()) ** 2).sum(1)
        opt = np.array([km.kmeans1d_optimal(x, k)[0] for x in rows])
        ratio = sse.numpy() / opt
        assert ratio.min() >= 1 - 1e-9 and ratio.max() <= 1.01


def test_codes_are_nearest_fp16_centroid():
    rows = student_t(10, 300, seed=15)
    codes, cb = km.kmeans1d_rows(rows, 16)
    dist = (rows[:, :, None].double() - cb.double()[:, None, :]).abs()
    chosen = torch.gather(dist, 2, codes.long()[:, :, None])[:, :, 0]
    assert torch.all(chosen <= dist.min(2).values)


def test_kmeans_short_rows_are_exact():
    rows = student_t(5, 60, seed=16)  # n <= n_cuts: every value its own group
    for backend in ("numba", "torch"):
        codes, cb = km.kmeans1d_rows(rows, 8, backend=backend)
        sse = ((torch.gather(cb.float(), 1, codes.long()).double() - rows.double()) ** 2).sum(1)
        for r, x in enumerate(rows):
            # only the fp16 rounding of the centroids separates us from the optimum
            assert float(sse[r]) == pytest.approx(exact_dp_sse(x.numpy(), 8), rel=2e-3)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_kmeans_a_one_codebook_near_optimum(backend):
    w = student_t(40, 250, seed=17, df=3.0)
    for k in (16, 8):
        codes, cb = km.kmeans1d_tensor(w, k, n_cuts=256, backend=backend)
        assert cb.shape == (1, k) and codes.shape == w.shape
        sse = float(((cb[0].float()[codes.long()].double() - w.double()) ** 2).sum())
        opt, _ = km.kmeans1d_optimal(w.reshape(-1), k)
        assert opt * (1 - 1e-9) <= sse <= 1.01 * opt


def test_assign_backends_agree_and_ties_go_low():
    cb = torch.tensor([[-1.0, 0.0, 0.5, 2.0]], dtype=torch.float16)
    rows = torch.tensor([[-0.5, 0.25, 1.25, -3.0, 9.0, 0.2]])
    for backend in ("numba", "torch"):
        assert km.assign_nearest(rows, cb, backend=backend).tolist() == [[0, 1, 2, 0, 3, 1]]
        per_row = km.assign_nearest(rows.expand(3, -1), cb.expand(3, -1), backend=backend)
        assert per_row.tolist() == [[0, 1, 2, 0, 3, 1]] * 3


def test_device_argument():
    w = student_t(4, 32, seed=18)
    for option in ("uaq-3", "kmeans_c-4"):
        a, b = quantize(w, option), quantize(w, option, device="cpu")
        assert torch.equal(a.codes, b.codes) and b.codes.device.type == "cpu"


def test_registry():
    for method in ("uaq", "kmeans_c", "kmeans_a"):
        assert get_method(method).name == method
