"""Trace one forward pass of a denoiser into a data-flow DAG of weight layers and combine ops.

How it works: the forward pass runs (on the meta device by default, so a full-size SDXL costs no
memory) under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch function and tensor
method call, while module hooks mark the quantizable layers. Every tensor is mapped to the graph node
that produced it (``None`` for constants, masks, parameters):

* a quantizable layer (``Linear``/``Conv`` named by a :class:`~sensitivity.layers.LayerSpec`) is a
  **weight node**; its inputs' producers get an edge to it. A split layer is two weight nodes
  (``<path>#main``, ``<path>#skip``, both fed the layer's input) whose outputs meet in an ``add`` node
  (``<path>#sum``); tied copies map to the first copy's node;
* an op whose tensor inputs come from **two or more different nodes** is a **combine node**: ``add``,
  ``mul``, ``cat``, ``matmul`` (``torch.matmul``/``bmm``/``baddbmm``/``einsum``), ``op:<name>`` else;
  ``scaled_dot_product_attention`` becomes two ``matmul`` nodes, ``<scope>:qk`` (inputs q, k) and
  ``<scope>:av`` (inputs qk, v), as in the reference's ``mul_qk`` / ``mul_vsm``;
* normalisation is a ``norm`` node: ``F.layer_norm`` / ``group_norm`` / ``rms_norm`` calls, and whole
  weight-free modules whose class name contains ``Norm`` (diffusers' ``RMSNorm`` is elementwise code);
* every other op (activations, reshapes, softmax, ops with one producer plus constants) passes its
  input's producer through, so elementwise chains collapse;
* the forward's named conditioning inputs are ``input`` nodes (``input:timestep``, ...), its result
  feeds one ``output`` node.

Afterwards chains of elementwise combine nodes (``add``/``mul``/``sub``/``div``) where each feeds only
the next are merged into one node: all adds -> ``add``, all muls -> ``mul``; a mixed chain fed by a
``norm`` node -> ``modulate`` (adaLN: ``norm(x)·(1+scale)+shift``), any other mixed chain ->
``gated_add`` (``x + gate·f(x)``); elementwise ops inside ``AdaLayerNorm*`` modules are ``modulate``.

Modules whose quantizable layers are all tied copies of another module's (DiT's per-block timestep
embedder) are traced once: a later call with the same input nodes reuses the first call's output node,
so the 28 copies of DiT-XL/2's embedder are one subgraph, as in the reference.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SensitivityError
from ..layers import LAYER_TYPES, LayerSpec

ELEMENTWISE = {"add", "mul", "sub", "div"}
_NORM_FUNCS = {"layer_norm", "group_norm", "rms_norm", "instance_norm", "batch_norm"}
_MATMUL_FUNCS = {"matmul", "bmm", "baddbmm", "einsum", "mm", "__matmul__", "addmm"}
_CAT_FUNCS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_ADD_FUNCS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_SUB_FUNCS = {"sub", "__sub__", "__rsub__", "__isub__", "sub_", "subtract"}
_MUL_FUNCS = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply", "addcmul"}
_DIV_FUNCS = {"div", "__div__", "__truediv__", "__rtruediv__", "__itruediv__", "div_", "true_divide"}
# tensor methods that neither compute nor move data: never make nodes, never matter
_IGNORED = {"__get__", "__set__", "dim", "size", "numel", "is_floating_point", "__len__", "__bool__", "__format__",
            "__repr__", "element_size", "data_ptr", "stride", "storage_offset", "is_contiguous", "get_device",
            "__index__", "__int__", "__float__", "item", "tolist", "__eq__", "__ne__", "__hash__"}


def _fname(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name


def _op_of(fname: str) -> Optional[str]:
    if fname in _ADD_FUNCS:
        return "add"
    if fname in _SUB_FUNCS:
        return "sub"
    if fname in _MUL_FUNCS:
        return "mul"
    if fname in _DIV_FUNCS:
        return "div"
    if fname in _CAT_FUNCS:
        return "cat"
    if fname in _MATMUL_FUNCS:
        return "matmul"
    return None


def _tensors(obj: Any, out: Optional[List[torch.Tensor]] = None, depth: int = 0) -> List[torch.Tensor]:
    """All tensors inside nested tuples / lists / dicts / dataclass-like outputs (flattened, in order)."""
    if out is None:
        out = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth > 6:
        return out
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out, depth + 1)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            _tensors(o, out, depth + 1)
    return out


@dataclass
class TraceResult:
    """Raw trace: the graph before elementwise merging, plus bookkeeping for tests and reports."""

    graph: nx.DiGraph
    seconds: float
    n_calls: int
    model_class: str
    input_names: List[str] = field(default_factory=list)


class _Tracer(TorchFunctionMode):
    """Maps tensors to producer nodes while the forward pass runs (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec], input_names: Iterable[str]):
        super().__init__()
        self.g = nx.DiGraph()
        self.paths: Dict[int, str] = {}
        for path, m in model.named_modules():
            self.paths.setdefault(id(m), path)
        self.modules = dict(model.named_modules())
        self.input_names = set(input_names)
        self.src: Dict[int, str] = {}  # id(tensor) -> node
        self.keep: List[torch.Tensor] = []  # keeps traced tensors alive so ids stay unique
        self.scope: List[str] = []
        self.suppress = 0
        self.n_calls = 0
        self.order = 0
        self.names: Counter = Counter()
        # layer rules
        self.by_module: Dict[str, List[LayerSpec]] = defaultdict(list)
        self.tied_to: Dict[str, str] = {}  # copy module path -> first module path
        for s in layers:
            self.by_module[s.module_path].append(s)
            for c in s.tied:
                self.tied_to[c] = s.module_path
        for path in self.by_module:
            if path not in self.modules:
                raise SensitivityError(f"layer module {path!r} is not in the traced model {type(model).__name__}")
        self.param_owner: Dict[int, str] = {}
        for path in list(self.by_module) + list(self.tied_to):
            w = getattr(self.modules.get(path), "weight", None)
            if w is not None:
                self.param_owner[id(w)] = path
        self.memo_root: Dict[str, str] = self._memo_roots()
        self.memo: Dict[Tuple[str, Tuple], List[Optional[str]]] = {}
        self.norm_modules = {
            path
            for path, m in self.modules.items()
            if "Norm" in type(m).__name__ and not any(isinstance(x, LAYER_TYPES) for x in m.modules())
        }
        self.layer_modules = {p for p, m in self.modules.items() if isinstance(m, LAYER_TYPES)}
        self._handles: list = []
        self._frames: List[Tuple[str, str, Any]] = []  # (path, action, data) per open module call

    # ---- tie roots ---------------------------------------------------------------------------
    def _memo_roots(self) -> Dict[str, str]:
        """``{module path: canonical path}`` for the largest subtrees that are tied copies.

        A copy subtree ``A_copy`` matches ``A_first`` if both have the same class and relative layout and
        every Linear/Conv under ``A_copy`` is a tied copy of the one at the same place under ``A_first``.
        """
        roots: Dict[str, str] = {}
        for copy, first in self.tied_to.items():
            c_parts, f_parts = copy.split("."), first.split(".")
            best = (copy, first)
            k = 1
            while k < min(len(c_parts), len(f_parts)) and c_parts[-k:] == f_parts[-k:]:
                a_copy, a_first = ".".join(c_parts[:-k]), ".".join(f_parts[:-k])
                mc, mf = self.modules.get(a_copy), self.modules.get(a_first)
                if mc is None or mf is None or type(mc) is not type(mf) or mc is mf:
                    break
                ok = True
                for sub_path, sub in mc.named_modules():
                    if isinstance(sub, LAYER_TYPES):
                        full = f"{a_copy}.{sub_path}" if sub_path else a_copy
                        twin = f"{a_first}.{sub_path}" if sub_path else a_first
                        if self.tied_to.get(full) != twin:
                            ok = False
                            break
                if not ok:
                    break
                best = (a_copy, a_first)
                k += 1
            roots[best[0]] = best[1]
            roots.setdefault(best[1], best[1])
        return roots

    # ---- nodes -------------------------------------------------------------------------------
    def _node(self, name: str, op: str, kind: str, out: Any = None, **attrs: Any) -> str:
        if name in self.g:
            return name
        shape = None
        ts = _tensors(out) if out is not None else []
        if ts:
            shape = tuple(int(s) for s in ts[0].shape)
        scope = self.scope[-1] if self.scope else ""
        self.g.add_node(name, op=op, kind=kind, scope=scope, scope_class=type(self.modules[scope]).__name__
                        if scope in self.modules else "", order=self.order, out_shape=shape, **attrs)
        self.order += 1
        return name

    def _combine_name(self, op: str) -> str:
        scope = self.scope[-1] if self.scope else ""
        base = f"{scope}:{op}" if scope else op
        self.names[base] += 1
        n = self.names[base]
        return base if n == 1 else f"{base}.{n - 1}"

    def _sources(self, obj: Any) -> List[str]:
        seen: List[str] = []
        for t in _tensors(obj):
            s = self.src.get(id(t))
            if s is not None and s not in seen:
                seen.append(s)
        return seen

    def _assign(self, obj: Any, node: Optional[str]) -> None:
        for t in _tensors(obj):
            self.keep.append(t)
            if node is None:
                self.src.pop(id(t), None)
            else:
                self.src[id(t)] = node

    def _edges(self, sources: Iterable[str], node: str) -> None:
        for s in sources:
            if s != node:
                self.g.add_edge(s, node)

    # ---- the function mode -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress:
            return out
        fname = _fname(func)
        if fname in _IGNORED:
            return out
        self.n_calls += 1
        # a quantizable weight used functionally (not through its module's forward)
        owned = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self.param_owner]
        if owned:
            srcs = self._sources((args, kwargs))
            nodes = []
            for a in owned:
                path = self.param_owner[id(a)]
                nodes.append(self._weight_call_srcs(self.tied_to.get(path, path), srcs, out))
            node = nodes[0]
            if len(nodes) > 1:  # e.g. F.multi_head_attention_forward with q/k/v/out weights
                node = self._node(self._combine_name(f"op:{fname}"), f"op:{fname}", "combine", out)
                self._edges(nodes, node)
            self._assign(out, node)
            return out
        if fname == "__setitem__":
            srcs = self._sources(args[0]) + [s for s in self._sources(args[2:]) if s not in self._sources(args[0])]
            if len(srcs) >= 2:
                node = self._node(self._combine_name("cat"), "cat", "combine", args[0])
                self._edges(srcs, node)
                self._assign(args[0], node)
            return out
        srcs = self._sources((args, kwargs))
        if fname == "scaled_dot_product_attention":
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            qk = self._node(self._combine_name("qk"), "matmul", "combine", out, role="qk")
            self._edges(self._sources(q) + self._sources(k), qk)
            av = self._node(self._combine_name("av"), "matmul", "combine", out, role="av")
            self._edges([qk] + self._sources(v), av)
            self._assign(out, av)
            return out
        if fname in _NORM_FUNCS:
            node = self._node(self._combine_name("norm"), "norm", "combine", out)
            self._edges(srcs, node)
            self._assign(out, node)
            return out
        if len(srcs) >= 2:
            op = _op_of(fname) or f"op:{fname}"
            node = self._node(self._combine_name(op), op, "combine", out, funcs=[fname])
            self._edges(srcs, node)
            self._assign(out, node)  # in-place ops return their first argument: it now maps to node
            return out
        self._assign(out, srcs[0] if srcs else None)
        return out

    # ---- module hooks ------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        path = self.paths.get(id(module), "?")
        if self.suppress:
            self._frames.append((path, "none", None))
            return
        if path == "" and not self.scope:
            self._frames.append((path, "root", None))
            self.scope.append(path)
            self._inputs(module, args, kwargs)
            return
        canon = self.tied_to.get(path, path)
        if canon in self.by_module:
            self.suppress += 1
            self._frames.append((path, "weight", (canon, self._sources((args, kwargs)))))
            return
        if path in self.layer_modules:  # excluded (not quantized) layer: pass its input through
            self.suppress += 1
            self._frames.append((path, "pass", self._sources((args, kwargs))))
            return
        if path in self.memo_root:
            key = (self.memo_root[path], tuple(self._sources((args, kwargs))))
            if key in self.memo:
                self.suppress += 1
                self._frames.append((path, "replay", key))
                return
            self.scope.append(path)
            self._frames.append((path, "record", key))
            return
        if path in self.norm_modules:
            self.suppress += 1
            self._frames.append((path, "norm", self._sources((args, kwargs))))
            return
        self.scope.append(path)
        self._frames.append((path, "scope", None))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        path, action, data = self._frames.pop()
        if action == "none":
            return
        if action == "root":
            self.scope.pop()
            node = self._node("output", "output", "output", out)
            self._edges(self._sources(out), node)
            return
        if action == "weight":
            self.suppress -= 1
            canon, srcs = data
            self.scope.append(path)
            node = self._weight_call_srcs(canon, srcs, out)
            self.scope.pop()
            self._assign(out, node)
            return
        if action == "pass":
            self.suppress -= 1
            self._assign(out, data[0] if len(data) == 1 else None)
            if len(data) > 1:
                self._module_combine(path, "op:" + type(module).__name__, data, out)
            return
        if action == "norm":
            self.suppress -= 1
            self._module_combine(path, "norm", data, out, norm_class=type(module).__name__)
            return
        if action == "replay":
            self.suppress -= 1
            recorded = self.memo[data]
            ts = _tensors(out)
            for i, t in enumerate(ts):
                n = recorded[i] if i < len(recorded) else None
                self._assign(t, n)
            return
        if action == "record":
            self.scope.pop()
            self.memo[data] = [self.src.get(id(t)) for t in _tensors(out)]
            return
        self.scope.pop()

    def _module_combine(self, path: str, op: str, srcs: List[str], out: Any, **attrs: Any) -> None:
        """One combine node ``op`` for a whole module's call (named in its scope), fed by ``srcs``."""
        self.scope.append(path)
        node = self._node(self._combine_name(op), op, "combine", out, **attrs)
        self.scope.pop()
        self._edges(srcs, node)
        self._assign(out, node)

    def _weight_call_srcs(self, path: str, srcs: List[str], out: Any) -> str:
        specs = self.by_module[path]
        if len(specs) == 1 and specs[0].in_slice is None:
            s = specs[0]
            node = self._node(s.name, s.kind, "weight", out, **_spec_attrs(s))
            self._edges(srcs, node)
            return node
        for s in specs:
            self._node(s.name, s.kind, "weight", out, **_spec_attrs(s))
            self._edges(srcs, s.name)
        node = self._node(f"{path}#sum", "add", "combine", out, role="split_sum")
        self._edges([s.name for s in specs], node)
        return node

    def _inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        import inspect

        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            params = []
        named = dict(zip(params, args))
        named.update(kwargs)
        flat: Dict[str, Any] = {}
        for k, v in named.items():
            if isinstance(v, Mapping):
                for k2, v2 in v.items():
                    flat[k2] = v2
            else:
                flat[k] = v
        for k, v in flat.items():
            if isinstance(v, torch.Tensor) and k in self.input_names:
                node = self._node(f"input:{k}", "input", "input", v)
                self._assign(v, node)

    def install(self, model: nn.Module) -> None:
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _spec_attrs(s: LayerSpec) -> Dict[str, Any]:
    return {
        "layer": s.name,
        "module_path": s.module_path,
        "weight_shape": tuple(s.shape),
        "numel": int(s.numel),
        "fp16_bytes": int(s.fp16_bytes),
        "in_slice": tuple(s.in_slice) if s.in_slice else None,
        "tied_copies": len(s.tied),
    }


