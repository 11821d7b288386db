"""Layer names -> block and op type, and module categories: the naming knowledge of diffusers denoisers.

:class:`LayerNaming` describes a layer by its **block** and **op type** from its name (rules for
diffusers' DiT / PixArt / Hunyuan-DiT transformers and UNets: SD1.5, SDXL, the digits UNet);
:func:`module_category` names the kind of a module (attention, ffn, resnet, ...) for the graph.
Every family uses :data:`DIFFUSERS_NAMING` unless it sets its own ``layer_naming`` (see
:class:`sensitivity.zoo.base.ModelFamily`). ``block_rank`` orders blocks along the network
(embed < down.* < mid < up.* / 0..N-1 < out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple


@dataclass(frozen=True)
class LayerInfo:
    block: str
    block_rank: int
    op_type: str
    op_group: str


# (regex on the part of the name after the block prefix, op_type, op_group); first match wins
_OP_RULES: Tuple[Tuple[str, str, str], ...] = (
    (r"(?:^|\.)attn1\.to_q$", "SA-Q", "SA"),
    (r"(?:^|\.)attn1\.to_k$", "SA-K", "SA"),
    (r"(?:^|\.)attn1\.to_v$", "SA-V", "SA"),
    (r"(?:^|\.)attn1\.to_out\.0$", "SA-Out", "SA"),
    (r"(?:^|\.)attn2\.to_q$", "CA-Q", "CA"),
    (r"(?:^|\.)attn2\.to_k$", "CA-K", "CA"),
    (r"(?:^|\.)attn2\.to_v$", "CA-V", "CA"),
    (r"(?:^|\.)attn2\.to_out\.0$", "CA-Out", "CA"),
    (r"^attentions\.\d+\.to_q$", "SA-Q", "SA"),  # UNet2DModel attention (no attn1)
    (r"^attentions\.\d+\.to_k$", "SA-K", "SA"),
    (r"^attentions\.\d+\.to_v$", "SA-V", "SA"),
    (r"^attentions\.\d+\.to_out\.0$", "SA-Out", "SA"),
    (r"(?:^|\.)ff\.net\.0\.proj$", "FF1", "FF"),
    (r"(?:^|\.)ff\.net\.2$", "FF2", "FF"),
    (r"(?:^|\.)timestep_embedder\.linear_\d$", "t-Embed", "Embed"),
    (r"^norm1\.linear$", "AdaLN", "AdaLN"),
    (r"^skip_linear$", "Skip-Linear", "Skip"),
    (r"^attentions\.\d+\.proj_in$", "Proj-In", "Attn-IO"),
    (r"^attentions\.\d+\.proj_out$", "Proj-Out", "Attn-IO"),
    (r"^resnets\.\d+\.conv1$", "Res-Conv1", "Res"),
    (r"^resnets\.\d+\.conv2$", "Res-Conv2", "Res"),
    (r"^resnets\.\d+\.time_emb_proj$", "Res-TEmb", "Res"),
    (r"^resnets\.\d+\.conv_shortcut$", "Res-Shortcut", "Res"),
    (r"^downsamplers\.\d+\.conv$", "Downsample", "Sample"),
    (r"^upsamplers\.\d+\.conv$", "Upsample", "Sample"),
)

# layers outside blocks: (regex on the full name, block, op_type, op_group)
_TOP_RULES: Tuple[Tuple[str, str, str, str], ...] = (
    (r"^pos_embed\.proj$", "embed", "Patchify", "IO"),
    (r"^conv_in$", "embed", "Conv-In", "IO"),
    (r"^(?:adaln_single\.emb\.)?timestep_embedder\.linear_\d$", "embed", "t-Embed", "Embed"),
    (r"^adaln_single\.", "embed", "t-Embed", "Embed"),
    (r"^time_embedding\.", "embed", "t-Embed", "Embed"),
    (r"^time_extra_emb\.timestep_embedder\.", "embed", "t-Embed", "Embed"),
    (r"^time_extra_emb\.", "embed", "c-Embed", "Embed"),
    (r"^(?:caption_projection|text_embedder|add_embedding|class_embedding|encoder_hid_proj)\.", "embed", "c-Embed", "Embed"),
    (r"^(?:proj_out_1|norm_out\.linear)$", "out", "Out-AdaLN", "IO"),
    (r"^(?:proj_out|proj_out_2|conv_out)$", "out", "Out", "IO"),
)

_BLOCK_RULES: Tuple[Tuple[str, str], ...] = (
    # (regex capturing the block prefix and index, kind)
    (r"^(transformer_blocks)\.(\d+)\.(.+)$", "flat"),  # DiT, PixArt
    (r"^(blocks)\.(\d+)\.(.+)$", "flat"),  # Hunyuan-DiT
    (r"^(down_blocks)\.(\d+)\.(.+)$", "down"),
    (r"^(up_blocks)\.(\d+)\.(.+)$", "up"),
    (r"^(mid_block)()\.(.+)$", "mid"),
)

_RANK_EMBED, _RANK_MID, _RANK_UP, _RANK_OUT = -1, 1000, 2000, 10_000


def _op(rest: str, op_rules=None) -> Tuple[str, str]:
    for pattern, op_type, group in (op_rules if op_rules is not None else _OP_RULES):
        if re.search(pattern, rest):
            return op_type, group
    # unknown layer kind: its path with indices removed, e.g. "foo.N.bar"
    return re.sub(r"\.\d+(?=\.|$)", "", rest) or rest, "Other"


@dataclass(frozen=True)
class LayerNaming:
    """Rules from layer names to :class:`LayerInfo`: ``op_rules`` (regex on the name after the block
    prefix, op_type, op_group), ``top_rules`` (regex on the full name of a layer outside blocks, block,
    op_type, op_group) and ``block_rules`` (regex capturing the block prefix and index, kind). First match wins."""

    op_rules: Tuple[Tuple[str, str, str], ...] = _OP_RULES
    top_rules: Tuple[Tuple[str, str, str, str], ...] = _TOP_RULES
    block_rules: Tuple[Tuple[str, str], ...] = _BLOCK_RULES

    def describe(self, name: str) -> LayerInfo:
        """Block and op type of a layer name (``#main`` / ``#skip`` halves keep their suffix in op_type)."""
        base, _, half = name.partition("#")
        suffix = f"#{half}" if half else ""
        for pattern, kind in self.block_rules:
            m = re.match(pattern, base)
            if not m:
                continue
            rest = m.group(3)
            op_type, group = _op(rest, self.op_rules)
            if kind == "flat":
                if group == "Embed":  # DiT: every block holds a copy of the (tied) timestep embedder
                    return LayerInfo("embed", _RANK_EMBED, op_type + suffix, group)
                i = int(m.group(2))
                return LayerInfo(str(i), i, op_type + suffix, group)
            if kind == "mid":
                return LayerInfo("mid", _RANK_MID, op_type + suffix, group)
            i = int(m.group(2))
            rank = i if kind == "down" else _RANK_UP + i
            return LayerInfo(f"{kind}.{i}", rank, op_type + suffix, group)
        for pattern, block, op_type, group in self.top_rules:
            if re.match(pattern, base):
                return LayerInfo(block, _RANK_EMBED if block == "embed" else _RANK_OUT, op_type + suffix, group)
        op_type, group = _op(base, self.op_rules)
        return LayerInfo("other", _RANK_OUT - 1, op_type + suffix, group)


DIFFUSERS_NAMING = LayerNaming()


def module_category(module: Any) -> Optional[str]:
    """Kind of a diffusers module by its class name: ``attention`` / ``cross-attention``, ``ffn``,
    ``resnet``, ``sampler``, ``embedding``, ``adanorm``; None for anything else."""
    name = type(module).__name__
    if "Attention" in name and "Pool" not in name and "Processor" not in name:
        return "cross-attention" if getattr(module, "is_cross_attention", False) else "attention"
    if "FeedForward" in name or name.endswith("Mlp") or name == "MLP":
        return "ffn"
    if "Resnet" in name or "ResBlock" in name:
        return "resnet"
    if name in ("Downsample2D", "Upsample2D", "Downsample1D", "Upsample1D"):
        return "sampler"
    if any(k in name for k in ("Embed", "TextProjection", "AdaLayerNormSingle", "AttentionPool")):
        return "embedding"
    if name.startswith("AdaLayerNorm") or name.startswith("AdaGroupNorm"):
        return "adanorm"
    return None
