"""``digits-sd``: the embedded text-to-image *latent* diffusion model, shaped like Stable Diffusion.

A ``StableDiffusionPipeline`` — ``AutoencoderKL`` + ``CLIPTextModel`` + ``CLIPTokenizer`` +
``UNet2DConditionModel`` with cross-attention + ``DDIMScheduler`` — trained by
``scripts/train_digits_sd.py`` from a seed on scikit-learn's bundled 8x8 digits with captions such
as ``"a handwritten seven"`` / ``"the digit 7, bold"``, saved with ``save_pretrained`` under
``sensitivity/zoo/weights/digits-sd/`` and loaded with ``StableDiffusionPipeline.from_pretrained``
exactly like SD1.5 (``local_files_only``; nothing touches the hub).

Choices (the numbers are in ``training_report.json`` beside the weights):

* **Resolution 32x32, 1 channel**: each 8x8 digit is nearest-upsampled x4. 32 px is the smallest
  size at which an SD-shaped VAE (4 levels, x8 downsampling, as ``StableDiffusionPipeline``
  assumes) leaves a 4x4 latent grid — the grid the digits-unet denoiser sees; nearest upsampling
  makes the classifier's 4x4 average pooling back to 8x8 an exact inverse on the data, so FID with
  the shipped digits classifier has the same reference set (the 1,797 digits) as the other models.
* **Latents 4 x 4 x 4** (1/8 resolution, 4 channels as SD), ``scaling_factor`` = 1 / std of the
  training latents.
* **Text encoder trained** jointly with the UNet (from random init, CLIP architecture, width 64,
  2 layers, 16 positions): there is no pretrained text model offline, and a frozen random encoder
  would hand the UNet arbitrary features to memorize (``"seven"`` and ``"7"`` unrelated); trained,
  the encoder's weights carry the meaning, as CLIP's do in SD — which is what quantizing it probes.
* **Tokenizer**: a real ``CLIPTokenizer`` (byte-level BPE, CLIP's pre-tokenizer and specials) with
  a vocabulary of the caption words (:func:`build_tokenizer`); unknown words fall back to bytes.
  CLIP's own 49,408-token vocabulary would make the token embedding alone 6 MB.
* **Captions**: templates x digit word or numeral x optional style; ``bold`` / ``thin`` describe
  the image's ink (above / below its class's median), so style words carry information too.
  :data:`TRAIN_TEMPLATES` are used in training; :data:`TEST_TEMPLATES` recombine the same words in
  forms never seen (held-out prompts for ``sensitivity components --test-prompts``).

Layers (denoiser, :meth:`DigitsSD.layer_rules`): every ``Conv2d``/``Linear`` of the UNet except
``conv_in`` (rows of 4x3x3 = 36 weights); the up-block ``conv_shortcut`` convs read the skip concat
and are split into ``#main`` / ``#skip`` as in SD1.5. Components (``sensitivity components``): see
:mod:`sensitivity.components` for the text-encoder and VAE-decoder rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import SensitivityError
from .base import DIGITS_CLASSIFIER, GenerationSettings, LayerRules
from .common import DiffusersFamily, WEIGHTS_ATTR, instantiate
from .digits_data import NUM_CLASSES
from .inputs import unet2d_condition_inputs
from .registry import register_family

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SD_DIR = WEIGHTS_DIR / "digits-sd"
PROMPTS_DIR = SD_DIR / "prompts"
SHIPPED = "shipped"

IMAGE_SIZE = 32          # pixels; each 8x8 digit nearest-upsampled x4
UPSAMPLE = 4
LATENT_SIZE = 4          # IMAGE_SIZE / 8
MAX_TOKENS = 16          # text positions (captions are <= 8 words)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("bold", "thin")
# {word}: digit word, {num}: numeral, {style}: bold/thin (from the image's ink)
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "the number {word}",
    "a {style} {word}",
    "the digit {num}, {style}",
    "{word}",
    "a scanned digit {num}",
    "a {style} handwritten {num}",
)
TEST_TEMPLATES = (
    "a handwritten {num}",
    "the digit {word}, {style}",
    "number {num}",
    "a scanned {style} {word}",
)

VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=1, out_channels=1, latent_channels=4, sample_size=IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
)
UNET_CONFIG: Dict[str, Any] = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)
TEXT_CONFIG: Dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=64,
)
SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1,
)
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 1.0


# ------------------------------------------------------------------------------------ captions
def caption(template: str, digit: int, style: str) -> str:
    return template.format(word=DIGIT_WORDS[digit], num=str(digit), style=style)


def caption_words() -> List[str]:
    """Every word the captions use (the tokenizer's whole-word vocabulary)."""
    words = set(DIGIT_WORDS) | set(STYLES) | {str(d) for d in range(10)}
    for t in TRAIN_TEMPLATES + TEST_TEMPLATES:
        words |= {w for w in re.findall(r"[a-z]+", t.replace("{word}", "").replace("{num}", "")
                                        .replace("{style}", ""))}
    return sorted(words)


def class_of_prompt(prompt: str) -> int:
    """The digit a prompt asks for (first digit word or numeral); :class:`SensitivityError` if none."""
    for token in re.findall(r"[a-z]+|\d", prompt.lower()):
        if token.isdigit():
            return int(token)
        if token in DIGIT_WORDS:
            return DIGIT_WORDS.index(token)
    raise SensitivityError(f"prompt {prompt!r} names no digit (zero..nine or 0..9)")


def prompt_list(templates: Sequence[str], n: int, seed: int = 0) -> List[str]:
    """``n`` prompts cycling through the classes 0..9 (so any prefix is class-balanced), each with a
    template and style drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [caption(templates[rng.integers(len(templates))], i % NUM_CLASSES, STYLES[rng.integers(2)])
            for i in range(n)]


# ------------------------------------------------------------------------------------ builders
def build_tokenizer():
    """A ``CLIPTokenizer`` whose BPE vocabulary is the 256 byte symbols (plain and word-final) plus
    every caption word, built from merges that spell each word left to right. Deterministic."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: Dict[str, int] = {}
    for sym in alphabet:
        vocab.setdefault(sym, len(vocab))
    for sym in alphabet:
        vocab.setdefault(sym + "</w>", len(vocab))
    merges: List[Tuple[str, str]] = []
    for word in caption_words():
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    return tok


def text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **TEXT_CONFIG)


