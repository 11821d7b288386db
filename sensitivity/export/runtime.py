"""Run-time policy of a packed export: which kernel computes each packed module, and the integer matmul.

Kernels (one per packed module, :data:`KERNELS`):

* ``on_the_fly``: each forward dequantizes the bit-packed codes into a reused scratch buffer (one fused
  unpack + table lookup pass, :func:`sensitivity.export.kernels.dequantize_into`) and runs the float
  layer. Memory held: the packed bytes. Values bit-identical to :func:`~sensitivity.multiquantizer.apply`.
* ``cached``: the weight is dequantized once, at load, and held in the compute dtype. Bit-identical.
* ``int8_dynamic`` (``act_bits=8`` only; ``nn.Linear`` with one affine map per row: ``uaq``, ``uaq_ls``,
  ``int8``, ``int8_c``, any bits): W8A8 on torch's int8 matmul (``torch._int_mm``; VNNI on x86). The
  input is quantized per token exactly as :func:`~sensitivity.quantizers.activation.fake_quantize_rows`
  (same codes), the weight codes are held as int8 (1 byte per weight), and the zero points enter as
  rank-1 corrections, so the result equals the fake-quantized layer up to float32 summation order.

With ``act_bits`` set, every packed module quantizes its input as
``enable_activation_quant(model, layers, act_bits, attention=False)`` does (the float kernels through
:mod:`~sensitivity.quantizers.activation`); attention Q/K/V are not quantized by the run-time modules.

Kernel choice (``benchmarks/bench_kernels.py`` measures it on the machine at hand, table in
``benchmarks/README.md``): torch's weight-only CPU kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) are fast only on bf16 activations, which changes the numerics, so
weight-only options run on the float kernels above; ``_int_mm`` (int8 x int8 -> int32) is the one
integer kernel that beats float32 GEMM here, and W8A8 runs on it (its activation quantization and
zero-point corrections are plain torch element-wise ops that still cost more than the matmul saves).

:func:`choose_kernels` is the automatic policy: ``int8_dynamic`` where it applies, else ``cached`` for the
modules that compute least per weight (fewest input positions per forward, measured on example inputs
at export time; smallest weights first when unknown) while their float bytes fit ``cache_budget``,
else ``on_the_fly``. The choice and its inputs are recorded in ``sensitivity_export.json`` (``runtime``).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

KERNELS = ("on_the_fly", "cached", "int8_dynamic")
#: the cache budget's floor: small models are cached whole (per-call dequantization dominates tiny layers)
MIN_CACHE_BYTES = 16 << 20
#: default cache budget, as a fraction of the config's quantized bytes
CACHE_FRACTION = 0.25


def default_cache_budget(quantized_bytes: int) -> int:
    """Bytes of float weights the automatic policy may hold: ``max(16 MiB, 0.25 x quantized bytes)``."""
    return max(MIN_CACHE_BYTES, int(CACHE_FRACTION * quantized_bytes))


def int8_eligible(kind: str, parts: Sequence[Any]) -> bool:
    """Whether a module (``kind``, its parts) can run ``int8_dynamic``: one affine-per-row part of a linear layer."""
    from ..options import FP16, QuantOption
    from .methods import method_format

    if kind != "linear" or len(parts) != 1 or parts[0].option == FP16:
        return False
    fmt = method_format(QuantOption.parse(parts[0].option).method)
    return fmt is not None and fmt.affine is not None


def choose_kernels(modules: Sequence[Mapping[str, Any]], cache_budget: int, act_bits: Optional[int] = None,
                   positions: Optional[Mapping[str, int]] = None) -> Dict[str, str]:
    """``{module: kernel}`` by the automatic policy (module docstring).

    ``modules``: ``[{"module", "kind", "weight_shape", "parts": [PartSpec]}]``; ``cache_budget``: bytes
    of float32 weights; ``positions``: input positions per forward of each module (tokens, pixels).
    """
    out: Dict[str, str] = {}
    rest = []
    for m in modules:
        if act_bits == 8 and int8_eligible(m["kind"], m["parts"]):
            out[m["module"]] = "int8_dynamic"
        else:
            numel = 1
            for s in m["weight_shape"]:
                numel *= int(s)
            pos = (positions or {}).get(m["module"])
            rest.append((pos if pos is not None else 0, numel, m["module"]))
    left = int(cache_budget)
    for pos, numel, name in sorted(rest):
        if 4 * numel <= left:
            out[name] = "cached"
            left -= 4 * numel
        else:
            out[name] = "on_the_fly"
    return out


@torch.no_grad()
def count_positions(model: nn.Module, module_paths: Sequence[str], example_inputs: Mapping[str, Any]) -> Dict[str, int]:
    """Input positions per forward of each module (tokens of a linear layer, output pixels of a conv)."""
    counts: Dict[str, int] = {}
    handles = []
    for path in module_paths:
        mod = model.get_submodule(path)

        def hook(m, args, output, path=path):
            if isinstance(output, torch.Tensor):
                channels = getattr(m, "out_features", None) or getattr(m, "out_channels", 1)
                counts[path] = counts.get(path, 0) + output.numel() // max(int(channels), 1)

        handles.append(mod.register_forward_hook(hook))
    try:
        model(**dict(example_inputs), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return counts


# --------------------------------------------------------------------------------------------------
# scratch buffer of the on-the-fly kernel
# --------------------------------------------------------------------------------------------------
_SCRATCH = threading.local()


def scratch(numel: int) -> torch.Tensor:
    """A float32 CPU buffer of ``numel`` elements reused by every on-the-fly module of this thread.

    Reusing one buffer spares a fresh allocation (and its page faults) per layer and forward; it is
    only used when autograd is off, so no graph keeps a reference to it.
    """
    # one buffer per mode: a tensor made under torch.inference_mode cannot be written outside it
    key = "inference" if torch.is_inference_mode_enabled() else "buf"
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(int(numel), dtype=torch.float32)
        setattr(_SCRATCH, key, buf)
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers."""
    _SCRATCH.buf = None
    _SCRATCH.inference = None


