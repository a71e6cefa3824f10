"""timm's residual networks (the optional extra `pip install 'sdcompress[timm]'`).

A block is the outermost module carrying `drop_path` (or ViT's `drop_path1`): the unit timm's own stochastic depth
drops. What it becomes when removed follows from its class:

| block class | removed block becomes |
|---|---|
| resnet BasicBlock / Bottleneck | identity; `downsample` then `act2` / `act3` where it has one |
| regnet Bottleneck / PreBottleneck | `downsample` (identity or projection) then `act3`; not removable without one |
| efficientnet / mobilenetv3 blocks (`has_skip`) | identity where `has_skip`, else not removable |
| convnext ConvNeXtBlock | identity; `shortcut` where it is a projection |
| vision_transformer Block (and other `drop_path1` blocks) | identity |
| any other class with `drop_path` | not removable (its residual path is not known); name it by path instead |
"""

from __future__ import annotations

import copy

from torch import nn

from . import Family, register
from .torchvision import ShortcutThenActivation


def _rule(mod: nn.Module) -> tuple[str, str | None] | None:
    """(how, activation attribute) for a timm block class, None when `mod` is not a block."""
    if not (hasattr(mod, "drop_path") or hasattr(mod, "drop_path1")):  # None in timm's ResNet when the rate is 0
        return None
    where, name = type(mod).__module__, type(mod).__name__
    if where.startswith("timm.models.resnet") and name in ("BasicBlock", "Bottleneck"):
        return "resnet", "act2" if name == "BasicBlock" else "act3"
    if where.startswith("timm.models.regnet") and name in ("Bottleneck", "PreBottleneck"):
        return "regnet", "act3" if name == "Bottleneck" else None
    if hasattr(mod, "has_skip"):
        return "has_skip", None
    if where.startswith("timm.models.convnext") and name == "ConvNeXtBlock":
        return "convnext", None
    if hasattr(mod, "drop_path1"):
        return "identity", None
    return "unknown", None


def _removal(mod: nn.Module, how: str) -> str:
    if how == "resnet":
        return "identity" if mod.downsample is None else "shortcut"
    if how == "regnet":
        return "none" if mod.downsample is None else "shortcut"
    if how == "has_skip":
        return "identity" if mod.has_skip else "none"
    if how == "convnext":
        return "identity" if isinstance(mod.shortcut, nn.Identity) else "shortcut"
    return "identity" if how == "identity" else "none"


def find(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    if not any(type(m).__module__.startswith("timm.") for m in model.modules()):  # a timm model, or one wrapping it
        return []
    found, inside = [], ()
    for path, mod in model.named_modules():
        if inside and path.startswith(inside):
            continue  # a block inside a block: the outer one is the unit
        rule = _rule(mod)
        if rule is not None:
            found.append((path, mod, _removal(mod, rule[0])))
            inside = tuple(p + "." for p, _, _ in found)
    return found


def replacement(mod: nn.Module, removal: str, share: bool = False) -> nn.Module:
    if removal == "identity":
        return nn.Identity()
    if removal != "shortcut":
        raise ValueError(f"a {type(mod).__name__} without a known residual path cannot be removed")
    how, act_name = _rule(mod)
    own = (lambda m: m) if share else copy.deepcopy
    name = "shortcut" if how == "convnext" else "downsample"
    act = copy.deepcopy(getattr(mod, act_name)) if act_name else nn.Identity()
    if hasattr(act, "inplace"):
        act.inplace = False
    return ShortcutThenActivation(name, own(getattr(mod, name)), act)


FAMILY = register(Family("timm", find, replacement))
