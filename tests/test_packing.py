"""Bit-packing of codes: exact round trip, layout, sizes, input checks."""

import numpy as np
import pytest
import torch

from sensitivity.quantizers import packing
from sensitivity.quantizers.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 16, 17, 1001, 4096 + 5])
def test_round_trip(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, n, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == (bits * n + 7) // 8 == packed_size(n, bits)
    assert np.array_equal(unpack_codes(packed, bits, n), codes)


def test_round_trip_across_chunks(monkeypatch):
    monkeypatch.setattr(packing, "_CHUNK", 64)
    rng = np.random.default_rng(0)
    for bits in (3, 5):
        codes = rng.integers(0, 2**bits, 64 * 5 + 13, dtype=np.uint8)
        assert np.array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.size), codes)


def test_layout():
    # 3-bit: 8 codes in 3 bytes, code i at bits [3i, 3i+3) of a little-endian 24-bit word
    codes = np.arange(8, dtype=np.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(codes, 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]
    # 4-bit: first code in the low nibble
    assert pack_codes(np.array([1, 2, 15], np.uint8), 4).tolist() == [0x21, 0x0F]
    # 1-bit: little-endian bit order
    assert pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], np.uint8), 1).tolist() == [0x81, 0x01]
    assert pack_codes(np.array([7, 200], np.uint8), 8).tolist() == [7, 200]


def test_torch_in_torch_out():
    codes = torch.randint(0, 8, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.numel() == 375
    out = unpack_codes(packed, 3, 1000)
    assert isinstance(out, torch.Tensor) and torch.equal(out, codes)


def test_bad_inputs():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array([0, 8], np.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(np.array([0, 1], np.int64), 3)
    with pytest.raises(ValueError, match="1-D"):
        pack_codes(np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros(4, np.uint8), 9)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(np.zeros(5, np.uint8), 3, 8)
