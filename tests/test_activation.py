"""Online activation fake-quantization: the math, the hooks, A8 vs A6 on a tiny model, off by default."""

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.layers import find_layers
from sensitivity.quantizers.activation import (activation_bits, activation_quant, disable_activation_quant,
                                               enable_activation_quant, fake_quantize_rows, quantize_channels,
                                               quantize_heads, quantize_tokens)
from sensitivity.zoo import get_family


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_rows_min_max_asymmetric(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 300, generator=g) * torch.linspace(0.1, 5, 16)[:, None] + torch.linspace(-3, 3, 16)[:, None]
    y = fake_quantize_rows(x, bits)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    delta = (hi - lo) / (2 ** bits - 1)
    # every value lands within half a step (plus the zero-point rounding, at most half a step more)
    assert ((y - x).abs() <= delta + 1e-5).all()
    for r in range(16):  # at most 2^b levels per row, on one grid of step delta
        levels = torch.unique(y[r])
        assert len(levels) <= 2 ** bits
        steps = (levels - levels[0]) / delta[r]
        assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_fewer_bits_more_error_and_special_rows():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    err = {b: ((fake_quantize_rows(x, b) - x) ** 2).mean().item() for b in (8, 6)}
    assert err[8] < err[6] / 8
    const = torch.full((2, 10), 3.25)
    assert torch.equal(fake_quantize_rows(const, 6), const)
    h = x.half()
    assert fake_quantize_rows(h, 8).dtype == torch.float16


def test_token_channel_and_head_rows_are_independent():
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    y = quantize_tokens(x, 6)
    x2 = x.clone()
    x2[1, 3] *= 100  # another token's range must not change token (0, 0)
    assert torch.equal(quantize_tokens(x2, 6)[0, 0], y[0, 0])
    assert torch.equal(y[1, 2], fake_quantize_rows(x[1, 2][None], 6)[0])
    c = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    qc = quantize_channels(c, 6)
    assert torch.equal(qc[1, 2], fake_quantize_rows(c[1, 2].reshape(1, -1), 6).reshape(4, 4))
    q = quantize_heads(x, heads=3, bits=6)  # rows of 4 = one head of one token
    assert torch.equal(q[0, 1, 4:8], fake_quantize_rows(x[0, 1, 4:8][None], 6)[0])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.skip_linear = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, img, tokens):
        h = self.conv(img).mean((2, 3))[:, None, :].expand(-1, tokens.shape[1], -1)
        return self.head(self.skip_linear(torch.cat([h, tokens], dim=-1)))


def test_hooks_quantize_split_halves_separately_and_come_off():
    net = Net()
    img = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    tok = 50 * torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))  # very different range
    layers = find_layers(net, splits={"skip_linear": 8})
    ref = net(img, tok)
    seen = {}
    net.skip_linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].clone()))
    assert activation_bits(net) is None
    info = enable_activation_quant(net, layers, 6)
    assert info == {"bits": 6, "layer_inputs": 3, "attention_modules": 0} and activation_bits(net) == 6
    got = {}
    net.skip_linear.register_forward_hook(lambda m, a, o: got.__setitem__("in", a[0].clone()))
    out = net(img, tok)
    raw = seen["raw"]  # registered first: sees the input before quantization
    halves = torch.cat([quantize_tokens(raw[..., :8], 6), quantize_tokens(raw[..., 8:], 6)], dim=-1)
    assert torch.equal(got["in"], halves)
    assert not torch.equal(got["in"], quantize_tokens(raw, 6))  # one range for both would differ
    assert not torch.equal(out, ref)
    disable_activation_quant(net)
    assert activation_bits(net) is None and torch.equal(net(img, tok), ref)
    with activation_quant(net, layers, 8):
        assert activation_bits(net) == 8
    assert activation_bits(net) is None
    with pytest.raises(SensitivityError, match="between 2 and 16"):
        enable_activation_quant(net, layers, 1)
    with pytest.raises(SensitivityError, match="no layer 'nope'"):
        enable_activation_quant(net, ["nope"], 8)


def test_one_split_half_in_the_layers_keeps_the_input_whole():
    """Only ``#main`` of a split layer quantized (a config leaving ``#skip`` at full precision): the input keeps its
    width, each half still gets its own per-token scale."""
    net = Net()
    img = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    tok = 50 * torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    layers = [s for s in find_layers(net, splits={"skip_linear": 8}) if not s.name.endswith("#skip")]
    seen, got = {}, {}
    net.skip_linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].clone()))
    with activation_quant(net, layers, 6):
        net.skip_linear.register_forward_hook(lambda m, a, o: got.__setitem__("in", a[0].clone()))
        net(img, tok)
    raw = seen["raw"]
    assert torch.equal(got["in"], torch.cat([quantize_tokens(raw[..., :8], 6), quantize_tokens(raw[..., 8:], 6)], -1))


def test_a8_closer_than_a6_and_off_by_default():
    fam = get_family("pixart-sigma")
    pipe = fam.load_pipeline("tiny", seed=0)
    den = fam.denoiser(pipe)
    layers = fam.find_layers(den)
    fp = fam.generate(pipe, ["a red bus", "a cat"], [0, 1], batch_size=2).astype(np.int64)
    assert activation_bits(den) is None
    assert np.array_equal(fam.generate(pipe, ["a red bus", "a cat"], [0, 1], batch_size=2), fp)  # off unless asked
    diff = {}
    for bits in (8, 6):
        info = enable_activation_quant(den, layers, bits)
        assert info["layer_inputs"] == 287 and info["attention_modules"] == 56  # 28 blocks x (self + cross)
        diff[bits] = np.abs(fam.generate(pipe, ["a red bus", "a cat"], [0, 1], batch_size=2) - fp).mean()
        disable_activation_quant(den)
    assert 0 < diff[8] < diff[6]
    assert np.array_equal(fam.generate(pipe, ["a red bus", "a cat"], [0, 1], batch_size=2), fp)


def test_qkv_hooks_on_every_attention_of_a_unet():
    fam = get_family("sd15")
    den = fam.load_denoiser("tiny")
    n_attn = sum(all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "heads")) for m in den.modules())
    info = enable_activation_quant(den, fam.find_layers(den), 8)
    assert info["attention_modules"] == n_attn == 32 and info["layer_inputs"] == 282
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        a = den(x, 5, ehs).sample
        disable_activation_quant(den)
        b = den(x, 5, ehs).sample
        enable_activation_quant(den, [], 8)  # attention only
        c = den(x, 5, ehs).sample
        disable_activation_quant(den)
    assert not torch.equal(a, b) and not torch.equal(c, b)
