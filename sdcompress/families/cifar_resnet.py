"""The project's own CIFAR ResNets (`nets.ResNet`): blocks `blocks.N`; a removed block becomes its parameter-free
option-A shortcut (identity, or stride-2 subsampling with zero-padded channels).

The CLI prunes these through their spec (`prune.remove_blocks` rebuilds the network with `blocks_kept`, so the
checkpoint format is unchanged); this adapter lets the Python API treat them like any other family.
"""

from __future__ import annotations

import copy

from torch import nn

from . import Family, register


def find(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    from ..nets import BasicBlock, ResNet

    if not isinstance(model, ResNet):
        return []
    found = []
    for key, mod in model.blocks.items():
        if isinstance(mod, BasicBlock):
            same = mod.shortcut.stride == 1 and mod.shortcut.in_channels == mod.shortcut.out_channels
            found.append((f"blocks.{key}", mod, "identity" if same else "shortcut"))
    return found


def replacement(mod: nn.Module, removal: str, share: bool = False) -> nn.Module:
    return nn.Identity() if removal == "identity" else (mod.shortcut if share else copy.deepcopy(mod.shortcut))


FAMILY = register(Family("cifar_resnet", find, replacement))
