"""Measure the cost table: forward time and run-time bytes of every option of every layer, on this device.

:func:`measure_costs` runs the denoiser once on its example inputs (:func:`sensitivity.graph.inputs.
example_inputs`) with forward pre-hooks that record each weight module's input shape and calls per
forward, then times, module by module, the run-time module of every option (:func:`runtime_module`:
today the packed module of :mod:`sensitivity.export.modules`, which dequantizes on the fly) and the plain
float module, on a seeded random input of the recorded shape: ``warmup`` calls, then ``repeats``
timings of a loop long enough to last ``min_seconds``; the median per call is kept. The run-time bytes
are the weight bytes the module holds (:func:`held_weight_bytes`: packed codes and tables today; the
float weight for ``fp16``).

A module split into ``#main`` / ``#skip`` halves runs as one matmul; its cost is split additively: with
``t_fp`` the float module's time, ``f_p`` the part's share of the weights and ``t_p(o)`` the module with
part ``p`` at option ``o`` and the other parts in float, part ``p`` costs ``f_p·t_fp`` in float and
``t_p(o) - (1 - f_p)·t_fp`` at ``o`` (clipped at 0); for an unsplit module these are its own times.

The table is saved after every module (atomically) to :func:`sensitivity.costs.cost_file` beside the
multiquantizer, keyed by device, torch version, multiquantizer hash, dtype, batch, threads and the
run-time module version (:data:`RUNTIME`); a rerun with the same key resumes, ``remeasure=True`` starts over.
The seconds of ``sum(range(10**7))`` and the load average (the calibrator) are recorded with it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from .. import __version__
from ..costs import FORMAT, CostTable, cost_file, measuring_key
from ..errors import SensitivityError
from ..io import atomic_write_text
from ..options import FP16, QuantOption
from ..threads import using_threads
from ..quantizers.packing import pack_codes
from .modules import PartSpec, pack_module

# the run-time module each option is timed with; part of the measuring key, so a new module re-measures
# (/3: the vectorized dequantize kernel, 2-5x faster per weight)
RUNTIME = "sensitivity.export.modules.pack_module/3 (runtime='on_the_fly')"


def device_name(device: torch.device) -> str:
    """``cuda:<GPU name>`` or ``cpu:<processor model>``: what the key calls this machine's device."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{device.type}:{model}"


def calibrator() -> Dict[str, float]:
    """Seconds of ``sum(range(10**7))`` and the 1-minute load average, recorded beside every timing."""
    t0 = time.perf_counter()
    sum(range(10**7))
    return {"sum_range_1e7_s": round(time.perf_counter() - t0, 4), "loadavg_1m": round(os.getloadavg()[0], 2)}


def runtime_module(module: nn.Module, parts: List[PartSpec], tensors: List[Dict[str, torch.Tensor]],
                   dtype: torch.dtype) -> nn.Module:
    """The module an export runs for ``module`` with ``parts`` (what :data:`RUNTIME` names)."""
    return pack_module(module, parts, tensors, dtype, runtime="on_the_fly")


def held_weight_bytes(module: nn.Module) -> int:
    """Bytes of the tensors ``module`` holds for its weight: every parameter and buffer but the bias
    (whatever form the run-time module keeps: packed codes and tables, int8 weights, a dequantized cache)."""
    seen, total = set(), 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name.rpartition(".")[2] == "bias" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return int(total)


def _part_tensors(mq, spec, option: str, weight: torch.Tensor, device) -> Dict[str, torch.Tensor]:
    if option == FP16:
        w = weight if spec.in_slice is None else weight[:, spec.in_slice[0]:spec.in_slice[1]]
        return {"weight": w.detach().clone()}
    qw = mq.quantized_weight(spec.name, option)
    bits = QuantOption.parse(option).bits
    out = {"codes": torch.from_numpy(pack_codes(qw.codes.reshape(-1).cpu().numpy(), bits)).to(device)}
    out.update({p: v.detach().to(device).contiguous() for p, v in qw.params.items()})
    return out


