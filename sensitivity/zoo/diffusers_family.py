"""The family class of the real diffusers models: :class:`DiffusersFamily` (see :mod:`sensitivity.zoo.offline`
for how its ``random`` / ``meta`` / ``tiny`` pipelines are built)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import SensitivityError
from .base import GenerationSettings, ModelFamily, SPECIAL_WEIGHTS
from .offline import (_HUB_ID, WEIGHTS_ATTR, _offline_hint, diffusers_class, dtype_kwargs, first_line, instantiate,
                      read_config, to_uint8)


# ------------------------------------------------------------------------------------ the family
class DiffusersFamily(ModelFamily):
    """A family backed by a diffusers pipeline class and the official configs in ``zoo/configs``.

    Subclasses set ``pipeline_class`` / ``denoiser_class`` (diffusers class names), ``config_root``
    (folder under ``zoo/configs``), ``pipeline_aliases`` (``_class_name`` values accepted in a
    folder's ``model_index.json``), ``tiny_denoiser`` (config overrides of the tiny denoiser),
    ``tiny_defaults`` (generation overrides applied to tiny pipelines), and implement
    :meth:`build_components` and :meth:`call_kwargs`.
    """

    pipeline_class: str = ""
    denoiser_class: str = ""
    denoiser_aliases: Tuple[str, ...] = ()

    @property
    def denoiser_class_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (self.denoiser_class,) + tuple(self.denoiser_aliases)
    config_root: str = ""
    pipeline_aliases: Tuple[str, ...] = ()
    tiny_denoiser: Mapping[str, Any] = {}
    tiny_defaults: Mapping[str, Any] = {}
    from_pretrained_kwargs: Mapping[str, Any] = {}

    # ------------------------------------------------------------------ construction from configs
    def denoiser_config(self, kind: str = "random") -> Dict[str, Any]:
        """The official denoiser config (``tiny``: with ``tiny_denoiser`` applied)."""
        cfg = read_config(f"{self.config_root}/{self.denoiser_attr}")
        if kind == "tiny":
            cfg.update(copy.deepcopy(dict(self.tiny_denoiser)))
        return cfg

    def build_denoiser(self, kind: str, dtype: torch.dtype, seed: int) -> nn.Module:
        if kind not in SPECIAL_WEIGHTS:
            raise SensitivityError(f"model {self.name!r}: unknown weights kind {kind!r}")
        cls = diffusers_class(self.denoiser_class)
        cfg = self.denoiser_config(kind)
        den = instantiate(lambda: cls.from_config(cfg), kind, dtype, seed)
        den = self.finalize_denoiser(den, kind)
        den.__dict__[WEIGHTS_ATTR] = kind
        return den

    def finalize_denoiser(self, denoiser: nn.Module, kind: str) -> nn.Module:
        """Hook after random/meta/tiny construction (DiT ties its embedder copies here)."""
        return denoiser

    def build_components(self, kind: str, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
        """*Subclass hook*: every pipeline component except the denoiser."""
        raise NotImplementedError

    def build_pipeline(self, kind: str, dtype: torch.dtype, seed: int):
        components = self.build_components(kind, dtype, seed)
        components[self.denoiser_attr] = self.build_denoiser(kind, dtype=dtype, seed=seed)
        pipe = diffusers_class(self.pipeline_class)(**components)
        pipe.__dict__[WEIGHTS_ATTR] = kind
        return pipe

    # ------------------------------------------------------------------ from_pretrained
    def _check_source(self, source: str, denoiser_only: bool = False) -> Tuple[str, Optional[str]]:
        """Validate a hub id / folder; returns ``(source, subfolder)`` for ``from_pretrained``."""
        path = os.path.expanduser(source)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise SensitivityError(f"--weights {source!r} is a file; give a diffusers model folder or a hub id")
            index = os.path.join(path, "model_index.json")
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as fh:
                    cls_name = json.load(fh).get("_class_name")
                if self.pipeline_aliases and cls_name not in self.pipeline_aliases:
                    raise SensitivityError(
                        f"folder {source!r} holds a {cls_name}, not a {self.pipeline_class} (model {self.name!r})")
                return path, (self.denoiser_attr if denoiser_only else None)
            config = os.path.join(path, "config.json")
            if denoiser_only and os.path.isfile(config):
                with open(config, encoding="utf-8") as fh:
                    cls_name = json.load(fh).get("_class_name")
                allowed = (self.denoiser_class,) + tuple(self.denoiser_aliases)
                if cls_name not in allowed:
                    raise SensitivityError(
                        f"folder {source!r} holds a {cls_name}, not a {self.denoiser_class} (model {self.name!r})")
                return path, None
            raise SensitivityError(f"folder {source!r} is not a diffusers model (no model_index.json)")
        if not _HUB_ID.match(source):
            raise SensitivityError(f"--weights {source!r}: no such folder, and not a hub id (org/name) "
                                   f"or one of {', '.join(self.special_weights)}")
        return source, (self.denoiser_attr if denoiser_only else None)

    def pipeline_from_pretrained(self, source: str, dtype: torch.dtype):
        src, _ = self._check_source(source)
        cls = diffusers_class(self.pipeline_class)
        try:
            pipe = cls.from_pretrained(src, **dtype_kwargs(dtype), **{**null_components(src),
                                                                     **dict(self.from_pretrained_kwargs)})
        except Exception as exc:  # noqa: BLE001 - any load failure is reported as one line
            raise SensitivityError(f"model {self.name!r}: cannot load {source!r}: {first_line(exc)}"
                                   f"{_offline_hint(src)}") from exc
        check_tokenizers(pipe, source)
        pipe.__dict__[WEIGHTS_ATTR] = source
        return pipe

    def denoiser_from_pretrained(self, source: str, dtype: torch.dtype) -> nn.Module:
        src, subfolder = self._check_source(source, denoiser_only=True)
        cls = diffusers_class(self.denoiser_class)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            den = cls.from_pretrained(src, **dtype_kwargs(dtype), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise SensitivityError(f"model {self.name!r}: cannot load {source!r}: {first_line(exc)}"
                                   f"{_offline_hint(src)}") from exc
        den.__dict__[WEIGHTS_ATTR] = source
        return den

    def info(self) -> Dict[str, Any]:
        row = super().info()
        if not row["defaults"].get("scheduler"):  # name the checkpoint's own scheduler
            sched = read_config(f"{self.config_root}/scheduler").get("_class_name")
            row["defaults"]["scheduler"] = f"{sched} (checkpoint's)"
        return row

    # ------------------------------------------------------------------ generation
    def defaults_for(self, pipe) -> GenerationSettings:
        """The defaults, with ``tiny_defaults`` applied when ``pipe`` was built with ``weights="tiny"``."""
        if weights_of(pipe) == "tiny" and self.tiny_defaults:
            return self.defaults.replace(**dict(self.tiny_defaults))
        return self.defaults

    def call_kwargs(self, pipe, conditions: list, settings: GenerationSettings) -> Dict[str, Any]:
        """*Subclass hook*: the pipeline call's keyword arguments (besides generator/output_type)."""
        raise NotImplementedError

    def pipeline_call_settings(self) -> Tuple[str, ...]:
        """Keyword arguments of the pipeline class's ``__call__`` that a user may set (``--set KEY=VALUE``):
        all but the prompts / embeddings, latents, generator, output and callback arguments this tool owns."""
        import inspect

        try:
            params = inspect.signature(diffusers_class(self.pipeline_class).__call__).parameters
        except SensitivityError:
            return ()
        owned = ("generator", "output_type", "return_dict", "latents", "callback", "callback_steps",
                 "callback_on_step_end", "callback_on_step_end_tensor_inputs", "num_images_per_prompt")
        return tuple(n for n, p in params.items() if n != "self" and n not in owned and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and not (("prompt" in n or n.endswith("_embeds")) and not n.startswith("negative_prompt")))

    def settings(self, pipe=None, **overrides: Any) -> GenerationSettings:
        """As :meth:`ModelFamily.settings`; besides the defaults' ``extra`` keys, any setting of the pipeline's
        call (:meth:`pipeline_call_settings`, e.g. ``max_sequence_length``) may be overridden."""
        base = self.defaults_for(pipe)
        fields = {"steps", "guidance", "height", "width", "scheduler", "scheduler_kwargs", "batch_size", "extra"}
        new = {k: v for k, v in overrides.items() if k not in fields and k not in base.extra}
        if new:
            allowed = set(self.pipeline_call_settings())
            unknown = sorted(set(new) - allowed)
            if unknown:
                known = sorted((fields - {"extra"}) | set(base.extra) | allowed)
                raise SensitivityError(f"unknown generation setting {unknown[0]!r} of {self.pipeline_class}; "
                                       f"known: {', '.join(known)}")
            base = base.replace(extra=new)
            overrides = {k: v for k, v in overrides.items() if k not in new}
        return base.replace(**overrides)

    def set_scheduler(self, pipe, settings: GenerationSettings) -> None:
        """Install ``settings.scheduler`` (built from the pipeline's original scheduler config)."""
        base = pipe.__dict__.get("_sensitivity_base_scheduler")
        if base is None:
            base = pipe.scheduler
            pipe.__dict__["_sensitivity_base_scheduler"] = base
        if settings.scheduler is None and not settings.scheduler_kwargs:
            if pipe.scheduler is not base:
                pipe.scheduler = base
            return
        name = settings.scheduler or type(base).__name__
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None or not name.endswith("Scheduler"):
            raise SensitivityError(f"unknown scheduler {name!r} (give a diffusers scheduler class name)")
        pipe.scheduler = cls.from_config(base.config, **dict(settings.scheduler_kwargs))

    def generate_batch(self, pipe, conditions: list, seeds: List[int], settings: GenerationSettings) -> np.ndarray:
        den = self.denoiser(pipe)
        device = next(den.parameters()).device
        if device.type == "meta":
            raise SensitivityError(
                f"model {self.name!r}: meta weights hold no values; use tiny, random or real weights")
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.set_scheduler(pipe, settings)
        kwargs = self.call_kwargs(pipe, conditions, settings)
        with torch.no_grad():
            out = pipe(**kwargs, generator=gens, output_type="np")
        images = out.images if hasattr(out, "images") else out[0]
        return to_uint8(images)


def null_components(source: str) -> Dict[str, None]:
    """``{name: None}`` for the components a local pipeline folder saved as absent (``[null, null]`` in its
    ``model_index.json``, e.g. SD3 without its T5 encoder): diffusers refuses to load such a folder unless
    they are passed as ``None``."""
    index = os.path.join(os.path.expanduser(source), "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index, encoding="utf-8") as fh:
        entries = json.load(fh)
    return {k: None for k, v in entries.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def check_tokenizers(pipe, source: str, minimum: int = 10) -> None:
    """Refuse tokenizers with almost no vocabulary.

    Offline, ``CLIPTokenizer.from_pretrained`` on a folder or cache without its vocabulary files can
    silently build a tokenizer of 2-3 special tokens instead of failing; every prompt then encodes
    to the same ids and the images stop depending on the text.
    """
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < minimum:
            raise SensitivityError(f"{source!r}: {name} has only {len(tok)} tokens (vocabulary files missing?)")


def weights_of(obj) -> Optional[str]:
    """The ``weights`` a pipeline / denoiser was loaded with (``None`` if unknown)."""
    return getattr(obj, "__dict__", {}).get(WEIGHTS_ATTR)


def text_settings_kwargs(settings: GenerationSettings, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """Common text-to-image call kwargs: steps, guidance, size and the ``extra`` entries."""
    kw: Dict[str, Any] = {"num_inference_steps": int(settings.steps), "guidance_scale": float(settings.guidance)}
    if settings.height is not None:
        kw["height"] = int(settings.height)
    if settings.width is not None:
        kw["width"] = int(settings.width)
    for k, v in settings.extra.items():
        if k not in skip:
            kw[k] = v
    from ..captions import warn_if_uncleaned

    warn_if_uncleaned(kw)  # diffusers would skip the cleaning with only a log line
    return kw
