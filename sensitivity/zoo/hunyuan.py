"""Hunyuan-DiT (``hunyuan-dit``): ``HunyuanDiT2DModel`` with BERT + mT5 text encoders, ``HunyuanDiTPipeline``.

Checkpoint (the reference's): ``Tencent-Hunyuan/HunyuanDiT-Diffusers`` (v1.0); 1,516.5 M parameters.

Layers: the transformer has 472 ``Conv2d``/``Linear`` weights. As in the reference, the 4
projections of the attention pooler ``time_extra_emb.pooler.{q,k,v,c}_proj`` are **excluded**
(468 left), and the 19 ``blocks.{21..39}.skip_linear`` layers, which read
``cat([hidden_states, skip], dim=-1)``, are **split** at the middle into ``#main`` (the block's
input) and ``#skip`` (the long skip from block ``39 - i``): 468 + 19 = **487** layers.

Difference from the reference's count (474): 474 is not the reference's quantizer count but the
size of its graph's hop-0 node set (``AutoBuild/ge_utils/custom_aggr.py``), and its graph builder
(``sdm/graph_hunyuan.py``) loops over ``range(39)`` blocks, leaving out block 39: its 11 layers
(norm1.linear, attn1 q/k/v/out, attn2 q/k/v/out, ff.net.0.proj, ff.net.2) and its 2 skip_linear
halves, 13 in all: 487 - 13 = 474. The reference quantizes block 39 like every other block
(its ``QuantModelMultiQ`` wraps every Linear except the pooler), so the search space here keeps it.

The denoiser expects float timesteps (the pipeline passes them in the latents' dtype) and a VAE
with four levels (the pipeline hard-codes ``height // 8`` for the rotary grid).

Generation (reference, ``docs/method.md`` §3: the pipeline defaults): DDPM (the checkpoint's
v-prediction scheduler), 50 steps, guidance 5.0, 1024 x 1024 with resolution binning, batch size 1,
no safety checker.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import GenerationSettings, LayerRules
from .common import (DiffusersFamily, autoencoder, bert_text_encoder, char_tokenizer, scheduler_from,
                     t5_text_encoder, text_settings_kwargs)
from .inputs import hunyuan_inputs
from .registry import register_family

ROOT = "hunyuan_dit/HunyuanDiT-Diffusers"


class HunyuanDiT(DiffusersFamily):
    name = "hunyuan-dit"
    hub_id = "Tencent-Hunyuan/HunyuanDiT-Diffusers"
    conditioning = "text"
    denoiser_attr = "transformer"
    pipeline_class = "HunyuanDiTPipeline"
    denoiser_class = "HunyuanDiT2DModel"
    config_root = ROOT
    pipeline_aliases = ("HunyuanDiTPipeline",)
    reference_layer_count = 474
    description = "Hunyuan-DiT v1.0 transformer (text-to-image, 1024 px, DDPM 50 steps, CFG 5)"
    defaults = GenerationSettings(steps=50, guidance=5.0, height=1024, width=1024, scheduler=None, batch_size=1,
                                  extra={"use_resolution_binning": True})
    # 40 blocks of width 32 (2 heads x 16, rotary needs head dim % 4 == 0), text widths 32 (the
    # pooler has 8 heads); text lengths 77 / 256 kept: the same 472 layer names
    tiny_denoiser = {"hidden_size": 32, "num_attention_heads": 2, "attention_head_dim": 16,
                     "cross_attention_dim": 32, "cross_attention_dim_t5": 32, "pooled_projection_dim": 32,
                     "sample_size": 32}  # example inputs of 32 x 32 latents (256 tokens, not 4,096): no weight changes
    tiny_defaults = {"steps": 2, "height": 64, "width": 64, "use_resolution_binning": False}
    from_pretrained_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        tokenizer = char_tokenizer("bert", model_max_length=77)
        tokenizer_2 = char_tokenizer("t5", model_max_length=256)
        return {
            "vae": autoencoder(f"{ROOT}/vae", kind, dtype, seed + 1),
            "text_encoder": bert_text_encoder(f"{ROOT}/text_encoder", kind, dtype, seed + 2, vocab_size=len(tokenizer)),
            "tokenizer": tokenizer,
            "text_encoder_2": t5_text_encoder(f"{ROOT}/text_encoder_2", kind, dtype, seed + 3,
                                              vocab_size=len(tokenizer_2)),
            "tokenizer_2": tokenizer_2,
            "scheduler": scheduler_from(f"{ROOT}/scheduler"),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def layer_rules(self, denoiser) -> LayerRules:
        splits = {}
        for i, block in enumerate(denoiser.blocks):
            if getattr(block, "skip_linear", None) is not None:
                splits[f"blocks.{i}.skip_linear"] = block.skip_linear.in_features // 2
        return LayerRules(exclude=("time_extra_emb.pooler.*",), splits=splits)

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        """Forward inputs for tracing (:func:`sensitivity.zoo.inputs.hunyuan_inputs`)."""
        return hunyuan_inputs(denoiser, batch, device, dtype, text_len)

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        return {"prompt": list(conditions), **text_settings_kwargs(settings)}


register_family(HunyuanDiT())
