"""Multiquantizer: build -> save -> load -> apply -> restore, resume, and bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity import multiquantizer as mqmod
from sensitivity.config import QuantConfig
from sensitivity.errors import ConfigError, CorruptFileError, MultiquantizerMismatchError, SensitivityError
from sensitivity.layers import find_layers
from sensitivity.multiquantizer import apply, applied_options, build_multiquantizer, load_multiquantizer, restore
from sensitivity.options import OPTION_NAMES
from sensitivity.sizes import SizeTable
from sensitivity.quantizers import quantize


class Toy(nn.Module):
    """Conv + a skip-concat linear (split) + two tied copies of one embedder + a head."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.skip_linear = nn.Linear(2 * 16, 16)
        self.emb = nn.ModuleList([nn.Linear(8, 16) for _ in range(2)])
        self.head = nn.Linear(16, 4)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.emb[1].load_state_dict(self.emb[0].state_dict())

    def forward(self, x, t):
        h = self.conv(x).mean((2, 3))
        h = self.skip_linear(torch.cat([h, h * 0.5], dim=1))
        h = h + self.emb[0](t) + self.emb[1](t)
        return self.head(torch.relu(h))


def toy_layers(model):
    return find_layers(model, splits={"skip_linear": 16}, ties={"emb.0": ["emb.1"]})


def toy_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 8, generator=g)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = Toy()
    path = tmp_path_factory.mktemp("mq") / "toy.safetensors"
    mq = build_multiquantizer(model, path, toy_layers(model), model_id="toy", progress=False)
    return model, path, mq


def test_layers_and_manifest(built):
    model, path, mq = built
    assert mq.layer_names == ["conv", "skip_linear#main", "skip_linear#skip", "emb.0", "head"]
    assert mq.options == OPTION_NAMES
    assert not Path(str(path) + ".parts").exists()
    spec = {s.name: s for s in mq.layers}
    assert spec["skip_linear#skip"].in_slice == (16, 32) and spec["emb.0"].tied == ("emb.1",)
    for s in mq.layers:
        for opt in OPTION_NAMES:
            st = mq.stats(s.name, opt)
            assert st["nbytes"] > 0 and st["error"] >= 0
    # stored stats equal a fresh quantization of the same weight
    w = model.conv.weight
    assert mq.stats("conv", "uaq-3")["error"] == pytest.approx(quantize(w, "uaq-3").error, rel=1e-9)


def test_dequantize_matches_quantize(built):
    model, _, mq = built
    for opt in OPTION_NAMES:
        ref = quantize(model.skip_linear.weight[:, 16:], opt).dequantize()
        got = mq.dequantize("skip_linear#skip", opt)
        assert torch.equal(got, ref), opt


def test_apply_restore_round_trip_exact(built):
    model, path, _ = built
    mq = load_multiquantizer(path, model=model)
    x, t = toy_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(x, t)
    cfg = {"conv": "kmeans_c-3", "skip_linear#main": "uaq-4", "skip_linear#skip": "kmeans_a-3", "emb.0": "uaq-3", "head": "kmeans_c-4"}
    apply(model, mq, cfg)
    assert applied_options(model) == cfg
    assert torch.equal(model.emb[0].weight, model.emb[1].weight)  # tied copies written together
    assert torch.equal(model.skip_linear.weight[:, 16:], mq.dequantize("skip_linear#skip", "kmeans_a-3"))
    assert not torch.equal(model(x, t), y0)
    # a second apply changes only what differs; a layer left out goes back to full precision
    apply(model, mq, {"conv": "kmeans_c-3"})
    assert torch.equal(model.head.weight, before["head.weight"])
    assert torch.equal(model.conv.weight, mq.dequantize("conv", "kmeans_c-3"))
    restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model(x, t), y0)


def test_avg_bits_consistent(built):
    _, _, mq = built
    cfg = {n: ("uaq-3" if i % 2 else "kmeans_a-4") for i, n in enumerate(mq.layer_names)}
    shapes = {s.name: s.shape for s in mq.layers}
    assert mq.avg_bits(cfg) == pytest.approx(SizeTable.from_shapes(shapes).avg_bits(cfg))
    assert SizeTable.from_multiquantizer(mq).avg_bits(cfg) == mq.avg_bits(cfg)
    assert mq.avg_bits({}) == pytest.approx(16.0)
    # the toy's rows are short, so the fp16 scale/zero overhead adds well over a bit per weight
    u3 = mq.avg_bits({n: "uaq-3" for n in mq.layer_names})
    u4 = mq.avg_bits({n: "uaq-4" for n in mq.layer_names})
    assert 3.0 < u3 < u4 < 16.0 and u4 - u3 == pytest.approx(1.0)


def test_config_file_round_trip(built, tmp_path):
    model, _, mq = built
    cfg = QuantConfig({"conv": "mse-4", "head": "kmeans_all-3"}, model="toy", multiquantizer_hash=mq.hash)
    f = cfg.save(tmp_path / "c.json")
    back = QuantConfig.load(f)
    assert back.options == {"conv": "uaq-4", "head": "kmeans_a-3"}
    assert back.config_hash == cfg.config_hash
    apply(model, mq, back)
    restore(model)


