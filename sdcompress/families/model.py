"""Networks of other families in the project's commands: `FamilyNet` wraps a torchvision or timm model.

A checkpoint of such a model names its builder and arguments in the sidecar's spec (`arch` "torchvision:resnet18"
or "timm:convnext_atto", `args`, and the module path of every block); loading calls that builder by name from
the library's own registry, with arguments from a short allow-list of plain numbers, and never runs code from the
file. Removed blocks are replaced by what is left of them (`families.replacement`) before the weights are loaded.

Training: per mini-batch, the blocks drawn as dropped are swapped for their residual path (the identity, or the
block's own projection shortcut sharing its weights) for that one forward pass, so they are not computed and
their parameters get no gradient, as with the project's own ResNets. The model's own per-sample stochastic
depth (torchvision `StochasticDepth`, timm `DropPath`) is switched off: the rate of each block is the spec's.
Unlike the project's ResNets, the evaluation-time network does not scale a block by its survival probability:
these blocks' residual branch is not separable from the block in general (torchvision's ResNet applies ReLU after
the addition), so every block runs at full weight in training and at evaluation, as in LayerDrop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import Block, family_of, replacement

FAMILIES = ("torchvision", "timm")
SUPPORTED = {  # builder name prefixes with an adapter (families/torchvision.py; timm: any model whose blocks carry drop_path)
    "torchvision": ("resnet", "wide_resnet", "resnext", "mobilenet_v2", "mobilenet_v3", "efficientnet_b", "efficientnet_v2",
                    "convnext", "regnet", "swin", "vit_"),
}
# Builder arguments a sidecar may carry (besides num_classes), with their ranges: plain numbers, nothing callable.
ARGS = {"width_mult": (0.1, 4.0), "dropout": (0.0, 1.0), "image_size": (16, 1024)}
SHORTCUT_NAMES = ("downsample", "proj", "shortcut")  # what a removed block may keep (its own projection, families.replacement)


def _builder(family: str, name: str):
    """The library's own builder for `name`; ValueError when the library does not register it."""
    if family == "torchvision":
        import torchvision.models as tvm

        if name not in tvm.list_models(module=tvm) or not name.startswith(SUPPORTED["torchvision"]):
            raise ValueError(f"torchvision has no supported classification model {name!r} (e.g. resnet18, mobilenet_v2, "
                             f"convnext_tiny, efficientnet_b0)")
        return lambda **kw: tvm.get_model(name, weights=None, **kw)
    if family == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError("timm models need the timm extra: pip install 'sdcompress[timm]'") from None
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}")
        def build(**kw):
            try:
                return timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kw)
            except TypeError as e:
                if "drop_path_rate" in str(e):
                    raise ValueError(f"timm model {name!r} has no drop path (no stochastic-depth residual blocks to drop or "
                                     f"remove); choose a residual timm model (resnet*, convnext*, regnet*, vit_*, ...)") from None
                raise

        return build
    raise ValueError(f"unknown model family {family!r}; choose torchvision or timm")


