"""What each quantization method becomes in each export format: the one table of per-method knowledge.

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

:func:`method_format` resolves a method name (``uaq_g128`` -> the ``uaq_g`` row with group 128);
:func:`check_exportable` raises one line naming the layer, the option and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..errors import ConfigError
from ..options import FP16, QuantOption

FORMATS: Tuple[str, ...] = ("packed", "sdnq", "onnx")


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


_TABLE: Mapping[str, MethodFormat] = {
    "uaq": MethodFormat("uaq", "qdq_affine", "uint_asymmetric", affine="scale_zero"),
    "uaq_ls": MethodFormat("uaq_ls", "affine_float_zero", "uint_asymmetric", affine="scale_zero"),
    "uaq_g": MethodFormat("uaq_g", "qdq_affine_blocked", "uint_asymmetric_grouped"),
    "kmeans_c": MethodFormat("kmeans_c", "codebook_gather", "codebook_row"),
    "kmeans_a": MethodFormat("kmeans_a", "codebook_gather", "codebook_tensor", per_row=False),
    "int8": MethodFormat("int8", "qdq_symmetric", "int8_symmetric", per_row=False, affine="scale_128"),
    "int8_c": MethodFormat("int8_c", "qdq_symmetric", "int8_symmetric", affine="scale_128"),
    "fp8_e4m3": MethodFormat("fp8_e4m3", "qdq_fp8", "fp8_symmetric", per_row=False),
}

_GROUPED = re.compile(r"^uaq_g(\d+)$")


def method_format(method: str) -> Optional[MethodFormat]:
    """The table row of ``method`` (``None``: only the packed format knows it)."""
    if method in _TABLE:
        return _TABLE[method]
    m = _GROUPED.match(method)
    if m:
        base = _TABLE["uaq_g"]
        return MethodFormat(method, base.onnx, base.sdnq, group=int(m.group(1)))
    return None


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
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    for layer, option in options.items():
        if option == FP16 or format == "packed":
            continue
        opt = QuantOption.parse(option)
        fmt = method_format(opt.method)
        if format == "onnx" and fmt is None:
            raise ConfigError(f"layer {layer!r}: option {option!r} has no ONNX mapping (method {opt.method!r} is "
                              "not in sensitivity.export.methods); export it as --format packed")
        if format == "sdnq":
            shape, kind = layers[layer]
            reason = sdnq_reason(option, shape, kind)
            if reason:
                raise ConfigError(f"layer {layer!r}: option {option!r} cannot be exported to sdnq exactly: {reason}")
