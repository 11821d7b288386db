"""The fold-model interface shared by the GNN and the baselines, and the kind registry.

A *fold model* is one fitted predictor of one cross-validation fold: ``fit(train Dataset, seed)``,
``predict_codes(codes int16 [n, L]) -> float64 [n]`` in target units (higher = better), and a state of
``(meta JSON dict, tensors {name: ndarray}, texts {name: str})`` that :mod:`.predictor` saves with
safetensors + JSON (no pickle) and reloads into identical predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import numpy as np

from ..params import Params
from ..registry import Registry
from .data import Dataset, LayerTable, Target

State = Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, str]]


@dataclass
class Context:
    """What every fold model of one predictor shares: the layer table, the target, the graph, a device."""

    table: LayerTable
    target: Target
    graph: Any = None  # sensitivity.graph.DenoiserGraph (needed by the GNN)
    device: Optional[str] = None


@dataclass(frozen=True)
class KindParams(Params):
    """Base of a predictor kind's parameters (a frozen dataclass per kind; unknown names are rejected)."""


class FoldModel:
    """Base class; subclasses set ``kind``, ``Params`` (their :class:`KindParams` dataclass) and implement
    ``fit``, ``predict_codes``, ``get_state``, ``set_state``.

    ``params`` (constructor): a mapping of parameter names to values, validated by ``Params.from_dict``
    (an unknown name raises one line naming it and the known ones); ``self.hparams`` is the typed
    object, ``self.params`` its dict (what the predictor folder records); ``defaults``: the defaults' dict.
    """

    kind: str = ""
    description: str = ""
    #: True when a fold model's state means the same on another model's layer table and graph (no
    #: per-layer parameters): :func:`.predictor.transfer` and the ``init_from`` prior need it
    transferable: ClassVar[bool] = False
    Params: ClassVar[Type[KindParams]] = KindParams
    defaults: ClassVar[Dict[str, Any]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.defaults = cls.Params().to_dict()

    def __init__(self, ctx: Context, params: Optional[Mapping[str, Any]] = None):
        self.ctx = ctx
        self.hparams = self.Params.from_dict(params, owner=f"predictor {self.kind}" if self.kind else None)
        self.params = self.hparams.to_dict()
        self.info: Dict[str, Any] = {}

    @classmethod
    def available(cls, ctx: Context, ds: Optional[Dataset] = None) -> Optional[str]:
        """``None`` if this kind can be trained here, else the reason (one line)."""
        return None

    def fit(self, ds: Dataset, seed: int = 0) -> "FoldModel":  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_state(self) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_state(self, meta: Dict[str, Any], tensors: Dict[str, np.ndarray], texts: Dict[str, str]) -> None:  # pragma: no cover
        raise NotImplementedError


#: predictor kind name -> its :class:`FoldModel` class; each module registers its kinds (imported on first use)
KINDS: Registry = Registry("predictor", key=lambda cls: cls.kind, replace=True, lazy={
    "bits": f"{__package__}.tabular", "error": f"{__package__}.tabular", "additive": f"{__package__}.tabular",
    "lightgbm": f"{__package__}.tabular", "ensemble": f"{__package__}.ensemble_model", "gnn": f"{__package__}.gnn",
})


def register_kind(cls: Type[FoldModel]) -> Type[FoldModel]:
    """Class decorator: register a :class:`FoldModel` subclass under its ``kind``."""
    return KINDS.register(cls)


def get_kind(name: str) -> Type[FoldModel]:
    """The fold-model class of kind ``name``; one line naming the known kinds if none."""
    return KINDS.get(name)
