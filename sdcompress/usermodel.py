"""Checkpoints of a user's own module: `save(model, folder)` and `load(folder, model=MyNet())`.

A folder holds `weights.pt` (the state_dict, read back with `weights_only=True`) and `blocks.json`, the sidecar:
the model's class name (checked, never imported), its blocks, the blocks removed and what each became, its
1-bit layers, and the drop effects when given. Loading rebuilds from the user's own object: every removed block of the fresh model is
replaced as it was (`families.replacement`, so the removed blocks' parameters are not there), then the weights
are loaded strictly. A sidecar alone never makes sdcompress import or run anything: a builder is used only when
the caller names it (`builder="package.module:function"`, imported because the caller asked).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import torch
from torch import nn

from .binary import apply_binary, binary_layer_names
from .errors import InputError
from .families import REMOVALS, Block, replacement
from .files import atomic_torch_save, atomic_write_json, output_folder, parse_untrusted_json

FORMAT = "sdcompress-module"
MARK = "_sdcompress_removed"  # attribute of the module a removed block became: its Block


def mark_removed(module: nn.Module, block: Block) -> nn.Module:
    setattr(module, MARK, block)
    return module


def removed_blocks(model: nn.Module) -> list[Block]:
    return [getattr(m, MARK) for _, m in model.named_modules() if isinstance(getattr(m, MARK, None), Block)]


def _block_from(d, where: str) -> Block:
    fields = {f.name for f in dataclasses.fields(Block)}
    if not isinstance(d, dict) or set(d) - fields or not {"index", "path", "stage", "removal", "kind", "family"} <= set(d):
        raise InputError(f"{where}: not a block record")
    if not isinstance(d["index"], int) or not isinstance(d["stage"], int) or d["removal"] not in REMOVALS:
        raise InputError(f"{where}: not a block record")
    if not all(isinstance(d.get(k, ""), str) for k in ("path", "kind", "family", "shortcut", "after", "scale")):
        raise InputError(f"{where}: not a block record")
    if d.get("after", "") not in ("", "relu"):
        raise InputError(f"{where}: unknown activation {d['after']!r}")
    return Block(**d)


def save(model: nn.Module, folder: str | Path, blocks: list[Block] | None = None, stats=None, force: bool = False,
         data: dict | None = None, arch: str | None = None, checkpoint=None) -> Path:
    """Write `model` (e.g. pruned) to `folder`: weights and the sidecar. `blocks`: its present blocks (default: those of
    `stats`, if given); `stats`: the `DropEffects` to keep with it; `data`: what the model takes (the command line
    keeps the data's name, classes and normalization here); `arch`: the builder it was made with, as a record
    (loading imports a builder only when the caller names it). The folder is written as one unit.

    Args:
        model: the module to save (any `nn.Module`, pruned or binarized by sdcompress or not).
        folder: the folder to write (`weights.pt`, `blocks.json`).
        blocks: its present blocks, as `find_blocks` gives them.
        stats: the `DropEffects` to keep with it.
        force: replace an existing folder.
        data: what the model takes, kept in the sidecar.
        arch: the builder it was made with, as a record.
        checkpoint: for a network loaded from a command-line checkpoint (`load(folder)` without a model), its
            `side["checkpoint"]`: the folder is then written as a command-line checkpoint (`model.pt`, `model.json`)
            that every `sdcompress` command reads, with one more stage, "python", in its history; its statistics are
            the checkpoint's, or `stats` where given (`blocks`, `data` and `arch` are the checkpoint's own).

    Returns:
        The folder written.

    Raises:
        InputError: the folder exists and `force` is False, or `checkpoint` for a network it does not describe.

    Example:
        >>> sdcompress.save(small, "runs/small", stats=trained.stats)
        >>> again = sdcompress.load("runs/small", model=Net())
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise InputError(f"{folder} exists; pass force=True to replace it")
    if checkpoint is not None:
        return _save_checkpoint(model, folder, checkpoint, stats)
    blocks = list(blocks) if blocks is not None else (list(stats.blocks) if stats is not None else [])
    side = {
        "format": FORMAT, "version": 1,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": sum(p.numel() for p in model.parameters()),
        "removed": [dataclasses.asdict(b) for b in removed_blocks(model)],
        "binarized": binary_layer_names(model),
        "blocks": [dataclasses.asdict(b) for b in blocks],
        "arch": arch,
        "data": data,
        "spec": _spec_of(model),
        "scale_exponent": getattr(model, "scale_exponent", None),  # kept blocks add p_l^t f(x): t, for a later prune or binarize
        "stats": None if stats is None else {
            "source": stats.source, "batches": stats.batches, "effect": list(stats.effect), "stderr": list(stats.stderr),
            "drop_rates": list(stats.drop_rates), "runs": list(stats.runs), "params": stats.params,
        },
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with output_folder(folder) as tmp:
        atomic_torch_save(state, tmp / "weights.pt")
        atomic_write_json(tmp / "blocks.json", side)
    return folder


def _save_checkpoint(model: nn.Module, folder: Path, checkpoint, stats) -> Path:
    from .checkpoint import Sidecar, save_checkpoint
    from .nets import NetSpec

    spec = getattr(model, "spec", None)
    if not isinstance(checkpoint, Sidecar) or not isinstance(spec, NetSpec) or spec.arch != checkpoint.spec.arch:
        raise InputError(f"checkpoint= is the side['checkpoint'] that load() gave for this network ({getattr(spec, 'arch', type(model).__name__)}); "
                         f"got {type(checkpoint).__name__}")
    binarized = tuple(binary_layer_names(model))
    if tuple(sorted(binarized)) != spec.binarized:
        raise InputError(f"the network's 1-bit layers ({len(binarized)}) are not those its spec names ({len(spec.binarized)}): "
                         f"binarize it with sdcompress.binarize")
    stage = {"stage": "python", "config": {}}
    if hasattr(model, "scale_exponent"):  # what its kept blocks add (prune may have chosen), so a later prune never divides twice
        from .pruning import scale_name

        stage["block_scale"] = {"chosen": scale_name(model.scale_exponent), "exponent": model.scale_exponent, "why": "as the Python session left it"}
    meta = checkpoint.derive(spec, stage, {})
    if stats is not None:  # effects measured or recorded in Python replace the checkpoint's; contributions are kept
        from .api import _spec_numbers

        d = meta.to_dict()
        d["survival_stats"] = stats.to_table(_spec_numbers(model), spec.blocks_total, checkpoint.survival_stats)
        meta = Sidecar.from_dict(d)
    with output_folder(folder) as tmp:
        save_checkpoint(tmp, model, meta)
    return folder


def _load_checkpoint(folder: Path):
    """A command-line checkpoint (model.pt + model.json: the project's ResNets, torchvision and timm networks)."""
    import dataclasses as dc

    from .api import DropEffects, _spec_numbers, find_blocks
    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(folder)
    blocks = find_blocks(model)
    params = sum(p.numel() for p in model.parameters())
    stats = DropEffects.from_table(meta.survival_stats, blocks, _spec_numbers(model), params) if meta.survival_stats else None
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dc.asdict(meta.data).items()}
    return model.eval(), {"blocks": blocks, "removed": [], "stats": stats, "class": f"{type(model).__module__}.{type(model).__qualname__}",
                          "data": data, "arch": meta.spec.arch, "checkpoint": meta}


