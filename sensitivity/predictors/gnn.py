"""The GNN predictor (in the spirit of the reference, docs/method.md §5), in plain torch.

**Input**: the traced :class:`~sensitivity.graph.DenoiserGraph` (one fixed structure per model) with
per-node features — categorical: op type, role in its block, block position (3 levels), quantization
method, bit width; numeric: log2 size reduction, standardised log10 relative error, log10 weight
count, depth fraction; optionally a measured per-(layer, option) sensitivity (``feature_table``: a CSV
``layer,option,value`` such as MixDQ single-layer damage or HAWQ Fisher-weighted ‖ΔW‖², see
:func:`.data.read_feature_table`; log10, standardised, fp16 = 0; its values are stored in the
predictor folder, so reloading needs no file). Combine / input / output nodes have method and bits
"none". The embeddings are concatenated and mixed by a 2-layer MLP into ``h⁰``.

**GNN**: ``layers`` (default 4) GATv2 convolutions (one head, self-loops, messages along data flow,
as PyG's ``GATv2Conv``; :class:`GATv2` is checked against it in the tests), each followed by
LayerNorm and ReLU, with residual connections after the first. Because every config shares one graph,
a batch is ``[B, N, F]`` node features with one edge list — no graph batching needed.

**Read-outs** (one per hop ``m = 0..M``): ``h_G⁰`` = mean of ``h⁰`` over the weight nodes, ``h_Gᵐ`` =
mean of ``hᵐ`` over all nodes. The regressor is an MLP on ``[h_G⁰ … h_Gᴹ, z(avg_bits)]`` (the config's
average bits are known arithmetic; giving them to the read-out keeps the comparison with the baselines,
whose one-hot features determine them linearly, fair).

**Loss**: ``MSE(ŷ, z(y)) + w · 1/(M+1) Σ_m L_rank(y, ‖h_Gᵐ‖₁)`` — the reference's hop-level ranking
term on the read-out norms, done so that its gradients reach the parameters (the reference calls
``backward`` inside the LambdaRank criterion and then ``zero_grad``). ``rank_loss``:
``spearman`` (1 − differentiable Spearman with pairwise-sigmoid soft ranks), ``lambdarank``
(|ΔNDCG|-weighted pairwise logistic loss, the weights computed without gradient, the loss itself
differentiable), ``hybrid`` (their mean) or ``none``.

**Training**: AdamW, cosine learning-rate decay, gradient clipping, seeded initialisation and
shuffling, best epoch chosen on an inner validation split (``val_fraction`` of the training fold).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SensitivityError
from ..options import QuantOption
from .base import Context, FoldModel, KindParams, State, register_kind
from .data import Dataset, LayerTable, read_feature_table
from .metrics import relevance as relevance_np


# ------------------------------------------------------------------------------------------ layers
class GATv2(nn.Module):
    """GATv2 convolution, one head, on a fixed edge list shared by a batch: ``[B, N, F] -> [B, N, H]``.

    ``out_i = Σ_{j→i} α_ij W_l x_j + b`` with ``α_ij = softmax_j(aᵀ LeakyReLU(W_l x_j + W_r x_i))``;
    the edge list must contain self-loops (see :func:`graph_tensors`).
    """

    def __init__(self, fin: int, fout: int, negative_slope: float = 0.2):
        super().__init__()
        self.lin_l = nn.Linear(fin, fout)
        self.lin_r = nn.Linear(fin, fout)
        self.att = nn.Parameter(torch.empty(fout))
        self.bias = nn.Parameter(torch.zeros(fout))
        self.negative_slope = negative_slope
        nn.init.xavier_uniform_(self.att.view(1, -1))

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        xl, xr = self.lin_l(x), self.lin_r(x)
        xj = xl.index_select(1, src)  # [B, E, H]
        e = F.leaky_relu(xj + xr.index_select(1, dst), self.negative_slope) @ self.att  # [B, E]
        idx = dst.unsqueeze(0).expand(B, -1)
        emax = torch.full((B, N), -torch.inf, device=x.device, dtype=e.dtype).scatter_reduce(
            1, idx, e.detach(), reduce="amax", include_self=True)
        ex = torch.exp(e - emax.gather(1, idx))
        den = torch.zeros((B, N), device=x.device, dtype=e.dtype).index_add(1, dst, ex)
        alpha = ex / den.gather(1, idx)
        out = torch.zeros_like(xl).index_add(1, dst, alpha.unsqueeze(-1) * xj)
        return out + self.bias


def soft_rank(s: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Differentiable ranks (1 = smallest) of ``s [B]``: ``0.5 + Σ_j σ((z_i − z_j)/τ)`` on z-scores."""
    z = (s - s.mean()) / (s.std() + 1e-8)
    return 0.5 + torch.sigmoid((z.unsqueeze(1) - z.unsqueeze(0)) / tau).sum(1)


