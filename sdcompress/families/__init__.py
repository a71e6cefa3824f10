"""Model families: which modules of a network are its residual blocks, and what each becomes when removed.

A family is an adapter over one kind of network. For a model it lists the residual blocks in order (input to
output), each with its module path, its stage (a run of blocks at one resolution and width; a new stage starts
at a block whose removal changes the shape) and its removal: `identity` when the block's input and output have
the same shape (what is left of `x + f(x)` without `f`), `shortcut` when the block carries its own projection
(torchvision ResNet's `downsample`, RegNet's `proj`: what is left is that projection and the activation after
the addition), or `none` when the block has no residual path and cannot be removed.

Families are tried in registration order; the first whose `blocks` finds anything wins. A user can also name
blocks of any module by their paths (`named_blocks`); those are checked with a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

REMOVALS = ("identity", "shortcut", "none")


@dataclass(frozen=True)
class Block:
    """One residual block of a model."""

    index: int  # 0..L-1 from input to output
    path: str  # module path, e.g. "layer2.0"
    stage: int  # 0-based; a new stage starts at a block that changes the shape
    removal: str  # identity | shortcut | none
    kind: str  # the block's class name
    family: str  # the adapter that found it ("named": paths a user gave; "found": a forward-pass survey)
    shortcut: str = ""  # "found" blocks: path of the block's own shortcut module, relative to the block ("": none)
    after: str = ""  # "found" blocks: "relu" when the block applies ReLU after the addition
    scale: str = ""  # "found" blocks: the branch's last affine layer (relative path), whose weights scale the branch

    @property
    def removable(self) -> bool:
        return self.removal != "none"


@dataclass(frozen=True)
class Family:
    """An adapter: `find(model)` lists (path, module, removal) for every block, in forward order;
    `replacement(module, removal, share)` is the module a removed block becomes (with `share`, one that uses the
    block's own shortcut weights rather than a copy: the residual path of a block dropped for one training step)."""

    name: str
    find: Callable[[nn.Module], list[tuple[str, nn.Module, str]]]
    replacement: Callable[[nn.Module, str, bool], nn.Module]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def number(found: list[tuple[str, nn.Module, str]], family: str) -> list[Block]:
    """Blocks with their index and stage: a stage ends where a block changes the shape."""
    blocks, stage = [], 0
    for i, (path, mod, removal) in enumerate(found):
        # a shortcut that is itself an identity (timm's RegNet gives every block a `downsample`) keeps the stage
        same = removal == "identity" or isinstance(getattr(mod, "downsample", None), nn.Identity)
        if i > 0 and not same:
            stage += 1
        blocks.append(Block(i, path, stage, removal, type(mod).__name__, family))
    return blocks


def replacement(model: nn.Module, block: Block, share: bool = False) -> nn.Module:
    """What `block` of `model` becomes when it is removed (`share`: using the block's own shortcut weights)."""
    if not block.removable:
        raise ValueError(f"block {block.index} ({block.path}, {block.kind}) has no residual path and cannot be removed")
    if block.family == "named":
        return nn.Identity()
    if block.family == "found":
        from .found import replacement as found_replacement

        return found_replacement(model.get_submodule(block.path), block, share)
    return FAMILIES[block.family].replacement(model.get_submodule(block.path), block.removal, share)


def family_of(model: nn.Module) -> tuple[Family, list[Block]]:
    """The family that recognises `model`, and its blocks; ValueError if none does."""
    from . import cifar_resnet, timm, torchvision  # noqa: F401 - registration, the project's own first

    for fam in FAMILIES.values():
        found = fam.find(model)
        if found:
            return fam, number(found, fam.name)
    raise ValueError(f"no residual blocks recognised in {type(model).__name__} by its classes")
