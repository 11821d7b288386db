"""Offline builders of the real-model families: configs, tokenizers, text encoders, VAEs, schedulers.

A :class:`DiffusersFamily` builds its diffusers pipeline in one of four ways (``weights``):

* a hub id or local diffusers folder: ``<Pipeline>.from_pretrained`` — the path GPU users take;
* ``random``: every component from the official configs shipped in ``zoo/configs/`` (see
  ``configs/SOURCES.md``), seeded random init;
* ``meta``: the same, on the meta device (structure and shapes only, no memory);
* ``tiny``: the official denoiser config with its widths shrunk and its depth kept, so the layer
  names are exactly the real model's, plus tiny text encoders and a tiny 4-level VAE. For tests.

Tokenizers never touch the hub: CLIP's BPE files ship in ``configs/clip_tokenizer/``; the T5, mT5
and BERT vocabularies are not shipped, so ``random``/``meta``/``tiny`` pipelines of PixArt and
Hunyuan get a small local WordPiece tokenizer over ASCII characters (:func:`char_tokenizer`). The
real path loads the official tokenizers with ``from_pretrained``.

Random weights are drawn from ``seed`` (denoiser) and ``seed + k`` (the other components), each
under its own forked RNG, so ``load_denoiser(w, seed=s)`` equals ``load_pipeline(w, seed=s)``'s
denoiser and the global torch RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import SensitivityError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"
WEIGHTS_ATTR = "_sensitivity_weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# widths of the tiny text encoders (depth 2): small, but real transformer stacks
TINY_TEXT_WIDTH = 32


# --------------------------------------------------------------------------------------- configs
def read_config(relpath: str) -> Dict[str, Any]:
    """A JSON file under ``zoo/configs`` (``relpath`` may name a folder holding ``config.json``)."""
    path = CONFIG_DIR / relpath
    if path.is_dir():
        for name in ("config.json", "scheduler_config.json", "model_index.json"):
            if (path / name).is_file():
                path = path / name
                break
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def public(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` without its private ``_name`` keys and saved dtypes (we choose the dtype)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU torch RNG seeded with ``seed``; the global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


# set by :func:`materializing`: the seeds whose modules are built with values (None: every module)
_REAL_SEEDS: contextvars.ContextVar[Optional[frozenset]] = contextvars.ContextVar("real_seeds", default=None)
_BUILT: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("built", default=None)


@contextlib.contextmanager
def materializing(seeds: Optional[Iterable[int]]) -> Iterator[List[Tuple[int, nn.Module]]]:
    """Within the block, :func:`instantiate` builds only the modules of ``seeds`` with values; every other
    one goes on the meta device (``None``: all with values). Yields the ``(seed, module)`` pairs built,
    so a caller can find which seed made which pipeline component and build one component at a time."""
    built: List[Tuple[int, nn.Module]] = []
    t1 = _REAL_SEEDS.set(None if seeds is None else frozenset(int(s) for s in seeds))
    t2 = _BUILT.set(built)
    try:
        yield built
    finally:
        _REAL_SEEDS.reset(t1)
        _BUILT.reset(t2)


def instantiate(factory: Callable[[], nn.Module], kind: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build a module: on the meta device for ``kind == "meta"`` (no memory) or when :func:`materializing`
    leaves ``seed`` out, else seeded, in ``dtype``."""
    real = _REAL_SEEDS.get()
    if kind == "meta" or (real is not None and int(seed) not in real):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=True):
            module = factory()
    else:
        with seeded(seed):
            module = factory()
        if dtype is not None and dtype != torch.float32:
            module = module.to(dtype)
    built = _BUILT.get()
    if built is not None:
        built.append((int(seed), module))
    return module.eval()


def diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise SensitivityError(f"diffusers {diffusers.__version__} has no class {name!r}")
    return cls


# ------------------------------------------------------------------------------------ tokenizers
def clip_tokenizer(config_relpath: str):
    """The official CLIP BPE tokenizer (vocab 49,408) from the shipped files; no hub access."""
    from transformers import CLIPTokenizer

    cfg = read_config(f"{config_relpath}/tokenizer_config.json")
    kwargs = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = cfg.get(key)
        if isinstance(tok, dict):
            tok = tok["content"]
        if tok is not None:
            kwargs[key] = tok
    kwargs["model_max_length"] = int(cfg.get("model_max_length", 77))
    vocab_path, merges_path = CLIP_TOKENIZER_DIR / "vocab.json", CLIP_TOKENIZER_DIR / "merges.txt"
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4.x
        tokenizer = CLIPTokenizer(vocab_file=str(vocab_path), merges_file=str(merges_path), **kwargs)
    else:  # transformers 5.x: vocab dict + merges list
        with open(vocab_path, encoding="utf-8") as fh:
            vocab = json.load(fh)
        with open(merges_path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip() and not line.startswith("#version")]
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    if len(tokenizer) != 49408:  # a broken build silently yields a tiny vocabulary
        raise SensitivityError(f"CLIP tokenizer from {CLIP_TOKENIZER_DIR} has {len(tokenizer)} tokens, expected 49408")
    return tokenizer


