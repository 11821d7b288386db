"""The embedded default models: class-conditional pixel-space diffusion on scikit-learn's digits.

Two families, both trained by ``scripts/train_digits.py`` on the 1,797 bundled 8x8 ``load_digits``
images and shipped in diffusers ``save_pretrained`` format under ``sensitivity/zoo/weights/``:

* ``digits-dit``  — diffusers' :class:`~diffusers.DiTTransformer2DModel` (width 128, 6 blocks,
  2x2 patches = 16 tokens, adaLN-zero with class labels), ~2.2 M parameters;
* ``digits-unet`` — a small diffusers :class:`~diffusers.UNet2DModel` (128 channels, levels at
  4x4 and 2x2 on the 2x2 pixel-unshuffled image, attention at 2x2, class embedding added to the
  time embedding), ~4.5 M parameters.

Both predict *v* (v-prediction) under a cosine (``squaredcos_cap_v2``) schedule with 1,000 training
steps and are sampled with DDIM ("trailing" spacing), by default without classifier-free guidance
(guidance 1); the null class (label ``10``) is trained, so guidance > 1 works too. Guidance 1 is the
FID-optimal setting and the one where quantization damage shows in FID: at guidance 2 the narrower
full-precision distribution sits farther from the data and quantization noise widens it again, so
3-bit configs of digits-unet scored a *better* FID than full precision (2.13 vs 2.43 on 1,000
images; at guidance 1: 3.03 vs 1.66). Every weight row that the family quantizes is >= 128 long. Images are 8x8 grayscale,
returned as ``uint8`` arrays ``[N, 8, 8, 1]`` in 0..255 (the data's 0..16 scaled by 255/16).

Both are loaded with ``<Pipeline>.from_pretrained(<folder>)``, the code path of hub models. Like
DiT-XL/2 on the hub, every DiT block holds its own copy of the (shared) timestep and class
embedders; training keeps them tied and the saved copies are identical.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel

from .digits_data import IMAGE_SIZE, NUM_CLASSES, digits_dataset  # noqa: F401 (re-exported)

NULL_CLASS = NUM_CLASSES  # label of the "unconditional" embedding used by classifier-free guidance
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_DIR = WEIGHTS_DIR / "digits-dit"
UNET_DIR = WEIGHTS_DIR / "digits-unet"

DIT_CONFIG: Dict = dict(
    num_attention_heads=4,
    attention_head_dim=32,  # width 128
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,  # diffusers adds the null class (label dropout 0.1)
    norm_type="ada_norm_zero",
    norm_num_groups=32,
)

# The UNet sees the image pixel-unshuffled by 2 (8x8x1 -> 4x4x4, lossless, like DiT's 2x2 patches):
# levels at 4x4 and 2x2 keep it about as cheap as the DiT (~65 MFLOP per image and step).
UNET_CONFIG: Dict = dict(
    sample_size=IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(128, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=32,
    norm_num_groups=32,
    num_class_embeds=NUM_CLASSES + 1,  # + null class
)

# Training noise schedule; sampling uses DDIM built from the same config.
SCHEDULER_CONFIG: Dict = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=True,
    clip_sample_range=1.0,
    timestep_spacing="trailing",
    set_alpha_to_one=False,
)

# Default sampling settings of both families (overridable per call); see the module docstring for
# why guidance is 1 (no classifier-free guidance).
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 1.0


def images_to_tensor(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, H, W, 1]`` in 0..255 -> float32 ``[N, 1, H, W]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), device=device).float()
    if x.ndim == 4:
        x = x[..., 0]
    return (x / 127.5 - 1.0).unsqueeze(1)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float ``[N, 1, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 1]`` in 0..255 (rounded, clipped)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------- models


def build_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A freshly initialised digits DiT (random weights from ``seed``; embedder copies tied)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIT_CONFIG)
    tie_dit_embedders(model)
    return model


def tie_dit_embedders(model: DiTTransformer2DModel) -> None:
    """Make every block use block 0's timestep + class embedder module (shared parameters)."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untie_dit_embedders(model: DiTTransformer2DModel) -> None:
    """Give every block its own (identical) copy of the embedder, the layout of hub DiT checkpoints."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        if block.norm1.emb is shared:
            block.norm1.emb = copy.deepcopy(shared)


def build_unet(seed: int = 0) -> UNet2DModel:
    """A freshly initialised digits UNet (random weights from ``seed``)."""
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


def unet_forward(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Run the digits UNet on images ``x [N, 1, 8, 8]``: pixel-unshuffle, UNet, pixel-shuffle."""
    out = unet(torch.nn.functional.pixel_unshuffle(x, 2), t, class_labels=labels).sample
    return torch.nn.functional.pixel_shuffle(out, 2)


