"""Residual blocks of a model nobody here wrote, found by a forward pass.

`survey(model, example_input)` looks at every submodule that holds parameters and runs once, on one tensor, in an
evaluation-time forward pass of `example_input`. A module is a residual block when, with its residual branch
silenced, it passes its shortcut's output through:

1. Its input `x` and output `y` are caught on the pass.
2. The shortcut is either nothing (the identity) or one of its submodules that takes the very tensor `x` and
   returns a tensor of `y`'s shape (a `shortcut`, `downsample` or `proj` module, parameter-free or not).
3. On a copy of the module, every parameter outside that shortcut is set to zero (convolutions, linear layers,
   normalisation scales and shifts), which silences whatever the block adds to its shortcut. The copy is run on
   `x`; it must give `s(x)` or `relu(s(x))` (a block that applies ReLU after the addition), where `s` is the
   shortcut, and `s(x)` must not be zero. What the block becomes when removed is exactly that: `s` and, where the
   test needed it, the ReLU.

A plain convolution / normalisation / activation stack outputs zeros under step 3 and is refused; so is a module
that runs more than once per pass, takes several inputs or none of its weights matter. A module that contains
blocks (a stage, a `Sequential` of blocks) passes the test too, as a chain of silenced blocks; only the innermost
are kept. A stage starts where the shape changes: at a block whose output shape differs from its input, or
whose input differs from the previous block's output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import Block
from .torchvision import ShortcutThenActivation


@dataclass(frozen=True)
class Candidate:
    """One module the survey looked at, and its verdict."""

    path: str
    kind: str  # class name
    residual: bool
    why: str  # what was seen: the removal found, or why it was refused


def _zeroed_except(mod: nn.Module, keep: str) -> nn.Module:
    """A copy of `mod` with every parameter outside its submodule `keep` ("" keeps none) set to zero."""
    silent = copy.deepcopy(mod)
    with torch.no_grad():
        for name, p in silent.named_parameters():
            if not keep or not (name == keep or name.startswith(keep + ".")):
                p.zero_()
    return silent.eval()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    scale = max(1.0, float(b.abs().max()))
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def catch(model: nn.Module, example_input: torch.Tensor, paths: list[str] | None = None) -> tuple[dict, dict, list[str]]:
    """The calls of every module (or of `paths`) on one evaluation-time pass: path -> list of (args, kwargs,
    output); the model's modules by path; and the order in which the modules first finished."""
    calls: dict[str, list] = {}
    order: list[str] = []
    handles = []
    for path, mod in (model.named_modules() if paths is None else ((p, model.get_submodule(p)) for p in paths)):
        def hook(m, args, kwargs, out, path=path):
            if path not in calls:
                calls[path] = []
                order.append(path)
            calls[path].append((args, kwargs, out))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return calls, dict(model.named_modules()), order


def _judge(path: str, mod: nn.Module, calls: dict, order: list[str]) -> tuple[Candidate, dict | None]:
    """The verdict on one module, and for a residual block its removal (shortcut path, activation, shapes)."""
    kind = type(mod).__name__
    seen = calls.get(path, [])
    if len(seen) != 1:
        return Candidate(path, kind, False, f"runs {len(seen)} times per forward pass"), None
    args, kwargs, y = seen[0]
    if len(args) != 1 or kwargs or not torch.is_tensor(args[0]) or not torch.is_tensor(y):
        return Candidate(path, kind, False, "does not take and return one tensor"), None
    x = args[0]
    if not x.is_floating_point():
        return Candidate(path, kind, False, "its input is not a floating-point tensor"), None
    # shortcut candidates: the identity first, then submodules that take x itself and give y's shape (in the order they finished)
    shortcuts = [""] if x.shape == y.shape else []
    prefix = path + "." if path else ""
    for sub in order:
        if sub.startswith(prefix) and sub != path and len(calls[sub]) == 1:
            (sargs, _, sy) = calls[sub][0]
            rel = sub[len(prefix):]
            if sargs and sargs[0] is x and torch.is_tensor(sy) and sy.shape == y.shape \
                    and not any(rel.startswith(s + ".") for s in shortcuts if s):
                shortcuts.append(rel)
    if not shortcuts:
        return Candidate(path, kind, False, f"maps {tuple(x.shape)} to {tuple(y.shape)} and no submodule of it carries "
                                             f"its input to that shape (no shortcut)"), None
    matches = []
    with torch.no_grad():
        for rel in shortcuts:
            if not any(True for name, _ in mod.named_parameters() if not rel or not (name == rel or name.startswith(rel + "."))):
                continue  # all its weights are in that path: no branch (e.g. a block already removed to its shortcut)
            try:
                silent = _zeroed_except(mod, rel)
                y0 = silent(x)
                sx = silent.get_submodule(rel)(x) if rel else x
            except Exception:  # noqa: BLE001 - a module that cannot run with zero weights is not judged residual
                continue
            if not torch.is_tensor(y0) or not torch.isfinite(y0).all() or float(sx.abs().max()) == 0.0:
                continue
            act = next((a for a in ("", "relu") if _same(y0, sx if not a else torch.relu(sx))), None)
            if act is not None:
                matches.append((rel, act, y0))
    if matches:
        # two paths that each carry x to the output (branch and projection shortcut of a downsampling block):
        # the shortcut is the one with fewer parameters
        rel, act, y0 = min(matches, key=lambda m: sum(p.numel() for p in mod.get_submodule(m[0]).parameters()) if m[0] else -1)
        s = mod.get_submodule(rel) if rel else None
        what = "its input" if s is None else f"its shortcut {rel!r} ({type(s).__name__})"
        after = " then ReLU" if act else ""
        return (Candidate(path, kind, True, f"with its branch silenced it passes {what}{after} through"),
                {"shortcut": rel, "after": act, "shapes": (tuple(x.shape), tuple(y.shape)),
                 "scale": _last_affine(mod, prefix, rel, order, x, y0)})
    return Candidate(path, kind, False, "with its weights set to zero it does not pass its input (or a shortcut of "
                                         "it) through: not residual"), None