def merge_elementwise(g: nx.DiGraph) -> nx.DiGraph:
    """Merge chains of elementwise combine nodes (each feeding only the next) into one node.

    The merged node keeps the *last* node's name; its ``op`` is ``modulate`` (inside an ``AdaLayerNorm*``
    module, or a mixed mul/add chain fed by a ``norm`` node: adaLN), else ``add`` / ``mul`` (uniform
    chains) or ``gated_add`` (other mixed chains, ``x + gate·f(x)``); ``funcs`` lists the merged ops.
    """
    g = g.copy()
    for n, d in g.nodes(data=True):
        if d.get("kind") == "combine" and d.get("op") in ELEMENTWISE and d.get("role") != "split_sum":
            d["ops"] = [d["op"]]
    changed = True
    while changed:
        changed = False
        for a in list(nx.topological_sort(g)):
            if a not in g:
                continue
            da = g.nodes[a]
            if "ops" not in da or g.out_degree(a) != 1:
                continue
            (b,) = list(g.successors(a))
            db = g.nodes[b]
            if "ops" not in db:
                continue
            preds = [p for p in g.predecessors(a)]
            for p in preds:
                if p != b:
                    g.add_edge(p, b)
            db["ops"] = da["ops"] + db["ops"]
            db["order"] = min(db["order"], da["order"])
            g.remove_node(a)
            changed = True
    for n, d in g.nodes(data=True):
        ops = d.pop("ops", None)
        if ops is None:
            continue
        kinds = {"add" if o in ("add", "sub") else "mul" for o in ops}
        norm_fed = any(g.nodes[p].get("op") == "norm" for p in g.predecessors(n))
        if d.get("scope_class", "").startswith("Ada") or (norm_fed and kinds == {"add", "mul"}):
            d["op"] = "modulate"
        elif kinds == {"add"}:
            d["op"] = "add"
        elif kinds == {"mul"}:
            d["op"] = "mul"
        else:
            d["op"] = "gated_add"
        d["funcs"] = ops
    return g


