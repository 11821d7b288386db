"""The one registration idiom: :class:`Registry` (entries by name) and :class:`HandlerRegistry`
(handlers keyed by a quantization method's class).

A :class:`Registry` holds named entries (quantization methods, predictor kinds, model families,
metrics, allocators, export formats, CLI commands) and answers ``get(name)`` with the entry or one
:class:`~sensitivity.errors.SensitivityError` line naming the unknown name and the known ones::

    ALLOCATORS = Registry("allocator")

    @ALLOCATORS.register("hawq")
    def hawq_allocate(sizes, target_bits, **kw): ...

    ALLOCATORS.get("hawq")            # the function
    ALLOCATORS.names()                # ("hawq", ...): e.g. the CLI's choices

Entries may be registered lazily (``lazy={"name": "module"}``: the module is imported on first
``get``, so listing names imports nothing), under aliases, or as a *family* of names matching a
pattern (``uaq_g<N>``: built from the match on first use, then registered).

A :class:`HandlerRegistry` is per-method knowledge of one feature (fine-tuning, export, calibration
refit), keyed by the method's class in the way torchao keys ``quantize_`` handlers by config type::

    FINETUNE_RULES = HandlerRegistry("fine-tuning rule")

    @FINETUNE_RULES.register(UniformAffine, UniformAffinePerGroup)
    class UniformRule(Rule): ...

    FINETUNE_RULES.unsupported(SomeMethod, "why it cannot be fine-tuned")
    FINETUNE_RULES.lookup(get_method("uaq_g64"))   # UniformRule (the class's MRO is walked)

``tests/test_method_matrix.py`` builds the method x feature table from these registries and fails on a
method a feature neither handles nor declares unsupported with a reason.
"""

from __future__ import annotations

import importlib
import re
from types import MappingProxyType
from typing import Any, Callable, Dict, Generic, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from .errors import SensitivityError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``what``: used in the error line).

    ``key``: how a decorated object names itself when ``register`` is given no name (e.g.
    ``lambda cls: cls.kind``). ``lazy``: ``{name: module}`` imported on first ``get(name)``.
    ``error``: the exception class (a :class:`SensitivityError`). ``unknown``: the error line's
    template (fields ``what``, ``name``, ``known``, ``families``). ``normalize``: applied to every name looked up.
    ``replace``: whether registering a name again replaces it (else it is an error).
    """

    def __init__(self, what: str, *, key: Optional[Callable[[Any], str]] = None,
                 lazy: Optional[Mapping[str, str]] = None, error: Type[SensitivityError] = SensitivityError,
                 unknown: str = "unknown {what} {name!r}; known: {known}",
                 normalize: Optional[Callable[[str], str]] = None, replace: bool = False):
        self.what = what
        self._key = key
        self._entries: Dict[str, T] = {}
        self._lazy: Dict[str, str] = dict(lazy or {})
        self._aliases: Dict[str, str] = {}
        self._families: List[Tuple["re.Pattern[str]", Callable[["re.Match[str]"], T], str, str]] = []
        self._error = error
        self._unknown = unknown
        self._normalize = normalize
        self._replace = replace

    # ---- registering ---------------------------------------------------------------------------
    def register(self, name: Union[str, T, None] = None, obj: Any = None, *, replace: Optional[bool] = None):
        """``register(name, obj)``; ``@register("name")``; ``@register`` (the name from ``key``).

        Returns ``obj`` (so it works as a decorator)."""
        if obj is not None:
            return self._add(str(name), obj, replace)
        if name is None or isinstance(name, str):
            return lambda o: self._add(name if name is not None else self._name_of(o), o, replace)
        return self._add(self._name_of(name), name, replace)

    def _name_of(self, obj: Any) -> str:
        if self._key is None:
            raise SensitivityError(f"{self.what} registry: give a name to register {obj!r}")
        return self._key(obj)

    def _add(self, name: str, obj: Any, replace: Optional[bool]) -> Any:
        name = self._norm(name)
        if name in self._entries and not (self._replace if replace is None else replace):
            raise SensitivityError(f"{self.what} {name!r} is already registered (pass replace=True)")
        self._entries[name] = obj
        return obj

    def alias(self, alias: str, name: str) -> None:
        """Make ``alias`` another name of ``name`` (looked up by ``get``, not listed by ``names``)."""
        self._aliases[self._norm(alias)] = self._norm(name)

    def add_family(self, pattern: str, factory: Callable[["re.Match[str]"], T], example: str, member: str) -> None:
        """Names matching ``pattern`` (full match) are built by ``factory(match)`` on first ``get``.

        ``example``: how the family is listed (``"uaq_g<N> (e.g. uaq_g128)"``); ``member``: one valid name."""
        if not re.fullmatch(pattern, member):
            raise SensitivityError(f"{self.what} family {example!r}: {member!r} does not match {pattern!r}")
        self._families.append((re.compile(pattern), factory, example, member))

    # ---- looking up ----------------------------------------------------------------------------
    def _norm(self, name: str) -> str:
        return self._normalize(name) if self._normalize else name

    def resolve_alias(self, name: str) -> str:
        key = self._norm(name)
        return self._aliases.get(key, key)

    def find(self, name: str) -> Optional[T]:
        """The entry ``name`` (aliases, lazy modules and families resolved) or ``None``."""
        key = self.resolve_alias(name)
        if key in self._entries:
            return self._entries[key]
        module = self._lazy.get(key)
        if module is not None:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
            if key in self._entries:
                return self._entries[key]
        for pattern, factory, _, _ in self._families:
            match = pattern.fullmatch(key)
            if match:
                try:
                    obj = factory(match)
                except SensitivityError as exc:
                    raise self._error(f"{self.what} {name!r}: {exc}") from None
                self._entries[key] = obj
                return obj
        return None

    def get(self, name: str) -> T:
        """The entry ``name``; one :class:`SensitivityError` line naming it and the known names if none."""
        obj = self.find(name)
        if obj is None:
            raise self._error(self._unknown.format(what=self.what, name=name, known=", ".join(self.names()),
                                                   families=", ".join(self.family_examples())))
        return obj

    def names(self) -> Tuple[str, ...]:
        """Every name: lazily registered ones first (in their given order), then the others."""
        return tuple(dict.fromkeys([*self._lazy, *self._entries]))

    @property
    def aliases(self) -> Mapping[str, str]:
        """``{alias: name}`` (a live read-only view)."""
        return MappingProxyType(self._aliases)

    def family_examples(self) -> Tuple[str, ...]:
        return tuple(ex for _, _, ex, _ in self._families)

    def family_members(self) -> Tuple[str, ...]:
        """One valid name per family (e.g. ``uaq_g128``)."""
        return tuple(m for _, _, _, m in self._families)

    def loaded(self) -> Dict[str, T]:
        """The entries registered so far (no lazy module imported)."""
        return dict(self._entries)

    def load_all(self) -> Dict[str, T]:
        """Every entry, importing the lazy modules."""
        for name in list(self._lazy):
            self.find(name)
        return {n: self._entries[n] for n in self.names() if n in self._entries}

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is known (imports no lazy module)."""
        if not isinstance(name, str):
            return False
        key = self.resolve_alias(name)
        return key in self._entries or key in self._lazy or any(p.fullmatch(key) for p, *_ in self._families)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self):
        return self.load_all().items()

    def values(self):
        return self.load_all().values()

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


