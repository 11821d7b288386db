"""The :class:`ModelFamily` base class: how one family of diffusion models is loaded, which of its
denoiser's layers are quantized, and how a batch of images is generated.

A family is a small object registered by name (see :mod:`sensitivity.zoo.registry`). Subclasses set
the class attributes and implement the hooks marked *subclass hook*; everything else is shared.

``weights`` (every loader, and ``--weights`` on the command line) is one of

* ``None``: the family's ``default_weights`` (the official hub id for the real families);
* a name in ``special_weights`` (the real families: ``tiny``, ``random``, ``meta``), handled by
  :meth:`ModelFamily.build_pipeline` / :meth:`ModelFamily.build_denoiser`;
* anything else: a hub id or a local diffusers folder, loaded with ``from_pretrained``
  (:meth:`ModelFamily.pipeline_from_pretrained`).

Generation: :meth:`ModelFamily.generate` cuts ``conditions`` / ``seeds`` into batches and calls
:meth:`ModelFamily.generate_batch`; image ``i`` is drawn from ``torch.Generator(device)
.manual_seed(seeds[i])`` alone, so it does not depend on the batch it was generated in.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import SensitivityError
from ..layers import LayerSpec, find_layers
from .naming import DIFFUSERS_NAMING, LayerInfo, LayerNaming, module_category

SPECIAL_WEIGHTS = ("tiny", "random", "meta")


# feature networks of the evaluation (ModelFamily.feature_network)
CLEAN_FID_INCEPTION = "clean-fid-inception"
DIGITS_CLASSIFIER = "digits-classifier"


NUMERIC_SETTINGS = ("steps", "guidance", "height", "width", "batch_size")  # numbers, against checks.CONSTRAINTS


@dataclass(frozen=True)
class GenerationSettings:
    """Default sampling settings of a family; every field can be overridden per call.

    ``steps``: denoising steps; ``guidance``: classifier-free guidance scale (1.0 = off);
    ``height``/``width``: image size in pixels (``None`` = the pipeline's default); ``scheduler``:
    diffusers scheduler class name used for sampling (``None`` = the pipeline's own);
    ``scheduler_kwargs``: config overrides for that scheduler; ``batch_size``: images per forward
    batch; ``extra``: further keyword arguments for the pipeline call (e.g. ``eta``).
    """

    steps: int
    guidance: float
    height: Optional[int] = None
    width: Optional[int] = None
    scheduler: Optional[str] = None
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **overrides: Any) -> "GenerationSettings":
        """A copy with ``overrides`` applied; keys of ``extra`` may be overridden by name too.

        ``None`` for a field (``steps``, ``height``...) keeps the default; ``None`` for an ``extra``
        key sets it to ``None`` (e.g. ``refiner=None`` turns SDXL's refiner off).
        Raises :class:`SensitivityError` naming an unknown setting.
        """
        from ..checks import check_values

        names = {f.name for f in dataclasses.fields(self)}
        check_values(**{k: v for k, v in overrides.items() if k in NUMERIC_SETTINGS})
        direct: Dict[str, Any] = {}
        extra = dict(self.extra)
        for key, value in overrides.items():
            if key in names:
                if value is not None:
                    direct[key] = value
            elif key in extra:
                extra[key] = value
            else:
                known = sorted(names - {"extra"} | set(extra))
                raise SensitivityError(f"unknown generation setting {key!r}; known: {', '.join(known)}")
        if "extra" in direct:
            extra.update(direct.pop("extra"))
        return dataclasses.replace(self, extra=extra, **direct)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scheduler_kwargs"] = dict(self.scheduler_kwargs)
        d["extra"] = dict(self.extra)
        return d


@dataclass(frozen=True)
class LayerRules:
    """The family's layer rules, as taken by :func:`sensitivity.layers.find_layers`.

    ``exclude``: fnmatch patterns of module paths; ``splits``: ``{module_path: split}``;
    ``ties``: ``{first_path: [copy paths]}``.
    """

    exclude: Tuple[str, ...] = ()
    splits: Mapping[str, int] = field(default_factory=dict)
    ties: Mapping[str, Sequence[str]] = field(default_factory=dict)


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``"fp16"``/``"float16"``/``"bf16"``/``"fp32"`` or a torch dtype -> torch dtype (``None`` stays)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise SensitivityError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def is_local_folder(weights: str) -> bool:
    return os.path.isdir(os.path.expanduser(str(weights)))


class ModelFamily:
    """One family of diffusion models (subclass and register an instance).

    Class attributes: ``name`` (registry key), ``hub_id`` (official checkpoint or ``None``),
    ``conditioning`` (``"text"`` or ``"class"``), ``num_classes`` (class families), ``denoiser_attr``
    (``"unet"`` or ``"transformer"``), ``default_weights`` (``None`` = ``hub_id``),
    ``special_weights`` (the names besides a hub id / folder that ``weights`` accepts),
    ``defaults`` (:class:`GenerationSettings`), ``description`` (one line for ``sensitivity models``).
    """

    name: str = ""
    hub_id: Optional[str] = None
    conditioning: str = "text"
    num_classes: Optional[int] = None
    denoiser_attr: str = "unet"
    default_weights: Optional[str] = None
    special_weights: Tuple[str, ...] = SPECIAL_WEIGHTS
    defaults: GenerationSettings = GenerationSettings(steps=50, guidance=7.5)
    description: str = ""
    # the reference's count of weight nodes for this family (docs/method.md §1.1), for reports
    reference_layer_count: Optional[int] = None
    # the FID/KID feature network of its evaluation: CLEAN_FID_INCEPTION (real images, a reference
    # folder) or DIGITS_CLASSIFIER (the shipped digits classifier, with class accuracy)
    feature_network: str = CLEAN_FID_INCEPTION
    # layer name -> block / op type rules (insights)
    layer_naming: LayerNaming = DIFFUSERS_NAMING
    # class names of the family's denoiser (how a traced model finds its family)
    denoiser_class_names: Tuple[str, ...] = ()

    # ------------------------------------------------------------------------------ weights
    def resolve_weights(self, weights: Optional[str]) -> str:
        """``weights`` with ``None`` replaced by the family's default; raises if there is none."""
        if weights is None or weights == "":
            weights = self.default_weights or self.hub_id
            if weights is None:
                raise SensitivityError(f"model {self.name!r} has no default weights; pass --weights")
        return str(weights)

    def model_id(self, weights: Optional[str] = None) -> str:
        """A stable id of family + weights, e.g. ``sd15:tiny`` or ``sd15:stable-diffusion-v1-5/stable-diffusion-v1-5``.

        A local folder is named by its folder name (the weights hash identifies its content).
        """
        w = self.resolve_weights(weights)
        if w not in self.special_weights and is_local_folder(w):
            w = Path(os.path.expanduser(w)).resolve().name
        return f"{self.name}:{w}"

    # ------------------------------------------------------------------------------ loading
    def load_pipeline(self, weights: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                      dtype: Union[None, str, torch.dtype] = None, seed: int = 0):
        """The family's diffusers pipeline with ``weights`` (see the module docstring).

        ``dtype`` defaults to float32 on CPU and float16 on CUDA (``meta``: float32, no memory);
        ``seed`` seeds random initialisation (``tiny``/``random``). The pipeline is moved to ``device``.
        """
        w = self.resolve_weights(weights)
        dt = self._default_dtype(device, dtype)
        if w in self.special_weights:
            pipe = self.build_pipeline(w, dtype=dt, seed=seed)
        else:
            pipe = self.pipeline_from_pretrained(w, dtype=dt)
        if w != "meta":
            pipe = pipe.to(torch.device(device))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_denoiser(self, weights: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                      dtype: Union[None, str, torch.dtype] = None, seed: int = 0) -> nn.Module:
        """Only the denoiser (``pipe.unet`` / ``pipe.transformer``), in eval mode, on ``device``."""
        w = self.resolve_weights(weights)
        dt = self._default_dtype(device, dtype)
        if w in self.special_weights:
            den = self.build_denoiser(w, dtype=dt, seed=seed)
        else:
            den = self.denoiser_from_pretrained(w, dtype=dt)
        if w != "meta":
            den = den.to(torch.device(device))
        return den.eval()

    def denoiser(self, pipe) -> nn.Module:
        """The denoiser of ``pipe``: ``pipe.unet`` or ``pipe.transformer``."""
        den = getattr(pipe, self.denoiser_attr, None)
        if den is None:
            raise SensitivityError(f"model {self.name!r}: the pipeline has no {self.denoiser_attr!r}")
        return den

    @staticmethod
    def _default_dtype(device, dtype) -> torch.dtype:
        dt = resolve_dtype(dtype)
        if dt is not None:
            return dt
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32

    # subclass hooks --------------------------------------------------------------------------
    def build_pipeline(self, kind: str, dtype: torch.dtype, seed: int):
        """*Subclass hook*: a pipeline for a name in ``special_weights`` (not yet moved to a device)."""
        raise SensitivityError(f"model {self.name!r} does not support --weights {kind}")

    def build_denoiser(self, kind: str, dtype: torch.dtype, seed: int) -> nn.Module:
        """*Subclass hook* (optional): the denoiser alone for a special name; default: via the pipeline."""
        return self.denoiser(self.build_pipeline(kind, dtype=dtype, seed=seed))

    def pipeline_from_pretrained(self, source: str, dtype: torch.dtype):
        """*Subclass hook*: ``<Pipeline>.from_pretrained(hub id or folder)``."""
        raise SensitivityError(f"model {self.name!r} cannot load weights from {source!r}")

    def denoiser_from_pretrained(self, source: str, dtype: torch.dtype) -> nn.Module:
        """*Subclass hook* (optional): the denoiser alone from a hub id / folder; default: via the pipeline."""
        return self.denoiser(self.pipeline_from_pretrained(source, dtype=dtype))

    # ------------------------------------------------------------------------------ layers
    def layer_rules(self, denoiser: nn.Module) -> LayerRules:
        """*Subclass hook*: exclusions, split points and ties of this family (default: none)."""
        return LayerRules()

    def find_layers(self, denoiser: nn.Module) -> List[LayerSpec]:
        """The quantizable layers of ``denoiser`` under this family's rules."""
        rules = self.layer_rules(denoiser)
        return find_layers(denoiser, exclude=rules.exclude, splits=rules.splits, ties=rules.ties)

    # ------------------------------------------------------------------------------ structure
    def describe_layer(self, name: str) -> LayerInfo:
        """Block and op type of one of the family's layer names (:attr:`layer_naming`)."""
        return self.layer_naming.describe(name)

    def module_category(self, module: nn.Module) -> Optional[str]:
        """Kind of a module of the denoiser for the graph (attention, ffn, resnet, ...; None: none)."""
        return module_category(module)

    def example_inputs(self, denoiser: nn.Module, batch: int = 1, device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None, text_len: Optional[int] = None) -> Dict[str, Any]:
        """Keyword arguments of one forward pass of ``denoiser`` (``batch`` samples, native latent size),
        for tracing the graph. Tensors on ``device`` in ``dtype``; integer inputs are int64 zeros."""
        raise SensitivityError(f"model {self.name!r} has no example inputs for tracing: pass inputs= to build_graph")

    # ------------------------------------------------------------------------------ generation
    def check_conditions(self, conditions: Sequence) -> list:
        """Validate prompts (text families) or class ids (class families); returns them as a list."""
        conds = list(conditions)
        if self.conditioning == "class":
            out = []
            for c in conds:
                try:
                    ci = int(c)
                except (TypeError, ValueError):
                    raise SensitivityError(f"model {self.name!r} takes class ids, got {c!r}") from None
                if ci != c and not (isinstance(c, str) and c.strip().lstrip("-").isdigit()):
                    raise SensitivityError(f"model {self.name!r} takes integer class ids, got {c!r}")
                if self.num_classes is not None and not 0 <= ci < self.num_classes:
                    raise SensitivityError(f"model {self.name!r}: class id {ci} outside 0..{self.num_classes - 1}")
                out.append(ci)
            return out
        for c in conds:
            if not isinstance(c, str):
                raise SensitivityError(f"model {self.name!r} takes text prompts, got {c!r}")
        return conds

    def settings(self, pipe=None, **overrides: Any) -> GenerationSettings:
        """The defaults for ``pipe`` (see :meth:`defaults_for`) with ``overrides`` (``None`` keeps the default)."""
        return self.defaults_for(pipe).replace(**overrides)

    def defaults_for(self, pipe) -> GenerationSettings:
        """Default settings for ``pipe`` (families may adapt them, e.g. small images for tiny models)."""
        return self.defaults

    def generate(self, pipe, conditions: Sequence, seeds: Sequence[int], batch_size: Optional[int] = None,
                 progress: bool = False, **overrides: Any) -> np.ndarray:
        """Generate one image per ``(conditions[i], seeds[i])``: uint8 ``[N, H, W, C]``.

        ``overrides``: any :class:`GenerationSettings` field or ``extra`` key (``steps``, ``guidance``,
        ``height``, ``width``, ``scheduler``...). ``batch_size`` defaults to the settings' one.
        """
        conds = self.check_conditions(conditions)
        seeds = [int(s) for s in seeds]
        if len(conds) != len(seeds):
            raise SensitivityError(f"{len(conds)} conditions but {len(seeds)} seeds")
        settings = self.settings(pipe, **overrides)
        bs = max(1, int(batch_size or settings.batch_size))
        starts = range(0, len(seeds), bs)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"{self.name} generate", unit="batch")
        out: List[np.ndarray] = []
        for s in starts:
            out.append(self.generate_batch(pipe, conds[s:s + bs], seeds[s:s + bs], settings))
        if progress:
            print(f"{self.name}: generated {len(seeds)} images in {len(out)} batches of <= {bs}")
        if not out:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return np.concatenate(out)

    def generate_batch(self, pipe, conditions: list, seeds: List[int], settings: GenerationSettings) -> np.ndarray:
        """*Subclass hook*: one batch -> uint8 ``[n, H, W, C]``, image ``i`` from ``seeds[i]`` alone."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ info
    def info(self) -> Dict[str, Any]:
        """One row for ``sensitivity models``."""
        return {
            "name": self.name,
            "hub_id": self.hub_id,
            "conditioning": self.conditioning,
            "num_classes": self.num_classes,
            "denoiser": self.denoiser_attr,
            "default_weights": self.default_weights or self.hub_id,
            "weights": list(self.special_weights),
            "defaults": self.defaults.to_dict(),
            "reference_layer_count": self.reference_layer_count,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
