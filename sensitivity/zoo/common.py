"""Shared machinery of the real-model families, in two modules: :mod:`sensitivity.zoo.offline` (the
offline builders: configs, tokenizers, text encoders, VAEs, schedulers) and
:mod:`sensitivity.zoo.diffusers_family` (:class:`DiffusersFamily`). Everything imports from here as before."""

from .diffusers_family import DiffusersFamily, check_tokenizers, text_settings_kwargs, weights_of  # noqa: F401
from .offline import (CLIP_TOKENIZER_DIR, CONFIG_DIR, TINY_TEXT_WIDTH, WEIGHTS_ATTR, autoencoder,  # noqa: F401
                      bert_text_encoder, char_tokenizer, clip_text_encoder, clip_tokenizer, diffusers_class,
                      dtype_kwargs, first_line, instantiate, public, read_config, scheduler_from, seeded,
                      t5_text_encoder, to_uint8)

__all__ = ["CLIP_TOKENIZER_DIR", "CONFIG_DIR", "DiffusersFamily", "TINY_TEXT_WIDTH", "WEIGHTS_ATTR", "autoencoder",
           "bert_text_encoder", "char_tokenizer", "check_tokenizers", "clip_text_encoder", "clip_tokenizer",
           "diffusers_class", "dtype_kwargs", "first_line", "instantiate", "public", "read_config", "scheduler_from",
           "seeded", "t5_text_encoder", "text_settings_kwargs", "to_uint8", "weights_of"]
