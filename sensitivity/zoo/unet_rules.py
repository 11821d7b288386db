"""Skip-connection split points of diffusers ``UNet2DConditionModel`` up-blocks (SD1.5, SDXL).

In every up-block resnet the input is ``torch.cat([hidden_states, res_hidden_states], dim=1)``:
the main path first, the skip connection from the down path second. The main path's channel count
is the output width of the module that ran just before: the mid-block for the first resnet of
``up_blocks.0``, the previous resnet in the same block, or the previous block's last resnet
(upsamplers keep the width). :func:`up_block_splits` returns ``{path: main_channels}``, the input
channel where the ``#skip`` half starts.
"""

from __future__ import annotations

from typing import Dict

from torch import nn

from ..errors import SensitivityError


def up_block_splits(unet: nn.Module, layer: str) -> Dict[str, int]:
    """``{"up_blocks.i.resnets.j.<layer>": main_channels}`` for every up-block resnet.

    ``layer`` is ``"conv1"`` or ``"conv_shortcut"`` (both read the concatenated input).
    """
    main = unet.mid_block.resnets[-1].out_channels
    splits: Dict[str, int] = {}
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            module = getattr(resnet, layer, None)
            if module is None:
                raise SensitivityError(f"up_blocks.{i}.resnets.{j} has no {layer}; not a skip-concat resnet")
            if not 0 < main < module.in_channels:
                raise SensitivityError(f"up_blocks.{i}.resnets.{j}.{layer}: main path of {main} channels does not "
                                       f"fit its {module.in_channels} input channels")
            splits[f"up_blocks.{i}.resnets.{j}.{layer}"] = int(main)
            main = resnet.out_channels
    return splits
