"""Stable Diffusion XL base 1.0 (``sdxl``): ``StableDiffusionXLPipeline`` with its UNet.

Official checkpoint ``stabilityai/stable-diffusion-xl-base-1.0`` (configs in ``configs/sdxl``);
UNet 2,567.5 M parameters.

Layers: the 794 ``Conv2d``/``Linear`` weights of the UNet, plus 9 split layers = **803**, the
reference count. The reference wraps diffusers' ``ResnetBlock2D`` and splits ``conv1`` wherever a
resnet narrows its input (``in_channels > out_channels``), which is exactly the 9 up-block resnets
reading ``cat([hidden_states, skip])``; its ``conv_shortcut`` is not split (the reference's check
only matches its single-quantizer class). We split the same 9 ``conv1`` layers.

**Difference in split points** (same layers, same count): the reference splits at
``out_channels``, we split at the true concatenation point (the main path's width, see
:mod:`~sensitivity.zoo.unet_rules`). They differ for the first resnet of two blocks, where the
upsampled main path is wider than the block's output:

* ``up_blocks.1.resnets.0.conv1`` (1920 inputs = 1280 main + 640 skip): reference 640, here 1280;
* ``up_blocks.2.resnets.0.conv1`` (960 inputs = 640 main + 320 skip): reference 320, here 640.

Elsewhere both give the same split. With the reference's point, one "half" mixes main-path and
skip channels, which defeats the purpose of splitting (independent ranges per source).

Generation (reference, ``docs/method.md`` §3): Euler (the checkpoint's scheduler), 40 steps, guidance
5.0, 512 x 512, base run with ``denoising_end=0.8`` and the FP16, never quantized, refiner
``stabilityai/stable-diffusion-xl-refiner-1.0`` finishing with ``denoising_start=0.8`` and the
same 40 steps. ``refiner="auto"`` (the default) means the official refiner for real weights and
no refiner (``denoising_end`` ignored) for ``tiny``/``random`` pipelines; pass ``refiner=None`` to
run the base alone, or a hub id / folder of another refiner.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import SensitivityError
from .base import SPECIAL_WEIGHTS, GenerationSettings, LayerRules
from .common import (WEIGHTS_ATTR, DiffusersFamily, autoencoder, clip_text_encoder, clip_tokenizer, dtype_kwargs,
                     first_line, scheduler_from, text_settings_kwargs, to_uint8, weights_of)
from .inputs import unet2d_condition_inputs
from .registry import register_family
from .unet_rules import up_block_splits

REFINER_HUB_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"


class StableDiffusionXL(DiffusersFamily):
    name = "sdxl"
    hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
    conditioning = "text"
    denoiser_attr = "unet"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_class = "UNet2DConditionModel"
    config_root = "sdxl"
    pipeline_aliases = ("StableDiffusionXLPipeline",)
    reference_layer_count = 803
    description = "SDXL base 1.0 UNet (text-to-image, 512 px, Euler 40 steps + FP16 refiner from 0.8, CFG 5)"
    defaults = GenerationSettings(steps=40, guidance=5.0, height=512, width=512, scheduler=None, batch_size=1,
                                  extra={"denoising_end": 0.8, "refiner": "auto"})
    # widths / 32 (heads 5/10/20 -> head dim 2), transformer depth [1, 2, 10] kept: the same 794 names.
    # Text encoders of width 32 + 32 -> cross-attention dim 64; add-embedding input 6 * 8 + 32.
    tiny_denoiser = {"block_out_channels": [10, 20, 40], "cross_attention_dim": 64, "norm_num_groups": 5,
                     "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
                     "sample_size": 32}  # example inputs of 32 x 32 latents, not 128 x 128: no weight changes
    tiny_defaults = {"steps": 2, "height": 64, "width": 64}

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        return {
            "vae": autoencoder("sdxl/vae", kind, dtype, seed + 1),
            "text_encoder": clip_text_encoder("sdxl/text_encoder", kind, dtype, seed + 2),
            "text_encoder_2": clip_text_encoder("sdxl/text_encoder_2", kind, dtype, seed + 3, with_projection=True),
            "tokenizer": clip_tokenizer("sdxl/tokenizer"),
            "tokenizer_2": clip_tokenizer("sdxl/tokenizer_2"),
            "scheduler": scheduler_from("sdxl/scheduler"),
        }

    def layer_rules(self, denoiser) -> LayerRules:
        return LayerRules(splits=up_block_splits(denoiser, "conv1"))

    # ------------------------------------------------------------------ refiner
    def refiner_for(self, pipe, refiner: Any):
        """The refiner pipeline for ``refiner`` (``"auto"``, ``None``, a hub id or folder), cached on ``pipe``."""
        if refiner == "auto":
            refiner = None if weights_of(pipe) in SPECIAL_WEIGHTS else REFINER_HUB_ID
        if not refiner:
            return None
        cache = pipe.__dict__.setdefault("_sensitivity_refiners", {})
        if refiner not in cache:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            den = self.denoiser(pipe)
            try:
                ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                    refiner, text_encoder_2=pipe.text_encoder_2, vae=pipe.vae, **dtype_kwargs(den.dtype))
            except Exception as exc:  # noqa: BLE001
                raise SensitivityError(f"model sdxl: cannot load refiner {refiner!r}: {first_line(exc)}") from exc
            ref = ref.to(den.device)
            ref.set_progress_bar_config(disable=True)
            ref.__dict__[WEIGHTS_ATTR] = refiner
            cache[refiner] = ref
        return cache[refiner]

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        """Forward inputs for tracing (:func:`sensitivity.zoo.inputs.unet2d_condition_inputs`)."""
        return unet2d_condition_inputs(denoiser, batch, device, dtype, text_len)

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        return {"prompt": list(conditions), **text_settings_kwargs(settings, skip=("refiner", "denoising_end"))}

    def generate_batch(self, pipe, conditions: list, seeds: List[int], settings: GenerationSettings) -> np.ndarray:
        refiner = self.refiner_for(pipe, settings.extra.get("refiner"))
        end = settings.extra.get("denoising_end")
        if refiner is None or end is None or not 0 < float(end) < 1:
            return super().generate_batch(pipe, conditions, seeds, settings)
        den = self.denoiser(pipe)
        device = next(den.parameters()).device
        self.set_scheduler(pipe, settings)
        kwargs = self.call_kwargs(pipe, conditions, settings)
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            latents = pipe(**kwargs, denoising_end=float(end), generator=gens, output_type="latent").images
            out = refiner(prompt=list(conditions), image=latents, num_inference_steps=int(settings.steps),
                          guidance_scale=float(settings.guidance), denoising_start=float(end),
                          generator=gens, output_type="np")
        return to_uint8(out.images)


register_family(StableDiffusionXL())