def _time_calls(fns: List, x: torch.Tensor, repeats: int, warmup: int, min_seconds: float) -> List[float]:
    """Median seconds of one ``fn(x)`` for each of ``fns``: ``warmup`` calls each, then ``repeats`` rounds
    that time every fn in turn (a loop of >= ``min_seconds``), so a burst of load hits all of them alike."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    loops = []
    for fn in fns:
        for _ in range(max(warmup, 1)):
            fn(x)
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        loops.append(max(1, min(1000, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))))
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, loops, times):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(x)
            sync()
            out.append((time.perf_counter() - t0) / n)
    return [float(statistics.median(t)) for t in times]


def _record_inputs(denoiser: nn.Module, module_paths: Iterable[str], inputs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{module path: {"shape", "dtype", "calls"}} from one forward on ``inputs``."""
    seen: Dict[str, Dict[str, Any]] = {}
    handles = []
    for path in set(module_paths):
        def hook(mod, args, path=path):
            x = args[0]
            entry = seen.setdefault(path, {"shape": list(x.shape), "dtype": str(x.dtype), "calls": 0})
            entry["calls"] += 1
        handles.append(denoiser.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            denoiser(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def measure_costs(denoiser: nn.Module, mq, inputs: Optional[Dict[str, Any]] = None, out: Optional[str | os.PathLike] = None,
                  options: Optional[Iterable[str]] = None, batch: int = 1, repeats: int = 7, warmup: int = 2,
                  min_seconds: float = 2e-3, seed: int = 0, threads: Optional[int] = None, remeasure: bool = False,
                  progress: bool = True) -> CostTable:
    """Measure (or resume) the cost table of ``mq``'s layers on the denoiser's device and dtype.

    ``inputs``: the denoiser's forward kwargs (default: its example inputs, ``batch`` samples);
    ``out``: the JSON file (default :func:`~sensitivity.costs.cost_file` beside the multiquantizer);
    ``options``: the options to time (default: all of ``mq``; ``fp16`` is always timed). ``seed``
    seeds the random layer inputs; ``threads``: torch's CPU threads while timing (default: its current
    number; under contention 1 times most steadily). Returns the table (also written to ``out``, path in ``meta["path"]``).
    """
    from ..checks import check_values

    check_values(repeats=repeats, warmup=warmup, batch=batch, threads=threads, min_seconds=min_seconds, seed=seed)
    threads = int(threads or torch.get_num_threads())
    with using_threads(threads):
        return _measure(denoiser, mq, inputs, out, options, batch, repeats, warmup, min_seconds, seed, threads,
                        remeasure, progress)


def _measure(denoiser, mq, inputs, out, options, batch, repeats, warmup, min_seconds, seed, threads, remeasure,
             progress) -> CostTable:
    from ..graph.inputs import example_inputs

    mq.check_model(denoiser)
    opts = list(mq.options) if options is None else [QuantOption.parse(o).name for o in options if o != FP16]
    for o in opts:
        if o not in mq.options:
            raise SensitivityError(f"option {o!r} is not in multiquantizer {mq.path.name} ({', '.join(mq.options)})")
    p = next(denoiser.parameters())
    device, dtype = p.device, p.dtype
    key = measuring_key(device_name(device), torch.__version__, mq.hash, str(dtype).replace("torch.", ""), batch,
                        threads, RUNTIME)
    path = Path(out) if out is not None else cost_file(mq.path, key)
    record: Dict[str, Any] = {"format": FORMAT, "key": key, "options": opts, "layers": {}}
    if path.is_file() and not remeasure:
        old = json.loads(path.read_text())
        if old.get("key") != key:
            raise SensitivityError(f"{path} was measured under another key ({old.get('key')}); pass --remeasure "
                                   "or another --out")
        if old.get("options") == opts:
            record = old
    record.update({"sensitivity": __version__, "settings": {"repeats": repeats, "warmup": warmup,
                                                            "min_seconds": min_seconds, "seed": seed}})
    cal = calibrator()
    record.setdefault("calibrator", cal)  # the first session's; every session's (resumed runs) in "sessions"
    record["sessions"] = list(record.get("sessions", [])) + [dict(cal, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))]

    specs_of: Dict[str, list] = {}
    for s in mq.layers:
        specs_of.setdefault(s.module_path, []).append(s)
    todo = [m for m, specs in specs_of.items() if any(s.name not in record["layers"] for s in specs)]
    if inputs is None:
        inputs = example_inputs(denoiser, batch=batch, device=device, dtype=dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {k: (torch.randn(v.shape, generator=gen).to(device, dtype)
                      if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v)
                  for k, v in inputs.items()}
    paths = [p for m in todo for s in specs_of[m] for p in (m, *s.tied)]
    shapes = _record_inputs(denoiser, paths, inputs) if todo else {}

    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="costs", unit="module", disable=not progress)
    last_save = time.monotonic()
    for module_path in bar:
        specs = sorted(specs_of[module_path], key=lambda s: s.in_slice[0] if s.in_slice else 0)
        if module_path not in shapes:
            raise SensitivityError(f"layer {specs[0].name!r}: module {module_path!r} did not run in the forward "
                                   "of the example inputs")
        calls = sum(shapes.get(p, {}).get("calls", 0) for s in specs[:1] for p in (module_path, *s.tied))
        info = shapes[module_path]
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + sum(map(ord, module_path)))
        x = torch.randn(info["shape"], generator=gen).to(device, dtype)
        module = denoiser.get_submodule(module_path)
        weight = module.weight.detach()
        parts = [PartSpec(s.name, tuple(s.shape), s.in_slice, FP16) for s in specs]
        fp_tensors = [_part_tensors(mq, s, FP16, weight, device) for s in specs]
        numel = sum(s.numel for s in specs)
        variants, cells_of = [module], []
        for k, s in enumerate(specs):
            for o in opts:
                mine = _part_tensors(mq, s, o, weight, device)
                run_parts = [PartSpec(q.name, q.shape, q.in_slice, FP16) for q in parts]
                run_parts[k] = PartSpec(s.name, tuple(s.shape), s.in_slice, o, tuple(sorted(set(mine) - {"codes"})))
                tensors = [mine if i == k else fp_tensors[i] for i in range(len(parts))]
                variant = runtime_module(module, run_parts, tensors, dtype)
                others = sum(q.numel for i, q in enumerate(specs) if i != k) * weight.element_size()
                variants.append(variant)
                held = int(getattr(variant, "packed_nbytes", None) or held_weight_bytes(variant))
                cells_of.append((k, o, held - others, type(variant).__name__))
        with torch.inference_mode():
            t_fp, *t_opt = _time_calls(variants, x, repeats, warmup, min_seconds)
        for k, s in enumerate(specs):
            share = s.numel / numel
            record["layers"][s.name] = {"module": module_path, "calls": int(calls), "input_shape": info["shape"],
                                        "options": {FP16: {"seconds": t_fp * share,
                                                           "runtime_bytes": s.numel * weight.element_size()}}}
        for (k, o, nbytes, kind), t in zip(cells_of, t_opt):
            share = specs[k].numel / numel
            record["layers"][specs[k].name]["options"][o] = {
                "seconds": max(t - (1.0 - share) * t_fp, 0.0), "runtime_bytes": nbytes, "runtime": kind}
        del variants
        if time.monotonic() - last_save > 2.0 or module_path == todo[-1]:
            _save(path, record)
            last_save = time.monotonic()
    if not todo and not path.is_file():
        _save(path, record)
    # model order, whatever order the modules were measured in
    record["layers"] = {s.name: record["layers"][s.name] for s in mq.layers if s.name in record["layers"]}
    table = CostTable.from_record(record, str(path))
    table.meta["path"] = str(path)
    return table


