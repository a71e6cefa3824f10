"""torchvision's residual networks.

| builders | block class | removed block becomes |
|---|---|---|
| resnet*, wide_resnet*, resnext* | BasicBlock, Bottleneck | identity; `downsample` then ReLU where it has one |
| mobilenet_v2, mobilenet_v3_* | InvertedResidual | identity where `use_res_connect`, else not removable |
| efficientnet_b*, efficientnet_v2_* | MBConv, FusedMBConv | identity where `use_res_connect`, else not removable |
| convnext_* | CNBlock | identity |
| regnet_* | ResBottleneckBlock | identity; `proj` then the block's activation where it has one |
| swin_*, swin_v2_* | SwinTransformerBlock(V2) | identity |
| vit_* | EncoderBlock | identity |

torchvision's stochastic depth (`StochasticDepth`, EfficientNet, ConvNeXt, Swin) scales surviving branches by
1/p in training and nothing at evaluation, so a removed block is its residual path alone: no rescaling of the
blocks that stay.
"""

from __future__ import annotations

import copy

from torch import nn

from . import Family, register


def _classes():
    from torchvision.models import convnext, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet, swin_transformer, vision_transformer

    return {
        resnet.BasicBlock: "downsample",
        resnet.Bottleneck: "downsample",
        regnet.ResBottleneckBlock: "proj",
        mobilenetv2.InvertedResidual: "use_res_connect",
        mobilenetv3.InvertedResidual: "use_res_connect",
        efficientnet.MBConv: "use_res_connect",
        efficientnet.FusedMBConv: "use_res_connect",
        convnext.CNBlock: None,
        swin_transformer.SwinTransformerBlock: None,
        swin_transformer.SwinTransformerBlockV2: None,
        vision_transformer.EncoderBlock: None,
    }


def _removal(mod: nn.Module, how: str | None) -> str:
    if how is None:
        return "identity"
    if how == "use_res_connect":
        return "identity" if mod.use_res_connect else "none"
    return "identity" if getattr(mod, how) is None else "shortcut"


def find(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    classes = _classes()
    found = []
    for path, mod in model.named_modules():
        how = classes.get(type(mod), "not a block")
        if how != "not a block":
            found.append((path, mod, _removal(mod, how)))
    return found


class ShortcutThenActivation(nn.Module):
    """A removed block with a projection shortcut: what `act(shortcut(x) + f(x))` is without `f`. The shortcut
    keeps its attribute name (`downsample`, `proj`), so its weights keep their state_dict keys."""

    def __init__(self, name: str, shortcut: nn.Module, act: nn.Module):
        super().__init__()
        self.name = name
        setattr(self, name, shortcut)
        self.act = act

    def forward(self, x):
        return self.act(getattr(self, self.name)(x))


def replacement(mod: nn.Module, removal: str, share: bool = False) -> nn.Module:
    if removal == "identity":
        return nn.Identity()
    if removal != "shortcut":
        raise ValueError(f"a {type(mod).__name__} without a residual path cannot be removed")
    own = (lambda m: m) if share else copy.deepcopy
    if hasattr(mod, "downsample"):  # torchvision ResNet: relu(bn(conv(...)) + downsample(x))
        return ShortcutThenActivation("downsample", own(mod.downsample), nn.ReLU())
    act = copy.deepcopy(mod.activation) if isinstance(getattr(mod, "activation", None), nn.Module) else nn.ReLU()
    if hasattr(act, "inplace"):
        act.inplace = False
    return ShortcutThenActivation("proj", own(mod.proj), act)  # RegNet: activation(proj(x) + f(x))


FAMILY = register(Family("torchvision", find, replacement))
