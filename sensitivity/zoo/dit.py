"""DiT-XL/2 (``dit-xl-2``): class-conditional ``DiTTransformer2DModel`` on ImageNet, ``DiTPipeline``.

Checkpoint (the reference's): ``facebook/DiT-XL-2-512``; 749.8 M parameters as diffusers holds it
(674.8 M without the duplicated embedders, see below).

Layers: diffusers has 255 ``Conv2d``/``Linear`` weights: pos_embed.proj, 28 x (the timestep
embedder's ``linear_1``/``linear_2`` + norm1.linear + attn1 q/k/v/out + ff.net.0.proj + ff.net.2)
and proj_out_1/2. In the original DiT the timestep embedder is one module shared by all blocks;
the diffusers conversion gives each block its own identical copy
(``transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}``). Here copies 1-27 are
**tied** to copy 0: one layer each, configured once, applying it writes all 28 copies (checked by
:func:`sensitivity.layers.check_ties`). 255 - 2 x 27 = **201** layers, the reference count. The
class embedder is an ``nn.Embedding`` (not quantized), as in the reference.

Difference from the reference's bookkeeping (its defect 3, ``docs/method.md`` §7): its FP_SIZE counts
all 28 embedder copies (717.0 M fp16 weights) and its random sampling sets the copies
independently; here the tied layer counts once in bytes and average bits, and a config can only set
all copies together.

``random`` weights copy block 0's whole ``norm1.emb`` (timestep and class embedders) into the other
27 blocks, so the tie holds as it does in the real checkpoint.

Generation (reference, ``docs/method.md`` §3): ``DPMSolverMultistepScheduler`` built from the
checkpoint's DDIM config, **250** steps, guidance 4.0 (the pipeline default), 512 px (the
transformer's native size; DiT cannot change it), batch size 25, one image per class id.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..errors import SensitivityError
from .base import GenerationSettings, LayerRules
from .common import DiffusersFamily, autoencoder, read_config, scheduler_from
from .inputs import dit_inputs
from .registry import register_family

NUM_BLOCKS = 28
EMBEDDER = "transformer_blocks.{i}.norm1.emb"


class DiTXL2(DiffusersFamily):
    name = "dit-xl-2"
    hub_id = "facebook/DiT-XL-2-512"
    conditioning = "class"
    num_classes = 1000
    denoiser_attr = "transformer"
    pipeline_class = "DiTPipeline"
    denoiser_class = "DiTTransformer2DModel"
    denoiser_aliases = ("Transformer2DModel",)
    config_root = "dit/DiT-XL-2-512"
    pipeline_aliases = ("DiTPipeline",)
    reference_layer_count = 201
    description = "DiT-XL/2 512 transformer (ImageNet classes, DPM-Solver 250 steps, CFG 4)"
    defaults = GenerationSettings(steps=250, guidance=4.0, height=512, width=512,
                                  scheduler="DPMSolverMultistepScheduler", batch_size=25)
    # 28 blocks of width 32 (2 heads x 16): the 255 layer names; 8 x 8 latents (64 px images)
    tiny_denoiser = {"num_attention_heads": 2, "attention_head_dim": 16, "sample_size": 8}
    tiny_defaults = {"steps": 2, "height": 64, "width": 64}

    def finalize_denoiser(self, denoiser: nn.Module, kind: str) -> nn.Module:
        if kind != "meta":
            tie_embedders(denoiser)
        return denoiser

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        index = read_config(f"{self.config_root}/model_index.json")
        return {
            "vae": autoencoder(f"{self.config_root}/vae", kind, dtype, seed + 1),
            "scheduler": scheduler_from(f"{self.config_root}/scheduler"),
            "id2label": {int(k): v for k, v in index.get("id2label", {}).items()},
        }

    def layer_rules(self, denoiser) -> LayerRules:
        n = len(denoiser.transformer_blocks)
        ties = {}
        for lin in ("linear_1", "linear_2"):
            first = f"{EMBEDDER.format(i=0)}.timestep_embedder.{lin}"
            ties[first] = [f"{EMBEDDER.format(i=i)}.timestep_embedder.{lin}" for i in range(1, n)]
        return LayerRules(ties=ties)

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        """Forward inputs for tracing (:func:`sensitivity.zoo.inputs.dit_inputs`)."""
        return dit_inputs(denoiser, batch, device, dtype, text_len)

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        size = int(self.denoiser(pipe).config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        for key in ("height", "width"):
            value = getattr(settings, key)
            if value is not None and int(value) != size:
                raise SensitivityError(f"model {self.name!r} generates at its native {size} px; {key}={value} "
                                       "is not possible")
        unknown = set(settings.extra)
        if unknown:
            raise SensitivityError(f"model {self.name!r}: unknown pipeline options {sorted(unknown)}")
        return {"class_labels": [int(c) for c in conditions], "num_inference_steps": int(settings.steps),
                "guidance_scale": float(settings.guidance)}


@torch.no_grad()
def tie_embedders(denoiser: nn.Module) -> None:
    """Copy block 0's ``norm1.emb`` (timestep + class embedders) into every other block, in place."""
    blocks = denoiser.transformer_blocks
    source = blocks[0].norm1.emb.state_dict()
    for block in blocks[1:]:
        block.norm1.emb.load_state_dict(source)


register_family(DiTXL2())