def matching_tables(mq) -> List[Path]:
    """Cost files beside ``mq`` measured for it on this machine's CPU (or its CUDA GPU) with this torch."""
    folder = Path(mq.path).parent / f"{Path(mq.path).stem}.costs"
    devices = {device_name(torch.device("cpu"))}
    if torch.cuda.is_available():
        devices.add(device_name(torch.device("cuda")))
    found = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            key = json.loads(f.read_text()).get("key") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if key.get("multiquantizer") == mq.hash and key.get("torch") == torch.__version__ and key.get("device") in devices:
            found.append(f)
    return found


def cost_table_for(mq, path: Optional[str | os.PathLike] = None) -> CostTable:
    """The cost table at ``path``, else the one beside ``mq`` measured on this machine with this torch
    (exactly one must match: :func:`matching_tables`); one-line errors say how to get one."""
    if path is not None:
        return CostTable.load(path, mq.hash)
    found = matching_tables(mq)
    if not found:
        raise SensitivityError(f"no cost table of {mq.path} for this machine: run `sensitivity costs "
                               f"{str(mq.model_id).partition(':')[0]} --multiquantizer {mq.path}` first (or pass --costs)")
    if len(found) > 1:
        raise SensitivityError(f"{len(found)} cost tables of {mq.path} match this machine "
                               f"({', '.join(p.name for p in found)}): pick one with --costs")
    return CostTable.load(found[0], mq.hash)


def _save(path: Path, record: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1) + "\n", what="cost table")


__all__ = ["RUNTIME", "calibrator", "cost_table_for", "device_name", "held_weight_bytes", "matching_tables", "measure_costs", "runtime_module"]
