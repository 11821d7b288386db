"""``onnx``: the denoiser exported with ``torch.onnx`` (dynamo exporter), quantized layers as QDQ.

The full-precision denoiser is exported once (no graph optimisation, so every weight stays an
initializer named by its parameter path, ``denoiser.<module>.weight``); then each quantized weight
initializer is replaced, per :mod:`sensitivity.export.methods`:

* uniform options (``uaq``, ``int8``, ``int8_c``, ``fp8_e4m3``, ``uaq_g<N>``): the codes as an integer
  (or float8) initializer ``[C, K]`` followed by ``DequantizeLinear`` with the stored scales and zero
  points (per row: ``axis=0``; per group: ``block_size=N``, opset 21), reshaped to the weight's shape.
  Codes of 4 bits or fewer are ``UINT4`` (two per byte, opset 21+; 3-bit codes take 4 bits), wider
  ones uint8. onnxruntime computes ``(q - z) * Δ`` in float32, as our table does, so the values are
  the multiquantizer's exactly. Zero points outside uint8 use int16 codes (opset 21).
* ``uaq_ls`` (non-integer zero points): codes -> float (``DequantizeLinear`` with scale 1), ``Sub`` the
  fp16 zero points, ``Mul`` the fp16 scales (cast to float32): the same float32 operations as the table.
* k-means options (``kmeans_c``, ``kmeans_a``): the codes (UINT4 / uint8) -> int64 indices (plus
  ``row * 2^b`` for per-row codebooks, from a ``Range``) -> ``Gather`` on the fp16 codebooks cast to
  float32. The file holds the codes and codebooks, not the float weight.
* split layers (``#main`` / ``#skip``): each half on its own, then ``Concat`` along the input axis.
* W8A8 (a config with ``act_bits == 8``): every conv and 3-D linear layer (``Transpose`` -> ``MatMul``)
  whose option is symmetric int8 (``int8_c`` per row, ``int8`` per tensor) is written as onnxruntime's
  QDQ pattern: the weight as int8 codes in its own shape (``[K, N]`` for a ``MatMul``) with one
  ``DequantizeLinear``, the input through ``QuantizeLinear`` -> ``DequantizeLinear`` at a **static**
  uint8 scale and zero point, and for a conv also its output (``QLinearConv`` needs a quantized output;
  the conv bias as int32 at the input scale x the weight scale). onnxruntime fuses them into
  ``QLinearConv`` / ``MatMulIntegerToFloat`` (u8 x s8 kernels) in a session that keeps its QDQ nodes
  (:func:`inference_session` with ``w8a8=True``: no weight folding, :data:`W8A8_DISABLED_OPTIMIZERS` off).
  The static ranges are each point's min / max observed on the weight-quantized PyTorch model over
  ``calibration_inputs`` (default: :data:`W8A8_CALIBRATION_SEEDS` seeded example inputs, so real inputs
  should be passed for a deployed model); ``onnx_check`` then compares with the same static fake
  quantization in PyTorch (agreeing up to the integer kernels' rounding: one 8-bit step at a layer, passed
  on through the requantized convs), and
  ``w8a8`` records the layers, the inputs' seeds and the error against the weight-only model.

After writing, the model is run in onnxruntime (CPU) on seeded example inputs and compared with
PyTorch's output of the fake-quantized denoiser (:func:`~sensitivity.multiquantizer.apply`); the
maximum absolute difference goes into ``sensitivity_export.json`` (``onnx_check``). Files: ``model.onnx``
(with ``model.onnx.data`` beside it above 1.5 GiB), ``sensitivity_export.json``, ``config.json``,
``inputs.json`` (input names, shapes and dtypes).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import SensitivityError
from ..options import FP16, QuantOption
from .methods import EXPORT_FILE, method_format
from .plan import ExportPlan

ONNX_FILE = "model.onnx"
_PREFIX = "denoiser."
_EXTERNAL_ABOVE = 3 << 29  # 1.5 GiB: protobuf files must stay below 2 GiB


def example_inputs(family, pipe, seed: int = 0) -> Dict[str, Any]:
    """Seeded keyword inputs of one denoiser forward (batch 1, native size): floats ~ N(0, 1), timestep 500."""
    from ..graph.inputs import example_inputs as zero_inputs

    den = family.denoiser(pipe)
    return random_inputs(zero_inputs(den, device="cpu", dtype=torch.float32), seed)


def random_inputs(kwargs: Mapping[str, Any], seed: int = 0) -> Dict[str, Any]:
    """``kwargs`` with every float tensor except ``timestep`` drawn from N(0, 1) (``seed``)."""
    gen = torch.Generator().manual_seed(seed)

    def fill(path, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and "timestep" not in str(path):
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return x

    return pytree.tree_map_with_path(fill, dict(kwargs))


class _Flat(nn.Module):
    """The denoiser called with flat tensor arguments (``None`` leaves of the kwargs stay constant)."""

    def __init__(self, denoiser: nn.Module, kwargs: Mapping[str, Any]):
        super().__init__()
        self.denoiser = denoiser
        leaves, self.spec = pytree.tree_flatten(dict(kwargs))
        self.slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self.leaves = leaves

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        kw = pytree.tree_unflatten(leaves, self.spec)
        return self.denoiser(**kw, return_dict=False)[0]

    def flat(self, kwargs: Mapping[str, Any]) -> List[torch.Tensor]:
        leaves, _ = pytree.tree_flatten(dict(kwargs))
        return [leaves[i] for i in self.slots]

    def names(self) -> List[str]:
        paths, _ = pytree.tree_flatten_with_path(dict(self._kw_template()))
        return [pytree.keystr(paths[i][0]).strip("[]'\".").replace("']['", ".") or f"input{i}" for i in self.slots]

    def _kw_template(self):
        return pytree.tree_unflatten(self.leaves, self.spec)


def _input_names(flat: _Flat) -> List[str]:
    import re

    names = []
    for n in flat.names():
        n = re.sub(r"[^0-9A-Za-z_]+", "_", n).strip("_") or "input"
        while n in names:
            n += "_"
        names.append(n)
    return names


MIN_OPSET = 18  # the lowest opset torch.onnx's exporter writes
INT4_OPSET = 21  # INT4 / UINT4 tensors and blocked DequantizeLinear


def check_opset(opset) -> int:
    """``opset`` as an int if this format can write it (``MIN_OPSET`` .. the installed onnx's newest), else one line."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:
        value = int(opset)
    except (TypeError, ValueError):
        value = None
    if value is None or value != opset or not MIN_OPSET <= value <= newest:
        raise SensitivityError(f"--opset {opset!r}: the onnx export writes opsets {MIN_OPSET} to {newest} "
                               f"(onnx {onnx.__version__}; {INT4_OPSET}+ stores 3/4-bit codes as UINT4)")
    return value


def _unpack_nodes(helper, numpy_helper, TensorProto, name: str, codes: np.ndarray, bits: int):
    """Initializers and nodes that rebuild uint8 codes ``[C, K]`` as ``name`` from our bit-packed stream.

    The packed bytes (``bits`` per group of 8 codes, LSB first: :mod:`sensitivity.quantizers.packing`) are an
    initializer ``[G, bits]``; code ``i`` of a group is ``(byte_j >> s) | (byte_j+1 << (8 - s))`` masked,
    with ``bit = bits * i``, ``j = bit // 8``, ``s = bit % 8`` (``BitShift`` / ``BitwiseAnd`` / ``BitwiseOr``
    on uint8), then ``Concat`` -> ``[G * 8]`` -> the first ``C * K`` -> ``[C, K]``.
    """
    from ..quantizers.packing import pack_codes

    n = codes.size
    packed = pack_codes(np.ascontiguousarray(codes.reshape(-1)), bits)
    groups = -(-n // 8)
    packed = np.concatenate([packed, np.zeros(groups * bits - packed.size, np.uint8)]).reshape(groups, bits)
    inits = [numpy_helper.from_array(packed, f"{name}__packed")]
    nodes = []
    const = {}

    def c(v: int) -> str:
        key = f"{name}__u8_{v}"
        if v not in const:
            const[v] = key
            inits.append(numpy_helper.from_array(np.asarray(v, np.uint8), key))
        return key

    byte = []
    for j in range(bits):
        inits.append(numpy_helper.from_array(np.asarray([j], np.int64), f"{name}__j{j}"))
        inits.append(numpy_helper.from_array(np.asarray([j + 1], np.int64), f"{name}__j{j}e"))
        nodes.append(helper.make_node("Slice", [f"{name}__packed", f"{name}__j{j}", f"{name}__j{j}e", f"{name}__axis1"],
                                      [f"{name}__b{j}"], name=f"{name}__Slice{j}"))
        byte.append(f"{name}__b{j}")
    inits.append(numpy_helper.from_array(np.asarray([1], np.int64), f"{name}__axis1"))
    mask = (1 << bits) - 1
    outs = []
    for i in range(8):
        bit = bits * i
        j, sh = divmod(bit, 8)
        lo = f"{name}__lo{i}"
        nodes.append(helper.make_node("BitShift", [byte[j], c(sh)], [lo], name=f"{name}__Shr{i}", direction="RIGHT"))
        val = lo
        if sh + bits > 8:
            hi = f"{name}__hi{i}"
            nodes.append(helper.make_node("BitShift", [byte[j + 1], c(8 - sh)], [hi], name=f"{name}__Shl{i}",
                                          direction="LEFT"))
            nodes.append(helper.make_node("BitwiseOr", [lo, hi], [f"{name}__or{i}"], name=f"{name}__Or{i}"))
            val = f"{name}__or{i}"
        nodes.append(helper.make_node("BitwiseAnd", [val, c(mask)], [f"{name}__c{i}"], name=f"{name}__And{i}"))
        outs.append(f"{name}__c{i}")
    inits += [numpy_helper.from_array(np.asarray([-1], np.int64), f"{name}__flat"),
              numpy_helper.from_array(np.asarray([0], np.int64), f"{name}__zero0"),
              numpy_helper.from_array(np.asarray([n], np.int64), f"{name}__n"),
              numpy_helper.from_array(np.asarray(codes.shape, np.int64), f"{name}__cshape")]
    nodes += [helper.make_node("Concat", outs, [f"{name}__cat"], name=f"{name}__Concat", axis=1),
              helper.make_node("Reshape", [f"{name}__cat", f"{name}__flat"], [f"{name}__all"], name=f"{name}__Flat"),
              helper.make_node("Slice", [f"{name}__all", f"{name}__zero0", f"{name}__n"], [f"{name}__cut"],
                               name=f"{name}__Cut"),
              helper.make_node("Reshape", [f"{name}__cut", f"{name}__cshape"], [name], name=f"{name}__CodesShape")]
    return inits, nodes


def _codes_tensor(numpy_helper, TensorProto, name: str, codes: np.ndarray, bits: int, opset: int, extra=None):
    """Codes ``[C, K]`` (uint8 values < 2**bits) as UINT4 (two per byte) when ``bits == 4`` and the opset has it;
    3-bit and narrower codes as our bit-packed stream unpacked in the graph (``extra``: a list that receives
    ``(initializers, nodes)``; uint8 codes are the result); else uint8."""
    if bits < 4 and extra is not None:
        from onnx import helper

        inits, nodes = _unpack_nodes(helper, numpy_helper, TensorProto, name, codes, bits)
        extra.append((inits, nodes))
        return None, "uint8"
    if bits <= 4 and opset >= INT4_OPSET:
        from onnx import helper

        from ..quantizers.packing import pack_codes

        raw = pack_codes(np.ascontiguousarray(codes.reshape(-1)), 4).tobytes()
        return helper.make_tensor(name, TensorProto.UINT4, list(codes.shape), raw, raw=True), "uint4"
    return numpy_helper.from_array(np.ascontiguousarray(codes.astype(np.uint8)), name), "uint8"


def _zero_like(numpy_helper, TensorProto, name: str, values: np.ndarray, kind: str):
    if kind == "uint4":
        from onnx import helper

        from ..quantizers.packing import pack_codes

        flat = values.reshape(-1).astype(np.uint8)
        raw = pack_codes(flat, 4).tobytes() if flat.size else b""
        return helper.make_tensor(name, TensorProto.UINT4, list(values.shape), raw, raw=True)
    return numpy_helper.from_array(values.astype(np.uint8), name)


def _qdq(helper, numpy_helper, TensorProto, name: str, option: str, qw, shape, opset: int):
    """Initializers and nodes computing one quantized part ``[C, ...]`` as ``name``; or ``None`` (dequantize).

    Codes are stored as UINT4 (``bits <= 4``, opset 21+) or uint8; see the module docstring for each kind.
    """
    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    if fmt is None or fmt.onnx == "dequantized":
        return None
    codes = qw.codes.reshape(qw.codes.shape[0], -1).cpu().numpy().astype(np.uint8)
    rows = codes.shape[0]
    inits, nodes = [], []
    attrs: Dict[str, Any] = {}
    extra: List[Any] = []  # the in-graph unpacking of 1-3 bit codes, placed before the nodes that read them
    built = _qdq_kind(helper, numpy_helper, TensorProto, name, opt, fmt, qw, codes, rows, shape, opset, inits, nodes,
                      attrs, extra)
    if built is None:
        return None
    for i, n in extra:
        inits, nodes = i + inits, n + nodes
    return inits, nodes


def _qdq_kind(helper, numpy_helper, TensorProto, name, opt, fmt, qw, codes, rows, shape, opset, inits, nodes, attrs,
              extra):
    """:func:`_qdq`'s body per ``fmt.onnx`` kind; fills ``inits`` / ``nodes``, returns ``True`` or ``None``."""
    if fmt.onnx == "codebook_gather":
        # codes -> float (DequantizeLinear, scale 1) -> int64 -> + row * L (per-row books) -> Gather(book)
        levels = 2 ** opt.bits
        q, kind = _codes_tensor(numpy_helper, TensorProto, f"{name}__codes", codes, opt.bits, opset, extra)
        book = qw.params["codebook"].cpu().numpy().reshape(-1)
        inits += [q] if q is not None else []
        inits += [numpy_helper.from_array(np.asarray(1.0, np.float32), f"{name}__one"),
                  _zero_like(numpy_helper, TensorProto, f"{name}__zero_point", np.zeros((), np.uint8), kind),
                  numpy_helper.from_array(book, f"{name}__codebook")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}__codes", f"{name}__one", f"{name}__zero_point"],
                                      [f"{name}__qf"], name=f"{name}__DequantizeLinear"))
        nodes.append(helper.make_node("Cast", [f"{name}__qf"], [f"{name}__idx"], name=f"{name}__CastIdx",
                                      to=TensorProto.INT64))
        idx = f"{name}__idx"
        if book.size > levels:  # one book per row: offset every row's codes by row * levels
            inits += [numpy_helper.from_array(np.asarray(0, np.int64), f"{name}__r0"),
                      numpy_helper.from_array(np.asarray(rows * levels, np.int64), f"{name}__r1"),
                      numpy_helper.from_array(np.asarray(levels, np.int64), f"{name}__rstep"),
                      numpy_helper.from_array(np.asarray([-1, 1], np.int64), f"{name}__rshape")]
            nodes += [helper.make_node("Range", [f"{name}__r0", f"{name}__r1", f"{name}__rstep"], [f"{name}__off"],
                                       name=f"{name}__Range"),
                      helper.make_node("Reshape", [f"{name}__off", f"{name}__rshape"], [f"{name}__off2"],
                                       name=f"{name}__ReshapeOff"),
                      helper.make_node("Add", [idx, f"{name}__off2"], [f"{name}__idx2"], name=f"{name}__AddOff")]
            idx = f"{name}__idx2"
        nodes.append(helper.make_node("Cast", [f"{name}__codebook"], [f"{name}__book32"], name=f"{name}__CastBook",
                                      to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Gather", [f"{name}__book32", idx], [f"{name}__dq"], name=f"{name}__Gather", axis=0))
        nodes.append(_reshape(helper, numpy_helper, name, f"{name}__dq", shape, inits))
        return inits, nodes
    if fmt.onnx in ("qdq_affine", "qdq_affine_blocked", "affine_float_zero"):
        scale = qw.params["scale"].to(torch.float32).cpu().numpy()
        zero = qw.params["zero"].to(torch.float32).cpu().numpy()
        if fmt.onnx == "qdq_affine_blocked":
            scale = scale.reshape(rows, -1)
            zero = zero.reshape(rows, -1)
            attrs.update(axis=1, block_size=int(fmt.group))
        else:
            scale, zero = scale.reshape(-1), zero.reshape(-1)
            attrs["axis"] = 0
        integer = np.array_equal(zero, np.round(zero))
        if fmt.onnx == "affine_float_zero" or not integer:
            if fmt.onnx == "qdq_affine_blocked":
                return None
            # (q - z) * d with fp16 z, d: codes -> float (DequantizeLinear, scale 1) - z, * d (exact in float32)
            q, kind = _codes_tensor(numpy_helper, TensorProto, f"{name}__codes", codes, opt.bits, opset, extra)
            inits += [q] if q is not None else []
            inits += [numpy_helper.from_array(np.asarray(1.0, np.float32), f"{name}__one"),
                      _zero_like(numpy_helper, TensorProto, f"{name}__zero_point", np.zeros((), np.uint8), kind),
                      numpy_helper.from_array(qw.params["zero"].cpu().numpy().reshape(-1, 1), f"{name}__z16"),
                      numpy_helper.from_array(qw.params["scale"].cpu().numpy().reshape(-1, 1), f"{name}__d16")]
            nodes += [helper.make_node("DequantizeLinear", [f"{name}__codes", f"{name}__one", f"{name}__zero_point"],
                                       [f"{name}__qf"], name=f"{name}__DequantizeLinear"),
                      helper.make_node("Cast", [f"{name}__z16"], [f"{name}__z"], name=f"{name}__CastZ", to=TensorProto.FLOAT),
                      helper.make_node("Cast", [f"{name}__d16"], [f"{name}__d"], name=f"{name}__CastD", to=TensorProto.FLOAT),
                      helper.make_node("Sub", [f"{name}__qf", f"{name}__z"], [f"{name}__qz"], name=f"{name}__Sub"),
                      helper.make_node("Mul", [f"{name}__qz", f"{name}__d"], [f"{name}__dq"], name=f"{name}__Mul")]
            nodes.append(_reshape(helper, numpy_helper, name, f"{name}__dq", shape, inits))
            return inits, nodes
        if zero.min() >= 0 and zero.max() < 2 ** min(opt.bits, 8) and opt.bits <= 8:
            q, kind = _codes_tensor(numpy_helper, TensorProto, f"{name}__codes", codes, opt.bits, opset, extra)
            inits += [q] if q is not None else []
            inits += [numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}__scale"),
                      _zero_like(numpy_helper, TensorProto, f"{name}__zero_point", zero, kind)]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}__codes", f"{name}__scale", f"{name}__zero_point"],
                                          [f"{name}__dq"], name=f"{name}__DequantizeLinear", **attrs))
            nodes.append(_reshape(helper, numpy_helper, name, f"{name}__dq", shape, inits))
            return inits, nodes
        if zero.min() >= 0 and zero.max() <= 255:
            q, z = codes, zero.astype(np.uint8)
        elif opset >= 21 and zero.min() >= -32768 + 255 and zero.max() <= 32767:
            q, z = codes.astype(np.int16), zero.astype(np.int16)
        else:
            return None
    elif fmt.onnx == "qdq_symmetric":
        scale = qw.params["scale"].to(torch.float32).cpu().numpy().reshape(-1)
        q, z = codes, np.full(scale.shape, 128, np.uint8)
        if fmt.per_row:
            attrs["axis"] = 0
        else:
            scale, z = scale.reshape(()), z.reshape(())
    elif fmt.onnx == "qdq_fp8":
        scale = qw.params["scale"].to(torch.float32).cpu().numpy().reshape(())
        q = numpy_helper.from_array(codes, f"{name}__codes")
        q.data_type = TensorProto.FLOAT8E4M3FN
        inits.append(q)
        inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}__scale"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}__codes", f"{name}__scale"], [f"{name}__dq"],
                                      name=f"{name}__DequantizeLinear"))
        nodes.append(_reshape(helper, numpy_helper, name, f"{name}__dq", shape, inits))
        return inits, nodes
    else:  # pragma: no cover - the table only names the kinds above
        return None
    inits += [numpy_helper.from_array(q, f"{name}__codes"),
              numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}__scale"),
              numpy_helper.from_array(z, f"{name}__zero_point")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}__codes", f"{name}__scale", f"{name}__zero_point"],
                                  [f"{name}__dq"], name=f"{name}__DequantizeLinear", **attrs))
    nodes.append(_reshape(helper, numpy_helper, name, f"{name}__dq", shape, inits))
    return inits, nodes


