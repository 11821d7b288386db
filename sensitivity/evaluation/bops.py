"""Bit operations per image, as the reference defines them (its ``bops/`` scripts, in Tera-BOPs).

``BOPs = Σ_layers MACs_l × weight_bits_l × activation_bits``, summed over every denoiser call of one
image (all steps; classifier-free guidance doubles the batch, so its calls count twice), / 1e12.
MACs are counted on the real generation (forward hooks on the quantizable layers: Linear
``tokens·in·out``, Conv ``output positions·out·in/groups·kh·kw``; a split layer's halves share its
MACs by input width; tied copies add up). Weight bits per method: its class's ``compute_bits`` (the
reference's ``BOP_LUT``: k-means codebooks compute in fp16), otherwise the option's bits;
full-precision layers 16. Activation bits: 16, or the protocol's ``act_bits``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping, Optional, Sequence

from torch import nn

from ..options import QuantOption


def weight_bits(option: Optional[str]) -> int:
    """Bits of a weight in the BOP count under ``option`` (``None`` / ``fp16``: 16)."""
    if option is None:
        return 16
    opt = QuantOption.parse(option)
    if opt.is_fp:
        return 16
    from ..quantizers import get_method

    compute = get_method(opt.method).compute_bits
    return int(compute if compute is not None else opt.bits)


def _module_macs(module: nn.Module, x, y) -> float:
    if isinstance(module, nn.Linear):
        return float(x.numel() // module.in_features) * module.in_features * module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = 1
        for s in module.kernel_size:
            k *= s
        return float(y.numel()) * (module.in_channels // module.groups) * k
    return 0.0


@contextlib.contextmanager
def count_macs(denoiser: nn.Module, layers: Sequence) -> Iterator[Dict[str, float]]:
    """Inside the block, ``macs[layer name]`` accumulates the MACs of every forward call."""
    modules = dict(denoiser.named_modules())
    macs: Dict[str, float] = {}
    handles = []
    for spec in layers:
        paths = [spec.module_path] + list(getattr(spec, "tied", ()) or ())
        share = 1.0
        if getattr(spec, "in_slice", None):
            a, b = spec.in_slice
            mod = modules[spec.module_path]
            width = getattr(mod, "in_features", None) or getattr(mod, "in_channels", None)
            share = (b - a) / width
        macs[spec.name] = 0.0
        for path in paths:
            mod = modules.get(path)
            if mod is None:
                continue

            def hook(m, args, out, name=spec.name, share=share):
                if args:
                    macs[name] += share * _module_macs(m, args[0], out)

            handles.append(mod.register_forward_hook(hook))
    try:
        yield macs
    finally:
        for h in handles:
            h.remove()


def tera_bops(options: Mapping[str, str], macs_per_image: Mapping[str, float], act_bits: Optional[int] = None) -> float:
    """Tera bit-operations per image of a config (absent layers: full precision, 16-bit weights)."""
    a = 16 if act_bits is None else int(act_bits)
    return float(sum(m * weight_bits(options.get(name)) * a for name, m in macs_per_image.items()) / 1e12)