def rename_combine_nodes(g: nx.DiGraph) -> nx.DiGraph:
    """Name combine nodes ``<scope>:<op>`` (``.1``, ``.2``, ... for repeats, in trace order).

    Split sums keep ``<path>#sum``; attention matmuls are ``<scope>:qk`` / ``<scope>:av``.
    """
    counts: Counter = Counter()
    mapping = {}
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["order"]):
        d = g.nodes[n]
        if d["kind"] != "combine" or d.get("role") == "split_sum":
            continue
        tag = d.get("role") if d.get("role") in ("qk", "av") else d["op"]
        base = f"{d['scope']}:{tag}" if d["scope"] else tag
        counts[base] += 1
        mapping[n] = base if counts[base] == 1 else f"{base}.{counts[base] - 1}"
    return nx.relabel_nodes(g, mapping, copy=True)


def trace(
    model: nn.Module,
    layers: Sequence[LayerSpec],
    inputs: Mapping[str, Any],
    input_names: Iterable[str],
) -> TraceResult:
    """Run ``model(**inputs)`` under the tracer; returns the merged DAG (see the module docstring).

    Raises :class:`SensitivityError` if the forward pass fails, if a layer of ``layers`` never ran, or
    if the result has a cycle.
    """
    tracer = _Tracer(model, layers, input_names)
    tracer.install(model)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), tracer:
            model(**inputs)
    except SensitivityError:
        raise
    except Exception as exc:  # a diffusers forward that cannot run on these inputs
        raise SensitivityError(
            f"tracing {type(model).__name__} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        tracer.remove()
    seconds = time.perf_counter() - t0
    g = tracer.g
    missing = [s.name for s in layers if s.name not in g]
    if missing:
        raise SensitivityError(
            f"layer {missing[0]!r} did not run in the traced forward pass of {type(model).__name__} "
            f"({len(missing)} of {len(layers)} layers missing)"
        )
    g = rename_combine_nodes(merge_elementwise(g))
    if not nx.is_directed_acyclic_graph(g):
        cyc = nx.find_cycle(g)
        raise SensitivityError(f"traced graph of {type(model).__name__} has a cycle through {cyc[0][0]!r}")
    return TraceResult(g, seconds, tracer.n_calls, type(model).__name__, sorted(tracer.input_names))