def test_bad_configs(built):
    model, _, mq = built
    with pytest.raises(ConfigError, match="not_a_layer"):
        apply(model, mq, {"not_a_layer": "uaq-4"})
    with pytest.raises(SensitivityError, match="uaq-9|unknown|bits"):
        apply(model, mq, {"conv": "uaq-9"})
    with pytest.raises(SensitivityError, match="unknown quantization option"):
        apply(model, mq, {"conv": "int4"})
    with pytest.raises(ConfigError, match="'int8' is not in multiquantizer"):
        apply(model, mq, {"conv": "int8"})
    assert applied_options(model) == {}


def test_wrong_model_refused(built):
    _, path, _ = built
    other = Toy(seed=5)
    with pytest.raises(MultiquantizerMismatchError, match="weights differ"):
        load_multiquantizer(path, model=other)
    with pytest.raises(MultiquantizerMismatchError, match="no layer"):
        load_multiquantizer(path, model=nn.Sequential(nn.Linear(3, 3)))


def test_truncated_and_tampered_files(built, tmp_path):
    _, path, _ = built
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_multiquantizer(trunc)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CorruptFileError):
        load_multiquantizer(tmp_path / "tiny.safetensors")
    tampered = tmp_path / "tampered.safetensors"
    b = bytearray(data)
    b[-3] ^= 0xFF  # last bytes belong to some tensor's data
    tampered.write_bytes(bytes(b))
    mq = load_multiquantizer(tampered)
    with pytest.raises(CorruptFileError, match="modified or damaged"):
        for name in mq.layer_names:
            for opt in mq.options:
                mq.dequantize(name, opt)
    # a manifest edited by hand (an error value changed) is refused as a whole
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["sensitivity.manifest"])
    manifest["layers"][0]["options"]["uaq-4"]["error"] = 0.0
    header["__metadata__"]["sensitivity.manifest"] = json.dumps(manifest)
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    with pytest.raises(CorruptFileError, match="manifest was modified"):
        load_multiquantizer(edited)
    with pytest.raises(SensitivityError, match="does not exist"):
        load_multiquantizer(tmp_path / "missing.safetensors")


def test_nan_and_empty_models(tmp_path):
    m = Toy()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(SensitivityError, match="head.*NaN"):
        build_multiquantizer(m, tmp_path / "nan.safetensors", toy_layers(m), progress=False)
    assert not (tmp_path / "nan.safetensors").exists()
    with pytest.raises(SensitivityError, match="no Conv1d/Conv2d/Linear"):
        build_multiquantizer(nn.Sequential(nn.ReLU()), tmp_path / "empty.safetensors", progress=False)
    with pytest.raises(SensitivityError, match="unknown quantization option"):
        build_multiquantizer(Toy(), tmp_path / "x.safetensors", options=["uaq-4", "foo-3"], progress=False)


def test_untied_copies_refused(tmp_path):
    m = Toy()
    with torch.no_grad():
        m.emb[1].weight.add_(1.0)
    with pytest.raises(SensitivityError, match="tied copy 'emb.1'"):
        build_multiquantizer(m, tmp_path / "t.safetensors", toy_layers(m), progress=False)


def test_resume_after_interrupt(tmp_path, monkeypatch, built):
    _, ref_path, ref = built
    model = Toy()
    out = tmp_path / "r.safetensors"
    real = mqmod._quantize_layer
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mqmod, "_quantize_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_multiquantizer(model, out, toy_layers(model), model_id="toy", progress=False)
    assert not out.exists()
    assert len(list((tmp_path / "r.safetensors.parts").glob("layer-*.safetensors"))) == 2
    monkeypatch.setattr(mqmod, "_quantize_layer", real)
    mq = build_multiquantizer(model, out, toy_layers(model), model_id="toy", progress=False)
    assert mq.manifest["resumed_layers"] == 2
    assert mq.hash == ref.hash
    for name in mq.layer_names:
        for opt in mq.options:
            assert torch.equal(mq.dequantize(name, opt), ref.dequantize(name, opt))


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A build killed with SIGKILL mid-way resumes and yields the same file content hash."""
    out = tmp_path / "k.safetensors"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from torch import nn
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_multiquantizer import Toy, toy_layers
        import sensitivity.multiquantizer as m
        real = m._quantize_layer
        def slow(*a, **k):
            r = real(*a, **k)
            print("layer", flush=True)
            time.sleep(0.3 if len(sys.argv) > 1 else 0)
            return r
        m._quantize_layer = slow
        model = Toy()
        m.build_multiquantizer(model, {str(out)!r}, toy_layers(model), model_id="toy", progress=False)
        print("done", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    p = subprocess.Popen([sys.executable, "-c", script, "slow"], stdout=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in p.stdout:
        seen += line.startswith("layer")
        if seen == 3:
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert not out.exists()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    mq = load_multiquantizer(out)
    assert mq.manifest["resumed_layers"] >= 2
    model = Toy()
    fresh = build_multiquantizer(model, tmp_path / "f.safetensors", toy_layers(model), model_id="toy", progress=False)
    assert mq.hash == fresh.hash