def _compact(graph) -> None:
    """Bytes that are not tensors, out of the file: torch.onnx's per-node stack traces (~1.6 kB a node, more
    than a small model's codes), ``value_info``, our nodes' names; our ``__`` intermediate names become
    short ids and identical small constants one initializer."""
    del graph.value_info[:]
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        if "__" in node.name:
            node.name = ""
    rename: Dict[str, str] = {}
    canonical: Dict[Any, str] = {}
    keep = []
    for init in graph.initializer:
        if "__" not in init.name:
            keep.append(init)
            continue
        key = (init.data_type, tuple(init.dims), init.SerializeToString().replace(init.name.encode(), b""))
        if len(key[2]) <= 64 and key in canonical:
            rename[init.name] = canonical[key]
            continue
        short = f"q{len(rename) + len(canonical)}"
        if len(key[2]) <= 64:
            canonical[key] = short
        rename[init.name] = short
        init.name = short
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for out in node.output:
            if "__" in out and out not in rename:
                rename[out] = f"q{len(rename) + len(canonical)}"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]


def _reshape(helper, numpy_helper, name, src, shape, inits):
    inits.append(numpy_helper.from_array(np.asarray(shape, np.int64), f"{name}__shape"))
    return helper.make_node("Reshape", [src, f"{name}__shape"], [name], name=f"{name}__Reshape")


