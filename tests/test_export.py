"""Export formats: packed (bit-exact with apply), sdnq and onnx (skipped without their extras), bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from sensitivity.errors import SensitivityError
from sensitivity.export import export, load_quantized
from sensitivity.export.modules import is_packed, unpack_codes_torch
from sensitivity.multiquantizer import apply, build_multiquantizer, restore
from sensitivity.quantizers.packing import pack_codes, unpack_codes
from sensitivity.zoo import get_family

from family_sweep import layer_sample

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
HAS_SDNQ = importlib.util.find_spec("sdnq") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
OPTIONS = ("uaq-3", "kmeans_c-3", "kmeans_a-4")
REAL = ["sd15", "sdxl", "pixart-alpha", "pixart-sigma", "dit-xl-2", "hunyuan-dit"]


def _config(mq, seed=0, p_fp=0.1):
    rng = random.Random(seed)
    return {n: rng.choice(mq.options) for n in mq.layer_names if rng.random() >= p_fp}


def _digits(tmp_path_factory, options):
    fam = get_family("digits-dit")
    pipe = fam.load_pipeline("shipped")
    den = fam.denoiser(pipe)
    path = tmp_path_factory.mktemp("mq") / "digits.safetensors"
    mq = build_multiquantizer(den, path, fam.find_layers(den), model_id=fam.model_id("shipped"),
                              options=options, progress=False)
    source = {"family": "digits-dit", "weights": "shipped", "seed": 0, "model_id": fam.model_id("shipped")}
    return fam, pipe, den, mq, source


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits-dit with a multiquantizer of uaq, kmeans_c and kmeans_a options (slow tests)."""
    return _digits(tmp_path_factory, OPTIONS)


@pytest.fixture(scope="module")
def digits_uaq(tmp_path_factory):
    """digits-dit with a uaq-3 / uaq-4 multiquantizer (cheap: seconds)."""
    return _digits(tmp_path_factory, ("uaq-3", "uaq-4"))


def _check_weights(q, den, mq, config):
    apply(den, mq, config)
    try:
        modules = dict(den.named_modules())
        n = 0
        for name, m in q.named_modules():
            if is_packed(m):
                assert torch.equal(m.weight, modules[name].weight), name
                n += 1
        return n
    finally:
        restore(den)


def test_unpack_torch_matches_numba():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        codes = rng.integers(0, 2**bits, 1003, dtype=np.uint8)
        packed = pack_codes(codes, bits)
        assert np.array_equal(unpack_codes_torch(torch.from_numpy(packed), bits, codes.size).numpy(), codes)
        assert np.array_equal(unpack_codes(packed, bits, codes.size), codes)


@pytest.mark.slow
def test_packed_digits_bit_exact_images(digits, tmp_path):
    fam, pipe, den, mq, source = digits
    config = _config(mq)
    rec = export(den, mq, config, tmp_path / "p", source=source)
    assert rec["quantized_layers"] == len(config) and rec["multiquantizer"]["hash"] == mq.hash
    q = load_quantized(tmp_path / "p")
    assert type(q) is type(den) and q.sensitivity_export["config"]["hash"] == rec["config"]["hash"]
    n = _check_weights(q, den, mq, config)
    assert n >= len(config)  # tied copies are packed modules too
    # memory held: packed codes, not float weights
    held = sum(b.numel() * b.element_size() for m in q.modules() if is_packed(m)
               for k, b in m.named_buffers(recurse=False) if k.endswith("codes"))
    assert held < sum(4 * np.prod(s.shape) for s in mq.layers if s.name in config) / 6
    seeds = list(range(4))
    apply(den, mq, config)
    try:
        want = fam.generate(pipe, seeds, seeds)
    finally:
        restore(den)
    setattr(pipe, fam.denoiser_attr, q)
    try:
        got = fam.generate(pipe, seeds, seeds)
        setattr(pipe, fam.denoiser_attr, load_quantized(tmp_path / "p", materialize=True))
        got_m = fam.generate(pipe, seeds, seeds)
    finally:
        setattr(pipe, fam.denoiser_attr, den)
    assert np.array_equal(got, want) and np.array_equal(got_m, want)


