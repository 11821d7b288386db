"""``packed``: our own low-bit format (no GPL dependency), reloaded into the diffusers model class.

A folder of three files::

    config.json                the denoiser's diffusers config (``save_config``)
    model.safetensors          per quantized layer ``q/<layer>/codes`` (bit-packed uint8, see
                               sensitivity.quantizers.packing) and ``q/<layer>/<param>`` (the method's
                               fp16 tables as stored in the multiquantizer); ``q/<layer>/weight`` for an
                               unquantized half of a split layer; every other tensor of the state dict
                               under its own name (float ones in ``float_dtype``)
    sensitivity_export.json    model class / id, family and weights, multiquantizer hash, config hash,
                               options, average bits, per module its parts, a blake2b digest per tensor

:func:`load_packed` builds the model class from ``config.json`` on the meta device (no memory), puts a
:mod:`~sensitivity.export.modules` packed module in every quantized module's place, assigns the other
tensors, and checks that nothing is missing, extra, corrupt or left on the meta device. Quantized
weights are dequantized on the fly (``materialize=True``: once, at load).

The weights file is read with plain file reads into fresh tensors (:class:`FileTensors`), not through
safetensors' memory map: a tensor read from a map stays resident as a mapped page beside its copy until the
map closes, so every byte counted twice at the load's peak (``benchmarks/bench_export.py``, SD1.5 size, a
4.2-bit export with the recorded policy: peak RSS at load 1,670 MiB through the map at commit 0235e68, 1,263 MiB
with plain reads at 26a7236; the fp32 model's whole forward peaks at about 4,150 MiB).
The header is parsed with :mod:`safetensors`' own format (8-byte length, JSON, data offsets).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import CorruptFileError, SensitivityError
from ..options import FP16, QuantOption
from ..quantizers.packing import pack_codes
from .modules import PartSpec, materialize, pack_module
from .methods import EXPORT_FILE
from .plan import ExportPlan, config_digest, digest

WEIGHTS_FILE = "model.safetensors"


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class FileTensors:
    """The tensors of a safetensors file read by plain reads into fresh (aligned) tensors, one at a time.

    ``keys()`` / ``get_tensor(key)`` as :func:`safetensors.safe_open`; raises ``ValueError`` / ``OSError`` for a
    file that is not safetensors or is cut short (the caller names the file).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            raw = self._fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(self._fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except BaseException:
            self._fh.close()
            raise
        header.pop("__metadata__", None)
        self._header = header
        self._base = 8 + n

    def keys(self):
        return self._header.keys()

    def get_tensor(self, key: str, pad: int = 0) -> torch.Tensor:
        """The tensor ``key``; ``pad``: allocate this many zero elements after it (a 1-D tensor's storage
        then has room for :func:`~sensitivity.export.kernels.pad_packed` without a copy)."""
        info = self._header[key]
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {key!r} has dtype {info.get('dtype')!r}")
        start, end = (int(v) for v in info["data_offsets"])
        shape = [int(s) for s in info["shape"]]
        if pad:
            n = math.prod(shape)
            full = torch.empty(n + pad, dtype=dtype)
            full[n:].zero_()
            t = full[:n].view(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        size = t.numel() * t.element_size()
        if end - start != size:
            raise ValueError(f"tensor {key!r}: {end - start} bytes for shape {info['shape']}")
        if size:
            self._fh.seek(self._base + start)
            if self._fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != size:
                raise ValueError(f"tensor {key!r} is cut short")
        return t

    def close(self) -> None:
        self._fh.close()


def _float(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    t = t.detach().cpu()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def runtime_record(plan: ExportPlan, example_inputs=None, cache_budget: Optional[int] = None) -> Dict[str, Any]:
    """The automatic run-time policy of ``plan`` (:mod:`.runtime`): kernels per module and what chose them.

    ``example_inputs``: the denoiser's call (default: zero inputs of its native size), run once to count
    each module's input positions; ``cache_budget``: bytes of cached float weights (default:
    :func:`~.runtime.default_cache_budget`).
    """
    from .runtime import choose_kernels, count_positions, default_cache_budget

    if cache_budget is None:
        cache_budget = default_cache_budget(plan.meta["quantized_bytes"])
    paths = [mp.module_path for mp in plan.modules]
    positions: Optional[Dict[str, int]] = None
    try:
        if example_inputs is None:
            from ..graph.inputs import example_inputs as zero_inputs

            example_inputs = zero_inputs(plan.denoiser, device="cpu", dtype=torch.float32)
        positions = count_positions(plan.denoiser, paths, example_inputs)
    except Exception:  # noqa: BLE001 - a model we cannot call here: rank by size alone
        positions = None
    modules = [{"module": mp.module_path, "kind": mp.kind, "weight_shape": mp.weight_shape, "parts": mp.parts}
               for mp in plan.modules]
    act_bits = plan.meta.get("act_bits")
    return {"policy": "auto", "cache_budget_bytes": int(cache_budget), "act_bits": act_bits,
            "positions": positions, "kernels": choose_kernels(modules, cache_budget, act_bits, positions)}


def write_packed(plan: ExportPlan, folder: Path, float_dtype: Optional[torch.dtype] = None,
                 example_inputs=None, cache_budget: Optional[int] = None) -> Dict[str, Any]:
    """Write ``plan`` into ``folder`` (an empty temporary folder); returns the export record.

    ``example_inputs`` / ``cache_budget``: see :func:`runtime_record`.
    """
    from safetensors.torch import save_file

    den = plan.denoiser
    tensors: Dict[str, torch.Tensor] = {}
    quantized_paths = set()
    modules = []
    for mp in plan.modules:
        quantized_paths.add(mp.module_path)
        quantized_paths.update(mp.tied)
        weight = den.get_submodule(mp.module_path).weight
        parts = []
        for part in mp.parts:
            prefix = f"q/{part.name}/"
            if part.option == FP16:
                a, b = part.in_slice
                tensors[prefix + "weight"] = _float(weight[:, a:b], float_dtype)
            else:
                qw = plan.quantized_weight(part.name)
                bits = QuantOption.parse(part.option).bits
                tensors[prefix + "codes"] = torch.from_numpy(pack_codes(qw.codes.reshape(-1).cpu().numpy(), bits))
                for p in part.params:
                    tensors[prefix + p] = qw.params[p].detach().cpu().contiguous()
            parts.append({"name": part.name, "shape": list(part.shape), "option": part.option,
                          "in_slice": list(part.in_slice) if part.in_slice else None, "params": list(part.params)})
        modules.append({"module": mp.module_path, "kind": mp.kind, "weight_shape": list(mp.weight_shape),
                        "tied": list(mp.tied), "parts": parts})
    shared = set()
    for key, value in den.state_dict().items():
        module_path, _, leaf = key.rpartition(".")
        if leaf == "weight" and module_path in quantized_paths:
            continue
        t = _float(value, float_dtype)
        if t.data_ptr() in shared:  # a tied tensor (T5's shared / embed_tokens): safetensors stores copies
            t = t.clone()
        shared.add(t.data_ptr())
        tensors[key] = t
    record = dict(plan.meta)
    stored_dtype = float_dtype or den.dtype
    record.update({
        "float_dtype": str(stored_dtype).replace("torch.", ""),
        "modules": modules,
        "runtime": runtime_record(plan, example_inputs, cache_budget),
        "tensors": {k: digest(v) for k, v in tensors.items()},
    })
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "sensitivity.packed"})
    if hasattr(den, "save_config"):  # diffusers
        den.save_config(str(folder))
    else:  # a transformers model (a pipeline's text encoder): its config.json names the class in `architectures`
        import copy

        config = copy.deepcopy(den.config)
        config.architectures = [type(den).__name__]
        config.save_pretrained(str(folder))
        record["library"] = "transformers"
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record



def read_record(folder: Path) -> Dict[str, Any]:
    """The ``sensitivity_export.json`` of an export folder (one-line errors for a missing or bad file)."""
    path = Path(folder) / EXPORT_FILE
    if not Path(folder).is_dir():
        raise SensitivityError(f"{str(folder)!r} is not a folder (expected a `sensitivity export` output)")
    if not path.is_file():
        raise SensitivityError(f"{folder}: no {EXPORT_FILE}; not a `sensitivity export` folder")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or "export_format" not in record:
        raise CorruptFileError(f"{path}: not a sensitivity export record")
    return record


def model_class(record: Dict[str, Any], folder: Path, expect: Optional[str] = None):
    """The diffusers (or transformers) class named by ``config.json``; checks it against the record and ``expect``."""
    import importlib

    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CorruptFileError(f"{folder}: config.json is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{cfg_path}: not valid JSON ({exc})") from None
    if "config_digest" in record and config_digest(config) != record["config_digest"]:
        raise CorruptFileError(f"{cfg_path}: modified since the export (its digest differs from {EXPORT_FILE}'s); "
                               "export again")
    transformers_model = record.get("library") == "transformers"
    name = (config.get("architectures") or [None])[0] if transformers_model else config.get("_class_name")
    if name != record.get("model_class"):
        raise CorruptFileError(f"{cfg_path}: class {name!r} differs from the export's {record.get('model_class')!r}")
    if expect is not None and name != expect:
        raise SensitivityError(f"{folder} holds a {name}, not a {expect} (exported from {record.get('model_id')})")
    library = importlib.import_module("transformers" if transformers_model else "diffusers")
    cls = getattr(library, str(name), None)
    if cls is None:
        raise SensitivityError(f"{cfg_path}: {library.__name__} {library.__version__} has no model class {name!r}")
    return cls, (cls.config_class.from_pretrained(str(folder)) if transformers_model else config)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def load_kernels(record: Dict[str, Any], runtime: Optional[str] = None, cache_budget: Optional[int] = None,
                 act_bits: Optional[int] = None) -> Tuple[Dict[str, str], Optional[int]]:
    """``({module: kernel}, act_bits)`` for a load: ``runtime=None`` the recorded choice, ``"auto"`` the
    automatic policy again (with ``cache_budget``), or one of :data:`~.runtime.KERNELS` for every module."""
    from .runtime import KERNELS, choose_kernels, default_cache_budget

    rec = record.get("runtime") or {}
    act = act_bits if act_bits is not None else rec.get("act_bits")
    if runtime is not None and runtime != "auto" and runtime not in KERNELS:
        raise SensitivityError(f"unknown run-time policy {runtime!r}; use auto or one of {', '.join(KERNELS)}")
    if act is not None and int(act) != 8 and runtime == "int8_dynamic":
        raise SensitivityError(f"run-time kernel int8_dynamic needs 8-bit activations, not {act}")
    names = [m["module"] for m in record["modules"]]
    if runtime is None and rec.get("kernels") and cache_budget is None and act == rec.get("act_bits"):
        return dict(rec["kernels"]), act
    if runtime in KERNELS:
        return {n: runtime for n in names}, act
    budget = cache_budget if cache_budget is not None else rec.get(
        "cache_budget_bytes", default_cache_budget(record.get("quantized_bytes", 0)))
    modules = [{"module": m["module"], "kind": m["kind"], "weight_shape": m["weight_shape"],
                "parts": _parts(m)} for m in record["modules"]]
    return choose_kernels(modules, budget, act, rec.get("positions")), act


def _parts(m: Dict[str, Any]):
    return [PartSpec(p["name"], tuple(p["shape"]), tuple(p["in_slice"]) if p["in_slice"] else None,
                     p["option"], tuple(p["params"])) for p in m["parts"]]


def load_packed(folder: Path, record: Dict[str, Any], device="cpu", dtype: Optional[torch.dtype] = None,
                materialize_weights: bool = False, expect_class: Optional[str] = None, verify: bool = True,
                runtime: Optional[str] = None, cache_budget: Optional[int] = None,
                act_bits: Optional[int] = None) -> nn.Module:
    """See the module docstring. ``dtype``: the compute dtype (default: the stored float dtype);
    ``runtime`` / ``cache_budget`` / ``act_bits``: see :func:`load_kernels`."""
    from accelerate import init_empty_weights

    from .kernels import PAD

    cls, config = model_class(record, folder, expect_class)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CorruptFileError(f"{folder}: {WEIGHTS_FILE} is missing")
    stored = getattr(torch, record.get("float_dtype", "float32"))
    dtype = dtype or stored
    with init_empty_weights():
        model = cls(config) if record.get("library") == "transformers" else cls.from_config(config)
    digests: Dict[str, str] = record.get("tensors", {})
    try:
        fh = FileTensors(path)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    keys = set(fh.keys())

    def get(key: str, pad: int = 0) -> torch.Tensor:
        if key not in keys:
            raise CorruptFileError(f"{path}: tensor {key!r} is missing")
        try:
            # a fresh (64-byte aligned) tensor: BLAS can round differently on unaligned inputs
            t = fh.get_tensor(key, pad=pad)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{path}: tensor {key!r} cannot be read ({exc})") from None
        if verify and digests.get(key) != digest(t):
            raise CorruptFileError(f"{path}: tensor {key!r} was modified or damaged (digest mismatch)")
        return t

    try:
        for key in digests:
            if key not in keys:
                raise CorruptFileError(f"{path}: tensor {key!r} is missing")
        quantized_weights = set()
        kernels, act = load_kernels(record, runtime, cache_budget, act_bits)
        for m in record["modules"]:
            parts = _parts(m)
            tensors = []
            for part in parts:
                prefix = f"q/{part.name}/"
                if part.option == FP16:
                    tensors.append({"weight": get(prefix + "weight").to(dtype)})
                else:
                    tensors.append({"codes": get(prefix + "codes", pad=PAD), **{p: get(prefix + p) for p in part.params}})
            for module_path in [m["module"]] + list(m["tied"]):
                try:
                    old = model.get_submodule(module_path)
                except AttributeError:
                    raise SensitivityError(f"{folder}: the {cls.__name__} built from config.json has no module "
                                           f"{module_path!r}") from None
                if tuple(old.weight.shape) != tuple(m["weight_shape"]):
                    raise CorruptFileError(f"{folder}: module {module_path!r} has weight shape {tuple(old.weight.shape)} "
                                           f"in config.json, {tuple(m['weight_shape'])} in the export")
                new = pack_module(old, parts, tensors, dtype, runtime=kernels.get(m["module"], "on_the_fly"), act_bits=act)
                _set_module(model, module_path, new)
                if module_path == m["module"]:
                    kernels[module_path] = new._runtime  # what it runs (an int8 conv whose codes do not fit falls back)
                quantized_weights.add(module_path + ".weight")
        plain = {}
        for key in digests:
            if key.startswith("q/"):
                continue
            t = get(key)
            plain[key] = t.to(dtype) if t.is_floating_point() else t
        result = model.load_state_dict(plain, strict=False, assign=True)
        missing = [k for k in result.missing_keys if k not in quantized_weights]
        if result.unexpected_keys:
            raise SensitivityError(f"{path}: tensor {result.unexpected_keys[0]!r} does not belong to a {cls.__name__}")
        if missing:
            raise CorruptFileError(f"{path}: tensor {missing[0]!r} is missing")
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta:
                raise CorruptFileError(f"{path}: tensor {name!r} is missing")
            leaf = name.rpartition(".")[2]
            if t.is_floating_point() and t.dtype != dtype and not leaf.startswith(("part", "int8_", "runtime_")):
                t.data = t.data.to(dtype)
        model = model.to(torch.device(device)).eval()
        if materialize_weights:
            materialize(model)
        model.__dict__["sensitivity_export"] = {k: v for k, v in record.items() if k not in ("tensors", "options")}
        model.__dict__["sensitivity_export"]["runtime_kernels"] = kernels
        return model
    finally:
        fh.close()


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (packed codes count as stored)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    convs = {id(c): c for c in (m.__dict__.get("_int8_conv") for m in model.modules()) if c is not None}
    return total + sum(c.nbytes for c in convs.values())


__all__ = ["write_packed", "load_packed", "read_record", "packed_nbytes", "WEIGHTS_FILE"]
