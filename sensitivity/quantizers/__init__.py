"""Weight quantizers: pure tensor math, no models.

* :mod:`.base` — the method registry (:class:`QuantMethod`, :func:`register_method`,
  :func:`get_method`); importing this package registers the built-in methods without importing torch:
  ``uaq``, ``uaq_ls``, ``uaq_g<N>`` (:mod:`.uaq`), ``kmeans_c``, ``kmeans_a`` (:mod:`.kmeans`),
  ``int8``, ``int8_c`` (:mod:`.int8`), ``fp8_e4m3`` (:mod:`.fp8`);
* :mod:`.tensor` — ``quantize(weight, "kmeans_c-3") -> QuantizedWeight`` (codes uint8 ``[C, K]``,
  params, error, sse), ``lookup`` (loaded on first use: it imports torch);
* kernels: :mod:`.uniform` (UAQ clipping search), :mod:`.kmeans1d`, :mod:`.packing`;
  :mod:`.activation` (activation fake-quantization).

**Error** (one definition for all methods): relative squared error ``||W - W_hat||_F^2 / ||W||_F^2``.
"""

from __future__ import annotations

from .base import (METHOD_ALIASES, MethodConfig, QuantMethod, TableMethod, get_method, method_names,  # noqa: F401
                   register_method, register_method_family)
from . import uaq as _uaq  # noqa: E402,F401  (registers uaq, uaq_ls, uaq_g<N>)
from . import kmeans as _kmeans  # noqa: E402,F401  (registers kmeans_c, kmeans_a)
from . import int8 as _int8  # noqa: E402,F401  (registers int8, int8_c)
from . import fp8 as _fp8  # noqa: E402,F401  (registers fp8_e4m3)

_TENSOR_API = ("quantize", "QuantizedWeight", "lookup")


def __getattr__(name: str):  # PEP 562: the torch-level API is imported on first use
    if name in _TENSOR_API:
        from . import tensor

        return getattr(tensor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
