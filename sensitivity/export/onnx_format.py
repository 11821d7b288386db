"""``onnx``: the denoiser exported with ``torch.onnx`` (dynamo exporter), quantized layers as QDQ.

The full-precision denoiser is exported once (no graph optimisation, so every weight stays an
initializer named by its parameter path, ``denoiser.<module>.weight``); then each quantized weight
initializer is replaced, per :mod:`sensitivity.export.methods`:

* uniform options (``uaq``, ``uaq_ls``, ``int8``, ``int8_c``, ``fp8_e4m3``, ``uaq_g<N>``): the codes
  as an integer (or float8) initializer ``[C, K]`` followed by ``DequantizeLinear`` with the stored
  scales and zero points (per row: ``axis=0``; per group: ``block_size=N``, opset 21), reshaped to the
  weight's shape. onnxruntime computes ``(q - z) * Δ`` in float32, as our table does, so the values
  are the multiquantizer's exactly. Zero points outside uint8 use int16 codes (opset 21).
* k-means options (``kmeans_c``, ``kmeans_a``): a float32 initializer of the dequantized weight. ONNX
  has no lookup-table DequantizeLinear; the file then holds the float weight, not the codes.
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
from .methods import EXPORT_FORMATS, method_format
from .plan import EXPORT_FILE, ExportPlan

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


def _qdq(helper, numpy_helper, TensorProto, name: str, option: str, qw, shape, opset: int):
    """Initializers and nodes computing one quantized part ``[C, ...]`` as ``name``; or ``None`` (dequantize)."""
    opt = QuantOption.parse(option)
    fmt = method_format(opt.method)
    if fmt is None or fmt.onnx == "dequantized":
        return None
    codes = qw.codes.reshape(qw.codes.shape[0], -1).cpu().numpy().astype(np.uint8)
    inits, nodes = [], []
    attrs: Dict[str, Any] = {}
    if fmt.onnx in ("qdq_affine", "qdq_affine_blocked"):
        scale = qw.params["scale"].to(torch.float32).cpu().numpy()
        zero = qw.params["zero"].to(torch.float32).cpu().numpy()
        if fmt.onnx == "qdq_affine":
            scale, zero = scale.reshape(-1), zero.reshape(-1)
            attrs["axis"] = 0
        else:
            scale = scale.reshape(codes.shape[0], -1)
            zero = zero.reshape(codes.shape[0], -1)
            attrs.update(axis=1, block_size=int(fmt.group))
        if not np.array_equal(zero, np.round(zero)):
            return None  # e.g. uaq_ls: refit zero points are not integers -> dequantized initializer
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


def _reshape(helper, numpy_helper, name, src, shape, inits):
    inits.append(numpy_helper.from_array(np.asarray(shape, np.int64), f"{name}__shape"))
    return helper.make_node("Reshape", [src, f"{name}__shape"], [name], name=f"{name}__Reshape")


def write_onnx(plan: ExportPlan, folder: Path, opset: int = 21, example_inputs: Optional[Mapping[str, Any]] = None,
               seed: int = 0) -> Dict[str, Any]:
    """Export ``plan`` to ``folder/model.onnx`` and check it in onnxruntime (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..multiquantizer import apply, restore

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
        for path in [mp.module_path] + list(mp.tied):
            key = f"{_PREFIX}{path}.weight"
            if key not in inits and path in mp.tied:
                continue  # a truly shared parameter: one initializer, replaced under the first path
            if key not in inits:
                raise SensitivityError(f"torch.onnx did not keep weight {path + '.weight'!r} as an initializer")
            model.graph.initializer.remove(inits.pop(key))
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
    path = folder / ONNX_FILE
    size = sum(i.ByteSize() for i in model.graph.initializer)
    if size > _EXTERNAL_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ONNX_FILE + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    del model

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
        "opset": opset,
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


EXPORT_FORMATS.register("onnx", lambda plan, folder, opset=21, example_inputs=None, **_:
                        write_onnx(plan, folder, opset=opset, example_inputs=example_inputs))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def run_onnx(path: os.PathLike, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run an exported ``model.onnx`` in onnxruntime on CPU; returns the first output (float32)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, dict(feeds))[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types; one line for the user
        msg = " ".join(str(exc).split())[:300]
        raise SensitivityError(f"onnxruntime cannot run the exported denoiser ({msg}); this model's ONNX export "
                               "is not supported yet (known: PixArt's Squeeze on a symbolic dimension)") from None
