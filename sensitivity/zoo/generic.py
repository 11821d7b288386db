"""Any diffusers text-to-image pipeline as a family: ``sd3``, ``flux`` and ``diffusers-<PipelineClass>``.

```
sensitivity layers diffusers --weights path/to/pipeline_folder          # class read from model_index.json
sensitivity sample diffusers --pipeline-class SanaPipeline --weights FOLDER ...
sensitivity sample sd3 --weights tiny ...                              # offline tiny SD3 / Flux
```
:class:`GenericDiffusersFamily` needs no per-model code: the pipeline class names the denoiser
(``transformer`` or ``unet``: whichever its constructor takes), every ``Linear`` / ``Conv`` weight
of the denoiser is a layer (no exclusions, splits or ties: keep a layer full precision with
``sample --fixed 'proj_out=fp16'``; check ``sensitivity layers --ops`` and the traced graph,
``sensitivity graph``, before trusting a new architecture). Each layer's block and op type (insights)
come from the traced graph (:mod:`sensitivity.zoo.graph_naming`: attention Q/K/V/Out from the attention
products, FFN, adaLN, embeddings by the input they descend from...), traced on the ``tiny`` build for
``sd3`` / ``flux`` or on the loaded denoiser (``layers --ops``, :meth:`GenericDiffusersFamily.use_graph`). Prompts go to
``pipe(prompt=..., num_inference_steps, guidance_scale, height, width, **extra)``. Weights: a local
pipeline folder or hub id (``from_pretrained``); ``sd3`` and ``flux`` also build ``tiny`` pipelines
offline (2-layer transformers, 32-wide CLIP / T5 text encoders, 4-level VAE). The family name is
``diffusers-<pipelineclass>`` (lower case), so multiquantizers and caches name their model.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Callable, Dict, Optional

import torch

from ..errors import SensitivityError
from .base import GenerationSettings
from .diffusers_family import DiffusersFamily, text_settings_kwargs
from .graph_naming import GraphNaming, naming_from_graph
from .naming import DIFFUSERS_NAMING
from .offline import TINY_TEXT_WIDTH, char_tokenizer, clip_tokenizer, diffusers_class, instantiate
from .registry import register_family

GENERIC_PREFIX = "diffusers-"


def pipeline_class_name(name: str) -> str:
    """The diffusers pipeline class called ``name`` (case-insensitive); one-line error if none."""
    import diffusers

    want = name.strip().lower()
    for attr in dir(diffusers):
        if attr.lower() == want and attr.endswith("Pipeline"):
            return attr
    raise SensitivityError(f"--pipeline-class {name!r}: not a diffusers pipeline class (e.g. StableDiffusion3Pipeline)")


def pipeline_class_of_folder(folder: str) -> str:
    """``_class_name`` of a pipeline folder's ``model_index.json``."""
    index = os.path.join(os.path.expanduser(folder), "model_index.json")
    if not os.path.isfile(index):
        raise SensitivityError(f"--weights {folder!r}: no model_index.json (give a diffusers pipeline folder or "
                               "--pipeline-class)")
    with open(index, encoding="utf-8") as fh:
        name = json.load(fh).get("_class_name")
    if not name:
        raise SensitivityError(f"{index}: has no _class_name")
    return pipeline_class_name(name)


class GenericDiffusersFamily(DiffusersFamily):
    """A text-to-image family defined by its diffusers pipeline class alone (see the module docstring)."""

    conditioning = "text"
    special_weights = ()

    def __init__(self, pipeline_class: str, name: Optional[str] = None, hub_id: Optional[str] = None,
                 defaults: Optional[GenerationSettings] = None, tiny_builder: Optional[Callable] = None,
                 tiny_defaults: Optional[Dict[str, Any]] = None, description: str = ""):
        cls = diffusers_class(pipeline_class)
        params = inspect.signature(cls.__init__).parameters
        if "transformer" in params:
            self.denoiser_attr = "transformer"
        elif "unet" in params:
            self.denoiser_attr = "unet"
        else:
            raise SensitivityError(f"{pipeline_class}: its constructor takes neither a transformer nor a unet")
        if "prompt" not in inspect.signature(cls.__call__).parameters:
            raise SensitivityError(f"{pipeline_class}: not a text-to-image pipeline (no prompt argument)")
        ann = params[self.denoiser_attr].annotation
        self.denoiser_class = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
        self.pipeline_class = pipeline_class
        self.pipeline_aliases = (pipeline_class,)
        self.name = name or GENERIC_PREFIX + pipeline_class.lower()
        self.hub_id = hub_id
        self.defaults = defaults or GenerationSettings(steps=28, guidance=7.0, batch_size=1)
        self._tiny_builder = tiny_builder
        self.tiny_defaults = dict(tiny_defaults or {})
        if tiny_builder is not None:
            self.special_weights = ("tiny",)
        self.description = description or f"any {pipeline_class} (generic: layers = every Linear/Conv of the {self.denoiser_attr})"

    # ------------------------------------------------------------------ layer naming from the traced graph
    @property
    def layer_naming(self):  # type: ignore[override]
        """Block / op-type rules: derived from a traced graph once one was given (:meth:`use_graph`), else the
        diffusers name rules."""
        return self.__dict__.get("_graph_naming") or DIFFUSERS_NAMING

    @property
    def naming_weights(self) -> Optional[str]:
        """Weights to trace for the graph-derived naming when none was given (``tiny``; None: no offline build)."""
        return "tiny" if self._tiny_builder is not None else None

    @property
    def needs_graph_naming(self) -> bool:
        return "_graph_naming" not in self.__dict__

    def use_graph(self, graph) -> GraphNaming:
        """Describe layers by ``graph`` (a :class:`sensitivity.graph.DenoiserGraph` of this family's denoiser,
        any size: names are generalised over block indices); returns the :class:`GraphNaming`."""
        naming = naming_from_graph(graph)
        self.__dict__["_graph_naming"] = naming
        return naming

    @property
    def denoiser_class_names(self):  # type: ignore[override]
        return (self.denoiser_class,) if self.denoiser_class else ()

    def build_pipeline(self, kind: str, dtype: torch.dtype, seed: int):
        if kind != "tiny" or self._tiny_builder is None:
            raise SensitivityError(f"model {self.name!r} does not support --weights {kind} (give a pipeline folder)")
        from .offline import WEIGHTS_ATTR

        pipe = self._tiny_builder(dtype, seed)
        pipe.__dict__[WEIGHTS_ATTR] = kind
        return pipe

    def build_denoiser(self, kind: str, dtype: torch.dtype, seed: int):
        return self.denoiser(self.build_pipeline(kind, dtype, seed))

    def denoiser_from_pretrained(self, source: str, dtype: torch.dtype):
        if not self.denoiser_class:
            return self.denoiser(self.pipeline_from_pretrained(source, dtype))
        return super().denoiser_from_pretrained(source, dtype)

    def info(self) -> Dict[str, Any]:
        return super(DiffusersFamily, self).info()

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        return {"prompt": list(conditions), **text_settings_kwargs(settings)}


