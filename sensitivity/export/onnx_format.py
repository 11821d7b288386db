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


def write_onnx(plan: ExportPlan, folder: Path, opset: int = 21, example_inputs: Optional[Mapping[str, Any]] = None,
               seed: int = 0, optimize: bool = False) -> Dict[str, Any]:
    """Export ``plan`` to ``folder/model.onnx`` and check it in onnxruntime (see the module docstring).

    ``optimize``: replace the file by onnxruntime's graph optimizations of it (``ORT_ENABLE_EXTENDED``:
    constant folding that keeps ``DequantizeLinear`` nodes, node fusions); recorded in ``optimized``.
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
    summary = {"qdq": 0, "dequantized": 0}
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
    nodes = list(model.graph.node)
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
    got = run_onnx(path, feeds)
    apply(den, plan.mq, {k: v for k, v in plan.options.items() if v != FP16})
    try:
        with torch.no_grad():
            want = flat(*args).detach().to(torch.float32).cpu().numpy()
    finally:
        restore(den)
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    record = dict(plan.meta)
    record.update({
        "opset": int(written_opset),
        "optimized": optimized,
        "layers_qdq": summary["qdq"],
        "layers_dequantized": summary["dequantized"],
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


def run_onnx(path: os.PathLike, feeds: Mapping[str, np.ndarray], fold_weights: bool = True) -> np.ndarray:
    """Run an exported ``model.onnx`` in onnxruntime on CPU; returns the first output (float32)."""
    import onnxruntime as ort

    opts = session_options(fold_weights)
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, dict(feeds))[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types; one line for the user
        msg = " ".join(str(exc).split())[:300]
        raise SensitivityError(f"onnxruntime cannot run the exported denoiser ({msg}); this model's ONNX export "
                               "is not supported yet (known: PixArt's Squeeze on a symbolic dimension)") from None