def test_bad_input_one_line_no_partial_output(digits_uaq, tmp_path):
    fam, pipe, den, mq, source = digits_uaq
    config = _config(mq, seed=1)
    unet = get_family("digits-unet").load_denoiser("shipped")
    with pytest.raises(SensitivityError, match="not built for|built for|has no layer"):
        export(unet, mq, config, tmp_path / "x", source={"model_id": "digits-unet:shipped"})
    with pytest.raises(SensitivityError, match="not in multiquantizer"):
        export(den, mq, {"proj_out_2": "kmeans_c-3"}, tmp_path / "x", source=source)
    with pytest.raises(SensitivityError, match="unknown export format"):
        export(den, mq, config, tmp_path / "x", format="gguf", source=source)
    assert not any(tmp_path.iterdir())  # nothing written, no temp folder left
    export(den, mq, config, tmp_path / "p", source=source)
    with pytest.raises(SensitivityError, match="already exists"):
        export(den, mq, config, tmp_path / "p", source=source)
    with pytest.raises(SensitivityError, match="holds a DiTTransformer2DModel, not a UNet2DModel"):
        load_quantized(tmp_path / "p", expect_class="UNet2DModel")
    # a missing tensor and a damaged tensor: one line naming it
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "p" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("/codes"))
    damaged = dict(tensors)
    damaged[key] = damaged[key].clone()
    damaged[key][0] ^= 1
    save_file(damaged, str(weights))
    with pytest.raises(SensitivityError, match=f"tensor '{key}' was modified or damaged") as e:
        load_quantized(tmp_path / "p")
    assert "\n" not in str(e.value)
    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(SensitivityError, match=f"tensor '{key}' is missing"):
        load_quantized(tmp_path / "p")
    # a file cut short and a file that is no safetensors at all (the loader reads it without a memory map)
    save_file(tensors, str(weights))
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    with pytest.raises(SensitivityError, match="model.safetensors: tensor '.*' cannot be read .*cut short") as e:
        load_quantized(tmp_path / "p")
    assert "\n" not in str(e.value)
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(SensitivityError, match="model.safetensors: not a readable safetensors file"):
        load_quantized(tmp_path / "p")
    weights.write_bytes(whole)
    assert load_quantized(tmp_path / "p") is not None
    with pytest.raises(SensitivityError, match="not a `sensitivity export` folder"):
        load_quantized(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.slow
def test_cli_export_and_infer(digits, tmp_path, capsys):
    from sensitivity.cli import main
    from sensitivity.config import QuantConfig

    fam, pipe, den, mq, source = digits
    cfg = tmp_path / "c.json"
    QuantConfig(_config(mq, seed=2), model=mq.model_id, multiquantizer_hash=mq.hash).save(cfg)
    out = tmp_path / "e"
    base = ["export", "digits-dit", "--weights", "shipped", "--multiquantizer", str(mq.path), "--config", str(cfg)]
    assert main(base + ["--format", "packed", "--out", str(out)]) == 0
    assert "wrote packed export" in capsys.readouterr().out
    assert main(["infer", "--quantized", str(out), "--class-id", "4", "--n-images", "2", "--out", str(tmp_path / "i"),
                 "--no-progress"]) == 0
    run = json.loads((tmp_path / "i" / "run.json").read_text())
    assert run["quantized"]["config_hash"] == QuantConfig.load(cfg).config_hash and len(run["images"]) == 2
    assert main(["infer", "digits-unet", "--quantized", str(out), "--class-id", "1", "--out", str(tmp_path / "j")]) == 2
    assert "exported from digits-dit:shipped" in capsys.readouterr().err
    assert main(base[:2] + ["--weights", "random"] + base[4:] + ["--format", "packed", "--out", str(tmp_path / "r")]) == 2
    assert "built for digits-dit:shipped" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_import_sensitivity_stays_torch_free():
    code = "import sys, sensitivity; assert 'torch' not in sys.modules; assert callable(sensitivity.load_quantized)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SDNQ, reason="sdnq not installed: pip install 'sensitivity[sdnq]'")
def test_sdnq_from_pretrained_identical_images(digits, tmp_path):
    from diffusers import DiTTransformer2DModel

    fam, pipe, den, mq, source = digits
    config = _config(mq, seed=3)
    rec = export(den, mq, config, tmp_path / "s", format="sdnq", source=source)
    assert rec["sdnq_check"]["max_abs_weight_diff"] == 0.0
    q = DiTTransformer2DModel.from_pretrained(str(tmp_path / "s"))
    qc = q.config.quantization_config
    n_sdnq = sum(hasattr(m, "sdnq_dequantizer") for m in q.modules())
    assert n_sdnq == rec["sdnq_check"]["layers"] and qc["quant_method"] == "sdnq"
    seeds = list(range(6))
    apply(den, mq, config)
    try:
        want = fam.generate(pipe, seeds, seeds)
    finally:
        restore(den)
    setattr(pipe, fam.denoiser_attr, q)
    try:
        got = fam.generate(pipe, seeds, seeds)
    finally:
        setattr(pipe, fam.denoiser_attr, den)
    assert np.array_equal(got, want)
    # --pipeline: the whole pipeline folder reloads with the pipeline class's from_pretrained
    export(den, mq, config, tmp_path / "sp", format="sdnq", source=source, pipeline=pipe)
    p2 = type(pipe).from_pretrained(str(tmp_path / "sp"))
    assert sum(hasattr(m, "sdnq_dequantizer") for m in p2.transformer.modules()) == n_sdnq


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime/onnxscript not installed: pip install 'sensitivity[onnx]'")
def test_onnx_qdq_matches_torch(digits, tmp_path):
    import onnx

    fam, pipe, den, mq, source = digits
    config = _config(mq, seed=4)
    rec = export(den, mq, config, tmp_path / "o", format="onnx", source=source)
    check = rec["onnx_check"]
    assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["torch_abs_max"])
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    cast_out = {n.output[0] for n in model.graph.node if n.op_type == "Cast"}
    n_gather = sum(n.op_type == "Gather" and n.input[0] in cast_out for n in model.graph.node)
    kmeans = sum(1 for o in config.values() if o.startswith("kmeans"))
    assert n_gather == kmeans and rec["layers_dequantized"] == 0 and rec["layers_qdq"] == len(config)
    # as small as the config: codes (UINT4, in-graph unpacked 3-bit streams) + tables, unquantized tensors at fp32
    quantized_paths = {p for s in mq.layers if s.name in config for p in (s.module_path,) + tuple(s.tied)}
    plain = sum(4 * v.numel() for k, v in den.state_dict().items()
                if not (k.endswith(".weight") and k[:-len(".weight")] in quantized_paths))
    assert rec["bytes_on_disk"] <= 1.25 * (rec["quantized_bytes"] + plain)
    with pytest.raises(SensitivityError, match="--opset 5: the onnx export writes opsets 18 to"):
        export(den, mq, config, tmp_path / "o5", format="onnx", source=source, opset=5)
    assert not (tmp_path / "o5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_packed_tiny_families(name, tmp_path):
    fam = get_family(name)
    den = fam.load_denoiser("tiny")
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", layer_sample(fam.find_layers(den)),
                              model_id=fam.model_id("tiny"), options=("uaq-3", "kmeans_a-4"), progress=False)
    config = _config(mq, seed=5)
    export(den, mq, config, tmp_path / "p", source={"family": name, "weights": "tiny", "model_id": fam.model_id("tiny")})
    q = load_quantized(tmp_path / "p")
    assert _check_weights(q, den, mq, config) >= len({s.module_path for s in mq.layers if s.name in config})
    from sensitivity.export.onnx_format import random_inputs
    from sensitivity.graph.inputs import example_inputs

    kw = random_inputs(example_inputs(den, device="cpu"), 0)
    apply(den, mq, config)
    try:
        with torch.no_grad():
            want = den(**kw, return_dict=False)[0]
            got = q(**kw, return_dict=False)[0]
    finally:
        restore(den)
    assert torch.equal(got, want)
    if HAS_SDNQ and any(s.in_slice for s in mq.layers if s.name in config):
        with pytest.raises(SensitivityError, match="split #main/#skip halves|groups of 8 values"):
            export(den, mq, config, tmp_path / "s", format="sdnq", source={"model_id": fam.model_id("tiny")})
        assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_new_methods_every_format(digits, tmp_path):
    """int8, int8_c, fp8_e4m3, uaq_g128, uaq_ls: packed bit-exact, sdnq weights exact, onnx within float32 noise."""
    fam, pipe, den, _, source = digits
    opts = ("int8-8", "int8_c-8", "fp8_e4m3-8", "uaq_g128-4", "uaq_ls-3")
    mq = build_multiquantizer(den, tmp_path / "new.safetensors", fam.find_layers(den), model_id=fam.model_id("shipped"),
                              options=opts, progress=False)
    config = _config(mq, seed=6, p_fp=0.0)
    export(den, mq, config, tmp_path / "p", source=source)
    assert _check_weights(load_quantized(tmp_path / "p"), den, mq, config) >= len(config)
    if HAS_SDNQ:
        rec = export(den, mq, config, tmp_path / "s", format="sdnq", source=source)
        assert rec["sdnq_check"]["max_abs_weight_diff"] == 0.0
    if HAS_ONNX:
        rec = export(den, mq, config, tmp_path / "o", format="onnx", source=source)
        assert rec["onnx_check"]["max_abs_diff"] <= 1e-5 * max(1.0, rec["onnx_check"]["torch_abs_max"])
        assert rec["layers_dequantized"] == 0 and rec["layers_qdq"] == len(config)  # uaq_ls too: codes, then - z, * Δ


