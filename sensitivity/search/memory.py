"""``--target-memory``: one byte budget over the whole pipeline's weights, for the same exact solver.

The bytes of a config are those the run-time holds in memory: per layer, the memory model's bytes
(:func:`sensitivity.sizes.memory_table`; ``stored`` by default, a run-time policy may register its
own), plus the pipeline's unquantized tensors at fp16 (embeddings, norms, biases, excluded layers and
the components not in the multiquantizer, from a pipeline multiquantizer's ``components`` manifest;
:mod:`sensitivity.pipeline_quant`). A denoiser-only multiquantizer counts its layers only.
The knapsack then runs on the memory table with ``budget = target − unquantized bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping

from ..options import canonical, FP16
from ..sizes import DEFAULT_MEMORY_MODEL, SizeTable, format_bytes, memory_table
from .solver import InfeasibleTargetError


@dataclass
class MemoryBudget:
    """``table``: the memory size table; ``budget``: bytes the layers may take; ``fixed``: unquantized bytes."""

    table: SizeTable
    budget: int
    fixed: int
    target: int
    model: str


def fixed_bytes(mq: Any) -> int:
    """fp16 bytes of the pipeline's weights outside every layer of ``mq`` (0 without a components manifest)."""
    comps = getattr(mq, "components", None) or {}
    return int(sum(int(c.get("unquantized_fp16_bytes", 0)) for c in comps.values()))


def memory_budget(mq: Any, target_bytes: int, sizes: Any = None, model: str = DEFAULT_MEMORY_MODEL,
                  what: str = "this multiquantizer") -> MemoryBudget:
    """The memory table of ``sizes`` (default ``mq``'s) and the layers' share of ``target_bytes``.
    Raises :class:`InfeasibleTargetError` naming the smallest feasible whole-pipeline memory."""
    table = memory_table(SizeTable.of(sizes if sizes is not None else mq), model)
    fixed = fixed_bytes(mq)
    budget = int(target_bytes) - fixed
    lo = table.min_bytes() + fixed
    if int(target_bytes) < lo:
        raise InfeasibleTargetError(
            f"--target-memory {format_bytes(target_bytes)} is infeasible for {what}: the smallest is "
            f"{format_bytes(lo)} ({lo} bytes: every layer at its smallest option, {format_bytes(fixed)} unquantized)",
            min_avg_bits=16.0 * table.min_bytes() / table.fp16_total, min_cost=lo)
    return MemoryBudget(table, budget, fixed, int(target_bytes), model)


def config_memory(mq: Any, config: Mapping[str, str], sizes: Any = None, model: str = DEFAULT_MEMORY_MODEL) -> int:
    """Whole-pipeline weight bytes of ``config`` in memory (layers by the memory model + unquantized at fp16)."""
    table = memory_table(SizeTable.of(sizes if sizes is not None else mq), model)
    return int(table.config_bytes(config)[0]) + fixed_bytes(mq)


def component_bytes(mq: Any, config: Mapping[str, str], sizes: Any = None,
                    model: str = DEFAULT_MEMORY_MODEL) -> Dict[str, int]:
    """``{component: bytes in memory}`` of ``config`` over a pipeline multiquantizer's components (layers by
    the memory model, unquantized tensors at fp16); ``{"denoiser": layer bytes}`` for a denoiser-only file."""
    table = memory_table(SizeTable.of(sizes if sizes is not None else mq), model)
    comps = getattr(mq, "components", None) or {}
    out: Dict[str, int] = {n: int(c.get("unquantized_fp16_bytes", 0)) for n, c in comps.items()}
    opts = {l: canonical(o) for l, o in config.items()}
    for i, layer in enumerate(table.layers):
        comp = layer.split(".", 1)[0] if comps else "denoiser"
        o = opts.get(layer, FP16)
        b = int(table.fp16_bytes[i]) if o == FP16 else int(table.nbytes[i, table.opt_index[o]])
        out[comp] = out.get(comp, 0) + b
    return out


def memory_result(res: Any, mq: Any, sizes: Any, budget: MemoryBudget) -> Any:
    """``res`` (solved on the memory table) with its stored sizes (avg bits, quantized bytes of ``sizes``)
    and its memory in ``details``: ``target_memory``, ``memory_bytes``, ``memory_model``, ``unquantized_bytes``,
    ``component_bytes`` ({component: bytes in memory})."""
    stored = SizeTable.of(sizes if sizes is not None else mq)
    q, fp = stored.config_bytes(res.options)
    res.avg_bits, res.quantized_bytes, res.fp16_bytes = 16.0 * q / fp, int(q), int(fp)
    used = int(budget.table.config_bytes(res.options)[0])
    assert used <= budget.budget
    res.details.update(target_memory=budget.target, memory_bytes=used + budget.fixed, memory_model=budget.model,
                       unquantized_bytes=budget.fixed,
                       component_bytes=component_bytes(mq, res.options, budget.table, DEFAULT_MEMORY_MODEL))
    return res
