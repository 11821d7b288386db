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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple

from . import quantizers as _quantizers  # noqa: F401  (registers the built-in methods; no torch import)
from .errors import UnknownOptionError
from .quantizers.base import METHOD_ALIASES, family_examples, get_method, method_names

FP16 = "fp16"

#: the reference's methods and widths: the default search space (:data:`OPTION_NAMES`)
REFERENCE_METHODS: Tuple[str, ...] = ("uaq", "kmeans_c", "kmeans_a")
BITS: Tuple[int, ...] = (4, 3)


@dataclass(frozen=True, order=True)
class QuantOption:
    """One quantization option, e.g. ``QuantOption("kmeans_c", 3)`` named ``"kmeans_c-3"``."""

    method: str
    bits: int

    @property
    def name(self) -> str:
        return FP16 if self.method == FP16 else get_method(self.method).option_name(self.bits)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.name

    @classmethod
    def parse(cls, name: str) -> "QuantOption":
        """Parse ``"uaq-4"``, ``"int8"``, ``"uaq_g64-3"``, an alias such as ``"mse-4"``, or ``"fp16"``."""
        if not isinstance(name, str):
            raise UnknownOptionError(f"option must be a string like 'uaq-4', got {name!r}")
        text = name.strip()
        if text.lower() in (FP16, "fp", "fp32", "16"):
            return cls(FP16, 16)
        method, sep, bits = text.rpartition("-")
        if not sep:
            method, bits = text, ""
        try:
            m = get_method(method)
        except UnknownOptionError:
            m = None
        if m is None or (bits and not bits.isdigit()) or (not bits and m.fixed_bits is None):
            hint = f"; {method!r} needs a bit width, e.g. '{method}-4'" if m is not None and not bits else ""
            raise UnknownOptionError(
                f"unknown quantization option {name!r}{hint}; known: {', '.join(known_option_names())} "
                f"(also {', '.join(family_examples())}; aliases: {', '.join(f'{a} = {b}' for a, b in METHOD_ALIASES.items())})"
            )
        b = int(bits) if bits else int(m.fixed_bits)
        try:
            m.check_bits(b)
        except UnknownOptionError as exc:
            raise UnknownOptionError(f"option {name!r}: {exc}") from None
        return cls(m.name, b)

    @property
    def is_fp(self) -> bool:
        return self.method == FP16

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes to store a weight of ``shape`` with this option (payload + parameters)."""
        if self.is_fp:
            return fp16_nbytes(shape)
        return get_method(self.method).nbytes(self.bits, shape)

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """Effective bits per weight including overhead."""
        return 8.0 * self.nbytes(shape) / math.prod(shape)


def known_option_names() -> Tuple[str, ...]:
    """One example name per registered method: ``uaq-<bits>`` style or the fixed-width name."""
    out = []
    for n in method_names():
        m = get_method(n)
        out.append(m.name if m.fixed_bits is not None else f"{m.name}-<bits>")
    return tuple(out)


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


def fp16_nbytes(shape: Sequence[int]) -> int:
    return 2 * math.prod(shape)
