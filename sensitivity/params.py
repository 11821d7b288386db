"""Typed, frozen parameters: the base of every method config and predictor kind's parameters.

A subclass is a frozen dataclass whose fields are the parameters with their defaults.
:meth:`Params.from_dict` builds one from a mapping and rejects an unknown name with one
:class:`~sensitivity.errors.SensitivityError` line naming it and the known names (the scikit-learn
``set_params`` contract); :meth:`Params.replace` does the same for changes to an existing one;
:meth:`Params.to_dict` is the JSON-able form (tuples as lists). ``validate()`` checks values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of a frozen parameters dataclass (subclasses add fields)."""

    #: the noun of the error line ("unknown setting(s) ...", "unknown parameter(s) ...")
    noun: ClassVar[str] = "parameter"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SensitivityError` for an invalid value (subclasses extend)."""

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names, owner: Optional[str] = None) -> None:
        """Raise one line if any of ``names`` is not a field (``owner``: who the parameters belong to)."""
        known = cls.names()
        unknown = sorted(set(names) - set(known))
        if unknown:
            from .errors import SensitivityError

            raise SensitivityError(f"{owner or cls.__name__}: unknown {cls.noun}(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(sorted(known)) or 'none'}")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]] = None, owner: Optional[str] = None) -> "Params":
        d = dict(d or {})
        cls.check_names(d, owner)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, owner: Optional[str] = None, **changes: Any) -> "Params":
        """A copy with ``changes`` (unknown names rejected)."""
        type(self).check_names(changes, owner)
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