def spearman_loss(s: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``1 − ρ(soft_rank(s), rank(y))`` (differentiable in ``s``)."""
    rs = soft_rank(s, tau)
    ry = torch.argsort(torch.argsort(y)).to(s.dtype) + 1.0
    rs, ry = rs - rs.mean(), ry - ry.mean()
    rho = (rs * ry).sum() / (rs.norm() * ry.norm() + 1e-8)
    return 1.0 - rho


def lambdarank_loss(s: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """|ΔNDCG|-weighted pairwise logistic loss (LambdaRank as a differentiable loss).

    Relevance = the reference's ``clip((y − q20)/(max − q20), 0, 1)``; the pair weights |ΔNDCG| use the
    current ranking of ``s`` and carry no gradient; ``s`` is z-scored within the batch.
    """
    z = (s - s.mean()) / (s.std() + 1e-8)
    with torch.no_grad():
        rel = torch.as_tensor(relevance_np(y.detach().cpu().numpy()), dtype=s.dtype, device=s.device)
        gain = torch.pow(2.0, rel) - 1.0
        order = torch.argsort(z.detach(), descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(z), device=s.device)
        disc = 1.0 / torch.log2(rank.to(s.dtype) + 2.0)
        ideal = torch.sort(gain, descending=True).values
        idcg = (ideal / torch.log2(torch.arange(len(z), device=s.device, dtype=s.dtype) + 2.0)).sum().clamp_min(1e-8)
        dg = gain.unsqueeze(1) - gain.unsqueeze(0)
        dd = disc.unsqueeze(1) - disc.unsqueeze(0)
        w = (dg * dd).abs() / idcg
        better = (y.unsqueeze(1) > y.unsqueeze(0)).to(s.dtype)
        w = w * better
    pair = F.softplus(-sigma * (z.unsqueeze(1) - z.unsqueeze(0)))
    return (w * pair).sum() / w.sum().clamp_min(1e-8)


RANK_LOSSES = ("spearman", "lambdarank", "hybrid", "none")


# ------------------------------------------------------------------------------------------ graph tensors
def graph_tensors(graph: Any, table: LayerTable, vocab: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Static tensors of ``graph`` for the GNN (numpy), plus the vocabularies used.

    Returns ``{"src", "dst"}`` (edges incl. self-loops, int64 [E]), ``op``, ``role`` (int64 [N]),
    ``pos`` (int64 [N, 3]), ``num`` (float32 [N, 2]: log10 weight count / 10, depth fraction),
    ``layer_of`` (int64 [N], layer index or −1), ``opt_method``/``opt_bits`` (int64 [1+O]: code ->
    vocab index), ``reduction``/``error`` (float32 [L, 1+O]), and ``vocab``.
    """
    nodes = graph.nodes
    g = graph.graph
    pos_of = {n: i for i, n in enumerate(nodes)}
    missing = [l for l in table.layers if l not in pos_of]
    if missing:
        raise SensitivityError(f"layer {missing[0]!r} of the predictor is not a node of the graph")
    if vocab is None:
        ops = sorted({g.nodes[n]["op"] for n in nodes})
        roles = sorted({g.nodes[n]["role"] for n in nodes})
        pos_max = [int(max(g.nodes[n]["position"][k] for n in nodes)) for k in range(3)]
        methods = ["none", "fp16"] + sorted({QuantOption.parse(o).method for o in table.options})
        bits = ["none", 16] + sorted({QuantOption.parse(o).bits for o in table.options}, reverse=True)
        err = table.error[:, 1:]
        le = np.log10(np.clip(err[np.isfinite(err)], 1e-10, None)) if np.isfinite(err).any() else np.zeros(1)
        vocab = {"ops": ops, "roles": roles, "pos_max": pos_max, "methods": methods, "bits": bits,
                 "err_mean": float(le.mean()), "err_std": float(le.std() + 1e-6)}
    op_ix = {o: i + 1 for i, o in enumerate(vocab["ops"])}  # 0 = unknown
    role_ix = {r: i + 1 for i, r in enumerate(vocab["roles"])}
    N = len(nodes)
    op = np.array([op_ix.get(g.nodes[n]["op"], 0) for n in nodes], np.int64)
    role = np.array([role_ix.get(g.nodes[n]["role"], 0) for n in nodes], np.int64)
    pos = np.array([[min(int(g.nodes[n]["position"][k]), vocab["pos_max"][k] + 1) for k in range(3)] for n in nodes], np.int64)
    maxdepth = max(1, max(g.nodes[n]["depth"] for n in nodes))
    num = np.array([[math.log10(g.nodes[n].get("numel") or 1) / 10.0, g.nodes[n]["depth"] / maxdepth] for n in nodes],
                   np.float32)
    layer_of = np.full(N, -1, np.int64)
    for li, l in enumerate(table.layers):
        layer_of[pos_of[l]] = li
    src = [pos_of[a] for a, b in g.edges] + list(range(N))
    dst = [pos_of[b] for a, b in g.edges] + list(range(N))
    meth_ix = {m: i for i, m in enumerate(vocab["methods"])}
    bits_ix = {b: i for i, b in enumerate(vocab["bits"])}
    for o in table.options:  # a prior of another model (``init_from``) knows its own options only
        q = QuantOption.parse(o)
        if q.method not in meth_ix or q.bits not in bits_ix:
            raise SensitivityError(f"option {o!r} is unknown to the GNN's vocabulary (methods {vocab['methods'][2:]}, "
                                   f"bits {vocab['bits'][2:]}): a prior must know every option of the model")
    opt_method = np.array([meth_ix["fp16"]] + [meth_ix[QuantOption.parse(o).method] for o in table.options], np.int64)
    opt_bits = np.array([bits_ix[16]] + [bits_ix[QuantOption.parse(o).bits] for o in table.options], np.int64)
    reduction = np.log2(table.fp16_bytes[:, None] / table.nbytes).astype(np.float32)
    err = np.log10(np.clip(table.error, 1e-10, None))
    err = (err - vocab["err_mean"]) / vocab["err_std"]
    err[:, 0] = 0.0
    err = np.where(np.isfinite(err), err, 0.0).astype(np.float32)
    return {"src": np.array(src, np.int64), "dst": np.array(dst, np.int64), "op": op, "role": role, "pos": pos,
            "num": num, "layer_of": layer_of, "opt_method": opt_method, "opt_bits": opt_bits,
            "reduction": reduction, "error": err, "vocab": vocab}


class GNNNet(nn.Module):
    """Node embedding → ``layers`` × GATv2 → hop read-outs → regressor (see the module docstring)."""

    def __init__(self, vocab: Dict[str, Any], d_emb: int = 8, d0: int = 32, hidden: int = 64, layers: int = 4,
                 extra_num: int = 0):
        super().__init__()
        self.e_op = nn.Embedding(len(vocab["ops"]) + 1, d_emb)
        self.e_role = nn.Embedding(len(vocab["roles"]) + 1, d_emb)
        self.e_pos = nn.ModuleList([nn.Embedding(m + 2, 4) for m in vocab["pos_max"]])
        self.e_method = nn.Embedding(len(vocab["methods"]), 6)
        self.e_bits = nn.Embedding(len(vocab["bits"]), 6)
        self.num = nn.Linear(4 + extra_num, d_emb)
        d_in = 2 * d_emb + 4 * len(vocab["pos_max"]) + 12 + d_emb
        self.mix = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, d0), nn.ReLU())
        dims = [d0] + [hidden] * layers
        self.convs = nn.ModuleList([GATv2(dims[i], dims[i + 1]) for i in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self.head = nn.Sequential(nn.Linear(d0 + hidden * layers + 1, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, node_cat: torch.Tensor, node_num: torch.Tensor, bits_z: torch.Tensor, gt: Dict[str, torch.Tensor]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``node_cat [B, N, 3]`` (method, bits, unused), ``node_num [B, N, 4 + extra_num]``, ``bits_z [B]`` ->
        ``(ŷ [B], [h_G⁰ … h_Gᴹ])``."""
        B, N, _ = node_num.shape
        static = torch.cat([self.e_op(gt["op"]), self.e_role(gt["role"])]
                           + [e(gt["pos"][:, k]) for k, e in enumerate(self.e_pos)], -1)
        x = torch.cat([static.unsqueeze(0).expand(B, -1, -1), self.e_method(node_cat[..., 0]),
                       self.e_bits(node_cat[..., 1]), self.num(node_num)], -1)
        h = self.mix(x)
        w = gt["weight_mask"]
        reads = [(h * w[None, :, None]).sum(1) / w.sum()]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out = F.relu(norm(conv(h, gt["src"], gt["dst"])))
            h = out + h if i > 0 else out
            reads.append(h.mean(1))
        yhat = self.head(torch.cat(reads + [bits_z.unsqueeze(-1)], -1)).squeeze(-1)
        return yhat, reads


class _threads:
    """Temporarily set torch's CPU intra-op threads (tiny matrices: 1 thread avoids oversubscription)."""

    def __init__(self, n: Optional[int]):
        self.n = int(n) if n else None

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ------------------------------------------------------------------------------------------ fold model
@register_kind
class GNNModel(FoldModel):
    kind = "gnn"
    description = "GATv2 GNN on the traced graph, hop read-outs, MSE + ranking loss"

    @dataclass(frozen=True)
    class Params(KindParams):
        """Architecture (``layers`` GATv2 convolutions of width ``hidden``, embeddings ``d0``), training
        (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``grad_clip``, ``val_fraction``), the ranking
        term (``rank_loss``, ``rank_weight``, soft-rank temperature ``tau``), torch threads, ``feature_table``;
        ``init_from``: a predictor folder (of any model) whose ``gnn`` fold model starts the training, its
        vocabularies, architecture and bit normalisation kept (transfer: a prior from another model's labels)."""

        layers: int = 4
        hidden: int = 64
        d0: int = 32
        epochs: int = 150
        batch_size: int = 32
        lr: float = 2e-3
        weight_decay: float = 1e-4
        rank_loss: str = "spearman"
        rank_weight: float = 1.0
        val_fraction: float = 0.15
        grad_clip: float = 5.0
        tau: float = 0.1
        num_threads: Optional[int] = 1
        feature_table: Optional[str] = None
        init_from: Optional[str] = None

    #: the node features are what transfers between models (op type, role, shape, bits, method, measured
    #: error), never a layer's name: a fold model runs on another model's graph (:func:`.predictor.transfer`)
    transferable = True

    @classmethod
    def available(cls, ctx: Context, ds: Optional[Dataset] = None) -> Optional[str]:
        if ctx.graph is None:
            return "no graph (pass --model so the denoiser can be traced)"
        return None

    def _device(self) -> torch.device:
        return torch.device(self.ctx.device or "cpu")

    def _setup(self, vocab: Optional[Dict[str, Any]] = None, feature: Optional[np.ndarray] = None,
               arch: Optional[Dict[str, int]] = None) -> None:
        gt = graph_tensors(self.ctx.graph, self.ctx.table, vocab)
        self.vocab = gt.pop("vocab")
        self.feature = None if feature is None else np.asarray(feature, np.float32)
        if self.feature is not None:
            gt["feature"] = self.feature
        dev = self._device()
        self.gt = {k: torch.as_tensor(v, device=dev) for k, v in gt.items()}
        self.gt["weight_mask"] = (self.gt["layer_of"] >= 0).to(torch.float32)
        self.arch = dict(arch or {k: int(self.params[k]) for k in ("d0", "hidden", "layers")})
        self.net = GNNNet(self.vocab, **self.arch, extra_num=0 if feature is None else 1).to(dev)

    def _prior(self, seed: int) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, Any]]:
        """``(meta, tensors, params)`` of the ``init_from`` folder's gnn fold model ``seed % k`` (one line if none)."""
        from .predictor import read_fold_state

        path = str(self.params["init_from"])
        if self.params.get("feature_table"):
            raise SensitivityError("gnn: init_from and feature_table together are not supported (the prior has no "
                                   "values of this model's feature table)")
        return read_fold_state(path, "gnn", (seed % 1000))

    def _feature_from_params(self) -> Optional[np.ndarray]:
        """The ``feature_table`` CSV as the node feature ``float32 [L, 1+O]``: log10, z-scored over the
        quantized entries, fp16 = 0 (``None`` without a table)."""
        path = self.params.get("feature_table")
        if not path:
            return None
        raw = read_feature_table(path, self.ctx.table)
        lg = np.log10(np.clip(raw[:, 1:], 1e-12, None))
        z = np.zeros_like(raw)
        z[:, 1:] = (lg - lg.mean()) / (lg.std() + 1e-6)
        return z.astype(np.float32)

    def _inputs(self, codes: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gt, dev = self.gt, self._device()
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=dev)  # [B, L]
        lo = gt["layer_of"]
        is_w = lo >= 0
        node_code = torch.where(is_w[None, :], c[:, lo.clamp_min(0)], torch.zeros_like(lo)[None, :])  # [B, N]
        lidx = lo.clamp_min(0)[None, :].expand_as(node_code)
        meth = torch.where(is_w[None, :], gt["opt_method"][node_code], torch.zeros_like(node_code))
        bits = torch.where(is_w[None, :], gt["opt_bits"][node_code], torch.zeros_like(node_code))
        red = torch.where(is_w[None, :], gt["reduction"][lidx, node_code], torch.zeros((), device=dev))
        err = torch.where(is_w[None, :], gt["error"][lidx, node_code], torch.zeros((), device=dev))
        B = c.shape[0]
        cols = [red.unsqueeze(-1), err.unsqueeze(-1), gt["num"].unsqueeze(0).expand(B, -1, -1)]
        if "feature" in gt:
            cols.append(torch.where(is_w[None, :], gt["feature"][lidx, node_code], torch.zeros((), device=dev)).unsqueeze(-1))
        num = torch.cat(cols, -1)
        cat = torch.stack([meth, bits, torch.zeros_like(meth)], -1)
        bits_z = torch.as_tensor((self.ctx.table.avg_bits(codes) - self.norm["bits_mean"]) / self.norm["bits_std"],
                                 dtype=torch.float32, device=dev)
        return cat, num, bits_z

    def _rank_loss(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kind = self.params["rank_loss"]
        if kind == "spearman":
            return spearman_loss(s, y, float(self.params["tau"]))
        if kind == "lambdarank":
            return lambdarank_loss(s, y)
        if kind == "hybrid":
            return 0.5 * (spearman_loss(s, y, float(self.params["tau"])) + lambdarank_loss(s, y))
        return s.sum() * 0.0

    def loss(self, codes: np.ndarray, yz: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, mse, rank)`` on a batch (``yz``: standardised targets)."""
        yhat, reads = self.net(*self._inputs(codes), self.gt)
        mse = F.mse_loss(yhat, yz)
        if self.params["rank_loss"] == "none" or float(self.params["rank_weight"]) == 0 or len(yz) < 3:
            rank = yhat.sum() * 0.0
        else:
            rank = torch.stack([self._rank_loss(r.abs().sum(-1), yz) for r in reads]).mean()
        return mse + float(self.params["rank_weight"]) * rank, mse, rank

    def fit(self, ds: Dataset, seed: int = 0) -> "GNNModel":
        with _threads(self.params.get("num_threads")):
            return self._fit(ds, seed)

    def _fit(self, ds: Dataset, seed: int = 0) -> "GNNModel":
        if self.params["rank_loss"] not in RANK_LOSSES:
            raise SensitivityError(f"rank loss {self.params['rank_loss']!r}: choose one of {', '.join(RANK_LOSSES)}")
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        prior = self._prior(seed) if self.params.get("init_from") else None
        if prior is None:
            self._setup(feature=self._feature_from_params())
        else:
            meta, tensors, _ = prior
            self._setup(meta["vocab"], arch=meta.get("arch") or {k: int(prior[2][k]) for k in ("d0", "hidden", "layers")})
            self.net.load_state_dict({k: torch.as_tensor(np.asarray(v), device=self._device()) for k, v in tensors.items()})
        n = len(ds)
        perm = rng.permutation(n)
        n_val = int(round(float(self.params["val_fraction"]) * n)) if n >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        self.norm = {"y_mean": float(ds.y[tr].mean()), "y_std": float(ds.y[tr].std() + 1e-8),
                     "bits_mean": float(ds.avg_bits[tr].mean()), "bits_std": float(ds.avg_bits[tr].std() + 1e-8)}
        if prior is not None:  # the prior's read-out saw its own bit normalisation
            self.norm.update({k: float(prior[0]["norm"][k]) for k in ("bits_mean", "bits_std")})
        dev = self._device()
        yz = torch.as_tensor((ds.y - self.norm["y_mean"]) / self.norm["y_std"], dtype=torch.float32, device=dev)
        opt = torch.optim.AdamW(self.net.parameters(), lr=float(self.params["lr"]), weight_decay=float(self.params["weight_decay"]))
        epochs, bs = int(self.params["epochs"]), int(self.params["batch_size"])
        steps = epochs * max(1, math.ceil(len(tr) / bs))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        best = (math.inf, -1, None)
        t0 = time.perf_counter()
        history = []
        for ep in range(epochs):
            self.net.train()
            order = tr[rng.permutation(len(tr))]
            tot = 0.0
            for b in range(0, len(order), bs):
                idx = order[b:b + bs]
                if len(idx) < 2:
                    continue
                loss, mse, rank = self.loss(ds.codes[idx], yz[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), float(self.params["grad_clip"]))
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(idx)
            if n_val:
                v = self._val_loss(ds.codes[val], yz[val])
                history.append((ep, tot / len(tr), v))
                if v < best[0]:
                    best = (v, ep, {k: t.detach().clone() for k, t in self.net.state_dict().items()})
        if best[2] is not None:
            self.net.load_state_dict(best[2])
        self.net.eval()
        self.info = {"best_epoch": int(best[1]) if n_val else epochs - 1, "val_mse": None if not n_val else float(best[0]),
                     "train_seconds": round(time.perf_counter() - t0, 2), "n_train": int(len(tr)), "n_val": int(n_val),
                     "parameters": int(sum(p.numel() for p in self.net.parameters()))}
        if prior is not None:
            self.info["prior"] = {"path": str(self.params["init_from"]), "fold": int(prior[0]["fold"])}
        return self

    @torch.no_grad()
    def _val_loss(self, codes: np.ndarray, yz: torch.Tensor) -> float:
        self.net.eval()
        yhat, _ = self.net(*self._inputs(codes), self.gt)
        return float(F.mse_loss(yhat, yz))

    @torch.no_grad()
    def predict_codes(self, codes: np.ndarray, batch_size: int = 256) -> np.ndarray:
        with _threads(self.params.get("num_threads")):
            return self._predict(codes, batch_size)

    def _predict(self, codes: np.ndarray, batch_size: int) -> np.ndarray:
        self.net.eval()
        out = []
        codes = np.asarray(codes)
        for b in range(0, len(codes), batch_size):
            yhat, _ = self.net(*self._inputs(codes[b:b + batch_size]), self.gt)
            out.append(yhat.double().cpu().numpy())
        z = np.concatenate(out) if out else np.zeros(0)
        return z * self.norm["y_std"] + self.norm["y_mean"]

    def get_state(self) -> State:
        tensors = {k: v.detach().cpu().float().numpy() for k, v in self.net.state_dict().items()}
        if self.feature is not None:
            tensors["node_feature"] = self.feature
        return {"vocab": self.vocab, "norm": self.norm, "arch": self.arch, **self.info}, tensors, {}

    def set_state(self, meta, tensors, texts) -> None:
        tensors = dict(tensors)
        self._setup(meta["vocab"], tensors.pop("node_feature", None), arch=meta.get("arch"))
        self.norm = dict(meta["norm"])
        self.info = {k: v for k, v in meta.items() if k not in ("vocab", "norm", "arch")}
        dev = self._device()
        sd = {k: torch.as_tensor(np.asarray(v), device=dev) for k, v in tensors.items()}
        self.net.load_state_dict(sd)
        self.net.eval()