_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&%$#@+*=<>[]_~"


def char_tokenizer(style: str, model_max_length: int):
    """A small local WordPiece tokenizer over lowercase ASCII characters (``style``: ``t5`` or ``bert``).

    ``t5``: ``<pad>``=0, ``</s>``=1 (appended), ``<unk>``=2, like T5's special ids. ``bert``:
    ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4, input wrapped in ``[CLS] … [SEP]``.
    Every ASCII word is spelled character by character (``c ##a ##t``); other words map to unk.
    Stands in for the T5 / mT5 / BERT vocabularies that are not shipped (synthetic weights only).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    elif style == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    vocab_list = specials + list(_CHARS) + ["##" + c for c in _CHARS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    unk = specials[2] if style == "t5" else specials[1]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=200))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                      model_max_length=model_max_length)
    else:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)
    if len(out) != len(vocab_list):
        raise SensitivityError(f"local {style} tokenizer has {len(out)} tokens, expected {len(vocab_list)}")
    return out


# ---------------------------------------------------------------------------------- text encoders
def clip_text_encoder(config_relpath: str, kind: str, dtype: torch.dtype, seed: int, with_projection: bool = False):
    """CLIP text encoder from the official config; ``tiny``: width 32, 2 layers, same vocab."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = public(read_config(config_relpath))
    if kind == "tiny":
        cfg.update(hidden_size=TINY_TEXT_WIDTH, intermediate_size=2 * TINY_TEXT_WIDTH, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=TINY_TEXT_WIDTH)
    config = CLIPTextConfig(**cfg)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return instantiate(lambda: cls(config), kind, dtype, seed)


def t5_text_encoder(config_relpath: str, kind: str, dtype: torch.dtype, seed: int, vocab_size: int):
    """T5 / mT5 encoder from the official config; ``tiny``: d_model 32, 2 layers, ``vocab_size`` tokens."""
    from transformers import T5Config, T5EncoderModel

    cfg = public(read_config(config_relpath))
    cfg.pop("architectures", None)
    if kind == "tiny":
        cfg.update(d_model=TINY_TEXT_WIDTH, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                   d_ff=2 * TINY_TEXT_WIDTH, vocab_size=vocab_size)
    cfg["model_type"] = "t5"
    config = T5Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    return instantiate(lambda: T5EncoderModel(config), kind, dtype, seed)


def bert_text_encoder(config_relpath: str, kind: str, dtype: torch.dtype, seed: int, vocab_size: int):
    """BERT encoder from the official config; ``tiny``: width 32, 2 layers, ``vocab_size`` tokens."""
    from transformers import BertConfig, BertModel

    cfg = public(read_config(config_relpath))
    cfg.pop("architectures", None)
    if kind == "tiny":
        cfg.update(hidden_size=TINY_TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=2 * TINY_TEXT_WIDTH, vocab_size=vocab_size)
    config = BertConfig(**cfg)
    return instantiate(lambda: BertModel(config, add_pooling_layer=False), kind, dtype, seed)


def autoencoder(config_relpath: str, kind: str, dtype: torch.dtype, seed: int):
    """The family's ``AutoencoderKL``; ``tiny``: 4 levels (scale factor 8, as pipelines assume), width 8-16."""
    from diffusers import AutoencoderKL

    cfg = read_config(config_relpath)
    if kind == "tiny":
        n = len(cfg["block_out_channels"])
        cfg = dict(cfg, block_out_channels=[8] + [16] * (n - 1), layers_per_block=1, norm_num_groups=8)
    return instantiate(lambda: AutoencoderKL.from_config(cfg), kind, dtype, seed)


def scheduler_from(config_relpath: str):
    cfg = read_config(config_relpath)
    return diffusers_class(cfg["_class_name"]).from_config(cfg)


# ------------------------------------------------------------------------------------- images
def to_uint8(images) -> np.ndarray:
    """Pipeline output (float ``[N,H,W,C]`` in [0, 1], numpy or torch) -> uint8 ``[N,H,W,C]``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)


def dtype_kwargs(dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """The dtype keyword of ``from_pretrained``: ``dtype`` on recent diffusers, ``torch_dtype`` before."""
    try:
        from diffusers.utils import deprecation_utils

        new_api = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        new_api = False
    return {"dtype" if new_api else "torch_dtype": dtype}


def _offline_hint(source: str) -> str:
    if os.path.isdir(source):
        return ""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set and it is not in the local hub cache)"
    return ""


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