def _spec_of(model: nn.Module) -> dict | None:
    """The spec of a network built from one (the project's ResNets, torchvision / timm as the commands wrap them): its
    removed blocks and 1-bit layers are in it, so `load` rebuilds the network from it."""
    from .nets import NetSpec

    spec = getattr(model, "spec", None)
    return spec.to_dict() if isinstance(spec, NetSpec) else None


def build(builder: str) -> nn.Module:
    """The module `builder` ("package.module:function", optionally after "python:") returns, imported now because the
    caller named it."""
    m = re.fullmatch(r"(?:python:)?([A-Za-z_][\w.]*):([A-Za-z_]\w*)", builder or "")
    if not m:
        raise InputError(f"builder must be 'package.module:function', got {builder!r}")
    import os
    import sys

    if os.getcwd() not in sys.path:  # as `python -m` does: the user's own package, where they run the command
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(m.group(1)), m.group(2))
    except (ImportError, AttributeError) as e:
        raise InputError(f"cannot import builder {builder!r} ({e})") from None
    model = fn()
    if not isinstance(model, nn.Module):
        raise InputError(f"builder {builder!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load(folder: str | Path, model: nn.Module | None = None, builder: str | None = None):
    """The model saved in `folder`, rebuilt on `model` (a fresh instance of the user's class, its weights are
    replaced) or on what `builder` ("package.module:function", imported because you named it) returns. A folder
    written by the command line (`model.json`: the bundled models, `sdcompress train` and `prune` outputs) rebuilds
    its own network: call `load(folder)` alone; its sidecar then also holds `checkpoint` (for `save`) and the
    drop effects recorded in its training as `stats`.

    Args:
        folder: a folder written by `save`.
        model: a fresh instance of the class that was saved; its blocks are removed and its layers binarized as
            the sidecar says, then the weights loaded.
        builder: instead of `model`, "package.module:function" to build it with.

    Returns:
        (model, sidecar): the model in evaluation mode, and the sidecar as a dict (blocks, removed, stats).

    Raises:
        InputError: no sidecar, neither `model` nor `builder`, or a model of another class or shape.

    Example:
        >>> model, side = sdcompress.load("runs/small", model=Net())
    """
    from .api import DropEffects

    folder = Path(folder)
    if not (folder / "blocks.json").exists() and (folder / "model.json").is_file():
        if model is not None or builder is not None:
            raise InputError(f"{folder} is a command-line checkpoint: its model.json rebuilds the network; call load({str(folder)!r}) "
                             f"without model or builder")
        return _load_checkpoint(folder)
    side = parse_untrusted_json(folder / "blocks.json", "module sidecar")
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise InputError(f"{folder}/blocks.json: not an sdcompress module sidecar")
    if model is None and builder is None:
        raise InputError(f"{folder} holds a {side.get('class')!s:.80} model: pass model=YourClass(...) (or name a builder); "
                         f"the sidecar is never used to import anything")
    if model is None:
        model = build(builder)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    want = str(side.get("class", ""))
    if want.rsplit(".", 1)[-1] != type(model).__qualname__.rsplit(".", 1)[-1]:
        raise InputError(f"{folder} holds a {want:.80} model, not a {type(model).__name__}")
    if isinstance(side.get("spec"), dict) and _spec_of(model) is not None:  # rebuilt from its spec, as saved
        from .nets import NetSpec, build_model

        try:
            model = build_model(NetSpec.from_dict(side["spec"]))
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"{folder}/blocks.json: spec: {e}") from None
        side = {**side, "removed": [], "binarized": []}  # both are in the spec
    if side.get("scale_exponent") is not None:  # the t its kept blocks' scale layers hold (prune or binarize chose it)
        from .nets import check_exponent

        model.scale_exponent = check_exponent(side["scale_exponent"], f"{folder}/blocks.json: scale_exponent")
    removed = [_block_from(d, f"{folder}/blocks.json removed[{i}]") for i, d in enumerate(side.get("removed") or [])]
    modules = dict(model.named_modules())
    for b in removed:
        if b.path not in modules or type(modules[b.path]).__name__ != b.kind:
            raise InputError(f"{folder}: removed block {b.path!r} ({b.kind}) is not a module of this {type(model).__name__}")
        model.set_submodule(b.path, mark_removed(replacement(model, b), b))
    binarized = side.get("binarized") or []
    if not isinstance(binarized, list) or not all(isinstance(n, str) for n in binarized):
        raise InputError(f"{folder}/blocks.json: binarized must be a list of layer names")
    try:
        apply_binary(model, binarized)  # 1-bit layers first: their weights are stored as packed signs
    except ValueError as e:
        raise InputError(f"{folder}: {e}") from None
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{folder}: the weights do not fit this {type(model).__name__} ({str(e).splitlines()[1][:160].strip() if len(str(e).splitlines()) > 1 else e})") from None
    blocks = [_block_from(d, f"{folder}/blocks.json blocks[{i}]") for i, d in enumerate(side.get("blocks") or [])]
    st = side.get("stats")
    stats = None
    if isinstance(st, dict) and blocks:
        stats = DropEffects(tuple(blocks), tuple(st["effect"]), tuple(st["stderr"]), int(st["batches"]), tuple(st["drop_rates"]),
                            tuple(st["runs"]), st.get("params"), source=str(st.get("source", "measured")))
    data = side.get("data") if isinstance(side.get("data"), dict) else None
    return model.eval(), {"blocks": blocks, "removed": removed, "stats": stats, "class": want, "data": data,
                          "arch": side.get("arch") if isinstance(side.get("arch"), str) else None}
