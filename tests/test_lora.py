"""LoRA on an exported model: ``load_lora_weights`` / ``set_adapters`` on a pipeline whose UNet is a packed
or sdnq export give the images LoRA gives on the fake-quantized model (``apply``), on a tiny SD1.5 and digits-sd.

The LoRAs are made here: peft's ``LoraConfig`` on the full-precision UNet (random ``lora_B``, so they
change the images), saved with diffusers' ``save_lora_weights``; ``all`` targets attention linears and
resnet convs, ``linear`` the attention linears only. peft wraps the packed modules as it wraps any
``nn.Linear`` / ``nn.Conv2d`` (they are subclasses): the adapter runs beside the low-bit layer, whose codes
stay untouched. SDNQ's conv layers cannot take a LoRA (peft builds the LoRA conv as ``type(base_layer)(...)``,
which ``SDNQConv2d`` does not accept), so the sdnq export is tested with the ``linear`` LoRA.
"""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch

from sensitivity.errors import SensitivityError

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_SDNQ = importlib.util.find_spec("sdnq") is not None
pytestmark = pytest.mark.skipif(not HAS_PEFT, reason="peft not installed: pip install 'sensitivity[lora]'")

# (weights, prompt, options): k-means (a codebook layer in both formats) on the smaller digits-sd only
CASES = {"sd15": ("tiny", "a red cube", ("uaq-4", "uaq-3")),
         "digits-sd": ("shipped", "a handwritten seven", ("uaq-4", "kmeans_c-3"))}
