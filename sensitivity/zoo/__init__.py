"""Model zoo: one module per family of diffusion models, and a registry.

```python
from sensitivity.zoo import get_family, list_families
fam = get_family("pixart-sigma")
pipe = fam.load_pipeline("tiny")              # or "random", "meta", a hub id, a diffusers folder
layers = fam.find_layers(fam.denoiser(pipe))
images = fam.generate(pipe, ["a red bus"], seeds=[0])   # uint8 [1, H, W, 3]
```
Families: ``sd15`` ``sdxl`` ``pixart-alpha`` ``pixart-sigma`` ``dit-xl-2`` ``hunyuan-dit`` (real models)
and ``digits-dit`` ``digits-unet`` (the embedded default models). Modules are imported on first use:
importing this package, the registry or :func:`family_cards` imports neither torch nor diffusers
(``ModelFamily`` and the other names of :mod:`sensitivity.zoo.base` load torch when first touched).
"""

from .registry import BUILTIN_FAMILIES, family_cards, family_for_denoiser, get_family, list_families, register_family

_FROM_BASE = ("GenerationSettings", "LayerRules", "ModelFamily", "SPECIAL_WEIGHTS")

__all__ = list(_FROM_BASE) + ["BUILTIN_FAMILIES", "family_cards", "family_for_denoiser", "get_family",
                              "list_families", "register_family"]


def __getattr__(name: str):  # PEP 562: the torch-level names on first use
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