#: seeds of the example inputs whose activation ranges set a W8A8 export's static scales by default
W8A8_CALIBRATION_SEEDS = (0, 1, 2, 3)


def w8a8_eligible(mp) -> bool:
    """Whether a module's weight can be an int8 QDQ weight of onnxruntime's integer kernels: one part at a
    symmetric 8-bit option (``int8_c``, ``int8``)."""
    if len(mp.parts) != 1 or mp.parts[0].option == FP16 or mp.kind not in ("linear", "conv2d"):
        return False
    opt = QuantOption.parse(mp.parts[0].option)
    fmt = method_format(opt.method)
    return fmt is not None and fmt.onnx == "qdq_symmetric" and opt.bits == 8


def _u8_grid(lo: float, hi: float):
    """``(scale, zero_point)`` of an asymmetric uint8 grid covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    scale = float(np.float32(scale))
    zero = int(np.clip(np.round(-lo / scale), 0, 255))
    return scale, zero


def _fake_u8(x: torch.Tensor, grid) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` on a static uint8 grid (round half to even, as onnxruntime)."""
    scale, zero = grid
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


@torch.no_grad()
def observe_w8a8_ranges(den: nn.Module, paths, calibration_inputs) -> Dict[str, Dict[str, Any]]:
    """``{module: {"input": (lo, hi), "output": (lo, hi)}}``: min / max of each module's input and output
    over the calibration forwards (``den`` as it is: the caller applies the quantized weights)."""
    ranges: Dict[str, Dict[str, Any]] = {p: {} for p in paths}

    def widen(path, key, t):
        lo, hi = float(t.min()), float(t.max())
        old = ranges[path].get(key)
        ranges[path][key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    handles = []
    for path in paths:
        def hook(m, args, output, path=path):
            widen(path, "input", args[0])
            widen(path, "output", output)

        handles.append(den.get_submodule(path).register_forward_hook(hook))
    try:
        for kwargs in calibration_inputs:
            den(**dict(kwargs), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return ranges


def _static_fake_quant_hooks(den: nn.Module, grids: Mapping[str, Dict[str, Any]]):
    """Forward hooks that give ``den`` the W8A8 export's static activation quantization (inputs; conv outputs)."""
    handles = []
    for path, g in grids.items():
        mod = den.get_submodule(path)
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, g=g: (_fake_u8(args[0], g["input"]),) + tuple(args[1:])))
        if "output" in g:
            handles.append(mod.register_forward_hook(lambda m, args, out, g=g: _fake_u8(out, g["output"])))
    return handles


