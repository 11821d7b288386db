"""What each quantization method becomes in each export format, keyed by the method's class.

``packed`` (our own format) stores any registered method as it is in the multiquantizer (bit-packed
codes + the method's params) and dequantizes with the method's own ``table()``, so every method,
present and future, exports to it bit-exactly: it needs no row here.

``onnx`` and ``sdnq`` have their own vocabulary. For each method the table names how its codes and
params map onto that vocabulary (or, as a one-line reason, why they cannot):

=============  =========================================  ===============================================
method         onnx                                       sdnq (``SDNQDequantizer`` fields)
=============  =========================================  ===============================================
uaq            QDQ: UINT4 (<= 4 bits) / uint8 codes, per- ``uint<b>``, ``group_size=-1``, ``scale = Δ``,
               row fp32 scale, zero point ``z`` (axis 0)  ``zero_point = -z·Δ`` (fp32, exact)
uaq_ls         codes -> float, ``- z``, ``* Δ`` with the  as uaq (``-z·Δ`` of fp16 z and Δ is exact in fp32)
               fp16 z, Δ (refit zero points are not
               integers)
uaq_g<N>       QDQ blocked (opset 21, ``block_size=N``)   ``uint<b>``, ``group_size=N`` (linear layers whose
               on the ``[C, K]`` codes                    row length N divides), scale/zero per group
kmeans_c       UINT4 / uint8 codes -> int64 + row * 2^b,  ``uint<b>`` codebook, ``use_codebook``,
               ``Gather`` on the fp16 codebooks           ``group_size=-1``: the per-row fp16 codebooks
kmeans_a       codes -> ``Gather`` on the fp16 codebook   codebook with ``group_size=-2`` (one per tensor)
int8, int8_c   QDQ: uint8 codes, zero point 128, fp32     ``int8`` symmetric, ``scale`` per tensor / row
               scale per tensor / row
fp8_e4m3       QDQ: float8e4m3fn codes, fp32 scale        ``float8_e4m3fn`` symmetric, ``scale`` per tensor
=============  =========================================  ===============================================

:data:`EXPORT_MAPPINGS` holds one function per method class (``method -> MethodFormat``, reading the
method's own config: ``uaq_g128``'s group is its ``group_size``, ``uaq_ls``'s refit its
``least_squares_refit``); :func:`method_format` resolves a method name through it;
:func:`check_exportable` raises one line naming the layer, the option and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..errors import ConfigError
from ..options import FP16, QuantOption
from ..quantizers import get_method
from ..quantizers.fp8 import FP8E4M3PerTensor
from ..quantizers.int8 import Int8Symmetric
from ..quantizers.kmeans import KMeansPerChannel, KMeansPerTensor
from ..quantizers.uaq import UniformAffine, UniformAffinePerGroup
from ..registry import HandlerRegistry, Registry

#: export format name -> its :class:`sensitivity.export.base.Exporter` (registered by that module, imported on
#: first use; the writers import torch and the format's extra only when they write)
EXPORT_FORMATS: Registry = Registry("export format", error=ConfigError, unknown="unknown export format {name!r}; use one of {known}",
                                    lazy={"packed": "sensitivity.export.base", "sdnq": "sensitivity.export.base",
                                          "onnx": "sensitivity.export.base"})
FORMATS: Tuple[str, ...] = EXPORT_FORMATS.names()
#: the record file of every export folder
EXPORT_FILE = "sensitivity_export.json"


@dataclass(frozen=True)
class MethodFormat:
    """How one method maps onto the onnx / sdnq formats.

    ``onnx``: ``"qdq_affine"`` (UINT4 / uint8 codes, per-row scale and zero point), ``"qdq_affine_blocked"``,
    ``"affine_float_zero"`` (non-integer zero points), ``"qdq_symmetric"`` (uint8 codes, zero point 128),
    ``"qdq_fp8"``, ``"codebook_gather"`` (codes index the codebook), ``"dequantized"``.
    ``sdnq``: ``"uint_asymmetric"``, ``"uint_asymmetric_grouped"``, ``"codebook_row"``,
    ``"codebook_tensor"``, ``"int8_symmetric"``, ``"fp8_symmetric"``, or ``None`` with ``sdnq_reason``.
    ``per_row``: the scale is per output row (else per tensor); ``group``: group size (``uaq_g<N>``).
    ``affine`` (run time, :mod:`.runtime`): how a row's value of code ``q`` is ``(q - z) * d``:
    ``"scale_zero"`` (``d = scale``, ``z = zero``), ``"scale_128"`` (``d = scale``, ``z = 128``), or ``None``
    (not one affine map per row: no integer matmul).
    """

    method: str
    onnx: str
    sdnq: Optional[str]
    per_row: bool = True
    group: Optional[int] = None
    sdnq_reason: str = ""
    affine: Optional[str] = None


#: quantization-method class -> ``f(method) -> MethodFormat`` (the onnx / sdnq vocabulary of the method)
EXPORT_MAPPINGS = HandlerRegistry("onnx / sdnq mapping")


@EXPORT_MAPPINGS.register(UniformAffine)
def _uniform_affine(m: UniformAffine) -> MethodFormat:
    # a least-squares refit leaves zero points that are not integers: no QDQ zero point can hold them, so the
    # codes are turned to floats and the fp16 zero points / scales applied by Sub / Mul
    onnx = "affine_float_zero" if m.config.least_squares_refit else "qdq_affine"
    return MethodFormat(m.name, onnx, "uint_asymmetric", affine="scale_zero")


@EXPORT_MAPPINGS.register(UniformAffinePerGroup)
def _uniform_affine_grouped(m: UniformAffinePerGroup) -> MethodFormat:
    return MethodFormat(m.name, "qdq_affine_blocked", "uint_asymmetric_grouped", group=int(m.config.group_size))


@EXPORT_MAPPINGS.register(KMeansPerChannel, KMeansPerTensor)
def _codebook(m) -> MethodFormat:
    return MethodFormat(m.name, "codebook_gather", "codebook_row" if m.per_row else "codebook_tensor", per_row=m.per_row)


@EXPORT_MAPPINGS.register(Int8Symmetric)
def _int8(m: Int8Symmetric) -> MethodFormat:
    return MethodFormat(m.name, "qdq_symmetric", "int8_symmetric", per_row=m.per_row, affine="scale_128")


@EXPORT_MAPPINGS.register(FP8E4M3PerTensor)
def _fp8(m: FP8E4M3PerTensor) -> MethodFormat:
    return MethodFormat(m.name, "qdq_fp8", "fp8_symmetric", per_row=False)


def method_format(method: str) -> Optional[MethodFormat]:
    """How the method ``method`` (a registered name) maps onto onnx / sdnq (``None``: only ``packed`` knows it)."""
    m = get_method(method)
    mapping = EXPORT_MAPPINGS.lookup(m)
    return None if mapping is None else mapping(m)


def row_affine(method: str, params: Mapping[str, Any], rows: int) -> Optional[Tuple[Any, Any]]:
    """float32 ``(d [rows], z [rows])`` with value ``(q - z) * d`` of code ``q`` in each row, or ``None``."""
    import torch

    fmt = method_format(method)
    if fmt is None or fmt.affine is None:
        return None
    d = params["scale"].to(torch.float32).reshape(-1).expand(rows) if params["scale"].numel() == 1 \
        else params["scale"].to(torch.float32).reshape(-1)
    if fmt.affine == "scale_128":
        return d.contiguous(), torch.full((rows,), 128.0)
    return d.contiguous(), params["zero"].to(torch.float32).reshape(-1).contiguous()


def sdnq_reason(option: str, shape: Tuple[int, ...], kind: str) -> Optional[str]:
    """Why SDNQ cannot carry ``option`` for a layer of ``shape`` / ``kind`` exactly (``None``: it can)."""
    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    if fmt is None or fmt.sdnq is None:
        return (fmt.sdnq_reason if fmt else "") or f"SDNQ has no storage for method {opt.method!r}"
    if fmt.sdnq == "int8_symmetric" and opt.bits != 8:
        return f"SDNQ's int8 storage needs 8-bit codes, {option!r} has {opt.bits}"
    numel = 1
    for s in shape:
        numel *= int(s)
    if opt.bits == 3 and numel % 8:  # sdnq.packed_int.pack_uint3 packs 3-bit codes in groups of 8 values
        return f"SDNQ packs 3-bit codes in groups of 8 values and the layer has {numel} weights"
    if fmt.sdnq == "uint_asymmetric_grouped":
        k = 1
        for s in shape[1:]:
            k *= int(s)
        if kind != "linear":
            return (f"SDNQ groups a conv layer's scales over input channels at each kernel position, "
                    f"{option!r} over {fmt.group} consecutive weights of the flattened row")
        if k % fmt.group:
            return f"SDNQ's groups must divide the row length {k}; {option!r} has groups of {fmt.group}"
    return None


def check_exportable(format: str, options: Mapping[str, str], layers: Mapping[str, Tuple[Tuple[int, ...], str]]) -> None:
    """Raise :class:`ConfigError` (one line: layer, option, why) if ``format`` cannot express a layer's option.

    ``layers``: ``{layer: (shape, kind)}``. Called before anything is written.
    """
    if format not in EXPORT_FORMATS:
        EXPORT_FORMATS.get(format)  # raises the one-line error
    for layer, option in options.items():
        if option == FP16 or format == "packed":
            continue
        opt = QuantOption.parse(option)
        fmt = method_format(opt.method)
        if format == "onnx" and fmt is None:
            m = get_method(opt.method)
            why = EXPORT_MAPPINGS.reason(m) or f"no EXPORT_MAPPINGS handler for {type(m).__name__}"
            raise ConfigError(f"layer {layer!r}: option {option!r} has no ONNX mapping ({why}); "
                              "export it as --format packed")
        if format == "sdnq":
            shape, kind = layers[layer]
            reason = sdnq_reason(option, shape, kind)
            if reason:
                raise ConfigError(f"layer {layer!r}: option {option!r} cannot be exported to sdnq exactly: {reason}")