LINEAR = ["to_q", "to_k", "to_v", "to_out.0"]
LORAS = {"all": LINEAR + ["conv1", "conv2"], "linear": LINEAR}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers: one thread runs them fastest, and steadily on a loaded machine."""
    from sensitivity.threads import using_threads

    with using_threads(1):
        yield


def _images(fam, pipe, prompt):
    return fam.generate(pipe, [prompt], [0], steps=2).astype(np.int16)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sensitivity.export import export
    from sensitivity.multiquantizer import apply, build_multiquantizer, restore
    from sensitivity.zoo import get_family

    name = request.param
    weights, prompt, options = CASES[name]
    fam = get_family(name)
    pipe = fam.load_pipeline(weights)
    den = fam.denoiser(pipe)
    d = tmp_path_factory.mktemp(f"lora-{name}")
    mq = build_multiquantizer(den, d / "mq.safetensors", fam.find_layers(den), model_id=fam.model_id(weights),
                              options=options, progress=False)
    rng = random.Random(0)
    # split #main/#skip halves stay in float: SDNQ cannot carry them
    config = {n: rng.choice(mq.options) for n in mq.layer_names if "#" not in n}
    source = {"family": name, "weights": weights, "seed": 0, "model_id": fam.model_id(weights)}
    export(den, mq, config, d / "packed", format="packed", source=source)
    if HAS_SDNQ:
        export(den, mq, config, d / "sdnq", format="sdnq", source=source)

    for lora, targets in LORAS.items():
        torch.manual_seed(0)
        den.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name=lora)
        with torch.no_grad():
            for n, p in den.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 1.0)
        StableDiffusionPipeline.save_lora_weights(
            d / lora, unet_lora_layers=get_peft_model_state_dict(den, adapter_name=lora), safe_serialization=True)
        den.delete_adapters(lora)

    apply(den, mq, config)  # LoRA on the fake-quantized model: the reference
    try:
        ref = {"none": _images(fam, pipe, prompt)}
        for lora in LORAS:
            ref.update(_with_lora(fam, pipe, prompt, d, lora))
    finally:
        restore(den)
    return fam, pipe, den, prompt, d, ref


def _with_lora(fam, pipe, prompt, d, lora):
    """Images with the LoRA at weight 1 and (``set_adapters``) 0.5; the pipeline is left without it."""
    pipe.load_lora_weights(str(d / lora), adapter_name=lora)
    try:
        wrapped = sum(type(m).__module__.startswith("peft") for m in fam.denoiser(pipe).modules())
        out = {f"{lora}@1": _images(fam, pipe, prompt)}
        pipe.set_adapters([lora], [0.5])
        out[f"{lora}@0.5"] = _images(fam, pipe, prompt)
    finally:
        pipe.unload_lora_weights()
    assert wrapped > 0
    return out


def _check(case, fmt, lora, tol):
    from sensitivity.export import load_quantized

    fam, pipe, den, prompt, d, ref = case
    for k in (f"{lora}@1", f"{lora}@0.5"):
        assert np.abs(ref[k] - ref["none"]).max() > 10, f"the LoRA must change the images ({k})"
    q = load_quantized(d / fmt)
    codes = {k: v.clone() for k, v in q.state_dict().items()}
    pipe.unet = q
    try:
        got = _with_lora(fam, pipe, prompt, d, lora)
        pipe.load_lora_weights(str(d / lora), adapter_name=lora)
        with pytest.raises(SensitivityError, match=f"fuse_lora on the {fmt} export"):
            pipe.fuse_lora()  # would merge into a dequantized copy / the codes: refused, nothing changed
        pipe.unload_lora_weights()
    finally:
        pipe.unet = den
    for k, img in got.items():
        assert np.abs(img - ref[k]).max() <= tol, (fmt, k, np.abs(img - ref[k]).max())
    # the low-bit layers were not rewritten
    after = q.state_dict()
    assert set(after) == set(codes) and all(torch.equal(after[k], v) for k, v in codes.items())


@pytest.mark.slow
def test_lora_on_packed_export(case):
    from sensitivity.export.modules import is_packed
    from sensitivity.export import load_quantized

    assert any(is_packed(m) for m in load_quantized(case[4] / "packed").modules())
    _check(case, "packed", "all", tol=1)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SDNQ, reason="sdnq not installed: pip install 'sensitivity[sdnq]'")
def test_lora_on_sdnq_export(case):
    _check(case, "sdnq", "linear", tol=2)


def test_lora_trains_on_a_packed_export(tmp_path):
    """QLoRA-style: a LoRA injected with peft into a packed digits-dit learns (loss falls), its codes stay."""
    from peft import LoraConfig, inject_adapter_in_model

    from sensitivity.export import export, load_quantized
    from sensitivity.graph.inputs import example_inputs
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-dit")
    den = fam.load_denoiser("shipped")
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", fam.find_layers(den), model_id=fam.model_id("shipped"),
                              options=("uaq-4",), progress=False)
    export(den, mq, {n: "uaq-4" for n in mq.layer_names}, tmp_path / "packed", format="packed",
           source={"model_id": fam.model_id("shipped")})
    q = inject_adapter_in_model(LoraConfig(r=4, target_modules=LINEAR), load_quantized(tmp_path / "packed"))
    frozen = {k: v.clone() for k, v in q.state_dict().items() if "lora" not in k}
    params = [p for n, p in q.named_parameters() if "lora" in n]
    assert params and all(p.requires_grad for p in params)
    gen = torch.Generator().manual_seed(0)
    inputs = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() and k != "timestep" else v)
              for k, v in example_inputs(q, batch=2, device="cpu", dtype=torch.float32).items()}
    target = torch.randn(q(**inputs).sample.shape, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = (q(**inputs).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    after = q.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_fuse_lora_is_refused_on_an_export(tmp_path):
    """``fuse_lora`` on a model with low-bit layers (packed, sdnq) fails in one line naming the folder,
    layers untouched; a materialized packed export (plain float layers) fuses as any diffusers model."""
    from peft import LoraConfig

    from sensitivity.export import export, load_quantized
    from sensitivity.multiquantizer import build_multiquantizer
    from sensitivity.zoo import get_family

    fam = get_family("digits-sd")
    den = fam.load_denoiser("shipped")
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", fam.find_layers(den), model_id=fam.model_id("shipped"),
                              options=("uaq-4",), progress=False)
    config = {n: "uaq-4" for n in mq.layer_names if "#" not in n}
    for fmt in ("packed", "sdnq") if HAS_SDNQ else ("packed",):
        export(den, mq, config, tmp_path / fmt, format=fmt, source={"model_id": fam.model_id("shipped")})
        q = load_quantized(tmp_path / fmt)
        q.add_adapter(LoraConfig(r=2, target_modules=LINEAR), adapter_name="a")
        before = {k: v.clone() for k, v in q.state_dict().items()}
        with pytest.raises(SensitivityError) as err:
            q.fuse_lora()
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / fmt) in msg and "unfused" in msg
        after = q.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert not any(getattr(m, "merged", False) for m in q.modules())
    m = load_quantized(tmp_path / "packed", materialize=True)
    m.add_adapter(LoraConfig(r=2, target_modules=LINEAR), adapter_name="a")
    m.fuse_lora()
    assert any(getattr(x, "merged", False) for x in m.modules())