def generic_family(name: str) -> GenericDiffusersFamily:
    """The family ``diffusers-<pipelineclass>`` (created and registered on first use)."""
    fam = GenericDiffusersFamily(pipeline_class_name(name[len(GENERIC_PREFIX):]))
    register_family(fam)
    return fam


# ----------------------------------------------------------------------------- tiny SD3 / Flux
def _tiny_vae(dtype, seed, **kw):
    from diffusers import AutoencoderKL

    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 16],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.5, shift_factor=0.06, **kw)
    return instantiate(lambda: AutoencoderKL(**cfg), "tiny", dtype, seed)


def _tiny_clip(dtype, seed, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=TINY_TEXT_WIDTH, intermediate_size=2 * TINY_TEXT_WIDTH, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=TINY_TEXT_WIDTH, vocab_size=49408,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return instantiate(lambda: cls(cfg), "tiny", dtype, seed)


def _tiny_t5(dtype, seed, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=TINY_TEXT_WIDTH, d_kv=8, num_heads=4, num_layers=2, d_ff=2 * TINY_TEXT_WIDTH,
                   vocab_size=vocab_size)
    return instantiate(lambda: T5EncoderModel(cfg), "tiny", dtype, seed)


def tiny_sd3(dtype, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    # pooled = 2 CLIP projections (2 x 32); joint width 64 = the two CLIP hidden states side by side (no T5)
    tr = instantiate(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * TINY_TEXT_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * TINY_TEXT_WIDTH, pos_embed_max_size=16), "tiny", dtype, seed)
    tok = clip_tokenizer("sd15/tokenizer")
    return StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(dtype, seed + 1, use_quant_conv=False,
                                                                                   use_post_quant_conv=False),
        text_encoder=_tiny_clip(dtype, seed + 2, True), tokenizer=tok,
        text_encoder_2=_tiny_clip(dtype, seed + 3, True), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def tiny_flux(dtype, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_tok = char_tokenizer("t5", model_max_length=16)
    tr = instantiate(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_WIDTH, pooled_projection_dim=TINY_TEXT_WIDTH, guidance_embeds=False,
        axes_dims_rope=[4, 4, 8]), "tiny", dtype, seed)
    return FluxPipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(dtype, seed + 1),
        text_encoder=_tiny_clip(dtype, seed + 2, False), tokenizer=clip_tokenizer("sd15/tokenizer"),
        text_encoder_2=_tiny_t5(dtype, seed + 3, len(t5_tok)), tokenizer_2=t5_tok)


_TINY = {"steps": 2, "height": 64, "width": 64}

SD3 = register_family(GenericDiffusersFamily(
    "StableDiffusion3Pipeline", name="sd3", hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
    defaults=GenerationSettings(steps=28, guidance=7.0, height=1024, width=1024, batch_size=1),
    tiny_builder=tiny_sd3, tiny_defaults=_TINY,
    description="Stable Diffusion 3 (SD3Transformer2DModel, flow matching; generic layer rules)"))
FLUX = register_family(GenericDiffusersFamily(
    "FluxPipeline", name="flux", hub_id="black-forest-labs/FLUX.1-schnell",
    defaults=GenerationSettings(steps=4, guidance=0.0, height=1024, width=1024, batch_size=1,
                                extra={"max_sequence_length": 256}),
    tiny_builder=tiny_flux, tiny_defaults={**_TINY, "max_sequence_length": 16},
    description="FLUX.1 (FluxTransformer2DModel, flow matching; generic layer rules)"))
