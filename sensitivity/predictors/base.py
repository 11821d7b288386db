"""The fold-model interface shared by the GNN and the baselines, and the kind registry.

A *fold model* is one fitted predictor of one cross-validation fold: ``fit(train Dataset, seed)``,
``predict_codes(codes int16 [n, L]) -> float64 [n]`` in target units (higher = better), and a state of
``(meta JSON dict, tensors {name: ndarray}, texts {name: str})`` that :mod:`.ensemble` saves with
safetensors + JSON (no pickle) and reloads into identical predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

import numpy as np

from .data import Dataset, LayerTable, Target

State = Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, str]]


@dataclass
class Context:
    """What every fold model of one predictor shares: the layer table, the target, the graph, a device."""

    table: LayerTable
    target: Target
    graph: Any = None  # sensitivity.graph.DenoiserGraph (needed by the GNN)
    device: Optional[str] = None


class FoldModel:
    """Base class; subclasses set ``kind`` and implement ``fit``, ``predict_codes``, ``get_state``, ``set_state``."""

    kind: str = ""
    description: str = ""
    defaults: Dict[str, Any] = {}

    def __init__(self, ctx: Context, params: Optional[Dict[str, Any]] = None):
        self.ctx = ctx
        self.params = {**self.defaults, **(params or {})}
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


KINDS: Dict[str, Type[FoldModel]] = {}


def register_kind(cls: Type[FoldModel]) -> Type[FoldModel]:
    KINDS[cls.kind] = cls
    return cls


def get_kind(name: str) -> Type[FoldModel]:
    from ..errors import SensitivityError

    _import_all()
    if name not in KINDS:
        raise SensitivityError(f"unknown predictor {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def _import_all() -> None:
    from . import baselines, blend, gnn  # noqa: F401 - registers the kinds
