"""Quantization options: ``<method>-<bits>`` names and their size accounting.

An option is one way to store a weight layer: a registered method (:mod:`sensitivity.quantizers`)
at a bit width: ``uaq-4``, ``kmeans_c-3``, ``uaq_g128-3``; a one-width method is named by the method
alone (``int8``, ``int8_c``, ``fp8_e4m3``). ``fp16`` is the unquantized pseudo-option (16 bits, no
overhead); configs may use it, random sampling and search do not by default.

Size (bytes) of a layer = ``ceil(bits * numel / 8)`` + the bytes of the parameters the method stores
(its ``param_layout``), e.g. per output channel ``C``, in fp16: ``uaq`` 2 C values, ``kmeans_c``
``2**bits`` C values, ``kmeans_a`` ``2**bits`` values, ``uaq_g<N>`` 2 C ceil(K/N) values; ``int8`` /
``fp8_e4m3`` one float32 scale, ``int8_c`` C float32 scales.

Average bits of a config = ``16 * sum(quantized bytes) / sum(fp16 bytes)`` over the quantized layers
(:class:`sensitivity.sizes.SizeTable`).

:class:`QuantOption` (the grammar) lives in :mod:`sensitivity.quantizers.option`, with the method
registry; this module adds the default search space and re-exports it.
"""

from __future__ import annotations

from typing import Iterable, Tuple

from .quantizers.base import get_method
from .quantizers.option import FP16, QuantOption, fp16_nbytes, known_option_names

__all__ = ["BITS", "FP16", "OPTION_NAMES", "QuantOption", "REFERENCE_METHODS", "all_option_names", "canonical",
           "canonical_method", "fp16_nbytes", "known_option_names"]

#: the reference's methods and widths: the default search space (:data:`OPTION_NAMES`)
REFERENCE_METHODS: Tuple[str, ...] = ("uaq", "kmeans_c", "kmeans_a")
BITS: Tuple[int, ...] = (4, 3)


def all_option_names(methods: Iterable[str] | None = None, bits: Iterable[int] = BITS) -> Tuple[str, ...]:
    """The option names of the search space: ``uaq-4, uaq-3, kmeans_c-4, ...``."""
    methods = tuple(methods) if methods is not None else REFERENCE_METHODS
    return tuple(f"{m}-{b}" for m in methods for b in bits)


OPTION_NAMES: Tuple[str, ...] = all_option_names()


def canonical(name: str) -> str:
    """Canonical name of an option: ``canonical("mse-4") == "uaq-4"``."""
    return QuantOption.parse(name).name


def canonical_method(name: str) -> str:
    """Canonical method name: ``canonical_method("mse") == "uaq"``; raises UnknownOptionError."""
    return get_method(str(name).strip()).name
