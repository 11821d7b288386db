"""The random-config sampler: reference distribution, determinism, bits/methods/fixed options."""

import collections
import random

import pytest

from sensitivity.errors import ConfigError, SensitivityError
from sensitivity.evaluation.sampler import SamplerSpec, parse_bits, sample_config, sample_configs
from sensitivity.layers import LayerSpec
from sensitivity.options import OPTION_NAMES, QuantOption

NAMES = [f"transformer_blocks.{b}.{n}" for b in range(20) for n in ("attn1.to_q", "attn1.to_k", "ff.net.2")]


def test_deterministic_and_order_independent():
    a = sample_config(NAMES, 7, 3)
    assert a == sample_config(NAMES, 7, 3)
    shuffled = NAMES[:]
    random.Random(0).shuffle(shuffled)
    assert sample_config(shuffled, 7, 3) == a  # a layer's draw depends on its name, not its position
    # config i does not depend on which other configs were drawn before (resume / many workers)
    batch = sample_configs(NAMES, 7, [5, 3, 1])
    assert batch[1] == a
    assert sample_config(NAMES, 7, 4) != a and sample_config(NAMES, 8, 3) != a
    assert set(a) == set(NAMES) and set(a.values()) <= set(OPTION_NAMES)


def test_pinned_draws_stay_stable():
    """Runs in existing caches rely on config i staying the same across versions of the code."""
    got = sample_config(["a", "b", "c", "d"], 0, 0)
    again = sample_config(["d", "c", "b", "a"], 0, 0)
    assert got == again
    # the sampler hashes (seed, index, name): recompute one layer's draw by hand
    import hashlib
    import struct

    def u(key, n):
        h = hashlib.blake2b(f"0\x1f0\x1f{key}".encode(), digest_size=32, person=b"sens.sampler.v1").digest()
        return [x / 2**64 for x in struct.unpack("<4Q", h)[:n]]

    (p,) = u("\x00p", 1)
    ua = u("a", 4)
    bits = 3 if ua[0] < p else 4
    methods = sorted(o for o in OPTION_NAMES if o.endswith(f"-{bits}"))
    assert got["a"] == methods[int(ua[3] * 3)]


def test_reference_distribution():
    """p ~ U(0,1) per config; a layer is 3-bit with probability p; the method is uniform."""
    n_cfg = 300
    fracs, methods = [], collections.Counter()
    for i in range(n_cfg):
        cfg = sample_config(NAMES, 0, i)
        bits = [QuantOption.parse(o).bits for o in cfg.values()]
        fracs.append(sum(b == 3 for b in bits) / len(bits))
        methods.update(QuantOption.parse(o).method for o in cfg.values())
    mean = sum(fracs) / n_cfg
    assert 0.45 < mean < 0.55
    # p is uniform: the 3-bit fraction per config spreads over [0, 1]
    assert min(fracs) < 0.05 and max(fracs) > 0.95
    assert sum(f < 0.25 for f in fracs) > 0.18 * n_cfg and sum(f > 0.75 for f in fracs) > 0.18 * n_cfg
    total = sum(methods.values())
    for m in ("uaq", "kmeans_c", "kmeans_a"):
        assert abs(methods[m] / total - 1 / 3) < 0.02


def test_bits_methods_and_aliases():
    only4 = sample_config(NAMES, 1, 0, bits="4")
    assert {QuantOption.parse(o).bits for o in only4.values()} == {4}
    mse = sample_config(NAMES, 1, 0, methods=["mse", "kmeans_all"])  # reference aliases
    assert {QuantOption.parse(o).method for o in mse.values()} <= {"uaq", "kmeans_a"}
    # three widths: j ~ Binomial(2, p) steps down from the highest width
    spec = SamplerSpec(seed=0, options=("uaq-2", "uaq-3", "uaq-4"))
    seen = collections.Counter(o for i in range(50) for o in spec.sample(NAMES, i).values())
    assert set(seen) == {"uaq-2", "uaq-3", "uaq-4"}
    assert parse_bits("3-4") == (3, 4) and parse_bits("4,3") == (3, 4) and parse_bits(None) is None
    with pytest.raises(ConfigError, match="no option left"):
        SamplerSpec(options=OPTION_NAMES, bits=(2,))
    with pytest.raises(ConfigError, match="unknown method"):
        SamplerSpec(methods=("int8x",))


def test_fixed_layers_and_patterns():
    fixed = {"transformer_blocks.0.attn1.to_q": "mse-4", "transformer_blocks.1*": "fp16"}
    cfg = sample_config(NAMES, 2, 9, fixed=fixed)
    assert cfg["transformer_blocks.0.attn1.to_q"] == "uaq-4"
    assert not any(k.startswith("transformer_blocks.1") for k in cfg)  # fp16 layers are left out
    # the other layers draw exactly what they draw without fixed layers
    free = sample_config(NAMES, 2, 9)
    assert all(cfg[k] == free[k] for k in cfg if k != "transformer_blocks.0.attn1.to_q")
    spec = SamplerSpec(fixed={"nothing.*": "uaq-4"})
    with pytest.raises(ConfigError, match="matches no layer"):
        spec.check_layers(NAMES)
    with pytest.raises(ConfigError, match="fixed layer"):
        SamplerSpec(fixed={"x": "uaq-9x"})


def test_layer_specs_and_tied_layers():
    specs = [LayerSpec("t.linear_1", "t.linear_1", "linear", (128, 128), None, ("b1.t.linear_1", "b2.t.linear_1")),
             LayerSpec("proj", "proj", "linear", (128, 128))]
    cfg = sample_config(specs, 0, 1)
    assert set(cfg) == {"t.linear_1", "proj"}  # a tied layer is one layer, sampled once
    spec = SamplerSpec(seed=4, bits=(3, 4), methods=("uaq",), fixed={"proj": "fp16"})
    assert SamplerSpec.from_dict(spec.to_dict()) == spec
    assert spec.signature() == SamplerSpec.from_dict(spec.to_dict()).signature()
    assert spec.signature() != SamplerSpec(seed=5, bits=(3, 4), methods=("uaq",), fixed={"proj": "fp16"}).signature()
    with pytest.raises(SensitivityError, match="duplicate"):
        sample_config(["a", "a"], 0, 0)
