"""The quantization-method registry: one class per method, one config dataclass, one registration.

A method turns the rows of a weight (``weight.reshape(C, -1)``, one row per output channel) into
uint8 codes ``[C, K]`` plus the parameter tensors it stores (scales, zero points, codebooks), and
back. Everything the pipeline needs to know about a method lives on its class:

* ``config``: its hyper-parameters, a frozen dataclass validated at construction (unknown keys are
  rejected by :meth:`MethodConfig.from_dict`);
* ``param_layout(bits, shape)``: name, shape and dtype of every stored parameter tensor. It is the
  one source of the method's overhead: ``nbytes = ceil(bits * numel / 8) + Σ param bytes``;
* ``quantize_rows`` / ``dequantize_rows``: the math (torch imported lazily, so that parsing option
  names and counting bytes never imports torch);
* ``settings()``: class, version and config, recorded in every multiquantizer manifest so a build
  with other settings is detected.

Option names are ``<method>-<bits>`` (``uaq-4``) or, for a method with one width, the method name
(``int8``, ``fp8_e4m3``). Parametrised methods register a *family* with a name pattern:
``uaq_g64`` is :class:`~sensitivity.quantizers.uaq.UniformAffinePerGroup` with ``group_size=64``.

Adding a method (see ``docs/ARCHITECTURE.md``)::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        strength: float = 1.0

    class MyMethod(QuantMethod):
        config_class = MyConfig
        def param_layout(self, bits, shape): return {"scale": ((shape[0],), "float16")}
        def quantize_rows(self, rows, bits): ...
        def dequantize_rows(self, codes, params, bits, out=None): ...

    register_method(MyMethod("mine"))
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from ..errors import SensitivityError, UnknownOptionError
from ..params import Params
from ..registry import Registry

_ITEMSIZE = {"float16": 2, "float32": 4, "uint8": 1}


@dataclasses.dataclass(frozen=True)
class MethodConfig(Params):
    """Base of every method's hyper-parameters (a frozen :class:`~sensitivity.params.Params`; subclasses
    add fields); :meth:`from_dict` rejects unknown names."""

    noun: ClassVar[str] = "setting"


class QuantMethod(ABC):
    """One quantization method (an instance per registered name). See the module docstring."""

    config_class: ClassVar[type] = MethodConfig
    #: bump when the math changes so that stored options are recomputed
    version: ClassVar[int] = 1
    #: widths the method accepts
    allowed_bits: ClassVar[Tuple[int, ...]] = tuple(range(1, 9))
    #: the only width of a one-width method (its option name is then the method name alone)
    fixed_bits: ClassVar[Optional[int]] = None
    #: weight bits the method computes with in a BOP count, where they differ from its storage bits
    #: (k-means codebooks compute in fp16: the reference's ``BOP_LUT``)
    compute_bits: ClassVar[Optional[int]] = None

    def __init__(self, name: str, config: Optional[MethodConfig] = None):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise SensitivityError(f"method name {name!r}: use lower-case letters, digits and '_'")
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise SensitivityError(f"method {name!r}: expected a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.name = name
        self.config = cfg

    # ---- names and sizes -------------------------------------------------------------------------
    def option_name(self, bits: int) -> str:
        return self.name if self.fixed_bits is not None else f"{self.name}-{bits}"

    def check_bits(self, bits: int) -> int:
        if bits not in self.allowed_bits:
            raise UnknownOptionError(
                f"method {self.name!r} takes bits {', '.join(map(str, self.allowed_bits))}, not {bits}"
            )
        return int(bits)

    @abstractmethod
    def param_layout(self, bits: int, shape: Sequence[int]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """``{param: (shape, dtype name)}`` of what is stored besides the codes of a ``shape`` weight."""

    def overhead_bytes(self, bits: int, shape: Sequence[int]) -> int:
        return sum(math.prod(s) * _ITEMSIZE[d] for s, d in self.param_layout(bits, shape).values())

    def nbytes(self, bits: int, shape: Sequence[int]) -> int:
        """Stored bytes of a ``shape`` weight: ``ceil(bits * numel / 8)`` + parameter bytes."""
        return math.ceil(bits * math.prod(shape) / 8) + self.overhead_bytes(bits, shape)

    # ---- math ------------------------------------------------------------------------------------
    @abstractmethod
    def quantize_rows(self, rows, bits: int):
        """``rows`` float32 ``[R, K]`` -> ``(codes uint8 [R, K], {param: tensor})`` as ``param_layout``."""

    @abstractmethod
    def dequantize_rows(self, codes, params: Mapping[str, Any], bits: int, out=None):
        """float32 ``[R, K]`` values of ``codes`` (``out``: optional contiguous float32 CPU tensor)."""

    # ---- provenance ------------------------------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """Everything that decides the stored result: class, version, config (JSON-able)."""
        cls = type(self)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "version": cls.version, "config": self.config.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.config})"


class TableMethod(QuantMethod):
    """A method whose value of code ``q`` in row ``r`` is ``table[r or 0, q]`` (a lookup table)."""

    @abstractmethod
    def table(self, params: Mapping[str, Any], bits: int):
        """float32 ``[R or 1, 2**bits]``: the value of every code, from the stored params."""

    def dequantize_rows(self, codes, params: Mapping[str, Any], bits: int, out=None):
        from .tensor import lookup

        return lookup(self.table(params, bits).to(codes.device), codes, out=out)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
#: every quantization method by name (a :class:`~sensitivity.registry.Registry`; families such as
#: ``uaq_g<N>`` are built on first use; aliases are the reference's names, e.g. ``mse`` = ``uaq``)
METHODS: Registry[QuantMethod] = Registry(
    "method", error=UnknownOptionError,
    unknown="unknown quantization method {name!r}; known: {known} (families: {families})")
#: reference (Qua2SeDiMo / q-diffusion fork) method names -> registered names (live, read-only)
METHOD_ALIASES: Mapping[str, str] = METHODS.aliases


def register_method(method: QuantMethod, replace: bool = False, aliases: Sequence[str] = ()) -> QuantMethod:
    """Make ``method`` available under ``method.name`` (``replace=True`` swaps an existing one) and ``aliases``."""
    if not isinstance(method, QuantMethod):
        raise SensitivityError(f"register_method expects a QuantMethod instance, got {type(method).__name__}")
    METHODS.register(method.name, method, replace=replace)
    for a in aliases:
        METHODS.alias(a, method.name)
    return method


def register_method_family(pattern: str, factory: Callable[["re.Match[str]"], QuantMethod], example: str,
                           member: str) -> None:
    """Methods named by a pattern, e.g. ``r"uaq_g(\\d+)"`` -> a method built from the match on first use;
    ``example``: how the family is listed; ``member``: one valid name (``uaq_g128``)."""
    METHODS.add_family(pattern, factory, example, member)


def get_method(name: str) -> QuantMethod:
    """The registered method ``name`` (aliases such as ``mse`` resolved; families built on first use)."""
    return METHODS.get(name)


def method_names() -> Tuple[str, ...]:
    """Names of the registered methods (family members once used)."""
    return METHODS.names()


def family_examples() -> Tuple[str, ...]:
    return METHODS.family_examples()


def family_members() -> Tuple[str, ...]:
    """One method name per family (``uaq_g128``)."""
    return METHODS.family_members()
