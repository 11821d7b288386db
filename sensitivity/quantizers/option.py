"""The option grammar: ``<method>-<bits>`` names of the registered methods, and ``fp16``.

:class:`QuantOption` lives with the method registry so that the quantizers never import a later
stage; :mod:`sensitivity.options` re-exports it with the default search space. No torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

from ..errors import UnknownOptionError
from .base import METHOD_ALIASES, family_examples, get_method, method_names

FP16 = "fp16"


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


def fp16_nbytes(shape: Sequence[int]) -> int:
    return 2 * math.prod(shape)
