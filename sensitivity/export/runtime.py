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
  ``nn.Conv2d`` with the same options (integer zero points, ``|q - z| <= 127``): W8A8 on oneDNN's u8 x s8
  convolution (``torch.ops.onednn.qconv2d_pointwise``, fp32 output), weight ``q - z`` (int8, prepacked
  once at load) with the per-channel scale, the input quantized **per sample** (one grid over all
  channels and positions: the integer conv takes one scale per input), where
  :func:`~sensitivity.multiquantizer.apply`'s fake quantization has one grid per (sample, channel). So an
  int8 conv equals :func:`~sensitivity.quantizers.activation.quantize_samples` followed by the float conv
  up to float32 summation order, and differs from ``apply()`` by the coarser activation grid
  (``benchmarks/bench_export.py`` reports each row's output error against fp32).

With ``act_bits`` set, every packed module quantizes its input as
``enable_activation_quant(model, layers, act_bits, attention=False)`` does (the float kernels through
:mod:`~sensitivity.quantizers.activation`); attention Q/K/V are not quantized by the run-time modules.

Kernel choice (``benchmarks/bench_kernels.py`` measures it on the machine at hand): torch's weight-only
CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are fast only on bf16 activations,
which changes the numerics, so weight-only options run on the float kernels above; ``_int_mm`` (int8 x
int8 -> int32, VNNI) is the integer kernel W8A8 runs on, between two fused numba passes
(:mod:`.kernels`: the activation codes and their row sums in one pass, the dequantize epilogue with the
zero-point corrections and bias in another). ``apply()`` quantizes conv activations per (sample,
channel), a scale that varies along the reduction, which no integer conv can factor out; the int8 conv
above therefore quantizes per sample instead (``benchmarks/bench_kernels.py`` on 2 AVX512-VNNI cores,
commit 635bd02, ``sum(range(10**7))`` 0.16 s: SD1.5's 3x3 convs in 0.46x (320 -> 320 on 64 x 64), 0.38x
(640 on 32 x 32), 0.28x (1280 on 16 x 16) and 0.23x (1280 on 8 x 8) of fp32 ``F.conv2d``'s time, the
input's quantization included; a 1x1 320 -> 640 conv on 32 x 32 1.06x).

:func:`choose_kernels` is the automatic policy: ``int8_dynamic`` where it applies and the layer computes at
least :data:`INT8_MIN_MACS` multiply-adds per forward (input positions x weights), else ``cached`` for the
smallest weights (fewest input positions first among equal sizes, measured on example inputs at export
time) while their float bytes fit ``cache_budget``, else ``on_the_fly``. Dequantizing costs the same per
weight in every layer, so caching saves the same time per cached byte everywhere except for the fixed cost
of each call, which weighs most on small layers: small models are cached whole (:data:`MIN_CACHE_BYTES`),
large ones keep only a small budget (:data:`CACHE_FRACTION` of their quantized bytes; at SD1.5 size the
former 0.25 cost 0.06x fp32's peak RSS for forward times within the run-to-run spread, commit ee32398).
The choice and its inputs are recorded in ``sensitivity_export.json`` (``runtime``).

On-the-fly modules with large weights and few input positions per forward (at most
:data:`TILE_MAX_POSITIONS` tokens or output pixels, :data:`TILE_MIN_NUMEL` weights or more) may compute in
blocks of output channels: each block's weight is dequantized into the scratch buffer just before its
matmul or conv, so it is still in cache when the kernel reads it, where the whole weight (up to 118 MB at
SD1.5 size) would round-trip through memory twice and oneDNN reorders it on every call. Whether that is
faster depends on the machine, so :func:`tile_rows` measures it on the first input of each layer shape and
keeps a block size only when its output is bit-identical to the whole-weight kernel's
(``benchmarks/bench_kernels.py``, commit b9666ff, 2 AVX512 cores, ``sum(range(10**7))`` 0.15 s: SD1.5's 3x3
convs with blocks of 64 rows at 0.82x (1280 -> 1280 on 16 x 16), 0.53x (1280 -> 1280 on 8 x 8) and 0.49x
(2560 -> 1280 on 8 x 8) of fp32 ``F.conv2d``'s time, where dequantizing the whole weight first takes 1.07x,
1.11x and 1.09x; for SD1.5's linear layers blocks are no faster than the whole weight, 1.09-2.1x fp32's
where the whole weight first takes 0.98-1.06x at 256 tokens or more).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

KERNELS = ("on_the_fly", "cached", "int8_dynamic")
#: the cache budget's floor: small models are cached whole (per-call dequantization dominates tiny layers)
MIN_CACHE_BYTES = 16 << 20
#: default cache budget, as a fraction of the config's quantized bytes
CACHE_FRACTION = 0.05
#: multiply-adds per forward below which W8A8 stays on float kernels: the int8 path's fixed cost per call
#: (two fused passes, the matmul launch) exceeds its gain (``benchmarks/bench_kernels.py``: 64 x 128 x 384
#: ~2.7x fp32 on int8, 77 x 768 x 320 ~0.8x, on 2 AVX512-VNNI cores)
INT8_MIN_MACS = 1 << 23


def default_cache_budget(quantized_bytes: int) -> int:
    """Bytes of float weights the automatic policy may hold: ``max(16 MiB, 0.05 x quantized bytes)``."""
    return max(MIN_CACHE_BYTES, int(CACHE_FRACTION * quantized_bytes))


#: module kinds with an integer W8A8 kernel (``LayerSpec.kind``)
INT8_KINDS = ("linear", "conv2d")


def int8_conv_available() -> bool:
    """Whether this torch has oneDNN's quantized convolution (x86 / aarch64 CPU builds)."""
    onednn = getattr(torch.ops, "onednn", None)
    return bool(torch.backends.mkldnn.is_available() and onednn is not None
                and hasattr(onednn, "qconv2d_pointwise") and hasattr(onednn, "qconv_prepack"))


def int8_eligible(kind: str, parts: Sequence[Any]) -> bool:
    """Whether a module (``kind``, its parts) can run ``int8_dynamic``: one affine-per-row part of a linear or
    conv2d layer (a conv also needs integer zero points with ``|q - z| <= 127``, checked on its codes at load)."""
    from ..options import FP16, QuantOption
    from .methods import method_format

    if kind not in INT8_KINDS or len(parts) != 1 or parts[0].option == FP16:
        return False
    if kind == "conv2d" and not int8_conv_available():
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
        numel = 1
        for s in m["weight_shape"]:
            numel *= int(s)
        pos = (positions or {}).get(m["module"])
        if act_bits == 8 and int8_eligible(m["kind"], m["parts"]) and (pos is None or pos * numel >= INT8_MIN_MACS):
            out[m["module"]] = "int8_dynamic"
        else:
            rest.append((numel, pos if pos is not None else 0, m["module"]))
    left = int(cache_budget)
    for numel, pos, name in sorted(rest):
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
    for key in ("buf", "inference", "int32", "int32_inference"):
        setattr(_SCRATCH, key, None)


# --------------------------------------------------------------------------------------------------
# output-channel blocks of the on-the-fly kernel
# --------------------------------------------------------------------------------------------------
#: weights (elements) from which an on-the-fly module tries output-channel blocks
TILE_MIN_NUMEL = 1 << 20
#: input positions per forward (tokens of a linear layer, output pixels of a conv) up to which it tries them
TILE_MAX_POSITIONS = 256
#: output rows per block the tuner tries
TILE_CANDIDATES = (32, 64, 128, 256)
#: timed calls per candidate (the fastest counts)
TILE_ROUNDS = 3
#: a block size replaces the whole-weight kernel only when at least this much faster (timing noise)
TILE_MIN_GAIN = 0.05
_TILE_CHOICE: Dict[tuple, int] = {}
_TILING = {"enabled": True}


def set_tiling(enabled: bool) -> None:
    """Turn the on-the-fly kernel's output-channel blocks on (the default) or off for this process."""
    _TILING["enabled"] = bool(enabled)
    _TILE_CHOICE.clear()


def tile_choices() -> Dict[tuple, int]:
    """The tuner's choices so far: ``{(class, weight shape, options, input shape, conv arguments,
    threads): rows per block}`` (0: the whole weight at once)."""
    return dict(_TILE_CHOICE)


def tile_rows(module: nn.Module, x: torch.Tensor) -> int:
    """Rows per block for this on-the-fly module and input (0: dequantize the whole weight).

    The first call per (layer shape, options, input shape, conv arguments, threads) times the whole-weight
    kernel against each of :data:`TILE_CANDIDATES` on this input (best of :data:`TILE_ROUNDS` interleaved
    calls each) and keeps a
    block size only when its output is bit-identical (``torch.equal``) and it is at least
    :data:`TILE_MIN_GAIN` faster; later calls reuse the choice. The outputs therefore never depend on
    the timing, only the speed does.
    """
    if not _TILING["enabled"] or module._runtime != "on_the_fly":
        return 0
    if math.prod(module._packed_shape) < TILE_MIN_NUMEL:
        return 0
    if isinstance(module, nn.Linear):
        positions = x.numel() // max(int(x.shape[-1]), 1)
    else:  # output pixels of a conv: input pixels over the stride's area
        positions = x[0, 0].numel() * int(x.shape[0]) // math.prod(getattr(module, "stride", (1,)))
    if positions > TILE_MAX_POSITIONS:
        return 0
    conv_args = tuple(str(getattr(module, a, "")) for a in ("stride", "padding", "dilation", "padding_mode"))
    key = (type(module).__name__, tuple(module._packed_shape), tuple(p.option for p in module._packed_parts),
           tuple(x.shape), conv_args, module.bias is not None, torch.get_num_threads())
    choice = _TILE_CHOICE.get(key)
    if choice is None:
        choice = _TILE_CHOICE[key] = _tune_tile(module, x)
    return choice


def _tune_tile(module: nn.Module, x: torch.Tensor) -> int:
    import time

    # the whole weight in a buffer of its own, freed after tuning: when a block size wins, the shared
    # scratch never grows to the layer's full weight (at SD1.5 size up to 118 MB held to the end)
    buffer = torch.empty(math.prod(module._packed_shape), dtype=torch.float32)

    def whole():
        return module._float_forward(x, module._dequantize(buffer=buffer))

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    reference, first = timed(whole)
    times = {0: first}
    for rows in TILE_CANDIDATES:
        if not module.tile_rows_allowed(rows):
            continue
        out, first = timed(lambda: module._tiled_forward(x, rows))
        if torch.equal(out, reference):
            times[rows] = first
    for _ in range(TILE_ROUNDS - 1):  # interleaved, so a burst of load on the machine hits every candidate
        for rows in times:
            call = whole if rows == 0 else (lambda: module._tiled_forward(x, rows))
            times[rows] = min(times[rows], timed(call)[1])
    tiled = [r for r in times if r]
    if not tiled:
        return 0
    best = min(tiled, key=lambda r: (times[r], r))
    return best if times[best] <= (1.0 - TILE_MIN_GAIN) * times[0] else 0


# --------------------------------------------------------------------------------------------------
# W8A8 integer matmul
# --------------------------------------------------------------------------------------------------
class Int8Weight:
    """A linear weight as int8 codes ``wq = q - 128`` ``[N, K]`` with float32 ``d``, ``c = 128 - z`` per row
    (the weight value is ``(wq + c) * d``), ``swk = Σ_k wq + K·c`` and ``wsum = Σ_k w`` (for flat input rows)."""

    def __init__(self, codes_u8: torch.Tensor, d: torch.Tensor, z: torch.Tensor):
        self.wq = (codes_u8.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.d = d.to(torch.float32).contiguous()
        self.c = (128.0 - z.to(torch.float32)).contiguous()
        sw = self.wq.sum(1, dtype=torch.int64).to(torch.float32)
        k = int(self.wq.shape[1])
        self.swk = (sw + k * self.c).contiguous()
        self.wsum = (self.swk * self.d).contiguous()

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"wq": self.wq, "d": self.d, "c": self.c, "swk": self.swk, "wsum": self.wsum}


INT8_TENSORS = ("wq", "d", "c", "swk", "wsum")
_NO_BIAS = torch.empty(0)


def _int_mm_scratch(rows: int, cols: int) -> torch.Tensor:
    """An int32 ``[rows, cols]`` buffer reused by every W8A8 module of this thread (see :func:`scratch`)."""
    key = "int32_inference" if torch.is_inference_mode_enabled() else "int32"
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=torch.int32)
        setattr(_SCRATCH, key, buf)
    return buf[:rows * cols].view(rows, cols)


def int8_linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(fake_quantize_rows(x, 8), (wq + c) * d, bias)`` on ``torch._int_mm`` (``x``: ``[..., K]``, CPU).

    Three passes: the input's per-token codes and code sums (one fused pass,
    :func:`~sensitivity.export.kernels.quantize_rows_int8`), ``S = xq @ wqᵀ`` (int32, into a reused buffer),
    and one fused epilogue ``y = dx·d·(S + c·sx + e·swk) + bias`` with ``e = 128 - zx``; flat input rows
    (constant tokens) give ``value · Σ_k w``.
    """
    from .kernels import int8_epilogue, quantize_rows_int8

    shape = x.shape
    dtype = x.dtype
    x2 = x.detach().reshape(-1, shape[-1]).to(torch.float32)  # the rounding has no gradient
    t = x2.shape[0]
    xq, dx, e, sx, flat = quantize_rows_int8(x2)
    wq = w["wq"]
    n = wq.shape[0]
    if t <= 16:  # torch._int_mm needs more than 16 rows on CPU: pad with zero rows
        s = torch._int_mm(torch.cat([xq, xq.new_zeros(17 - t, xq.shape[1])]), wq.t())[:t]
    else:
        s = torch._int_mm(xq, wq.t(), out=_int_mm_scratch(t, n))
    b = _NO_BIAS if bias is None else bias.detach().to(torch.float32).contiguous()
    y = int8_epilogue(s, x2[:, 0].contiguous(), dx, e, sx, flat, w["d"], w["c"], w["swk"], w["wsum"], b)
    return y.to(dtype).reshape(*shape[:-1], n)


# --------------------------------------------------------------------------------------------------
# W8A8 convolution
# --------------------------------------------------------------------------------------------------
class Int8Conv:
    """A conv2d weight as oneDNN's prepacked int8 ``q - z`` ``[O, C / groups, kh, kw]`` with float32 scales ``d``
    ``[O]`` (the weight value is ``(q - z) * d``); immutable, so copies share it."""

    def __init__(self, wq: torch.Tensor, d: torch.Tensor, stride, padding, dilation, groups: int):
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = int(groups)
        self.d = d.to(torch.float32).contiguous()
        self.zeros = torch.zeros(int(wq.shape[0]), dtype=torch.int64)
        self.packed = torch.ops.onednn.qconv_prepack(wq.contiguous(), self.d, 1.0, 0, self.stride, self.padding,
                                                     self.dilation, self.groups, None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, d: torch.Tensor, z: torch.Tensor, module: nn.Conv2d) -> Optional["Int8Conv"]:
        """From codes ``[O, C/g * kh * kw]`` (uint8) and the row affine ``(d, z)``; ``None`` where ``q - z`` is
        not an int8 value (non-integer zero point, or a code more than 127 steps from it)."""
        if (not isinstance(module.padding, (tuple, list)) or module.padding_mode != "zeros"
                or not torch.equal(z, torch.round(z))):
            return None
        wq = codes.to(torch.int16) - z.to(torch.int16)[:, None]
        if int(wq.min()) < -128 or int(wq.max()) > 127:
            return None
        return cls(wq.to(torch.int8).view(module.weight.shape), d, module.stride, module.padding, module.dilation,
                   module.groups)

    @property
    def nbytes(self) -> int:
        return int(self.packed.numel()) + 4 * int(self.d.numel())

    def __deepcopy__(self, memo):  # the prepacked tensor has no storage to copy; nothing here changes
        return self

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor], float_weight) -> torch.Tensor:
        """The conv of ``x`` ``[B, C, H, W]`` (CPU) with the input quantized per sample (8 bits);
        ``float_weight()``: the dequantized weight, for a constant sample (which keeps its float value)."""
        from torch.nn import functional as F

        from .kernels import quantize_samples_u8

        dtype = x.dtype
        x32 = x.detach().to(torch.float32).contiguous()
        b = x32.shape[0]
        codes, delta, zero, flat = quantize_samples_u8(x32.reshape(b, -1))
        bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
        outs = []
        for i in range(b):
            if bool(flat[i]):
                outs.append(F.conv2d(x32[i:i + 1], float_weight().to(torch.float32), bias32, self.stride,
                                     self.padding, self.dilation, self.groups))
                continue
            outs.append(torch.ops.onednn.qconv2d_pointwise(
                codes[i].view(1, *x32.shape[1:]), float(delta[i]), int(zero[i]), self.packed, self.d, self.zeros,
                bias32, self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], ""))
        y = outs[0] if b == 1 else torch.cat(outs)
        return y.to(dtype)
