"""Quantization options: ``<method>-<bits>`` names, their registry, and their size accounting.

An option is one way to store a weight layer: a method (``uaq``, ``kmeans_c``, ``kmeans_a``) at a bit
width (4 or 3). ``fp16`` is the unquantized pseudo-option (16 bits, no overhead); configs may use it,
random sampling and search do not by default.

Size (bytes) of a layer with ``numel`` weights and ``C`` output channels, overhead counted in fp16:

* payload: ``ceil(bits * numel / 8)``
* ``uaq``: + ``2 * C * 2`` (one scale and one zero point per output channel)
* ``kmeans_c``: + ``2**bits * C * 2`` (a codebook per output channel)
* ``kmeans_a``: + ``2**bits * 2`` (one codebook per tensor)

Average bits of a config = ``16 * sum(quantized bytes) / sum(fp16 bytes)`` over the quantized layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Sequence, Tuple

from .errors import UnknownOptionError

FP16 = "fp16"

METHODS: Tuple[str, ...] = ("uaq", "kmeans_c", "kmeans_a")
BITS: Tuple[int, ...] = (4, 3)

# Method names of the reference implementation (Qua2SeDiMo / q-diffusion fork).
METHOD_ALIASES: Dict[str, str] = {"mse": "uaq", "kmeans": "kmeans_c", "kmeans_all": "kmeans_a"}

# overhead in fp16 values: f(bits, out_channels) -> number of fp16 values stored besides the codes
_OVERHEAD_VALUES: Dict[str, Callable[[int, int], int]] = {
    "uaq": lambda bits, c: 2 * c,
    "kmeans_c": lambda bits, c: (2**bits) * c,
    "kmeans_a": lambda bits, c: 2**bits,
}


def register_method(name: str, overhead_values: Callable[[int, int], int]) -> None:
    """Register a new method's size accounting (e.g. an INT8 per-tensor method).

    ``overhead_values(bits, out_channels)`` returns how many fp16 values the method stores besides
    its ``bits``-wide codes. The quantizer itself is registered in :mod:`sensitivity.quantizers`.
    """
    global METHODS
    _OVERHEAD_VALUES[name] = overhead_values
    if name not in METHODS:
        METHODS = METHODS + (name,)


@dataclass(frozen=True, order=True)
class QuantOption:
    """One quantization option, e.g. ``QuantOption("kmeans_c", 3)`` named ``"kmeans_c-3"``."""

    method: str
    bits: int

    @property
    def name(self) -> str:
        return FP16 if self.method == FP16 else f"{self.method}-{self.bits}"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.name

    @classmethod
    def parse(cls, name: str) -> "QuantOption":
        """Parse ``"uaq-4"``, an alias such as ``"mse-4"`` / ``"kmeans_all-3"``, or ``"fp16"``."""
        if not isinstance(name, str):
            raise UnknownOptionError(f"option must be a string like 'uaq-4', got {name!r}")
        text = name.strip()
        if text.lower() in (FP16, "fp", "fp32", "16"):
            return cls(FP16, 16)
        method, sep, bits = text.rpartition("-")
        method = METHOD_ALIASES.get(method, method)
        if not sep or method not in _OVERHEAD_VALUES or not bits.isdigit():
            raise UnknownOptionError(
                f"unknown quantization option {name!r}; known: {', '.join(all_option_names())} "
                f"(aliases: {', '.join(f'{a}-<bits>' for a in METHOD_ALIASES)})"
            )
        b = int(bits)
        if not 1 <= b <= 8:
            raise UnknownOptionError(f"option {name!r}: bits must be between 1 and 8")
        return cls(method, b)

    @property
    def is_fp(self) -> bool:
        return self.method == FP16

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes to store a weight of ``shape`` with this option (payload + fp16 overhead)."""
        numel = math.prod(shape)
        if self.is_fp:
            return 2 * numel
        out_channels = int(shape[0])
        payload = math.ceil(self.bits * numel / 8)
        return payload + 2 * _OVERHEAD_VALUES[self.method](self.bits, out_channels)

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """Effective bits per weight including overhead."""
        return 8.0 * self.nbytes(shape) / math.prod(shape)


def all_option_names(methods: Iterable[str] | None = None, bits: Iterable[int] = BITS) -> Tuple[str, ...]:
    """The option names of the search space: ``uaq-4, uaq-3, kmeans_c-4, ...``."""
    methods = tuple(methods) if methods is not None else METHODS
    return tuple(f"{m}-{b}" for m in methods for b in bits)


OPTION_NAMES: Tuple[str, ...] = all_option_names()


def canonical(name: str) -> str:
    """Canonical name of an option: ``canonical("mse-4") == "uaq-4"``."""
    return QuantOption.parse(name).name


def fp16_nbytes(shape: Sequence[int]) -> int:
    return 2 * math.prod(shape)


def average_bits(options: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> float:
    """``16 * sum(q_bytes) / sum(fp16_bytes)`` over the layers of ``shapes`` (missing layers = fp16)."""
    q = fp = 0
    for layer, shape in shapes.items():
        fp += fp16_nbytes(shape)
        q += QuantOption.parse(options.get(layer, FP16)).nbytes(shape)
    return 16.0 * q / fp if fp else float("nan")
