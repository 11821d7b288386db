"""Registry of model families (one module each, as diffusers does with its pipelines).

``get_family("sd15")`` imports the family's module on first use, so importing the zoo stays cheap.
A module registers its families at import time with :func:`register_family` (an instance, or a
``ModelFamily`` subclass used as a decorator, which is instantiated without arguments).
:func:`family_cards` describes the families without importing them (torch-free, see
:mod:`sensitivity.zoo.catalog`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, List, Union

from ..errors import SensitivityError
from ..registry import Registry

if TYPE_CHECKING:  # base imports torch; the registry must not
    from .base import ModelFamily

# family name -> module under sensitivity.zoo that registers it (imported lazily)
BUILTIN_FAMILIES: Dict[str, str] = {
    "sd15": "sd15",
    "sdxl": "sdxl",
    "pixart-alpha": "pixart",
    "pixart-sigma": "pixart",
    "dit-xl-2": "dit",
    "hunyuan-dit": "hunyuan",
    "digits-dit": "digits",
    "digits-unet": "digits",
    "digits-sd": "digits_sd",
    "sd3": "generic",
    "flux": "generic",
}

#: family name -> its ModelFamily (built-in modules imported on first use)
FAMILIES: Registry = Registry("model", lazy={n: f"{__package__}.{m}" for n, m in BUILTIN_FAMILIES.items()},
                              replace=True, normalize=lambda n: str(n).strip().lower())


def register_family(family: Union["ModelFamily", type]) -> Union["ModelFamily", type]:
    """Register ``family`` under ``family.name`` (a later registration of a name replaces the first)."""
    from .base import ModelFamily

    obj = family() if isinstance(family, type) else family
    if not isinstance(obj, ModelFamily) or not obj.name:
        raise TypeError(f"register_family needs a named ModelFamily, got {family!r}")
    FAMILIES.register(obj.name, obj)
    return family


def _import_builtin(name: str) -> None:
    if name in BUILTIN_FAMILIES:
        FAMILIES.find(name)


def list_families() -> List[str]:
    """Names of all families: the built-in ones (in their fixed order) and any registered later."""
    for name in BUILTIN_FAMILIES:
        _import_builtin(name)
    loaded = FAMILIES.loaded()
    names = [n for n in BUILTIN_FAMILIES if n in loaded]
    return names + sorted(n for n in loaded if n not in BUILTIN_FAMILIES)


def family_cards() -> List[Dict[str, Any]]:
    """``info()`` of every family, in :func:`list_families` order, importing no family module that has
    a card in :mod:`sensitivity.zoo.catalog` (so no torch); families without one are imported."""
    from .catalog import CARDS

    rows = []
    for name in BUILTIN_FAMILIES:
        loaded = FAMILIES.loaded()
        if name in loaded:
            rows.append(loaded[name].info())
        elif name in CARDS:
            rows.append(copy.deepcopy(CARDS[name]))
        else:
            fam = FAMILIES.find(name)
            if fam is not None:
                rows.append(fam.info())
    loaded = FAMILIES.loaded()
    rows += [loaded[n].info() for n in sorted(loaded) if n not in BUILTIN_FAMILIES]
    return rows


def get_family(name: Union[str, "ModelFamily"]) -> "ModelFamily":
    """The registered family called ``name``; :class:`SensitivityError` (listing the known ones) if none."""
    if not isinstance(name, str):
        from .base import ModelFamily

        if isinstance(name, ModelFamily):
            return name
    key = str(name).strip().lower()
    fam = FAMILIES.find(key)
    if fam is None and key.startswith("diffusers-"):  # any diffusers pipeline class
        from .generic import generic_family

        return generic_family(key)
    if fam is None:
        known = ", ".join(dict.fromkeys(list(BUILTIN_FAMILIES) + sorted(FAMILIES.loaded())))  # imports no family
        raise SensitivityError(f"unknown model {name!r}; known models: {known}")
    return fam


def family_for_denoiser(denoiser) -> "ModelFamily | None":
    """The first registered family whose denoiser class is ``type(denoiser)`` (None: no zoo family)."""
    name = type(denoiser).__name__
    for fam_name in list_families():
        fam = FAMILIES.get(fam_name)
        if name in tuple(fam.denoiser_class_names):
            return fam
    return None
