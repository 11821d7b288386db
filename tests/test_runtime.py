"""Run-time kernels of packed modules agree with apply()'s fake quantization (every option, every kernel)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.export import export, load_quantized
from sensitivity.export.kernels import dequantize_into, pad_packed
from sensitivity.export.modules import PartSpec, is_packed, pack_module
from sensitivity.export.runtime import KERNELS, choose_kernels, int8_conv_available
from sensitivity.multiquantizer import apply, build_multiquantizer, restore
from sensitivity.quantizers.activation import (disable_activation_quant, enable_activation_quant, quantize_channels,
                                             quantize_samples, quantize_tokens)
from sensitivity.quantizers.packing import pack_codes
from sensitivity.quantizers.tensor import quantize
from sensitivity.zoo import get_family

from family_sweep import layer_sample

OPTIONS = ("uaq-3", "uaq-4", "uaq-8", "uaq_ls-4", "uaq_g16-4", "uaq_g16-3", "kmeans_c-3", "kmeans_a-4",
           "int8", "int8_c", "fp8_e4m3")
REAL = ["sd15", "sdxl", "pixart-alpha", "pixart-sigma", "dit-xl-2", "hunyuan-dit"]


def _packed(module, options, kernel, act_bits=None, split=None):
    """``module`` packed with ``options`` (one, or two halves split at input channel ``split``) + reference weight."""
    w = module.weight.detach()
    if split is None:
        pieces = [(None, w)]
    else:
        pieces = [((0, split), w[:, :split]), ((split, w.shape[1]), w[:, split:])]
    parts, tensors, ref = [], [], []
    for i, ((sl, piece), option) in enumerate(zip(pieces, options)):
        qw = quantize(piece.contiguous(), option)
        codes = torch.from_numpy(pack_codes(qw.codes.reshape(-1).numpy(), qw.bits))
        parts.append(PartSpec(f"p{i}", tuple(piece.shape), sl, option, tuple(sorted(qw.params))))
        tensors.append({"codes": codes, **{k: v for k, v in qw.params.items()}})
        ref.append(qw.dequantize().reshape(piece.shape).to(torch.float32))
    return pack_module(module, parts, tensors, torch.float32, runtime=kernel, act_bits=act_bits), torch.cat(ref, 1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_fused_dequantize_matches_lookup(bits):
    rng = np.random.default_rng(bits)
    # odd sizes (bit-by-bit path), byte-aligned rows and groups (the whole-byte / 3-byte fast paths, their
    # tails), one table for the whole tensor, and rows written into a strided view (a split layer's half)
    for rows, k, group, shared, strided in [(3, 13, 13, False, False), (4, 16, 16, False, False),
                                            (5, 40, 16, False, False), (2, 7, 3, False, False),
                                            (3, 64, 64, False, False), (4, 72, 24, False, True),
                                            (3, 70, 70, True, False), (2, 100, 32, False, True)]:
        codes = rng.integers(0, 2**bits, rows * k, dtype=np.uint8)
        ng = -(-k // group)
        table = torch.randn(1 if shared else rows * ng, 2**bits)
        out = torch.empty(rows, k + 5)[:, 2:k + 2] if strided else torch.empty(rows, k)
        dequantize_into(pad_packed(torch.from_numpy(pack_codes(codes, bits))), bits, table, rows, k, group, out)
        c = torch.from_numpy(codes).view(rows, k).long()
        g = torch.arange(k) // group
        want = table[0][c] if shared else table[torch.arange(rows)[:, None] * ng + g[None, :], c]
        assert torch.equal(out, want), (rows, k, group, shared, strided)


def test_codes_read_with_room_are_padded_without_a_copy(tmp_path):
    from safetensors.torch import save_file

    from sensitivity.export.kernels import PAD
    from sensitivity.export.packed import FileTensors

    codes = torch.arange(1, 38, dtype=torch.uint8)
    save_file({"c": codes}, str(tmp_path / "t.safetensors"))
    fh = FileTensors(tmp_path / "t.safetensors")
    read = fh.get_tensor("c", pad=PAD)
    fh.close()
    assert torch.equal(read, codes)
    padded = pad_packed(read)
    assert padded.data_ptr() == read.data_ptr() and padded.numel() == codes.numel() + PAD
    assert torch.equal(padded[:-PAD], codes) and not padded[-PAD:].any()
    # no room, or non-zero bytes after the codes: a padded copy
    for t in (codes.clone(), torch.arange(1, 60, dtype=torch.uint8)[:37]):
        copy = pad_packed(t)
        assert copy.data_ptr() != t.data_ptr() and torch.equal(copy[:-PAD], t[:37]) and not copy[-PAD:].any()


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_every_kernel(option):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 5, 48)
    xc = torch.randn(1, 8, 6, 6)
    for kernel in KERNELS:
        q, w = _packed(lin, [option], kernel)
        assert torch.equal(q.weight, w)
        with torch.no_grad():
            assert torch.equal(q(x), nn.functional.linear(x, w, lin.bias)), (option, kernel)
        qc, wc = _packed(conv, [option], kernel)
        with torch.no_grad():
            assert torch.equal(qc(xc), nn.functional.conv2d(xc, wc, conv.bias, padding=1)), (option, kernel)
        # a split layer: two halves at their own options
        qs, ws = _packed(lin, [option, "uaq-4"], kernel, split=20)
        with torch.no_grad():
            assert torch.equal(qs(x), nn.functional.linear(x, ws, lin.bias))
    # W8A8: inputs quantized per token, the matmul on torch._int_mm where the option is affine per row
    q, w = _packed(lin, [option], "int8_dynamic", act_bits=8)
    with torch.no_grad():
        want = nn.functional.linear(quantize_tokens(x, 8), w, lin.bias)
        got = q(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (q._runtime == "int8_dynamic") == (option.split("-")[0] in ("uaq", "uaq_ls", "int8", "int8_c"))
    # a conv on oneDNN's int8 conv where q - z is an int8 value: its input on one grid per sample, exact up to
    # float32 summation order; else the float kernel with apply()'s grid per (sample, channel), bit for bit
    qc, wc = _packed(conv, [option], "int8_dynamic", act_bits=8)
    xc2 = torch.cat([xc, torch.full_like(xc, 0.25)])  # a constant sample keeps its float value
    with torch.no_grad():
        if qc._runtime == "int8_dynamic":
            want = nn.functional.conv2d(quantize_samples(xc2, 8), wc, conv.bias, padding=1)
            assert (qc(xc2) - want).abs().max() <= 1e-5 * want.abs().max()
        else:
            assert torch.equal(qc(xc2), nn.functional.conv2d(quantize_channels(xc2, 8), wc, conv.bias, padding=1))
    if option != "uaq-8":  # 8-bit codes fit int8 after the zero point only when z is 128 (data-dependent)
        assert (qc._runtime == "int8_dynamic") == (int8_conv_available() and option in ("uaq-3", "uaq-4", "int8", "int8_c"))
    # autograd on: a fresh weight (no shared scratch) and gradients reach the input
    q, w = _packed(lin, [option], "on_the_fly")
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert torch.allclose(xg.grad, w.sum(0).expand_as(x), atol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_output_channel_blocks_match_the_whole_weight(option, monkeypatch):
    from sensitivity.export import runtime

    torch.manual_seed(1)
    lin, conv = nn.Linear(48, 40), nn.Conv2d(8, 40, 3, padding=1)
    x, xc = torch.randn(2, 5, 48), torch.randn(1, 8, 6, 6)
    cases = [(_packed(lin, [option], "on_the_fly"), x, lambda w: nn.functional.linear(x, w, lin.bias)),
             (_packed(lin, [option, "uaq-3"], "on_the_fly", split=16), x, lambda w: nn.functional.linear(x, w, lin.bias)),
             (_packed(conv, [option], "on_the_fly"), xc, lambda w: nn.functional.conv2d(xc, w, conv.bias, padding=1))]
    for (q, w), inp, whole in cases:
        with torch.no_grad():
            want = whole(w)
            for rows in (8, 16, 32):
                # the block's values are the weight's rows: equal up to the kernels' summation order
                assert q.tile_rows_allowed(rows)
                assert torch.allclose(q._tiled_forward(inp, rows), want, rtol=1e-6, atol=1e-6), (option, rows)
    # the tuner keeps a block size only when the output is bit-identical, so the forward always is
    monkeypatch.setattr(runtime, "TILE_MIN_NUMEL", 1)
    monkeypatch.setattr(runtime, "TILE_MAX_POSITIONS", 10**9)
    monkeypatch.setattr(runtime, "TILE_CANDIDATES", (8, 16))
    monkeypatch.setattr(runtime, "TILE_MIN_GAIN", -10.0)  # any exact block wins, so the tiled path runs
    runtime.set_tiling(True)
    try:
        for (q, w), inp, whole in cases:
            with torch.no_grad():
                assert torch.equal(q(inp), whole(w))
                assert torch.equal(q(inp), whole(w))  # the remembered choice
        assert runtime.tile_choices() and all(v in (0, 8, 16) for v in runtime.tile_choices().values())
        assert any(runtime.tile_choices().values())
        runtime.set_tiling(False)
        assert runtime.tile_rows(cases[0][0][0], x) == 0 and not runtime.tile_choices()
    finally:
        runtime.set_tiling(True)
    # blocks must start on a byte of the packed stream, and grouped convs are not cut
    q3, _ = _packed(nn.Linear(3, 40), ["uaq-3"], "on_the_fly")
    assert not q3.tile_rows_allowed(1) and q3.tile_rows_allowed(8) and not q3.tile_rows_allowed(40)
    qg, _ = _packed(nn.Conv2d(8, 16, 3, groups=2), [option], "on_the_fly")
    assert not qg.tile_rows_allowed(8)


def test_policy_caches_smallest_weights_first():
    from sensitivity.export.modules import PartSpec as P

    mods = [{"module": n, "kind": "linear", "weight_shape": (100, 100), "parts": [P(n, (100, 100), None, "kmeans_c-4")]}
            for n in ("a", "b", "c")]
    got = choose_kernels(mods, cache_budget=2 * 4 * 100 * 100, positions={"a": 4096, "b": 64, "c": 256})
    assert got == {"a": "on_the_fly", "b": "cached", "c": "cached"}  # equal sizes: fewest positions first
    small = {"module": "s", "kind": "linear", "weight_shape": (10, 100), "parts": [P("s", (10, 100), None, "uaq-4")]}
    got = choose_kernels(mods + [small], cache_budget=4 * 100 * 100, positions={"a": 4096, "b": 64, "c": 256, "s": 10**6})
    assert got == {"a": "on_the_fly", "b": "on_the_fly", "c": "on_the_fly", "s": "cached"}
    mods.append({"module": "d", "kind": "linear", "weight_shape": (10, 10), "parts": [P("d", (10, 10), None, "uaq-8")]})
    assert choose_kernels(mods, 0, act_bits=8)["d"] == "int8_dynamic"
    # W8A8 on the integer kernel only where the layer computes enough (positions x weights) to gain from it
    assert choose_kernels(mods, 0, act_bits=8, positions={"d": 10})["d"] == "on_the_fly"
    big = [{"module": "e", "kind": "linear", "weight_shape": (1280, 1280), "parts": [P("e", (1280, 1280), None, "uaq-8")]}]
    assert choose_kernels(big, 0, act_bits=8, positions={"e": 4096})["e"] == "int8_dynamic"


def _config(mq, seed):
    rng = random.Random(seed)
    return {n: rng.choice(mq.options) for n in mq.layer_names if rng.random() >= 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-dit"] + REAL)
def test_runtime_kernels_agree_with_apply(name, tmp_path):
    """Every kernel of every family: bit-exact with apply(); W8A8 within float32 summation noise."""
    from sensitivity.export.onnx_format import random_inputs
    from sensitivity.graph.inputs import example_inputs

    fam = get_family(name)
    weights = "shipped" if name.startswith("digits") else "tiny"
    den = fam.load_denoiser(weights)
    layers = layer_sample(fam.find_layers(den))
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", layers, model_id=fam.model_id(weights),
                              options=("uaq-4", "kmeans_a-4", "int8_c"), progress=False)
    config = _config(mq, 7)
    export(den, mq, config, tmp_path / "p", source={"model_id": fam.model_id(weights)})
    kw = random_inputs(example_inputs(den, device="cpu"), 0)
    q = load_quantized(tmp_path / "p", runtime="int8_dynamic", act_bits=8)  # int8 wherever eligible
    kernels = q.sensitivity_export["runtime_kernels"]
    int8_convs = [p for p, k in kernels.items() if k == "int8_dynamic" and isinstance(den.get_submodule(p), nn.Conv2d)]
    apply(den, mq, config)
    try:
        with torch.no_grad():
            want = den(**kw, return_dict=False)[0]
        # every half of a module with a quantized half: the run-time module quantizes each input slice; an int8
        # conv quantizes its input on one grid per sample
        packed_paths = {s.module_path for s in layers if s.name in config}
        enable_activation_quant(den, [s for s in layers if s.module_path in packed_paths], 8, attention=False,
                                per_sample=int8_convs)
        with torch.no_grad():
            want8 = den(**kw, return_dict=False)[0]
    finally:
        disable_activation_quant(den)
        restore(den)
    for runtime in (None, "on_the_fly", "cached"):
        qf = load_quantized(tmp_path / "p", runtime=runtime)
        with torch.no_grad():
            assert torch.equal(qf(**kw, return_dict=False)[0], want), runtime
    if int8_conv_available():  # every whole conv at an int8-representable option runs the int8 conv
        assert {s.module_path for s in mq.layers if s.kind == "conv2d" and not s.in_slice
                and config.get(s.name) in ("uaq-4", "int8_c")} <= set(int8_convs)
    assert "int8_dynamic" in kernels.values() or not any(
        o == "int8_c" and s.kind == "linear" and not s.in_slice for s in mq.layers for n, o in config.items() if n == s.name)
    with torch.no_grad():
        got8 = q(**kw, return_dict=False)[0]
    # one float32 rounding can move a later activation code by one step: within a few steps, not bit-exact
    assert (got8 - want8).abs().max() <= 0.05 * max(1.0, float(want8.abs().max()))
    assert sum(is_packed(m) for m in q.modules()) >= 1


@pytest.mark.parametrize("tokens", [3, 300])
def test_w8a8_fused_passes_match_the_fake_quantizer(tokens):
    """The fused activation pass gives quantize_rows_codes' codes exactly (serial and parallel sizes, flat rows),
    and int8_linear equals F.linear of the fake-quantized input up to float32 summation order."""
    from sensitivity.export.kernels import quantize_rows_int8
    from sensitivity.export.runtime import Int8Weight, int8_linear
    from sensitivity.quantizers.activation import fake_quantize_rows, quantize_rows_codes

    gen = torch.Generator().manual_seed(tokens)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(tokens, 256, generator=gen) * scale
        x[1] = 0.25  # a flat row keeps its float value
        q, delta, zero, flat = quantize_rows_codes(x, 8)
        xq, dx, e, sx, fl = quantize_rows_int8(x)
        assert torch.equal(xq, (q - 128).to(torch.int8))
        assert torch.equal(dx, delta.reshape(-1)) and torch.equal(e, 128 - zero.reshape(-1))
        assert torch.equal(fl, flat.reshape(-1)) and torch.equal(sx, xq.sum(1).float())
        codes = torch.randint(0, 256, (40, 256), dtype=torch.uint8, generator=gen)
        d, z = torch.rand(40, generator=gen) * 0.01, torch.randint(90, 160, (40,)).float()
        w, bias = (codes.float() - z[:, None]) * d[:, None], torch.randn(40, generator=gen)
        want = nn.functional.linear(fake_quantize_rows(x, 8), w, bias)
        got = int8_linear(x.reshape(1, tokens, 256), Int8Weight(codes, d, z).tensors(), bias).reshape(tokens, 40)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fused_input_fake_quantizer_is_bit_exact():
    """The one-pass input quantizer of the float W8A8 path equals fake_quantize_rows (serial and parallel sizes)."""
    from sensitivity.export.kernels import fake_quantize_rows_fused
    from sensitivity.quantizers.activation import fake_quantize_rows

    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 33), (80, 1024)]:
        for bits in (4, 6, 8):
            for scale in (1e-3, 1.0, 1e3):
                x = torch.randn(*shape, generator=gen) * scale
                x[1] = 3.0
                assert torch.equal(fake_quantize_rows_fused(x, bits), fake_quantize_rows(x, bits)), (shape, bits, scale)