def _w8a8_rewrite(helper, numpy_helper, consumers, key: str, qw, option: str, weight_shape,
                  grids: Dict[str, Any], name: str, conv_bias) -> Optional[Dict[str, Any]]:
    """Nodes and initializers that put one layer on onnxruntime's QDQ integer pattern (module docstring),
    or ``None`` when its graph does not have the expected shape (the layer then stays weight-only QDQ).

    ``consumers``: ``{tensor: [nodes]}`` of the exported graph; ``grids``: ``{"input", "output"}`` uint8 grids
    ``(scale, zero_point)``;
    ``conv_bias``: the float bias initializer's array when the consumer is a conv with a bias.
    Returns ``{"inits", "weight_nodes", "before": {node_id: [nodes]}, "after": {node_id: [nodes]},
    "drop": [nodes], "kind"}``; the caller edits ``graph_nodes`` in place.
    """
    users = consumers.get(key, [])
    if len(users) != 1:
        return None
    node = users[0]
    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    codes = qw.codes.reshape(qw.codes.shape[0], -1).cpu().numpy().astype(np.int16) - 128
    scale = qw.params["scale"].to(torch.float32).cpu().numpy().reshape(-1)
    rows = codes.shape[0]
    if not fmt.per_row:
        scale = np.full(rows, float(scale.reshape(-1)[0]), np.float32)
    sx, zx = grids["input"]
    inits = [numpy_helper.from_array(np.asarray(sx, np.float32), f"{name}__sx"),
             numpy_helper.from_array(np.asarray(zx, np.uint8), f"{name}__zx"),
             numpy_helper.from_array(scale.astype(np.float32), f"{name}__sw")]
    out: Dict[str, Any] = {"inits": inits, "before": {}, "after": {}, "drop": [], "weight_nodes": []}
    if node.op_type == "Conv" and list(node.input).index(key) == 1 and len(weight_shape) == 4:
        q = codes.reshape(weight_shape).astype(np.int8)
        inits += [numpy_helper.from_array(q, f"{name}__wq"),
                  numpy_helper.from_array(np.zeros(rows, np.int8), f"{name}__zw")]
        out["weight_nodes"].append(helper.make_node("DequantizeLinear", [f"{name}__wq", f"{name}__sw", f"{name}__zw"],
                                                    [f"{name}__wd"], name=f"{name}__DQw", axis=0))
        x_in, y_out = node.input[0], node.output[0]
        sy, zy = grids["output"]
        inits += [numpy_helper.from_array(np.asarray(sy, np.float32), f"{name}__sy"),
                  numpy_helper.from_array(np.asarray(zy, np.uint8), f"{name}__zy")]
        out["before"][id(node)] = [
            helper.make_node("QuantizeLinear", [x_in, f"{name}__sx", f"{name}__zx"], [f"{name}__xq"], name=f"{name}__Qx"),
            helper.make_node("DequantizeLinear", [f"{name}__xq", f"{name}__sx", f"{name}__zx"], [f"{name}__xd"],
                             name=f"{name}__DQx")]
        node.input[0], node.input[1] = f"{name}__xd", f"{name}__wd"
        if len(node.input) > 2 and node.input[2] and conv_bias is not None:
            bias_scale = (np.float32(sx) * scale).astype(np.float32)
            bq = np.round(conv_bias.astype(np.float64) / np.where(bias_scale > 0, bias_scale, 1.0))
            inits += [numpy_helper.from_array(np.clip(bq, -2**31, 2**31 - 1).astype(np.int32), f"{name}__bq"),
                      numpy_helper.from_array(bias_scale, f"{name}__sb"),
                      numpy_helper.from_array(np.zeros(rows, np.int32), f"{name}__zb")]
            out["weight_nodes"].append(helper.make_node("DequantizeLinear", [f"{name}__bq", f"{name}__sb", f"{name}__zb"],
                                                        [f"{name}__bd"], name=f"{name}__DQb", axis=0))
            out["bias_input"] = node.input[2]
            node.input[2] = f"{name}__bd"
        node.output[0] = f"{name}__yc"
        out["after"][id(node)] = [
            helper.make_node("QuantizeLinear", [f"{name}__yc", f"{name}__sy", f"{name}__zy"], [f"{name}__yq"], name=f"{name}__Qy"),
            helper.make_node("DequantizeLinear", [f"{name}__yq", f"{name}__sy", f"{name}__zy"], [y_out], name=f"{name}__DQy")]
        out["kind"] = "conv"
        return out
    if node.op_type == "Transpose" and [list(a.ints) for a in node.attribute if a.name == "perm"] == [[1, 0]]:
        mms = consumers.get(node.output[0], [])
        if not mms or any(m.op_type != "MatMul" or list(m.input).index(node.output[0]) != 1 for m in mms):
            return None
        q = np.ascontiguousarray(codes.reshape(rows, -1).T).astype(np.int8)  # [K, N]
        inits += [numpy_helper.from_array(q, f"{name}__wq"),
                  numpy_helper.from_array(np.zeros(rows, np.int8), f"{name}__zw")]
        out["weight_nodes"].append(helper.make_node("DequantizeLinear", [f"{name}__wq", f"{name}__sw", f"{name}__zw"],
                                                    [f"{name}__wd"], name=f"{name}__DQw", axis=1))
        for j, mm in enumerate(mms):
            x_in = mm.input[0]
            out["before"][id(mm)] = [
                helper.make_node("QuantizeLinear", [x_in, f"{name}__sx", f"{name}__zx"], [f"{name}__xq{j}"],
                                 name=f"{name}__Qx{j}"),
                helper.make_node("DequantizeLinear", [f"{name}__xq{j}", f"{name}__sx", f"{name}__zx"], [f"{name}__xd{j}"],
                                 name=f"{name}__DQx{j}")]
            mm.input[0], mm.input[1] = f"{name}__xd{j}", f"{name}__wd"
        out["drop"].append(node)
        out["kind"] = "matmul"
        return out
    return None