class HandlerRegistry:
    """One feature's handler per quantization-method class (see the module docstring).

    ``feature``: what the handlers do, for the error line. A method class without a handler may be
    declared :meth:`unsupported` with a one-line reason; :meth:`get` then raises that reason.
    """

    def __init__(self, feature: str):
        self.feature = feature
        self._handlers: Dict[type, Any] = {}
        self._unsupported: Dict[type, str] = {}

    def register(self, *types: type, handler: Any = None):
        """``@register(MethodClass, ...)`` on a handler, or ``register(MethodClass, handler=h)``."""
        if not types:
            raise SensitivityError(f"{self.feature}: register needs at least one method class")

        def add(h):
            for t in types:
                self._handlers[t] = h
            return h

        return add(handler) if handler is not None else add

    def unsupported(self, method_class: type, reason: str) -> None:
        """Declare that ``method_class`` has no handler, and why (one line)."""
        if not reason.strip():
            raise SensitivityError(f"{self.feature}: an unsupported method needs a reason")
        self._unsupported[method_class] = reason

    def _walk(self, table: Dict[type, Any], method: Any):
        cls = method if isinstance(method, type) else type(method)
        for c in cls.__mro__:
            if c in table:
                return table[c]
        return None

    def lookup(self, method: Any) -> Any:
        """The handler of ``method`` (an instance or class; its MRO is walked) or ``None``."""
        return self._walk(self._handlers, method)

    def reason(self, method: Any) -> Optional[str]:
        """Why ``method`` has no handler (``None``: it has one, or nothing was declared)."""
        if self.lookup(method) is not None:
            return None
        return self._walk(self._unsupported, method)

    def get(self, method: Any) -> Any:
        h = self.lookup(method)
        if h is None:
            name = getattr(method, "name", getattr(method, "__name__", str(method)))
            why = self.reason(method) or f"no {self.feature} is registered for {type(method).__name__}"
            raise SensitivityError(f"method {name!r} has no {self.feature}: {why}")
        return h