def make_scheduler() -> DDIMScheduler:
    """The sampling scheduler (DDIM, v-prediction, cosine schedule, trailing spacing)."""
    return DDIMScheduler(**SCHEDULER_CONFIG)


# ------------------------------------------------------------------------------------ pipelines


class DigitsPipeline(DiffusionPipeline):
    """Shared sampling loop of the digits pipelines (subclasses register ``transformer``/``unet``).

    ``pipe(class_labels, seeds)`` returns uint8 images ``[N, 8, 8, 1]``. Image ``i`` starts from
    ``torch.randn`` drawn with ``torch.Generator(device).manual_seed(seeds[i])``, so an image depends
    on its seed and class only, not on the batch it was generated in.
    """

    denoiser_name = ""

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial_noise(self, seeds: Sequence[int], device, dtype) -> torch.Tensor:
        """Per-seed starting noise ``[N, 1, 8, 8]`` (each image from its own generator)."""
        shape = (1, 1, IMAGE_SIZE, IMAGE_SIZE)
        out = [torch.randn(shape, generator=torch.Generator(device).manual_seed(int(s)), device=device,
                           dtype=torch.float32) for s in seeds]
        return torch.cat(out).to(dtype)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, noise: torch.Tensor, num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float = DEFAULT_GUIDANCE, scheduler=None) -> torch.Tensor:
        """Denoise ``noise [N,1,8,8]`` for class ``labels [N]``; returns ``[N,1,8,8]`` in [-1, 1].

        ``scheduler`` replaces the pipeline's own for this call (e.g. a DPM-Solver built from its config).
        """
        sched = scheduler if scheduler is not None else self.scheduler
        sched.set_timesteps(num_inference_steps, device=noise.device)
        x = noise * sched.init_noise_sigma
        n = x.shape[0]
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            labels_in = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        else:
            labels_in = labels
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if use_cfg else x
            xin = sched.scale_model_input(xin, t)
            tt = t.reshape(1).expand(xin.shape[0]).to(xin.device)
            out = self._predict(xin, tt, labels_in).float()
            if use_cfg:
                cond, uncond = out[:n], out[n:]
                out = uncond + guidance_scale * (cond - uncond)
            x = sched.step(out, t, x.float()).prev_sample.to(noise.dtype)
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int], seeds: Sequence[int],
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 batch_size: int = 500, progress: bool = False, scheduler=None) -> np.ndarray:
        """Generate one image per ``(class_labels[i], seeds[i])``: uint8 ``[N, 8, 8, 1]``."""
        if len(class_labels) != len(seeds):
            raise ValueError(f"{len(class_labels)} class labels but {len(seeds)} seeds")
        den = self.denoiser
        device, dtype = den.device, den.dtype
        out: List[np.ndarray] = []
        starts = range(0, len(seeds), max(1, int(batch_size)))
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="digits generate", unit="batch")
        for s in starts:
            lab = torch.as_tensor(list(class_labels[s:s + batch_size]), dtype=torch.long, device=device)
            noise = self.initial_noise(seeds[s:s + batch_size], device, dtype)
            out.append(tensor_to_images(self.sample(lab, noise, num_inference_steps, guidance_scale, scheduler)))
        if not out:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
        return np.concatenate(out)


class DigitsDiTPipeline(DigitsPipeline):
    """Pipeline of the ``digits-dit`` family: a :class:`DiTTransformer2DModel` and a scheduler."""

    denoiser_name = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _predict(self, x, t, labels):
        return self.transformer(x, timestep=t, class_labels=labels).sample


class DigitsUNetPipeline(DigitsPipeline):
    """Pipeline of the ``digits-unet`` family: a class-conditional :class:`UNet2DModel` and a scheduler."""

    denoiser_name = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _predict(self, x, t, labels):
        return unet_forward(self.unet, x, t, labels)