def write_onnx(plan: ExportPlan, folder: Path, opset: int = 21, example_inputs: Optional[Mapping[str, Any]] = None,
               seed: int = 0, optimize: bool = False, calibration_inputs=None) -> Dict[str, Any]:
    """Export ``plan`` to ``folder/model.onnx`` and check it in onnxruntime (see the module docstring).

    ``optimize``: replace the file by onnxruntime's graph optimizations of it (``ORT_ENABLE_EXTENDED``:
    constant folding that keeps ``DequantizeLinear`` nodes, node fusions); recorded in ``optimized``.
    ``calibration_inputs``: keyword inputs of the denoiser whose activation ranges set a W8A8 export's
    static scales (default: :data:`W8A8_CALIBRATION_SEEDS` seeded example inputs).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..multiquantizer import apply, restore

    opset = check_opset(opset)
    den = plan.denoiser
    if example_inputs is None:
        from ..graph.inputs import example_inputs as zero_inputs

        example_inputs = random_inputs(zero_inputs(den, device="cpu", dtype=torch.float32), seed)
    flat = _Flat(den, example_inputs)
    args = tuple(flat.flat(example_inputs))
    names = _input_names(flat)
    raw = folder / "raw.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(flat.eval(), args, dynamo=True, opset_version=opset, optimize=False,
                                        input_names=names, output_names=["output"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
            raise SensitivityError(f"torch.onnx could not export {type(den).__name__}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        program.save(str(raw), external_data=True)
    model = onnx.load(str(raw), load_external_data=True)
    for f in folder.iterdir():
        f.unlink()
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: List[Any] = []
    summary = {"qdq": 0, "dequantized": 0, "w8a8": 0}
    graph_nodes = list(model.graph.node)
    consumers: Dict[str, List[Any]] = {}
    for node in graph_nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    grids: Dict[str, Dict[str, Any]] = {}
    calibration_note = None
    if plan.meta.get("act_bits") == 8:
        targets = [mp.module_path for mp in plan.modules if w8a8_eligible(mp) and not mp.tied]
        if targets:
            if calibration_inputs is None:
                from ..graph.inputs import example_inputs as zero_inputs

                zeros = zero_inputs(den, device="cpu", dtype=torch.float32)
                calibration_inputs = [random_inputs(zeros, s) for s in W8A8_CALIBRATION_SEEDS]
                calibration_note = {"seeded_example_inputs": list(W8A8_CALIBRATION_SEEDS)}
            else:
                calibration_inputs = list(calibration_inputs)
                calibration_note = {"given_inputs": len(calibration_inputs)}
            apply(den, plan.mq, {k: v for k, v in plan.options.items() if v != FP16})
            try:
                ranges = observe_w8a8_ranges(den, targets, calibration_inputs)
            finally:
                restore(den)
            grids = {p: {"input": _u8_grid(*r["input"]), "output": _u8_grid(*r["output"])}
                     for p, r in ranges.items() if "input" in r and "output" in r}
    before: Dict[int, List[Any]] = {}
    after: Dict[int, List[Any]] = {}
    drop: set = set()
    used_grids: Dict[str, Dict[str, Any]] = {}
    for mp in plan.modules:
        weight = den.get_submodule(mp.module_path).weight.detach().to(torch.float32)
        first = None
        for path in [mp.module_path] + list(mp.tied):
            key = f"{_PREFIX}{path}.weight"
            if key not in inits and path in mp.tied:
                continue  # a truly shared parameter: one initializer, replaced under the first path
            if key not in inits:
                raise SensitivityError(f"torch.onnx did not keep weight {path + '.weight'!r} as an initializer")
            model.graph.initializer.remove(inits.pop(key))
            if first is not None:  # a tied copy (equal weights, own parameter): the first copy's codes, once
                new_nodes.append(helper.make_node("Identity", [first], [key], name=f"{key}__Tied"))
                continue
            first = key
            if mp.module_path in grids:
                part = mp.parts[0]
                users = consumers.get(key, [])
                bias = None
                if len(users) == 1 and users[0].op_type == "Conv" and len(users[0].input) > 2 \
                        and users[0].input[2] in inits:
                    bias = numpy_helper.to_array(inits[users[0].input[2]])
                rw = _w8a8_rewrite(helper, numpy_helper, consumers, key, plan.quantized_weight(part.name), part.option,
                                   tuple(mp.weight_shape), grids[mp.module_path], key, bias)
                if rw is not None:
                    model.graph.initializer.extend(rw["inits"])
                    new_nodes.extend(rw["weight_nodes"])
                    before.update(rw["before"])
                    after.update(rw["after"])
                    drop.update(id(n) for n in rw["drop"])
                    if "bias_input" in rw and len(consumers.get(rw["bias_input"], [])) == 1:
                        model.graph.initializer.remove(inits.pop(rw["bias_input"]))
                    g = grids[mp.module_path]
                    used_grids[mp.module_path] = g if rw["kind"] == "conv" else {"input": g["input"]}
                    summary["w8a8"] += 1
                    continue
            part_outputs = []
            for k, part in enumerate(mp.parts):
                out_name = key if len(mp.parts) == 1 else f"{key}__part{k}"
                if part.option == FP16:
                    a, b = part.in_slice
                    model.graph.initializer.append(numpy_helper.from_array(weight[:, a:b].contiguous().numpy(), out_name))
                else:
                    qw = plan.quantized_weight(part.name)
                    built = _qdq(helper, numpy_helper, TensorProto, out_name, part.option, qw, part.shape, opset)
                    if built is None:
                        values = plan.mq.dequantize(part.name, part.option).reshape(part.shape)
                        model.graph.initializer.append(numpy_helper.from_array(values.contiguous().numpy(), out_name))
                        summary["dequantized"] += 1
                    else:
                        model.graph.initializer.extend(built[0])
                        new_nodes.extend(built[1])
                        summary["qdq"] += 1
                part_outputs.append(out_name)
            if len(part_outputs) > 1:
                new_nodes.append(helper.make_node("Concat", part_outputs, [key], name=f"{key}__Concat", axis=1))
    nodes = []
    for node in graph_nodes:
        if id(node) not in drop:
            nodes += before.get(id(node), []) + [node] + after.get(id(node), [])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)
    _compact(model.graph)
    path = folder / ONNX_FILE
    size = sum(i.ByteSize() for i in model.graph.initializer)
    if size > _EXTERNAL_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ONNX_FILE + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    written_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    del model
    optimized = None
    if optimize:
        optimized = optimize_onnx(path)

    # check in onnxruntime against PyTorch's fake-quantized output
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, args)}
    got = run_onnx(path, feeds, w8a8=bool(used_grids))
    apply(den, plan.mq, {k: v for k, v in plan.options.items() if v != FP16})
    hooks = []
    try:
        with torch.no_grad():
            weight_only = flat(*args).detach().to(torch.float32).cpu().numpy()
            hooks = _static_fake_quant_hooks(den, used_grids)
            want = flat(*args).detach().to(torch.float32).cpu().numpy() if hooks else weight_only
    finally:
        for h in hooks:
            h.remove()
        restore(den)
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    w8a8 = None
    if used_grids:
        w8a8 = {"layers": summary["w8a8"], "calibration": calibration_note, "session_fold_weights": False,
                "session_disabled_optimizers": list(W8A8_DISABLED_OPTIMIZERS),
                "conv_layers": sum(1 for g in used_grids.values() if "output" in g),
                "max_abs_diff_vs_weight_only": float(np.abs(got.astype(np.float64) - weight_only.astype(np.float64)).max()),
                "grids": {p: {k: [float(v[0]), int(v[1])] for k, v in g.items()} for p, g in sorted(used_grids.items())}}
    record = dict(plan.meta)
    record.update({
        "opset": int(written_opset),
        "optimized": optimized,
        "layers_qdq": summary["qdq"],
        "layers_dequantized": summary["dequantized"],
        "layers_w8a8": summary["w8a8"],
        "w8a8": w8a8,
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                   for n, t in zip(names, args)],
        "onnx_check": {"max_abs_diff": diff, "torch_abs_max": float(np.abs(want).max()), "seed": seed,
                       "onnxruntime": _ort_version()},
    })
    den.save_config(str(folder))
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record



def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def optimize_onnx(path: Path) -> Dict[str, Any]:
    """Rewrite ``path`` with onnxruntime's extended graph optimizations applied; returns ``{level, bytes before/after}``."""
    import onnxruntime as ort

    from ..io import atomic_path

    before = path.stat().st_size
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with atomic_path(path, "optimized ONNX model") as tmp:  # onnxruntime writes it; renamed over the original
        opts.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise SensitivityError(f"onnxruntime could not optimize {path.name}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
    return {"level": "extended", "bytes_before": before, "bytes_after": path.stat().st_size}


def session_options(fold_weights: bool = True, threads: Optional[int] = None):
    """onnxruntime session options for an export.

    ``fold_weights``: let onnxruntime's constant folding evaluate the weights' ``DequantizeLinear`` /
    ``Gather`` / unpacking subgraphs once, at session creation (``session.disable_quant_qdq = 1``): the
    file stays small, the session holds float32 weights and runs float kernels. Without it onnxruntime
    keeps every ``DequantizeLinear`` for its QDQ fusions, and the ones it does not fuse (behind the
    ``Reshape`` to the weight's shape) run on every call.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if fold_weights:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


#: onnxruntime graph transformers turned off for a W8A8 file: ``MatMulAddFusion`` rewrites a QDQ ``MatMul`` and
#: its bias ``Add`` into a float ``Gemm`` before the QDQ fusion sees them (a third of SD1.5's linear layers)
W8A8_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def inference_session(path: os.PathLike, fold_weights: bool = True, threads: Optional[int] = None,
                      w8a8: bool = False):
    """An onnxruntime CPU session for an exported ``model.onnx`` (:func:`session_options`); ``w8a8``: a W8A8
    export's session (QDQ kept for the integer kernels, :data:`W8A8_DISABLED_OPTIMIZERS` off)."""
    import onnxruntime as ort

    opts = session_options(fold_weights=fold_weights and not w8a8, threads=threads)
    extra = {"disabled_optimizers": list(W8A8_DISABLED_OPTIMIZERS)} if w8a8 else {}
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], **extra)


def run_onnx(path: os.PathLike, feeds: Mapping[str, np.ndarray], fold_weights: bool = True,
             w8a8: bool = False) -> np.ndarray:
    """Run an exported ``model.onnx`` in onnxruntime on CPU; returns the first output (float32)."""
    try:
        sess = inference_session(path, fold_weights, w8a8=w8a8)
        return sess.run(None, dict(feeds))[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types; one line for the user
        msg = " ".join(str(exc).split())[:300]
        raise SensitivityError(f"onnxruntime cannot run the exported denoiser ({msg}); this model's ONNX export "
                               "is not supported yet (known: PixArt's Squeeze on a symbolic dimension)") from None
