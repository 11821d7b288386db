"""Caption cleaning (``clean_caption=True``, PixArt's default) and the packages it needs.

diffusers cleans captions with BeautifulSoup and ftfy; where either is missing it logs a warning and
quietly uses the raw lower-cased prompt, so a cache could hold FIDs of uncleaned prompts under an
evaluation that says they were cleaned. Here:

```python
missing_caption_packages()                       # [] or e.g. ["beautifulsoup4", "ftfy"] (pip names)
check_clean_caption({"clean_caption": True})     # an explicit request without them: SensitivityError
resolve_clean_caption(overrides, defaults)       # a family default without them: one warning, and
                                                 # {"clean_caption": False} to put in the protocol
warn_if_uncleaned(call_kwargs)                   # at the pipeline call (Python API): one warning
```
``pip install "sensitivity[captions]"`` installs both.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Dict, List, Mapping

from .errors import SensitivityError

CAPTION_PACKAGES = {"bs4": "beautifulsoup4", "ftfy": "ftfy"}  # module -> pip name
INSTALL_HINT = "pip install 'sensitivity[captions]'"
_warned = False


def missing_caption_packages() -> List[str]:
    """Pip names of the caption-cleaning packages that are not importable."""
    return [pip for mod, pip in CAPTION_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def _wants_cleaning(settings: Mapping[str, Any]) -> bool:
    value = settings.get("clean_caption", False)
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def check_clean_caption(explicit: Mapping[str, Any], source: str = "--set clean_caption=true") -> None:
    """Refuse an explicit ``clean_caption=True`` (one line naming what to install) when the packages are missing."""
    if _wants_cleaning(explicit):
        missing = missing_caption_packages()
        if missing:
            raise SensitivityError(f"{source}: caption cleaning needs {' and '.join(missing)} "
                                   f"(not installed): {INSTALL_HINT}, or --set clean_caption=false")


def warn_once(message: str) -> None:
    """Print ``warning: MESSAGE`` to stderr the first time only (per process)."""
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: {message}", file=sys.stderr)


def resolve_clean_caption(overrides: Mapping[str, Any], defaults: Mapping[str, Any], model: str = "") -> Dict[str, Any]:
    """Extra settings to add to an evaluation so that it says what is really done.

    ``overrides``: the user's settings (an explicit ``clean_caption=True`` without the packages raises);
    ``defaults``: the family's ``extra`` defaults. When the default cleans captions and the packages are
    missing, warns once and returns ``{"clean_caption": False}`` (the prompts are only lower-cased, and
    the protocol and its signature record that); otherwise ``{}``.
    """
    if "clean_caption" in overrides:
        check_clean_caption(overrides)
        return {}
    missing = missing_caption_packages()
    if _wants_cleaning(defaults) and missing:
        warn_once(f"{model + ': ' if model else ''}the default clean_caption=true is off here: "
                  f"{' and '.join(missing)} not installed ({INSTALL_HINT}); prompts are only lower-cased and "
                  "the evaluation records clean_caption=false")
        return {"clean_caption": False}
    return {}


def warn_if_uncleaned(call_kwargs: Mapping[str, Any]) -> None:
    """At a pipeline call: one warning when ``clean_caption`` is on but diffusers will skip it."""
    if _wants_cleaning(call_kwargs):
        missing = missing_caption_packages()
        if missing:
            warn_once(f"clean_caption=true but {' and '.join(missing)} not installed ({INSTALL_HINT}): "
                      "diffusers skips the cleaning and only lower-cases the prompts")
