"""PixArt-α and PixArt-Σ (``pixart-alpha``, ``pixart-sigma``): ``PixArtTransformer2DModel`` with a
T5-XXL text encoder, in ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``.

Checkpoints (the reference's): ``PixArt-alpha/PixArt-XL-2-512x512`` (α, 512 px) and
``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` (Σ, 1024 px); 610.9 M parameters each.

Layers: all **287** ``Conv2d``/``Linear`` weights of the transformer, the reference count
(pos_embed.proj + 3 adaln_single + 2 caption_projection + 28 x (attn1 q/k/v/out + attn2
q/k/v/out + ff.net.0.proj + ff.net.2) + proj_out). No exclusions, splits or ties. (The α
``1024-MS`` config adds 4 micro-condition embedder layers, 291; the reference used α 512.)

Generation (reference, ``docs/method.md`` §3: the pipeline defaults): DPM-Solver++ (the checkpoints'
scheduler), 20 steps, guidance 4.5, 512 px (α) / 1024 px (Σ), resolution binning and caption
cleaning on (cleaning needs ``bs4`` + ``ftfy``; without them diffusers warns and skips it), T5
sequence length 120 (α) / 300 (Σ), batch size 1.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..errors import SensitivityError
from .base import GenerationSettings
from .common import (DiffusersFamily, autoencoder, char_tokenizer, scheduler_from, t5_text_encoder,
                     text_settings_kwargs)
from .inputs import pixart_inputs
from .registry import register_family

# 28 blocks of width 32 (2 heads x 16): the 287 layer names; the caption projection maps the tiny
# T5 width (32) to the same width, and cross-attention reads it (cross_attention_dim = width).
TINY_TRANSFORMER = {"num_attention_heads": 2, "attention_head_dim": 16, "cross_attention_dim": 32,
                    "caption_channels": 32}


class PixArtFamily(DiffusersFamily):
    """One PixArt variant; ``pixart-alpha`` and ``pixart-sigma`` are two instances."""

    conditioning = "text"
    denoiser_attr = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    denoiser_aliases = ("Transformer2DModel",)
    reference_layer_count = 287
    tiny_denoiser = TINY_TRANSFORMER

    def __init__(self, name: str, hub_id: str, config_root: str, pipeline_class: str, resolution: int,
                 max_sequence_length: int, description: str):
        self.name = name
        self.hub_id = hub_id
        self.config_root = config_root
        self.pipeline_class = pipeline_class
        self.pipeline_aliases = (pipeline_class,)
        self.description = description
        self.defaults = GenerationSettings(
            steps=20, guidance=4.5, height=resolution, width=resolution, scheduler=None, batch_size=1,
            extra={"clean_caption": True, "use_resolution_binning": True, "max_sequence_length": max_sequence_length})
        self.tiny_defaults = {"steps": 2, "height": 64, "width": 64, "clean_caption": False,
                              "use_resolution_binning": False, "max_sequence_length": 16}
        self.max_sequence_length = max_sequence_length

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        tokenizer = char_tokenizer("t5", model_max_length=self.max_sequence_length)
        return {
            "vae": autoencoder(f"{self.config_root}/vae", kind, dtype, seed + 1),
            "text_encoder": t5_text_encoder(f"{self.config_root}/text_encoder", kind, dtype, seed + 2,
                                            vocab_size=len(tokenizer)),
            "tokenizer": tokenizer,
            "scheduler": scheduler_from(f"{self.config_root}/scheduler"),
        }

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        """Forward inputs for tracing (:func:`sensitivity.zoo.inputs.pixart_inputs`)."""
        return pixart_inputs(denoiser, batch, device, dtype, text_len)

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        if int(settings.steps) < 2:  # diffusers' PixArt one-step path expects a DMD scheduler's output
            raise SensitivityError(f"model {self.name!r} needs at least 2 steps, got {settings.steps}")
        return {"prompt": list(conditions), **text_settings_kwargs(settings)}


PIXART_ALPHA = register_family(PixArtFamily(
    "pixart-alpha", "PixArt-alpha/PixArt-XL-2-512x512", "pixart_alpha/PixArt-XL-2-512x512", "PixArtAlphaPipeline",
    512, 120, "PixArt-α XL/2 512 transformer (text-to-image, DPM-Solver 20 steps, CFG 4.5)"))
PIXART_SIGMA = register_family(PixArtFamily(
    "pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart_sigma/PixArt-Sigma-XL-2-1024-MS",
    "PixArtSigmaPipeline", 1024, 300, "PixArt-Σ XL/2 1024 transformer (text-to-image, DPM-Solver 20 steps, CFG 4.5)"))
