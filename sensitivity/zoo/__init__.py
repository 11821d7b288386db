"""Model zoo: one module per family of diffusion models, and a registry.

```python
from sensitivity.zoo import get_family, list_families
fam = get_family("pixart-sigma")
pipe = fam.load_pipeline("tiny")              # or "random", "meta", a hub id, a diffusers folder
layers = fam.find_layers(fam.denoiser(pipe))
images = fam.generate(pipe, ["a red bus"], seeds=[0])   # uint8 [1, H, W, 3]
```
Families: ``sd15`` ``sdxl`` ``pixart-alpha`` ``pixart-sigma`` ``dit-xl-2`` ``hunyuan-dit`` (real models)
and ``digits-dit`` ``digits-unet`` (the embedded default models). Modules are imported on first use.
"""

from .base import GenerationSettings, LayerRules, ModelFamily, SPECIAL_WEIGHTS
from .registry import BUILTIN_FAMILIES, family_for_denoiser, get_family, list_families, register_family

__all__ = ["GenerationSettings", "LayerRules", "ModelFamily", "SPECIAL_WEIGHTS", "BUILTIN_FAMILIES",
           "family_for_denoiser", "get_family", "list_families", "register_family"]
