"""Stable Diffusion v1.5 (``sd15``): ``StableDiffusionPipeline`` with its ``UNet2DConditionModel``.

Official checkpoint ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the hub's current home of SD1.5;
the original ``runwayml/stable-diffusion-v1-5`` repository was taken down; configs in ``configs/sd15``, copied from it); UNet 859.5 M
parameters.

Layers: the 282 ``Conv2d``/``Linear`` weights of the UNet, plus skip splits = **294** quantized
layers. The reference quantizes the CompVis (ldm) UNet of ``v1-5-pruned-emaonly.ckpt``, whose 294
weight nodes have ldm names (``output_blocks.3.0.skip_connection``); here the same layers carry
their diffusers names. In ldm, only the ResBlock ``skip_connection`` of the 12 output-block
resnets gets the split (its input is the ``cat([h, hs.pop()])`` of the up path); in diffusers
that module is ``up_blocks.{i}.resnets.{j}.conv_shortcut``, so those 12 are split into
``#main`` (``[:main]``, the up path) and ``#skip`` (``[main:]``, the down-path skip): 282 + 12 = 294,
the reference count. (``conv1`` reads the same concatenation but the reference does not split it;
neither do we, to keep the search space the reference's.)

Generation (reference, ``docs/method.md`` §3): PLMS (diffusers ``PNDMScheduler`` with
``skip_prk_steps``, the checkpoint's own scheduler), 50 steps, guidance 7.5, eta 0, 512 x 512,
batch size 1, no safety checker (the reference's ldm sampler has none).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import GenerationSettings, LayerRules
from .common import (DiffusersFamily, autoencoder, clip_text_encoder, clip_tokenizer, scheduler_from,
                     text_settings_kwargs)
from .inputs import unet2d_condition_inputs
from .registry import register_family
from .unet_rules import up_block_splits


class StableDiffusion15(DiffusersFamily):
    name = "sd15"
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    conditioning = "text"
    denoiser_attr = "unet"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_class = "UNet2DConditionModel"
    config_root = "sd15"
    pipeline_aliases = ("StableDiffusionPipeline",)
    reference_layer_count = 294
    description = "Stable Diffusion v1.5 UNet (text-to-image, 512 px, PLMS 50 steps, CFG 7.5)"
    defaults = GenerationSettings(steps=50, guidance=7.5, height=512, width=512, scheduler=None,
                                  batch_size=1, extra={"eta": 0.0})
    # widths / 20 (same equalities, so the same shortcut convs exist), depth and attention layout kept:
    # the same 282 layer names
    tiny_denoiser = {"block_out_channels": [16, 32, 64, 64], "cross_attention_dim": 32, "norm_num_groups": 8}
    tiny_defaults = {"steps": 2, "height": 64, "width": 64}
    from_pretrained_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        return {
            "vae": autoencoder("sd15/vae", kind, dtype, seed + 1),
            "text_encoder": clip_text_encoder("sd15/text_encoder", kind, dtype, seed + 2),
            "tokenizer": clip_tokenizer("sd15/tokenizer"),
            "scheduler": scheduler_from("sd15/scheduler"),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def layer_rules(self, denoiser) -> LayerRules:
        return LayerRules(splits=up_block_splits(denoiser, "conv_shortcut"))

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        """Forward inputs for tracing (:func:`sensitivity.zoo.inputs.unet2d_condition_inputs`)."""
        return unet2d_condition_inputs(denoiser, batch, device, dtype, text_len)

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        return {"prompt": list(conditions), **text_settings_kwargs(settings)}


register_family(StableDiffusion15())