# --------------------------------------------------------------------------------------------------
# W8A8 integer matmul
# --------------------------------------------------------------------------------------------------
def quantize_tokens_int8(x: torch.Tensor):
    """Per-token asymmetric 8-bit codes of ``x`` float ``[T, K]`` as in ``fake_quantize_rows(x, 8)``.

    Returns ``(xq int8 [T, K] = code - 128, delta [T], zero [T], flat bool [T])`` (float32; a flat row
    keeps its float value in the fake quantizer, handled by the caller).
    """
    from ..quantizers.activation import quantize_rows_codes

    q, delta, zero, flat = quantize_rows_codes(x.float(), 8)
    return (q - 128).to(torch.int8), delta.reshape(-1), zero.reshape(-1), flat.reshape(-1)


class Int8Weight:
    """A linear weight as int8 codes ``wq = q - 128`` ``[N, K]`` with float32 ``d``, ``c = 128 - z`` per row
    and the row sums ``sw = Σ_k wq`` (the weight value is ``(wq + c) * d``)."""

    def __init__(self, codes_u8: torch.Tensor, d: torch.Tensor, z: torch.Tensor):
        self.wq = (codes_u8.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.d = d.to(torch.float32).contiguous()
        self.c = (128.0 - z.to(torch.float32)).contiguous()
        self.sw = self.wq.sum(1, dtype=torch.int64).to(torch.float32)
        self.k = int(self.wq.shape[1])
        self.wsum = ((self.sw + self.k * self.c) * self.d)  # Σ_k w[n, k], for flat input rows

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"wq": self.wq, "d": self.d, "c": self.c, "sw": self.sw, "wsum": self.wsum}


def int8_linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(fake_quantize_rows(x, 8), (wq + c) * d, bias)`` on ``torch._int_mm`` (``x``: ``[..., K]``).

    ``y = dx·d·(S + c·sx + e·sw + K·e·c)`` with ``S = xq @ wqᵀ`` (int32), ``sx``/``sw`` the rows' code sums and
    ``e = 128 - zx``; flat input rows (constant tokens) give ``value · Σ_k w``.
    """
    shape = x.shape
    dtype = x.dtype
    x2 = x.reshape(-1, shape[-1])
    t = x2.shape[0]
    xq, dx, zx, flat = quantize_tokens_int8(x2)
    wq = w["wq"]
    if t <= 16:  # torch._int_mm needs more than 16 rows on CPU: pad with zero rows
        xq_mm = torch.cat([xq, xq.new_zeros(17 - t, xq.shape[1])])
        s = torch._int_mm(xq_mm, wq.t())[:t]
    else:
        s = torch._int_mm(xq, wq.t())
    k = float(wq.shape[1])
    sx = xq.sum(1, dtype=torch.int32).to(torch.float32)
    e = 128.0 - zx
    y = s.to(torch.float32)
    y += torch.outer(sx, w["c"])
    y += torch.outer(e, w["sw"] + k * w["c"])
    y *= torch.outer(dx, w["d"])
    if bool(flat.any()):
        y[flat] = torch.outer(x2[flat, 0].float(), w["wsum"])
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(dtype).reshape(*shape[:-1], wq.shape[0])