def check_spec(spec) -> None:
    """The parts of a NetSpec that only other families have (called by NetSpec itself)."""
    family, _, name = spec.arch.partition(":")
    if family not in FAMILIES or not name:
        raise ValueError(f"unknown architecture {spec.arch!r}; other families are torchvision:NAME or timm:NAME")
    for k, v in spec.args:
        if k not in ARGS:
            raise ValueError(f"builder argument {k!r} is not one sdcompress passes (allowed: {', '.join(ARGS)})")
        lo, hi = ARGS[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise ValueError(f"builder argument {k} must be a number in [{lo}, {hi}], got {v!r:.40}")
    if not spec.paths or not all(isinstance(p, str) and p for p in spec.paths):
        raise ValueError("a model of another family needs the module path of each of its blocks (spec.paths)")
    if len(spec.stages) != len(spec.paths) or any(not 0 <= g <= b for b, g in enumerate(spec.stages)):
        raise ValueError("a model of another family needs the stage of each of its blocks (spec.stages)")
    if any(not 0 <= b < len(spec.paths) for b in spec.fixed):
        raise ValueError("fixed blocks must be block numbers of the model")
    if spec.blocks_kept is not None and not set(spec.fixed) <= set(spec.blocks_kept):
        raise ValueError("blocks without a residual path cannot be removed")


class LibraryLayout:
    """torchvision and timm models in the project's commands (`FamilyNet`): the spec names the builder, its
    arguments, the module path and stage of every block and the blocks without a residual path (`fixed`); a removed
    block may leave its own projection shortcut. `nets.CifarLayout` is the other kind, with the same methods."""

    fields: tuple[str, ...] = ("args", "paths", "fixed", "stages")
    left_by_removal: tuple[str, ...] = SHORTCUT_NAMES

    def check(self, spec) -> None:
        check_spec(spec)

    def blocks_total(self, spec) -> int:
        return len(spec.paths)

    def stage(self, spec, b: int) -> int:
        return spec.stages[b]

    def where(self, spec, b: int) -> str:
        return spec.paths[b]

    def path(self, spec, b: int) -> str:
        return f"net.{spec.paths[b]}"

    def build(self, spec) -> nn.Module:
        return FamilyNet(spec)


LIBRARY = LibraryLayout()


def build_plain(arch: str, num_classes: int, args: dict | None = None) -> nn.Module:
    """The library's model for `arch` ("torchvision:NAME" / "timm:NAME"), random weights."""
    family, _, name = arch.partition(":")
    return _builder(family, name)(num_classes=num_classes, **(args or {}))


def describe(arch: str, input_shape: tuple[int, int, int], num_classes: int, survival_rule: str, p_last: float,
             args: dict | None = None):
    """The NetSpec of a fresh model of another family for images of `input_shape` (CHW): builds it once, runs one
    batch of that size through it (a ViT built for 224x224 refuses 32x32 here, not at the first training step),
    and finds its blocks."""
    from ..nets import NetSpec

    in_channels = input_shape[0]
    if in_channels != 3:
        raise ValueError(f"{arch} takes 3-channel (colour) images; this data has {in_channels} channel(s)")
    probe = NetSpec(arch, in_channels, num_classes, survival_rule, p_last, args=tuple((args or {}).items()), paths=("x",), stages=(0,))
    plain = build_plain(arch, num_classes, dict(probe.args)).eval()
    try:
        with torch.no_grad():
            plain(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - the library's own refusal, e.g. "Wrong image height! Expected 224 but got 32!"
        raise ValueError(f"does not take {input_shape[1]}x{input_shape[2]} images ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    _, blocks = family_of(plain)
    return NetSpec(arch, in_channels, num_classes, survival_rule, p_last, args=probe.args, paths=tuple(b.path for b in blocks),
                   fixed=tuple(b.index for b in blocks if not b.removable), stages=tuple(b.stage for b in blocks))


def _no_own_drop_path(net: nn.Module) -> None:
    """Switch off the model's own per-sample stochastic depth (the spec's per-batch rates replace it)."""
    from torchvision.ops import StochasticDepth

    for m in net.modules():
        if isinstance(m, StochasticDepth):
            m.p = 0.0
        elif type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):  # timm
            m.drop_prob = 0.0


class FamilyNet(nn.Module):
    """A torchvision or timm model (`self.net`) with the interface the project's commands use.

    `forward(x, run_mask)` runs the model with the blocks that `run_mask` marks False replaced by their residual path for
    that pass; `run_mask=None` is the evaluation-time network (every present block, unscaled). Removed blocks are
    replaced permanently at construction, so they hold no parameters.
    """

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.net = build_plain(spec.arch, spec.num_classes, dict(spec.args))
        _no_own_drop_path(self.net)
        _, found = family_of(self.net)
        if tuple(b.path for b in found) != spec.paths or tuple(b.stage for b in found) != spec.stages:
            raise ValueError(f"{spec.arch} has blocks {[b.path for b in found][:3]}..., the spec lists {list(spec.paths)[:3]}...; "
                             f"the checkpoint was made by another version of its library")
        probs = spec.probs()
        kept = set(spec.kept)
        # plain attributes, not submodules: the blocks already sit in self.net (one key per weight in state_dict)
        self._block: dict[int, Block] = {}
        self._module: dict[int, nn.Module] = {}
        self._skip: dict[int, nn.Module] = {}
        self._p: dict[int, float] = {}
        for b in found:
            if b.index not in kept:
                self.net.set_submodule(b.path, replacement(self.net, b))
                continue
            self._block[b.index], self._module[b.index], self._p[b.index] = b, self.net.get_submodule(b.path), probs[b.index]
            if b.removable:
                self._skip[b.index] = replacement(self.net, b, share=True)
        self._contrib: dict[int, torch.Tensor | None] = {}
        self._hooks: list = []

    @property
    def block_ids(self) -> list[int]:
        return sorted(self._block)

    def block_survival(self) -> dict[int, float]:
        return dict(self._p)

    def contributions(self) -> dict[int, torch.Tensor | None]:
        return {b: self._contrib.get(b) for b in self.block_ids}

    def forward(self, x: torch.Tensor, run_mask: dict[int, bool] | None = None) -> torch.Tensor:
        dropped = [b for b, runs in (run_mask or {}).items() if not runs and b in self._skip]
        if not dropped:
            return self.net(x)
        try:
            for b in dropped:
                self.net.set_submodule(self._block[b].path, self._skip[b])
            return self.net(x)
        finally:
            for b in dropped:
                self.net.set_submodule(self._block[b].path, self._module[b])

    def set_record_contribution(self, on: bool) -> None:
        """Record ||block(x) - removed(x)|| / ||removed(x)|| of every block that runs, on each forward pass.

        removed(x) is what the block's forward computed anyway: its input (identity removal), or the output of its
        own projection shortcut, caught on the way (then the activation after the addition), never run a second
        time (which would update a shortcut BatchNorm's running statistics twice).
        """
        for h in self._hooks:
            h.remove()
        self._hooks, self._contrib = [], {}
        if not on:
            return
        caught: dict[int, torch.Tensor] = {}
        for b, mod in self._module.items():
            skip = self._skip.get(b)
            if skip is None:
                continue
            projection = getattr(skip, getattr(skip, "name", ""), None) if not isinstance(skip, nn.Identity) else None
            if projection is not None:
                def catch(m, args, out, b=b):
                    caught[b] = out.detach()

                self._hooks.append(projection.register_forward_hook(catch))

            def hook(m, args, out, b=b, skip=skip, projection=projection):
                if not (torch.is_tensor(args[0]) and torch.is_tensor(out)):
                    return
                with torch.no_grad():
                    rest = args[0] if projection is None else skip.act(caught.pop(b))
                    rest = rest.float()
                    self._contrib[b] = (out.float() - rest).norm() / rest.norm().clamp_min(1e-12)

            self._hooks.append(mod.register_forward_hook(hook))

    def __getstate__(self):  # deepcopy and pickling: our recording hooks stay with the original
        state = self.__dict__.copy()
        state["_hook_ids"] = [h.id for h in self._hooks]
        state["_hooks"], state["_contrib"] = [], {}
        return state

    def __setstate__(self, state):
        ids = state.pop("_hook_ids", [])
        super().__setstate__(state)
        for m in self.modules():  # the copied submodules hold copies of the hook tables: drop ours from them
            for i in ids:
                m._forward_hooks.pop(i, None)