def build_components(seed: int = 0, kind: str = "random", dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """Randomly initialised pipeline components (``kind`` ``"meta"``: no memory); UNet from ``seed``,
    VAE ``seed + 1``, text encoder ``seed + 2``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    return {
        "unet": instantiate(lambda: UNet2DConditionModel(**UNET_CONFIG), kind, dtype, seed),
        "vae": instantiate(lambda: AutoencoderKL(**VAE_CONFIG), kind, dtype, seed + 1),
        "text_encoder": instantiate(lambda: CLIPTextModel(text_config(tokenizer)), kind, dtype, seed + 2),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
    }


def assemble_pipeline(components: Dict[str, Any]):
    """``StableDiffusionPipeline`` of the components, no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def upsample(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 8, 8]`` digits -> uint8 ``[N, 32, 32]`` (nearest, each pixel a 4x4 block)."""
    return np.repeat(np.repeat(np.asarray(images), UPSAMPLE, axis=1), UPSAMPLE, axis=2)


# ------------------------------------------------------------------------------------ the family
class DigitsSD(DiffusersFamily):
    """``digits-sd``: text-to-image latent diffusion on 32x32 digits (see the module docstring)."""

    name = "digits-sd"
    hub_id = None
    conditioning = "text"
    num_classes = NUM_CLASSES
    denoiser_attr = "unet"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_class = "UNet2DConditionModel"
    pipeline_aliases = ("StableDiffusionPipeline",)
    default_weights = SHIPPED
    special_weights = (SHIPPED, "tiny", "random", "meta")
    description = ("embedded text-to-image latent diffusion (SD-shaped: VAE + CLIP text encoder + "
                   "cross-attention UNet, 32x32 digits, DDIM 10 steps, no CFG), trained in the package")
    defaults = GenerationSettings(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, height=IMAGE_SIZE,
                                  width=IMAGE_SIZE, scheduler=None, batch_size=250, extra={"eta": 0.0})
    from_pretrained_kwargs = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True}
    shipped_dir = SD_DIR
    # FID / accuracy with the shipped digits classifier (images pooled to 8x8; see evaluation/)
    feature_network = DIGITS_CLASSIFIER
    # ``sensitivity components`` defaults
    default_prompts = PROMPTS_DIR / "train.txt"
    default_test_prompts = PROMPTS_DIR / "test.txt"
    # ``sample`` / ``demo`` protocol prompts (class-balanced prefixes; 1,000 lines)
    eval_prompts = PROMPTS_DIR / "eval.txt"

    # insight op groups of UNet2DConditionModel layer names (the names sensitivity.insights uses)
    CATEGORY_RULES: Tuple[Tuple[str, str], ...] = (
        (r"\.attn2\.", "CA"),                       # cross-attention: q/k/v/out of attn2
        (r"\.attn1\.", "SA"),                       # self-attention
        (r"\.ff\.", "FF"),                          # GEGLU feed-forward
        (r"\.resnets\.\d+\.", "Res"),               # resnet convs, time projections, shortcuts
        (r"\.attentions\.\d+\.proj_(in|out)$", "Attn-IO"),
        (r"^time_embedding\.", "Embed"),
        (r"\.(downsamplers|upsamplers)\.", "Sample"),
        (r"^conv_(in|out)$", "IO"),
    )

    def layer_category(self, layer: str) -> str:
        """Block type of a denoiser layer name for the insight tables: ``CA`` (cross-attention,
        ``attn2``), ``SA`` (self-attention, ``attn1``), ``FF``, ``Res``, ``Attn-IO``, ``Embed``,
        ``Sample``, ``IO``, else ``Other`` (the op groups of :func:`sensitivity.insights.describe_layer`)."""
        path = layer.split("#", 1)[0]
        for pattern, category in self.CATEGORY_RULES:
            if re.search(pattern, path):
                return category
        return "Other"

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        return unet2d_condition_inputs(denoiser, batch, device, dtype, text_len)

    def class_labels(self, conditions: Sequence[str]) -> List[int]:
        """The digit each prompt asks for (the accuracy metric's labels)."""
        return [class_of_prompt(c) for c in conditions]

    def default_conditions(self, n_per_class: int) -> List[str]:
        """``10 * n_per_class`` prompts from :attr:`eval_prompts` (classes interleaved)."""
        return read_prompt_file(self.eval_prompts, 10 * int(n_per_class))

    # weights -------------------------------------------------------------------------------------
    def resolve_weights(self, weights: Optional[str]) -> str:
        w = super().resolve_weights(weights)
        return str(self.shipped_dir) if w == SHIPPED else w

    def model_id(self, weights: Optional[str] = None) -> str:
        w = self.resolve_weights(weights)
        try:
            if Path(w).expanduser().resolve() == self.shipped_dir.resolve():
                return f"{self.name}:{SHIPPED}"
        except OSError:
            pass
        return super().model_id(w)

    def _check_source(self, source: str, denoiser_only: bool = False):
        if Path(source).expanduser().resolve() == self.shipped_dir.resolve() and not (self.shipped_dir /
                                                                                      "model_index.json").is_file():
            raise SensitivityError(f"model {self.name!r}: shipped weights missing at {self.shipped_dir} "
                                   "(run scripts/train_digits_sd.py)")
        return super()._check_source(source, denoiser_only)

    def build_denoiser(self, kind: str, dtype: torch.dtype, seed: int):
        if kind not in ("tiny", "random", "meta"):
            raise SensitivityError(f"model {self.name!r}: unknown weights kind {kind!r}")
        from diffusers import UNet2DConditionModel

        den = instantiate(lambda: UNet2DConditionModel(**UNET_CONFIG), kind, dtype, seed)
        den.__dict__[WEIGHTS_ATTR] = kind
        return den

    def build_pipeline(self, kind: str, dtype: torch.dtype, seed: int):
        pipe = assemble_pipeline(build_components(seed, kind, dtype))
        pipe.__dict__[WEIGHTS_ATTR] = kind
        return pipe

    def denoiser_config(self, kind: str = "random") -> Dict[str, Any]:
        return dict(UNET_CONFIG)

    def info(self) -> Dict[str, Any]:
        row = super(DiffusersFamily, self).info()
        row["defaults"]["scheduler"] = "DDIMScheduler (checkpoint's)"
        return row

    # layers / generation -------------------------------------------------------------------------
    def layer_rules(self, denoiser) -> LayerRules:
        from .unet_rules import up_block_splits

        return LayerRules(exclude=("conv_in",), splits=up_block_splits(denoiser, "conv_shortcut"))

    def defaults_for(self, pipe) -> GenerationSettings:
        return self.defaults

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        from .common import text_settings_kwargs

        return {"prompt": list(conditions), **text_settings_kwargs(settings)}


def read_prompt_file(path, n: Optional[int] = None, what: str = "prompts file") -> List[str]:
    """Non-empty lines of a prompt file (the first ``n``); :class:`SensitivityError` naming the file
    (as ``what``: e.g. the option that gave it)."""
    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"{what} {str(p)!r} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise SensitivityError(f"{what} {str(p)!r} holds no prompts")
    if n is not None:
        if n > len(lines):
            raise SensitivityError(f"{what} {str(p)!r} holds {len(lines)} prompts, {n} asked")
        lines = lines[:n]
    return lines


register_family(DigitsSD())
