"""CIFAR ResNets (He et al. 2016, section 4.2) with stochastic depth (Huang et al. 2016).

6n+2 layers: a 3x3 stem, three stages of n basic blocks with 16, 32 and 64 channels, global average pooling
and a linear classifier. Shortcuts are parameter-free ("option A": stride-2 subsampling plus zero-padded
channels), so every block, the downsampling ones included, reduces exactly to its shortcut when it is dropped
in training or removed by pruning.

Scaling follows the paper: during training a block that runs adds its branch unscaled, f(x); the
evaluation-time network runs every block and adds p_l * f(x). Which network runs is chosen by the `run_mask`
argument of `ResNet.forward`, not by train/eval mode, so BatchNorm can be put in train mode (for
re-estimating its statistics) while the evaluation-time network runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .binary import apply_binary
from .errors import InputError
from .survival import survival_probs

# Blocks per stage (n) of each registered architecture: depth = 6n + 2.
ARCHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18, "resnet1202": 200}
STAGE_CHANNELS = (16, 32, 64)
MAX_CLASSES = 100_000  # classifier outputs (ImageNet-21k has 21,841); more is a corrupt label or sidecar
MAX_IN_CHANNELS = 64  # input image channels


@dataclass(frozen=True)
class NetSpec:
    """Everything needed to rebuild a network before its weights are loaded."""

    arch: str = "resnet56"  # a key of ARCHS
    in_channels: int = 3  # input image channels
    num_classes: int = 10  # classifier outputs
    survival_rule: str = "linear"  # linear | uniform | none
    p_last: float = 0.5  # the paper's p_L
    blocks_kept: tuple[int, ...] | None = None  # None: every block; else the kept block numbers, ascending
    binarized: tuple[str, ...] = ()  # names of the layers with 1-bit weights (see binary.py)
    # A model of another family ("torchvision:resnet18", "timm:convnext_atto"; see families/model.py) also carries:
    args: tuple[tuple[str, object], ...] = ()  # builder arguments besides num_classes, sorted (families.model.ARGS)
    paths: tuple[str, ...] = ()  # module path of every residual block of the full model, in order
    fixed: tuple[int, ...] = ()  # blocks without a residual path: never dropped, never removed
    stages: tuple[int, ...] = ()  # stage of every block (0-based; a new stage starts where a block changes the shape)

    @property
    def family(self) -> str:
        """"cifar_resnet" for the project's own ResNets, else the prefix of `arch` (torchvision, timm)."""
        return self.arch.partition(":")[0] if ":" in self.arch else "cifar_resnet"

    @property
    def layout(self) -> "CifarLayout":
        """Where this kind of network keeps its blocks, what its spec carries, how it is built: `CIFAR` for the
        project's ResNets, `families.model.LIBRARY` for torchvision and timm models. The one place the kinds differ."""
        if self.family == "cifar_resnet":
            return CIFAR
        from .families.model import LIBRARY  # families.model builds specs of its own: imported when first needed

        return LIBRARY

    def __post_init__(self):
        object.__setattr__(self, "args", tuple(sorted((str(k), v) for k, v in dict(self.args).items())))
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "fixed", tuple(sorted(set(int(b) for b in self.fixed))))
        object.__setattr__(self, "stages", tuple(int(g) for g in self.stages))
        self.layout.check(self)
        if not 1 <= self.in_channels <= MAX_IN_CHANNELS or not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"in_channels must be in [1, {MAX_IN_CHANNELS}] and num_classes in [2, {MAX_CLASSES:,}]")
        survival_probs(self.survival_rule, 1, self.p_last)  # validates rule and p_last
        if self.blocks_kept is not None:
            kept = tuple(int(b) for b in self.blocks_kept)
            if list(kept) != sorted(set(kept)) or any(not 0 <= b < self.blocks_total for b in kept):
                raise ValueError(f"blocks_kept must be ascending block numbers in 0..{self.blocks_total - 1}")
            # every block kept is the same network as "all": one spelling, so equal specs compare equal
            object.__setattr__(self, "blocks_kept", None if kept == tuple(range(self.blocks_total)) else kept)
        object.__setattr__(self, "binarized", tuple(sorted(set(self.binarized))))

    @property
    def blocks_total(self) -> int:
        return self.layout.blocks_total(self)

    def block_stage(self, b: int) -> int:
        """0-based stage of block `b`."""
        return self.layout.stage(self, b)

    def block_where(self, b: int) -> str:
        """What tells a block apart in a table: its width for the project's ResNets, else its module path."""
        return self.layout.where(self, b)

    def block_path(self, b: int) -> str:
        """Module path of block `b` in the built model."""
        return self.layout.path(self, b)

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(range(self.blocks_total)) if self.blocks_kept is None else self.blocks_kept

    def probs(self) -> list[float]:
        """Survival probability of every block by the rule; 1 for blocks that cannot be dropped."""
        p = survival_probs(self.survival_rule, self.blocks_total, self.p_last)
        return [1.0 if b in self.fixed else v for b, v in enumerate(p)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks_total"] = self.blocks_total
        d["blocks_kept"] = list(self.kept)
        d["binarized"] = list(self.binarized)
        d["args"], d["paths"], d["fixed"], d["stages"] = dict(self.args), list(self.paths), list(self.fixed), list(self.stages)
        for k in {"args", "paths", "fixed", "stages"} - set(self.layout.fields):  # written only by the kinds that have them
            del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetSpec":
        fields = {k: d[k] for k in ("arch", "in_channels", "num_classes", "survival_rule", "p_last") if k in d}
        kept = d.get("blocks_kept")
        args = d.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("args must be an object of builder arguments")
        return cls(**fields, blocks_kept=tuple(kept) if kept is not None else None, binarized=tuple(d.get("binarized", ())),
                   args=tuple(args.items()), paths=tuple(d.get("paths") or ()), fixed=tuple(d.get("fixed") or ()),
                   stages=tuple(d.get("stages") or ()))

    def with_kept(self, kept) -> "NetSpec":
        """The spec with only `kept` blocks (binarized layers of removed blocks are gone with them)."""
        kept = tuple(sorted(kept))
        gone = tuple(f"{self.block_path(b)}." for b in self.kept if b not in kept)
        # what a removed block leaves (a projection shortcut, families.replacement) keeps its layers
        left = tuple(f"{g}{name}." for g in gone for name in self.layout.left_by_removal)
        return replace(self, blocks_kept=kept,
                       binarized=tuple(n for n in self.binarized if not n.startswith(gone) or n.startswith(left)))


class CifarLayout:
    """The project's CIFAR ResNets (`ResNet`): three stages of n blocks at `blocks.N`, parameter-free shortcuts that
    leave no layer behind when a block is removed; the spec names the architecture and nothing else. The other
    kind, torchvision and timm models, is `families.model.LibraryLayout`, with the same methods."""

    fields: tuple[str, ...] = ()  # spec fields this kind carries beyond the common ones
    left_by_removal: tuple[str, ...] = ()  # modules a removed block leaves in place, with their layers

    def check(self, spec: NetSpec) -> None:
        if spec.arch not in ARCHS:
            raise ValueError(f"unknown architecture {spec.arch!r}; choose one of {', '.join(ARCHS)} (or torchvision:NAME, timm:NAME)")
        if spec.args or spec.paths or spec.fixed or spec.stages:
            raise ValueError(f"{spec.arch} takes no builder arguments, block paths, stages or fixed blocks")

    def blocks_total(self, spec: NetSpec) -> int:
        return 3 * ARCHS[spec.arch]

    def stage(self, spec: NetSpec, b: int) -> int:
        return b // ARCHS[spec.arch]

    def where(self, spec: NetSpec, b: int) -> str:
        return str(block_layout(spec.arch)[b][1])

    def path(self, spec: NetSpec, b: int) -> str:
        return f"blocks.{b}"

    def build(self, spec: NetSpec) -> nn.Module:
        return ResNet(spec)


CIFAR = CifarLayout()


def block_layout(arch: str) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of every block of an architecture, block 0 first."""
    n = ARCHS[arch]
    layout = []
    in_ch = STAGE_CHANNELS[0]
    for stage, out_ch in enumerate(STAGE_CHANNELS):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layout.append((in_ch, out_ch, stride))
            in_ch = out_ch
    return layout


class Shortcut(nn.Module):
    """Parameter-free shortcut (option A): identity, or stride-2 subsampling with zero-padded channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a parameter-free shortcut; the unit stochastic depth drops."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, survival_prob: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = Shortcut(in_channels, out_channels, stride)
        self.survival_prob = float(survival_prob)
        self.record_contribution = False
        self.last_contribution: torch.Tensor | None = None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        identity = self.shortcut(x)
        f = self.branch(x)
        if self.record_contribution:
            with torch.no_grad():
                self.last_contribution = f.float().norm() / identity.float().norm().clamp_min(1e-12)
        return F.relu(identity + f * scale if scale != 1.0 else identity + f)


class ResNet(nn.Module):
    """A CIFAR ResNet whose residual blocks sit in `blocks`, keyed by their block number.

    Removed blocks are absent from `blocks`; a removed downsampling block is replaced by its parameter-free
    `Shortcut`, so the network still changes resolution and width where it did.
    """

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        self.scale_exponent = 1.0  # t: at evaluation block l adds p_l^t f(x) (1: as trained; a prune may choose another, `rescale_blocks`)
        probs = spec.probs()
        kept = set(spec.kept)
        self.stem = nn.Conv2d(spec.in_channels, STAGE_CHANNELS[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.blocks = nn.ModuleDict()
        for l, (cin, cout, stride) in enumerate(block_layout(spec.arch)):
            if l in kept:
                self.blocks[str(l)] = BasicBlock(cin, cout, stride, probs[l])
            elif stride != 1 or cin != cout:
                self.blocks[str(l)] = Shortcut(cin, cout, stride)
        self.fc = nn.Linear(STAGE_CHANNELS[-1], spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def block_ids(self) -> list[int]:
        """Numbers of the residual blocks present (kept), ascending."""
        return [int(k) for k, m in self.blocks.items() if isinstance(m, BasicBlock)]

    def forward(self, x: torch.Tensor, run_mask: dict[int, bool] | None = None) -> torch.Tensor:
        """Run the network.

        Args:
            x: a normalized image batch, NCHW.
            run_mask: None for the evaluation-time network (every block runs, branch scaled by p_l); otherwise
                the training draw, block number -> runs. A block that does not run is not computed at all:
                only its shortcut is, so its parameters get no gradient that step.
        """
        x = F.relu(self.stem_bn(self.stem(x)))
        for key, m in self.blocks.items():
            if not isinstance(m, BasicBlock):
                x = m(x)
            elif run_mask is None:
                x = m(x, m.survival_prob)
            elif run_mask[int(key)]:
                x = m(x)
            else:
                x = m.shortcut(x)  # the input is post-ReLU, so ReLU(shortcut(x)) == shortcut(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)

    def block_survival(self) -> dict[int, float]:
        """p_l of every present block."""
        return {b: self.blocks[str(b)].survival_prob for b in self.block_ids}

    def contributions(self) -> dict[int, torch.Tensor | None]:
        """||f(x)|| / ||x|| of every present block on the last recorded forward pass (None: it did not run)."""
        return {b: self.blocks[str(b)].last_contribution for b in self.block_ids}

    def set_record_contribution(self, on: bool) -> None:
        for m in self.blocks.values():
            if isinstance(m, BasicBlock):
                m.record_contribution = on
                m.last_contribution = None


@torch.no_grad()
def scale_blocks(model: ResNet, power: float) -> None:
    """Multiply each present block's last BatchNorm (scale and shift) by its p_l^power, in place: the one fold of p_l.
    -1 on pretrained weights before a retrofit (the evaluation-time network starts as the pretrained one; in training
    a block that runs then adds f / p_l, on average the pretrained f); +1 in the ONNX export, which folds the
    evaluation-time p_l so the graph has no multiply for it; `rescale_blocks` after pruning. Blocks at p_l 1 are left
    as they are (nothing to fold; a folded copy's BatchNorm may be a plain affine by now)."""
    for b in model.block_ids:
        blk = model.blocks[str(b)]
        if blk.survival_prob < 1.0:
            factor = blk.survival_prob ** power
            blk.bn2.weight.mul_(factor)
            blk.bn2.bias.mul_(factor)


EXPONENT_RANGE = (-2.0, 1.0)  # t of p_l^t f(x) a prune may choose (`pruning.search_exponent`): as trained (1) down to 1/p_l^2


def check_exponent(v, where: str) -> float:
    """A block-scale exponent read from a file: a finite number in `EXPONENT_RANGE`, else one clear error."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not EXPONENT_RANGE[0] <= v <= EXPONENT_RANGE[1]:
        raise InputError(f"{where}: must be a number from {EXPONENT_RANGE[0]:g} to {EXPONENT_RANGE[1]:g}, got {v!r:.40}")
    return float(v)


def rescale_blocks(model: ResNet, exponent: float) -> None:
    """Make each present block add p_l^exponent f(x) at evaluation, in place (`scale_blocks` by the difference from
    `model.scale_exponent`). 1 is the stochastic depth rule (how the network was trained to be evaluated), 0 adds
    f(x) as a training step where the block ran, below 0 amplifies the blocks of a network that lost others
    (`pruning.choose_block_scale`)."""
    scale_blocks(model, exponent - getattr(model, "scale_exponent", 1.0))  # a network pickled whole before t existed: 1
    model.scale_exponent = exponent


def build_model(spec: NetSpec) -> nn.Module:
    """Build a network from its spec (random weights; load a state_dict to restore one): a `ResNet`, or a
    `families.model.FamilyNet` around a torchvision or timm model."""
    model = spec.layout.build(spec)
    apply_binary(model, spec.binarized)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_with_hooks(model: nn.Module, input_shape: tuple[int, ...], hooks: dict) -> None:
    """One evaluation-time forward pass of a zero image with forward hooks on the named modules, then removed."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(fn) for n, fn in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
    """Multiply-accumulate count of the evaluation-time network on one image, in total and per block.

    Counted from the shapes seen in one forward pass: a conv costs out_elements * in_channels/groups * kh * kw,
    a linear layer in_features * out_features. BatchNorm, ReLU, pooling and shortcuts are not counted.
    """
    macs: dict[str, int] = {}

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                macs[name] = macs.get(name, 0) + out.numel() // out.shape[0] * k
            else:
                macs[name] = macs.get(name, 0) + mod.in_features * mod.out_features

        return fn

    forward_with_hooks(model, input_shape, {n: hook(n) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))})
    per_block: dict[int, int] = {}
    spec = getattr(model, "spec", None)  # a plain nn.Module (the Python API) has no blocks of ours to count by
    prefixes = {spec.block_path(b) + ".": b for b in model.block_ids} if isinstance(spec, NetSpec) else {}
    for name, v in macs.items():
        b = next((b for pre, b in prefixes.items() if name.startswith(pre)), None)
        if b is not None:
            per_block[b] = per_block.get(b, 0) + v
    return {"total": sum(macs.values()), "per_block": dict(sorted(per_block.items())), "per_layer": macs}


__all__ = ["ARCHS", "NetSpec", "ResNet", "BasicBlock", "Shortcut", "build_model", "block_layout", "count_params", "count_macs"]