AFFINE = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm, nn.GroupNorm)


def _last_affine(mod: nn.Module, prefix: str, shortcut: str, order: list[str], x: torch.Tensor, removed: torch.Tensor) -> str:
    """The last affine layer of the block's residual branch (a BatchNorm, convolution, linear or LayerNorm /
    GroupNorm layer, called last of the block's layers outside its shortcut) when silencing that layer alone
    silences the branch: then scaling its weight and bias by c scales the branch by c. "" when there is none."""
    inside = [p[len(prefix):] for p in order if p.startswith(prefix) and p != prefix.rstrip(".")]
    inside = [r for r in inside if not (shortcut and (r == shortcut or r.startswith(shortcut + ".")))]
    layers = [r for r in inside if isinstance(mod.get_submodule(r), AFFINE) and any(True for _ in mod.get_submodule(r).parameters())]
    if not layers:
        return ""
    last = layers[-1]
    silent = copy.deepcopy(mod).eval()
    with torch.no_grad():
        for p in silent.get_submodule(last).parameters():
            p.zero_()
        try:
            out = silent(x)
        except Exception:  # noqa: BLE001
            return ""
    return last if torch.is_tensor(out) and _same(out, removed) else ""


def survey(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Block], list[Candidate]]:
    """The residual blocks of `model` (innermost, in the order they run) and the verdict on every candidate."""
    calls, modules, order = catch(model, example_input)
    verdicts: list[Candidate] = []
    found: dict[str, dict] = {}
    for path in order:
        mod = modules[path]
        if path == "" or not any(True for _ in mod.parameters(recurse=True)):
            continue
        if not list(mod.children()):  # a single layer (Conv2d, BatchNorm2d, Linear...) has no branch and no shortcut
            continue
        kids = [q for q in found if q.startswith(path + ".")]  # modules finish after what they contain
        if kids:
            verdicts.append(Candidate(path, type(mod).__name__, False, f"contains {len(kids)} residual block(s) "
                                                                       f"({kids[0]}, ...): a stage of blocks, not a block"))
            continue
        cand, info = _judge(path, mod, calls, order)
        verdicts.append(cand)
        if info is not None:
            found[path] = info
    blocks: list[Block] = []
    prev_out = None
    stage = 0
    for path in [p for p in order if p in found]:
        info = found[path]
        shape_in, shape_out = info["shapes"]
        if blocks and (shape_in != prev_out or shape_in != shape_out):
            stage += 1
        prev_out = shape_out
        removal = "identity" if not info["shortcut"] else "shortcut"
        blocks.append(Block(len(blocks), path, stage, removal, type(modules[path]).__name__, "found",
                            info["shortcut"], info["after"], info["scale"]))
    return blocks, verdicts


def replacement(mod: nn.Module, block: Block, share: bool = False) -> nn.Module:
    """What a found block becomes when removed: its shortcut (or nothing), then ReLU where the block applies one."""
    act = nn.ReLU() if block.after == "relu" else nn.Identity()
    if not block.shortcut:
        return act if block.after else nn.Identity()
    s = mod.get_submodule(block.shortcut)
    return ShortcutThenActivation(block.shortcut.replace(".", "_"), s if share else copy.deepcopy(s), act)