def load_digits_pipeline(kind: str, path: Union[str, Path, None] = None, device="cpu",
                         dtype: Optional[torch.dtype] = None) -> DigitsPipeline:
    """Load a digits pipeline (``kind`` = ``"dit"`` or ``"unet"``) with ``from_pretrained``.

    ``path`` defaults to the weights shipped in the package. ``dtype`` defaults to float32.
    """
    cls = {"dit": DigitsDiTPipeline, "unet": DigitsUNetPipeline}[kind]
    folder = Path(path) if path is not None else (DIT_DIR if kind == "dit" else UNET_DIR)
    pipe = cls.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs(dtype or torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ------------------------------------------------------------------------------------- families

from ..errors import SensitivityError  # noqa: E402
from .base import DIGITS_CLASSIFIER, GenerationSettings, LayerRules, ModelFamily  # noqa: E402
from .inputs import dit_inputs, unet2d_inputs  # noqa: E402
from .common import WEIGHTS_ATTR, dtype_kwargs, first_line  # noqa: E402
from .registry import register_family  # noqa: E402

SHIPPED = "shipped"


class DigitsFamily(ModelFamily):
    """Shared loading and generation of the two digits families.

    ``weights``: ``"shipped"`` (default; the package's trained weights), ``"random"`` / ``"tiny"``
    (the same architecture, randomly initialised from ``seed`` — the model is already tiny),
    ``"meta"`` (no memory), or a folder written by ``save_pretrained`` (e.g. by
    ``scripts/train_digits.py --out``).
    """

    conditioning = "class"
    num_classes = NUM_CLASSES
    feature_network = DIGITS_CLASSIFIER  # FID/KID/accuracy from the shipped digits classifier
    default_weights = SHIPPED
    special_weights = (SHIPPED, "tiny", "random", "meta")
    defaults = GenerationSettings(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, height=IMAGE_SIZE,
                                  width=IMAGE_SIZE, scheduler="DDIMScheduler", batch_size=500)
    kind = ""  # "dit" or "unet"
    pipeline_cls: type = DigitsPipeline
    shipped_dir: Path = WEIGHTS_DIR

    # loading -----------------------------------------------------------------------------------
    def _random_denoiser(self, kind: str, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def build_denoiser(self, kind: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
        if kind == SHIPPED:
            return self.denoiser_from_pretrained(str(self.shipped_dir), dtype)
        if kind == "meta":
            with torch.device("meta"):
                den = self._random_denoiser(kind, seed)
        else:
            den = self._random_denoiser(kind, seed)
        if next(den.parameters()).dtype != dtype:  # no needless .to(): diffusers warns on every cast of a model
            den = den.to(dtype)
        den.__dict__[WEIGHTS_ATTR] = kind
        return den.eval()

    def build_pipeline(self, kind: str, dtype: torch.dtype, seed: int):
        if kind == SHIPPED:
            pipe = self.pipeline_from_pretrained(str(self.shipped_dir), dtype)
        else:
            den = self.build_denoiser(kind, dtype, seed)
            pipe = self.pipeline_cls(den, make_scheduler())
        pipe.__dict__[WEIGHTS_ATTR] = kind
        return pipe

    def _check_folder(self, source: str) -> Path:
        path = Path(source).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            if not path.exists() and source == str(self.shipped_dir):
                raise SensitivityError(f"model {self.name!r}: shipped weights missing at {path} "
                                       "(run scripts/train_digits.py)")
            raise SensitivityError(f"--weights {source!r}: not a {self.name} folder (no model_index.json) "
                                   f"and not one of {', '.join(self.special_weights)}")
        import json

        cls_name = json.loads(index.read_text()).get("_class_name")
        if cls_name != self.pipeline_cls.__name__:
            raise SensitivityError(f"folder {source!r} holds a {cls_name}, not a {self.pipeline_cls.__name__} "
                                   f"(model {self.name!r})")
        return path

    def pipeline_from_pretrained(self, source: str, dtype: torch.dtype):
        path = self._check_folder(source)
        try:
            pipe = self.pipeline_cls.from_pretrained(str(path), local_files_only=True, **dtype_kwargs(dtype))
        except Exception as exc:  # noqa: BLE001 - any load failure is one line
            raise SensitivityError(f"model {self.name!r}: cannot load {source!r}: {first_line(exc)}") from exc
        pipe.__dict__[WEIGHTS_ATTR] = source
        return pipe

    def denoiser_from_pretrained(self, source: str, dtype: torch.dtype) -> torch.nn.Module:
        path = self._check_folder(source)
        cls = DiTTransformer2DModel if self.kind == "dit" else UNet2DModel
        try:
            den = cls.from_pretrained(str(path), subfolder=self.denoiser_attr, **dtype_kwargs(dtype),
                                      local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SensitivityError(f"model {self.name!r}: cannot load {source!r}: {first_line(exc)}") from exc
        den.__dict__[WEIGHTS_ATTR] = source
        return den.eval()

    def model_id(self, weights: Optional[str] = None) -> str:
        w = self.resolve_weights(weights)
        try:
            if Path(w).expanduser().resolve() == self.shipped_dir.resolve():
                w = SHIPPED
        except OSError:
            pass
        return super().model_id(w)

    # generation --------------------------------------------------------------------------------
    def _scheduler_for(self, pipe, settings: GenerationSettings):
        """``None`` (the pipeline's own) or the scheduler named by ``settings``, built from its config."""
        name = settings.scheduler or type(pipe.scheduler).__name__
        if name == type(pipe.scheduler).__name__ and not settings.scheduler_kwargs:
            return None
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None or not name.endswith("Scheduler"):
            raise SensitivityError(f"unknown scheduler {name!r} (give a diffusers scheduler class name)")
        return cls.from_config(pipe.scheduler.config, **dict(settings.scheduler_kwargs))

    def generate_batch(self, pipe, conditions: list, seeds: List[int], settings: GenerationSettings) -> np.ndarray:
        for key in ("height", "width"):
            value = getattr(settings, key)
            if value is not None and int(value) != IMAGE_SIZE:
                raise SensitivityError(f"model {self.name!r} generates {IMAGE_SIZE}x{IMAGE_SIZE} images; "
                                       f"{key}={value} is not possible")
        if settings.extra:
            raise SensitivityError(f"model {self.name!r}: unknown pipeline options {sorted(settings.extra)}")
        if self.denoiser(pipe).device.type == "meta":
            raise SensitivityError(f"model {self.name!r}: meta weights hold no values; use shipped or random")
        return pipe(conditions, seeds, num_inference_steps=int(settings.steps),
                    guidance_scale=float(settings.guidance), batch_size=len(seeds),
                    scheduler=self._scheduler_for(pipe, settings))


class DigitsDiT(DigitsFamily):
    """``digits-dit``: DiT (width 128, 6 blocks, 2x2 patches) on 8x8 digits, 10 classes.

    Layers: ``pos_embed.proj`` (rows of 1x2x2 = 4 weights) is excluded; the timestep embedder's
    ``linear_1``/``linear_2`` copies in blocks 1-5 are tied to block 0's (as for DiT-XL/2). That
    leaves 6 x 7 + 2 + 2 = 46 layers, every row >= 128 long.
    """

    name = "digits-dit"
    kind = "dit"
    denoiser_attr = "transformer"
    denoiser_class_names = ("DiTTransformer2DModel",)
    pipeline_cls = DigitsDiTPipeline
    shipped_dir = DIT_DIR
    description = "embedded digits DiT (8x8 pixels, 10 classes, DDIM 10 steps, no CFG), trained in the package"

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        return dit_inputs(denoiser, batch, device, dtype, text_len)

    def _random_denoiser(self, kind, seed):
        model = build_dit(seed)
        untie_dit_embedders(model)
        return model

    def layer_rules(self, denoiser) -> LayerRules:
        n = len(denoiser.transformer_blocks)
        emb = "transformer_blocks.{i}.norm1.emb.timestep_embedder.{lin}"
        ties = {emb.format(i=0, lin=lin): [emb.format(i=i, lin=lin) for i in range(1, n)]
                for lin in ("linear_1", "linear_2")}
        return LayerRules(exclude=("pos_embed.proj",), ties=ties)


class DigitsUNet(DigitsFamily):
    """``digits-unet``: a class-conditional UNet (128 channels) on 8x8 digits (pixel-unshuffled), 10 classes.

    Layers: ``conv_in`` (rows of 4x3x3 = 36 weights) is excluded; the up-block resnets read
    ``cat([h, skip])`` and their ``conv1`` and ``conv_shortcut`` are split at the main path's width
    into ``#main`` / ``#skip`` halves.
    """

    name = "digits-unet"
    kind = "unet"
    denoiser_attr = "unet"
    denoiser_class_names = ("UNet2DModel",)
    pipeline_cls = DigitsUNetPipeline
    shipped_dir = UNET_DIR
    description = "embedded digits UNet (8x8 pixels, 10 classes, DDIM 10 steps, no CFG), trained in the package"

    def example_inputs(self, denoiser, batch=1, device=None, dtype=None, text_len=None):
        return unet2d_inputs(denoiser, batch, device, dtype, text_len)

    def _random_denoiser(self, kind, seed):
        return build_unet(seed)

    def layer_rules(self, denoiser) -> LayerRules:
        from .unet_rules import up_block_splits

        splits = dict(up_block_splits(denoiser, "conv1"))
        splits.update(up_block_splits(denoiser, "conv_shortcut"))
        return LayerRules(exclude=("conv_in",), splits=splits)


register_family(DigitsDiT())
register_family(DigitsUNet())
