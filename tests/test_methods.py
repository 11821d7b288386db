"""Registered quantization methods: INT8 / FP8 / per-group / least-squares UAQ, bits accounting,
settings in the manifest, and a method added from outside the package."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sensitivity.errors import SensitivityError, UnknownOptionError
from sensitivity.layers import find_layers
from sensitivity.multiquantizer import apply, build_multiquantizer, load_multiquantizer, read_manifest, restore
from sensitivity.options import QuantOption
from sensitivity.quantizers import MethodConfig, TableMethod, get_method, quantize, register_method
from sensitivity.quantizers.uaq import GroupConfig, UAQConfig, UniformAffine, UniformAffinePerGroup


def heavy(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 0] = 0.5  # an outlier
    return w


@pytest.mark.parametrize("seed", range(4))
def test_int8_per_tensor_matches_reference(seed):
    w = heavy(48, 200, seed) * (10.0 ** (seed - 2))
    q = quantize(w, "int8")
    scale = w.abs().max() / 127.5
    ref = torch.clamp(torch.round(w / scale), -128, 127) * scale
    assert torch.equal(q.dequantize(), ref)
    assert q.params["scale"].dtype == torch.float32 and q.params["scale"].shape == (1,)
    assert int(q.codes.max()) <= 255 and torch.equal(q.codes.to(torch.int16) - 128, torch.round(w / scale).clamp(-128, 127).to(torch.int16))


def test_int8_rounds_half_to_even():
    w = torch.tensor([[127.5, 0.5, 1.5, 2.5, -0.5, -127.5]])  # scale 1: exact halves
    q = quantize(w, "int8")
    assert q.params["scale"].item() == 1.0
    assert q.dequantize().tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -128.0]]


def test_int8_per_channel_matches_reference():
    w = heavy(32, 90, 3)
    q = quantize(w, "int8_c")
    scale = w.abs().amax(1, keepdim=True) / 127.5
    assert torch.equal(q.dequantize(), torch.clamp(torch.round(w / scale), -128, 127) * scale)
    assert q.params["scale"].shape == (32,)


@pytest.mark.parametrize("seed", range(4))
def test_fp8_e4m3_matches_torch_cast(seed):
    w = heavy(64, 130, seed) * (10.0 ** (seed - 2))
    q = quantize(w, "fp8_e4m3")
    scale = w.abs().max() / 448.0
    ref = (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    assert torch.equal(q.dequantize(), ref)
    assert torch.equal(q.codes, (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_zero_tensors_are_exact():
    for opt in ("int8", "int8_c", "fp8_e4m3", "uaq_g16-3", "uaq_ls-3"):
        q = quantize(torch.zeros(4, 40), opt)
        assert torch.equal(q.dequantize(), torch.zeros(4, 40)), opt


@pytest.mark.parametrize("shape", [(16, 256), (16, 300), (8, 3, 3, 3), (5, 64)])
@pytest.mark.parametrize("option", ["uaq_g128-4", "uaq_g64-3", "int8", "int8_c", "fp8_e4m3", "uaq_ls-3", "uaq-4", "kmeans_c-3", "kmeans_a-4"])
def test_bytes_are_what_is_stored(shape, option):
    """nbytes = packed payload + the bytes of the stored params, for every method (one accounting)."""
    w = heavy(shape[0], math.prod(shape[1:]), 1).reshape(shape)
    q = quantize(w, option)
    o = QuantOption.parse(option)
    payload = math.ceil(o.bits * math.prod(shape) / 8)
    params = sum(t.numel() * t.element_size() for t in q.params.values())
    assert q.nbytes == o.nbytes(shape) == payload + params
    layout = get_method(o.method).param_layout(o.bits, shape)
    assert {k: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in q.params.items()} == layout


def test_group_bits_exact():
    # 3 bits x 300 values x 16 rows, groups of 128: 3 groups per row (128, 128, 44), fp16 scale + zero each
    o = QuantOption.parse("uaq_g128-3")
    assert o.nbytes((16, 300)) == math.ceil(3 * 16 * 300 / 8) + 16 * 3 * 2 * 2
    assert o.bits_per_weight((1152, 1152)) == pytest.approx(3 + 32 / 128)
    assert QuantOption.parse("uaq_g64-4").nbytes((2, 64)) == 64 + 2 * 2 * 2


def test_group_quantizes_each_group_like_uaq():
    w = heavy(6, 300, 2)
    g = quantize(w, "uaq_g128-3")
    deq = g.dequantize()
    for a, b in ((0, 128), (128, 256), (256, 300)):
        ref = quantize(w[:, a:b].contiguous(), "uaq-3").dequantize()
        assert torch.equal(deq[:, a:b], ref)
    assert g.error < quantize(w, "uaq-3").error


def test_least_squares_refit_never_worse():
    for seed in range(3):
        w = heavy(64, 320, seed)
        for bits in (3, 4):
            base = quantize(w, f"uaq-{bits}")
            ls = quantize(w, f"uaq_ls-{bits}")
            rows_base = ((base.dequantize() - w) ** 2).sum(1)
            rows_ls = ((ls.dequantize() - w) ** 2).sum(1)
            assert (rows_ls <= rows_base + 1e-12).all()
            assert ls.sse < base.sse


def test_option_names_and_errors():
    assert QuantOption.parse("int8").name == "int8" and QuantOption.parse("int8").bits == 8
    assert QuantOption.parse("fp8").name == "fp8_e4m3"
    assert QuantOption.parse("uaq_g32-3").method == "uaq_g32"
    assert get_method("uaq_g32").config.group_size == 32
    for bad in ("int8-4", "uaq", "uaq_g1-3", "foo-3", "uaq-9"):
        with pytest.raises(UnknownOptionError):
            QuantOption.parse(bad)


def test_configs_validated():
    with pytest.raises(SensitivityError, match="clip_ratios"):
        UAQConfig(clip_ratios=(1.2,))
    with pytest.raises(SensitivityError, match="group_size"):
        GroupConfig(group_size=0)
    with pytest.raises(SensitivityError, match="unknown setting"):
        UAQConfig.from_dict({"clip_ratio": [1.0]})
    assert UAQConfig.from_dict(UAQConfig().to_dict()) == UAQConfig()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(40, 24)
        self.b = nn.Linear(24, 8)
        self.c = nn.Conv2d(3, 6, 3)


ALL = ["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3", "int8", "fp8_e4m3",
       "uaq_g16-4", "uaq_g16-3", "uaq_ls-3", "int8_c"]


def test_mixed_config_applies_bit_exact(tmp_path):
    model = Tiny()
    mq = build_multiquantizer(model, tmp_path / "t.safetensors", find_layers(model), options=ALL, progress=False)
    assert mq.options == tuple(ALL)
    cfg = {"a": "int8", "b": "uaq_g16-3", "c": "fp8_e4m3"}
    apply(model, mq, cfg)
    for name, opt in cfg.items():
        w = {"a": model.a, "b": model.b, "c": model.c}[name].weight
        assert torch.equal(w.data, mq.quantized_weight(name, opt).dequantize())
    restore(model)
    for name in ("a", "b", "c"):
        assert torch.equal(getattr(model, name).weight, getattr(Tiny(), name).weight)


def test_manifest_records_settings_and_resume_rebuilds_changed(tmp_path, monkeypatch):
    import sensitivity.multiquantizer as MQ

    model = Tiny()
    out = tmp_path / "t.safetensors"
    opts = ["uaq-3", "kmeans_a-3"]
    m = build_multiquantizer(model, out, find_layers(model), options=opts, progress=False).manifest
    assert m["settings"]["methods"]["uaq"]["config"]["clip_ratios"][:2] == [1.0, 0.99]
    assert m["settings"]["methods"]["kmeans_a"]["class"].endswith("KMeansPerTensor")

    # a build killed after its first layer, then resumed with another uaq grid: only uaq is recomputed
    calls = []
    real = MQ._quantize_layer

    def dies_after_one(module, spec, options, device):
        if calls:
            raise KeyboardInterrupt
        calls.append(list(options))
        return real(module, spec, options, device)

    monkeypatch.setattr(MQ, "_quantize_layer", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_multiquantizer(model, out, find_layers(model), options=opts, progress=False, resume=False)
    assert (tmp_path / "t.safetensors.parts").is_dir()
    seen = []

    def spy(module, spec, options, device):
        seen.append((spec.name, list(options)))
        return real(module, spec, options, device)

    monkeypatch.setattr(MQ, "_quantize_layer", spy)
    from sensitivity.quantizers import base

    coarse = UniformAffine("uaq", UAQConfig(clip_ratios=(1.0, 0.5)))
    monkeypatch.setitem(base.METHODS._entries, "uaq", coarse)
    mq = build_multiquantizer(model, out, find_layers(model), options=opts, progress=False)
    first = mq.layer_names[0]
    assert seen[0] == (first, ["uaq-3"])  # kmeans_a-3 of the finished layer kept
    assert all(o == opts for _, o in seen[1:])
    assert mq.manifest["recomputed_options"] == 1
    assert read_manifest(out)["settings"]["methods"]["uaq"]["config"]["clip_ratios"] == [1.0, 0.5]


@dataclass(frozen=True)
class SignConfig(MethodConfig):
    pass


class SignTimesMean(TableMethod):
    """A toy 1-bit method defined outside the package: value = sign * mean|row|."""

    config_class = SignConfig
    fixed_bits = 1
    allowed_bits = (1,)

    def param_layout(self, bits, shape):
        return {"scale": ((int(shape[0]),), "float16")}

    def quantize_rows(self, rows, bits):
        return (rows >= 0).to(torch.uint8), {"scale": rows.abs().mean(1).to(torch.float16)}

    def table(self, params, bits):
        s = params["scale"].to(torch.float32)[:, None]
        return torch.cat([-s, s], 1)


def test_a_new_method_is_one_class_and_one_registration(tmp_path, monkeypatch):
    from sensitivity.quantizers import base

    monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))
    register_method(SignTimesMean("sign1"))
    model = Tiny()
    mq = build_multiquantizer(model, tmp_path / "s.safetensors", find_layers(model), options=["sign1", "uaq-4"], progress=False)
    s = mq.stats("a", "sign1")
    assert s["nbytes"] == math.ceil(40 * 24 / 8) + 24 * 2
    apply(model, mq, {"a": "sign1"})
    assert set(model.a.weight.abs().reshape(-1).tolist()) <= set(mq.quantized_weight("a", "sign1").dequantize().abs().reshape(-1).tolist())
    restore(model)
    assert json.loads(json.dumps(read_manifest(tmp_path / "s.safetensors")["settings"]))["methods"]["sign1"]["class"].endswith("SignTimesMean")
    loaded = load_multiquantizer(tmp_path / "s.safetensors")
    assert loaded.avg_bits({"a": "sign1"}) < 16
