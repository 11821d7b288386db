"""Options registry, size accounting, layer discovery, config files."""

import pickle

import pytest
import torch
from torch import nn

from sensitivity.config import QuantConfig
from sensitivity.errors import ConfigError, SensitivityError, UnknownOptionError
from sensitivity.layers import architecture_hash, find_layers, layer_weight, weights_hash
from sensitivity.options import OPTION_NAMES, QuantOption, canonical
from sensitivity.sizes import SizeTable


def test_option_names_and_aliases():
    assert OPTION_NAMES == ("uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-4", "kmeans_a-3")
    assert canonical("mse-4") == "uaq-4"
    assert canonical("kmeans-3") == "kmeans_c-3"
    assert canonical("kmeans_all-4") == "kmeans_a-4"
    assert canonical("fp16") == "fp16"
    for bad in ("uaq", "uaq-x", "foo-4", "uaq-0", "", "kmeans_c-12"):
        with pytest.raises(UnknownOptionError):
            QuantOption.parse(bad)


def test_sizes_follow_design():
    shape = (1152, 1152)
    n, c = 1152 * 1152, 1152
    assert QuantOption.parse("uaq-4").nbytes(shape) == n // 2 + 2 * 2 * c
    assert QuantOption.parse("kmeans_c-3").nbytes(shape) == 3 * n // 8 + 8 * c * 2
    assert QuantOption.parse("kmeans_a-4").nbytes(shape) == n // 2 + 16 * 2
    assert QuantOption.parse("kmeans_c-4").bits_per_weight(shape) == pytest.approx(4 + 256 / 1152)
    assert QuantOption.parse("fp16").nbytes(shape) == 2 * n
    # ceil for odd element counts at 3 bits
    assert QuantOption.parse("kmeans_a-3").nbytes((3, 3)) == 4 + 16
    shapes = {"a": (8, 16), "b": (4, 4)}
    table = SizeTable.from_shapes(shapes)
    assert table.avg_bits({}) == 16.0
    assert table.avg_bits({"a": "kmeans_a-4", "b": "kmeans_a-4"}) == pytest.approx(16 * (64 + 32 + 8 + 32) / 288)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 1)
        self.cat = nn.Linear(12, 4)
        self.pool = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)
        self.emb = nn.Embedding(3, 4)


def test_find_layers_rules():
    net = Net()
    layers = find_layers(net, exclude=["pool.*"], splits={"cat": 8})
    assert [s.name for s in layers] == ["a", "b", "cat#main", "cat#skip"]
    assert [s.kind for s in layers] == ["conv1d", "conv2d", "linear", "linear"]
    main, skip = layers[2], layers[3]
    assert main.shape == (4, 8) and skip.shape == (4, 4) and skip.in_slice == (8, 12)
    assert torch.equal(layer_weight(net, skip), net.cat.weight[:, 8:])
    assert layers[0].row_length == 9 and layers[0].fp16_bytes == 2 * 8 * 3 * 3
    with pytest.raises(SensitivityError, match="nope"):
        find_layers(net, splits={"nope": 1})
    with pytest.raises(SensitivityError, match="split 12"):
        find_layers(net, splits={"cat": 12})
    with pytest.raises(SensitivityError, match="no Conv1d"):
        find_layers(nn.Sequential(nn.ReLU()))


def test_hashes():
    net = Net()
    layers = find_layers(net)
    h = weights_hash(net, layers)
    net2 = Net()
    assert weights_hash(net2, layers) != h
    assert architecture_hash(layers) == architecture_hash(find_layers(net2))
    assert architecture_hash(layers) != architecture_hash(find_layers(net2, splits={"cat": 4}))


def test_weights_hash_is_dtype_independent():
    net = Net()
    layers = find_layers(net)
    h32 = weights_hash(net, layers)
    assert weights_hash(net.to(torch.float16), layers) == h32


def test_config_files(tmp_path):
    cfg = QuantConfig({"a": "mse-3"}, model="m")
    p = cfg.save(tmp_path / "c.json")
    assert QuantConfig.load(p).options == {"a": "uaq-3"}
    (tmp_path / "bare.json").write_text('{"a": "kmeans_all-4"}')
    assert QuantConfig.load(tmp_path / "bare.json").options == {"a": "kmeans_a-4"}
    (tmp_path / "bad.json").write_text('{"options": {"a": "q-7"}}')
    with pytest.raises(ConfigError, match="layer 'a'"):
        QuantConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.load(tmp_path / "broken.json")
    ref = {"model.up_blocks.0.resnets.0.conv1.weight_quantizer_0": "kmeans_all-3",
           "model.up_blocks.0.resnets.0.conv1.weight_quantizer": "kmeans-4",
           "model.conv_in.weight_quantizer": "mse-4"}
    pkl = tmp_path / "ref.pkl"
    pkl.write_bytes(pickle.dumps(ref))
    with pytest.raises(ConfigError, match="--trust-pickle"):
        QuantConfig.load(pkl)
    assert QuantConfig.load(pkl, trust_pickle=True).options == {
        "up_blocks.0.resnets.0.conv1#skip": "kmeans_a-3", "up_blocks.0.resnets.0.conv1#main": "kmeans_c-4",
        "conv_in": "uaq-4"}