ONNX_UNSUPPORTED = {"pixart-alpha", "pixart-sigma"}  # onnxruntime rejects the exported graph (Squeeze on a symbolic dim)
# the ONNX export of these runs the same denoiser class as another family of the sweep (UNet2DConditionModel: sd15,
# PixArtTransformer2DModel: pixart-alpha); its graph export is the sweep's costliest step, so they check sdnq only
ONNX_SAME_CLASS_AS = {"sdxl": "sd15", "pixart-sigma": "pixart-alpha"}


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SDNQ and HAS_ONNX), reason="needs the sdnq and onnx extras: pip install 'sensitivity[sdnq,onnx]'")
@pytest.mark.parametrize("name", REAL)
def test_sdnq_and_onnx_tiny_families(name, tmp_path):
    """Every family's tiny denoiser exports to sdnq (weights identical) and onnx (onnxruntime = PyTorch),
    or is refused with one line where the format cannot carry it."""
    fam = get_family(name)
    den = fam.load_denoiser("tiny")
    # split halves: sdnq refuses them (tested above)
    layers = layer_sample([s for s in fam.find_layers(den) if s.in_slice is None])
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", layers, model_id=fam.model_id("tiny"),
                              options=("uaq-4", "kmeans_a-4"), progress=False)
    config = _config(mq, seed=7)
    source = {"family": name, "weights": "tiny", "model_id": fam.model_id("tiny")}
    rec = export(den, mq, config, tmp_path / "s", format="sdnq", source=source)
    assert rec["sdnq_check"]["max_abs_weight_diff"] == 0.0 and rec["sdnq_check"]["layers"] >= 1
    if name in ONNX_SAME_CLASS_AS:
        assert type(den).__name__ == type(get_family(ONNX_SAME_CLASS_AS[name]).load_denoiser("meta")).__name__
        return
    if name in ONNX_UNSUPPORTED:
        with pytest.raises(SensitivityError, match="onnxruntime cannot run"):
            export(den, mq, config, tmp_path / "o", format="onnx", source=source)
        assert not (tmp_path / "o").exists()
        return
    rec = export(den, mq, config, tmp_path / "o", format="onnx", source=source)
    check = rec["onnx_check"]
    assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["torch_abs_max"])


def test_model_card_yaml_header(digits_uaq, tmp_path):
    yaml = pytest.importorskip("yaml", reason="pyyaml not installed")
    fam, pipe, den, mq, source = digits_uaq
    config = _config(mq, seed=6)
    rec = export(den, mq, config, tmp_path / "p", source=source, metrics={"fid_heldout": 12.5},
                 command="sensitivity export digits-dit --format packed")
    text = (tmp_path / "p" / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["base_model"] == "digits-dit:shipped" and header["base_model_relation"] == "quantized"
    assert header["library_name"] == "diffusers" and "packed" in header["tags"] and "digits-dit" in header["tags"]
    assert f"{rec['avg_bits']:.3f} average bits" in text and "| fid_heldout | 12.5 |" in text
    n3 = sum(1 for o in config.values() if o == "uaq-3")
    assert f"| uaq-3 | {n3} |" in text and "sensitivity export digits-dit --format packed" in text
    assert "sensitivity.load_quantized" in text


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime/onnxscript not installed: pip install 'sensitivity[onnx]'")
@pytest.mark.parametrize("name", ["sd15"])  # convs and linear layers (digits-dit passes at 2e-2 too; left out for the suite's time)
def test_onnx_w8a8_runs_on_integer_kernels(name, tmp_path):
    """A W8A8 config's ONNX file: static QDQ that onnxruntime fuses into QLinearConv / MatMulIntegerToFloat,
    equal to the same static fake quantization in PyTorch up to integer rounding."""
    import onnx
    import onnxruntime as ort

    from sensitivity.config import QuantConfig
    from sensitivity.export.onnx_format import W8A8_DISABLED_OPTIMIZERS, session_options

    fam = get_family(name)
    weights = "shipped" if name.startswith("digits") else "tiny"
    den = fam.load_denoiser(weights)
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", fam.find_layers(den), model_id=fam.model_id(weights),
                              options=("int8_c-8", "uaq-4"), progress=False)
    options = {n: "int8_c-8" for n in mq.layer_names}
    options[mq.layer_names[-1]] = "uaq-4"  # a weight-only layer in the same file stays weight-only QDQ
    config = QuantConfig(options, model=mq.model_id, multiquantizer_hash=mq.hash, act_bits=8)
    source = {"family": name, "weights": weights, "model_id": fam.model_id(weights)}
    rec = export(den, mq, config, tmp_path / "o", format="onnx", source=source)
    w8a8 = rec["w8a8"]
    assert rec["layers_w8a8"] == w8a8["layers"] >= 1 and w8a8["calibration"] == {"seeded_example_inputs": [0, 1, 2, 3]}
    assert rec["layers_dequantized"] == 0 and rec["layers_qdq"] >= 1
    check = rec["onnx_check"]
    # the integer kernels round like the fake quantizer up to near-ties and the int32 bias: one 8-bit step at
    # the first conv (measured), and each requantized conv passes its differences on, so a deep UNet's output
    # moves by several steps
    tol = 2e-2 if name.startswith("digits") else 1e-1
    assert check["max_abs_diff"] <= tol * max(1.0, check["torch_abs_max"]), check
    assert 0 < w8a8["max_abs_diff_vs_weight_only"]
    opts = session_options(fold_weights=False)
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(W8A8_DISABLED_OPTIMIZERS))  # what inference_session(w8a8=True) does
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") + ops.count("QLinearConv") >= w8a8["layers"], sorted(set(ops))
    if name == "sd15":
        assert w8a8["conv_layers"] >= 1 and "QLinearConv" in ops
