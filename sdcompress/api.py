"""The Python API for a network trained anywhere: find its residual blocks, measure what each is worth, remove the
cheapest, export the result.

    blocks = sdcompress.find_blocks(model)                      # torchvision, the project's ResNets, or named paths
    stats = sdcompress.measure_drop_effects(model, batches)     # no training: random removals, loss regressed
    small = sdcompress.prune(model, keep=0.6, stats=stats)      # a new model; removed blocks hold no parameters
    sdcompress.export_onnx(small, "model.onnx", example_input)  # verified with onnxruntime before it is written

Removal is real: a removed block's module is replaced by what is left of it (nothing, or its own shortcut), so
its parameters are gone from the model, its `state_dict` and anything exported.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from itertools import islice
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .families import Block, family_of, replacement
from .retrofit import Trained, finetune, recalibrate, train_stochastic_depth  # noqa: F401 - the API
from .survival import fit_drop_effect
from .usermodel import load, mark_removed, save  # noqa: F401 - the API


def _shape_through(model: nn.Module, paths: list[str], example_input: torch.Tensor) -> dict[str, tuple]:
    """(input shape, output shape) of each named module that took and gave a tensor on one evaluation-time forward
    pass, in the order they finished."""
    from .families.found import catch

    calls, _, order = catch(model, example_input, paths)
    return {p: (tuple(calls[p][-1][0][0].shape), tuple(calls[p][-1][2].shape)) for p in order
            if calls[p][-1][0] and torch.is_tensor(calls[p][-1][0][0]) and torch.is_tensor(calls[p][-1][2])}


def find_blocks(model: nn.Module, example_input: torch.Tensor | None = None, paths: list[str] | None = None) -> list[Block]:
    """The residual blocks of `model`, input to output.

    With `example_input`, any model: a forward pass finds the modules that, with their residual branch silenced,
    pass their input or their own shortcut's output through (see `sdcompress.families.found`; `survey_blocks`
    says why each other module was refused). Without it, the families sdcompress knows by class (torchvision's
    residual networks, timm's, its own CIFAR ResNets).

    Args:
        model: the network (not modified).
        example_input: an input batch (e.g. `torch.randn(2, 3, 32, 32)`).
        paths: module paths of blocks to use instead (e.g. ["stages.1.blocks.0", ...]), checked on `example_input`:
            each must keep its input's shape (it becomes the identity when removed), and the model must still
            run with every named block removed.

    Returns:
        Block records: index, module path, stage (a new stage where the shape changes), removal ("identity" or
        "shortcut"), class name.

    Raises:
        InputError: a path that is not a module, a block that changes the shape, or a model with no residual block.

    Example:
        >>> blocks = sdcompress.find_blocks(model, torch.randn(2, 3, 32, 32))
        >>> [b.path for b in blocks][:2]
        ['layer1.0', 'layer1.1']
    """
    if example_input is not None and not torch.is_tensor(example_input):
        raise TypeError(f"example_input must be a tensor (an input batch), got {type(example_input).__name__}")
    if paths is None:
        try:
            blocks = family_of(model)[1]
        except ValueError as e:
            if example_input is None:
                raise InputError(f"{e}; give an example input (find_blocks(model, torch.randn(2, 3, 32, 32))) and a forward "
                                 f"pass finds them") from None
        else:
            number = _spec_numbers(model)  # a network built from a spec: its stages are the spec's, removed blocks or not
            if number is not None:
                from dataclasses import replace

                blocks = [replace(b, stage=model.spec.block_stage(number[b.path])) if b.path in number else b for b in blocks]
            return blocks
        blocks, verdicts = survey_blocks(model, example_input, _with_blocks=True)
        if not blocks:
            seen = "; ".join(f"{c.path}: {c.why}" for c in verdicts[:3]) or "it has no module with parameters and submodules"
            raise InputError(f"no residual blocks found in {type(model).__name__} ({seen})")
        _check_removable(model, blocks, example_input, "found")
        return blocks
    if example_input is None:
        raise InputError("blocks named by path need an example_input to check that removing them keeps the model valid")
    paths = None if isinstance(paths, str) else list(paths)  # a generator is read once, here
    if paths is None or not all(isinstance(p, str) for p in paths):
        raise TypeError("paths must be a list of module paths (strings), e.g. ['layer1.0', 'layer1.1']")
    if not paths:
        raise InputError("paths is empty: name at least one block")
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules or p == ""]
    if missing:
        raise InputError(f"no module {missing[0]!r} in {type(model).__name__}")
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise InputError(f"block {twice[0]!r} is named twice")
    nested = [(a, b) for a in paths for b in paths if b.startswith(a + ".")]
    if nested:
        raise InputError(f"block {nested[0][1]!r} lies inside block {nested[0][0]!r}; name blocks that do not contain each other")
    shapes = _shape_through(model, list(paths), example_input)  # in the order the blocks ran
    silent = [p for p in paths if p not in shapes]
    if silent:
        raise InputError(f"block {silent[0]!r} did not run on the example input (or does not take and return one tensor)")
    order = sorted(paths, key=list(shapes).index)
    for p in order:
        if shapes[p][0] != shapes[p][1]:
            raise InputError(f"block {p!r} maps {shapes[p][0]} to {shapes[p][1]}; only a block that keeps the shape can be removed")
    blocks = [Block(i, p, 0, "identity", type(modules[p]).__name__, "named") for i, p in enumerate(order)]
    _check_removable(model, blocks, example_input, "named")
    return blocks


def _check_removable(model: nn.Module, blocks: list[Block], example_input: torch.Tensor, how: str) -> None:
    """The model runs with every block removed at once."""
    try:
        with torch.no_grad():
            remove_blocks(model, blocks, blocks).eval()(example_input)
    except Exception as e:  # noqa: BLE001 - any failure means the blocks are not removable together
        raise InputError(f"the model does not run with the {how} blocks removed ({str(e).splitlines()[0][:100]})") from None


def survey_blocks(model: nn.Module, example_input: torch.Tensor, _with_blocks: bool = False):
    """Every module `find_blocks` looked at on a forward pass, with its verdict: why each is, or is not, a block.

    Args:
        model: the network (not modified).
        example_input: an input batch as the model takes it (e.g. `torch.randn(2, 3, 32, 32)`).

    Returns:
        A list of `Candidate(path, kind, residual, why)`, in the order the modules ran.

    Raises:
        InputError: the model does not run on `example_input`.

    Example:
        >>> for c in sdcompress.survey_blocks(model, torch.randn(2, 3, 32, 32)):
        ...     print(c.path, c.residual, c.why)
        layer1 False contains 9 residual block(s) (layer1.0, ...): a stage of blocks, not a block
        layer1.0 True with its branch silenced it passes its input through
    """
    from .families.found import survey

    if not torch.is_tensor(example_input):
        raise TypeError(f"example_input must be a tensor (an input batch), got {type(example_input).__name__}")
    try:
        blocks, verdicts = survey(model, example_input)
    except Exception as e:  # noqa: BLE001 - the model's own failure on the example input
        raise InputError(f"{type(model).__name__} does not run on the example input "
                         f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
    return (blocks, verdicts) if _with_blocks else verdicts


def _is_index(v) -> bool:
    """An integer index (int, numpy or torch integer), not a bool."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _replacement(model: nn.Module, block: Block) -> nn.Module:
    try:
        return replacement(model, block)
    except ValueError as e:
        raise InputError(str(e)) from None


def remove_blocks(model: nn.Module, remove: Iterable[Block | int], blocks: list[Block] | None = None) -> nn.Module:
    """A copy of `model` without the given blocks: each is replaced by what is left of it (nothing, or its own
    parameter-free shortcut), so its parameters are gone from the copy, its `state_dict` and its exports.

    Args:
        model: the network (not modified).
        remove: the blocks to remove, as Block records or indices into `blocks`.
        blocks: the model's blocks (default `find_blocks(model)`).

    Returns:
        The new module. `save` records which blocks it lacks.

    Raises:
        InputError: an index out of range, a block named twice or a block not of this model.

    Example:
        >>> blocks = sdcompress.find_blocks(model, torch.randn(2, 3, 32, 32))
        >>> small = sdcompress.remove_blocks(model, [blocks[-1], blocks[-3]], blocks)
    """
    blocks = blocks if blocks is not None else find_blocks(model)
    chosen = []
    for r in remove:
        if isinstance(r, Block):
            chosen.append(r)
        elif _is_index(r):
            r = operator.index(r)
            if not 0 <= r < len(blocks):
                raise InputError(f"block index {r} is not one of the model's blocks (0 to {len(blocks) - 1})")
            chosen.append(blocks[r])
        else:
            raise TypeError(f"blocks to remove are Block objects or indices, got {type(r).__name__}")
    if len({b.path for b in chosen}) != len(chosen):
        raise InputError("a block is named twice in the blocks to remove")
    unknown = [b.path for b in chosen if b.path not in {k.path for k in blocks}]
    if unknown:
        raise InputError(f"block {unknown[0]!r} is not one of the model's blocks")
    number = _spec_numbers(model)
    if number is not None and all(b.path in number for b in chosen):  # a network of a command-line checkpoint:
        from .pruning import remove_blocks as rebuild  # rebuilt from its spec, as `sdcompress prune` does

        return rebuild(model, [number[b.path] for b in chosen])
    new = copy.deepcopy(model)
    for b in chosen:
        new.set_submodule(b.path, mark_removed(_replacement(model, b), b))  # marked: `save` records what it was
    return new


def _spec_numbers(model: nn.Module) -> dict[str, int] | None:
    """Module path -> block number, for a network built from a `NetSpec` (the project's ResNets, and torchvision or
    timm networks as the command line wraps them); None for any other module."""
    from .nets import NetSpec

    spec = getattr(model, "spec", None)
    if not isinstance(spec, NetSpec) or not hasattr(model, "block_ids"):
        return None
    return {spec.block_path(n): n for n in model.block_ids}


@dataclass(frozen=True)
class DropEffects:
    """Drop effects per block: the rise in loss when it is missing, with standard errors, measured on a finished
    model (`measure_drop_effects`, source "measured") or recorded while training (`train_stochastic_depth`, source
    "training"). Indexed like `blocks`; None where a block cannot be removed.

    Example:
        >>> stats = trained.stats
        >>> [(b.path, e) for b, e in zip(stats.blocks, stats.effect)][:2]
    """

    blocks: tuple[Block, ...]
    effect: tuple[float | None, ...]  # None for a block that cannot be removed
    stderr: tuple[float | None, ...]
    batches: int  # forward passes measured (batches x rounds)
    drop_rates: tuple[float | None, ...]  # removal probability of each block (None: not removable)
    runs: tuple[int, ...]  # passes on which each block was present
    params: int | None = None  # parameters of the model measured (prune refuses the effects for another model)
    source: str = "measured"  # "measured": measure_drop_effects; "training": recorded by train_stochastic_depth

    @classmethod
    def from_fit(cls, blocks: list[Block], idx: list[int], fit, dropped: np.ndarray, rates, params: int,
                 source: str = "measured") -> "DropEffects":
        """The effects of a `survival.fit_drop_effect` fit over the removable blocks `idx` (columns of `dropped`,
        removed at `rates`); a block that is never removed runs on every pass."""
        passes = len(dropped)
        effect: list[float | None] = [None] * len(blocks)
        stderr: list[float | None] = [None] * len(blocks)
        rate: list[float | None] = [None] * len(blocks)
        runs = [passes] * len(blocks)
        for k, i in enumerate(idx):
            effect[i] = float(fit.effect[k]) if math.isfinite(fit.effect[k]) else None
            stderr[i] = float(fit.stderr[k]) if math.isfinite(fit.stderr[k]) else None
            rate[i] = float(rates[k])
            runs[i] = passes - int(dropped[:, k].sum())
        return cls(tuple(blocks), tuple(effect), tuple(stderr), passes, tuple(rate), tuple(runs), params, source)

    @classmethod
    def from_table(cls, table, blocks: list[Block], numbers: dict[str, int], params: int) -> "DropEffects | None":
        """The drop effects of a command-line checkpoint (its `survival_stats`, rows by block number of the spec),
        indexed like `blocks`; `numbers` maps a block's module path to its block number. None when no block has a
        drop effect (a network trained at constant depth never dropped one)."""
        rows = {r.block: r for r in table.blocks}
        effect, stderr, rate, runs = [], [], [], []
        for b in blocks:
            r = rows.get(numbers.get(b.path, -1))
            known = b.removable and r is not None
            effect.append(r.drop_effect if known else None)
            stderr.append(r.drop_effect_se if known else None)
            rate.append(round(1.0 - r.p_scheduled, 6) if known else None)
            runs.append(r.runs if r is not None else table.steps)
        if all(e is None for e in effect):
            return None
        return cls(tuple(blocks), tuple(effect), tuple(stderr), table.regression_steps, tuple(rate), tuple(runs), params,
                   source="measured" if table.source == "measured" else "training")

    def to_table(self, numbers: dict[str, int], blocks_total: int, prior=None) -> dict:
        """These effects as a command-line checkpoint's `survival_stats` (rows by block number of the spec; `numbers`
        maps a block's module path to its number): what `sdcompress stats --measure` and `save(checkpoint=...)`
        write. Contributions, which only training records, are kept from `prior` (the checkpoint's table)."""
        old = {r.block: r for r in prior.blocks} if prior is not None else {}
        measured = {numbers[b.path]: k for k, b in enumerate(self.blocks) if b.path in numbers and self.drop_rates[k] is not None}
        rows = []
        for n in range(blocks_total):
            k, before = measured.get(n), old.get(n)
            rows.append({
                "block": n,
                "p_scheduled": round(1.0 - self.drop_rates[k], 6) if k is not None else (before.p_scheduled if before else 1.0),
                "runs": self.runs[k] if k is not None else 0,
                "survival_rate": self.runs[k] / self.batches if k is not None else None,
                "contribution": before.contribution if before else None,
                "drop_effect": self.effect[k] if k is not None else None,
                "drop_effect_se": self.stderr[k] if k is not None else None,
            })
        return {"steps": self.batches, "window": self.batches, "regression_steps": self.batches, "source": self.source, "blocks": rows}


def measure_drop_effects(model: nn.Module, batches: Iterable, blocks: list[Block] | None = None, rounds: int = 1,
                         max_drop: float = 0.5, loss_fn: Callable = F.cross_entropy, seed: int = 0) -> DropEffects:
    """Drop effects of a finished model, without training.

    On every batch a random subset of the removable blocks is removed (block l with probability
    (l+1)/L * max_drop, the stochastic depth paper's linear rule) and the evaluation-time loss is recorded; the
    loss is then regressed on the removal indicators (least squares with an intercept), as in training.

    Args:
        model: the network (not modified).
        batches: an iterable of (inputs, targets), e.g. a DataLoader of training images.
        blocks: the blocks (default `find_blocks(model)`).
        rounds: passes over `batches` (more passes, more draws, smaller standard errors).
        max_drop: removal rate of the last block.
        loss_fn: loss(outputs, targets).
        seed: seed of the draws.

    Returns:
        `DropEffects`: per block the rise in loss when it is missing, its standard error, its removal rate and the
        passes it ran on; what `prune(..., stats=...)` ranks by.

    Raises:
        InputError: no removable block, an empty or one-shot `batches` with `rounds` > 1, or fewer batches than
            blocks to estimate.

    Example:
        >>> stats = sdcompress.measure_drop_effects(model, [next(iter(train_loader)) for _ in range(40)], rounds=3)
        >>> small = sdcompress.prune(model, keep=0.6, stats=stats)
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be a whole number >= 1, got {rounds!r}")
    _check_fraction("max_drop", max_drop, closed=False)
    if rounds > 1 and isinstance(batches, Iterator):
        raise InputError(f"batches is a one-shot iterator and rounds={rounds} passes over it; give a list or a DataLoader "
                         f"(anything that can be iterated again)")
    blocks = blocks if blocks is not None else find_blocks(model)
    idx = [b.index for b in blocks if b.removable]
    if not idx:
        raise InputError("the model has no removable block")
    rates = np.array([(k + 1) / len(idx) * max_drop for k in range(len(idx))])
    gen = np.random.default_rng(seed)
    work = copy.deepcopy(model).eval()
    originals = {i: work.get_submodule(blocks[i].path) for i in idx}
    removed_form = {i: _replacement(model, blocks[i]) for i in idx}
    dropped, losses = [], []
    with torch.no_grad():
        for _ in range(rounds):
            for x, y in batches:
                mask = gen.random(len(idx)) < rates
                for k, i in enumerate(idx):
                    work.set_submodule(blocks[i].path, removed_form[i] if mask[k] else originals[i])
                losses.append(float(loss_fn(work(x), y)))
                dropped.append(mask.astype(np.uint8))
    if not losses:
        raise InputError("batches is empty: give (inputs, targets) batches of training images")
    if len(losses) <= len(idx) + 1:
        raise InputError(f"{len(losses)} batches cannot estimate {len(idx)} drop effects; give more batches or rounds")
    dropped = np.stack(dropped)
    fit = fit_drop_effect(dropped, np.array(losses), np.arange(len(losses)), trend_degree=0)
    return DropEffects.from_fit(blocks, idx, fit, dropped, rates, sum(p.numel() for p in model.parameters()))


def _check_fraction(name: str, v, closed: bool = True) -> None:
    """A fraction argument: a real number in (0, 1] (`closed`) or (0, 1); TypeError for anything but a number."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1{']' if closed else ')'}, got {type(v).__name__} {v!r:.40}")
    if not (0.0 < v <= 1.0 if closed else 0.0 < v < 1.0) or math.isnan(v):
        raise InputError(f"{name} must be in (0, 1{']' if closed else ')'}, got {v}")


def prune(model: nn.Module, keep: float | None = None, stats: DropEffects | None = None, strategy: str | None = None,
          blocks: list[Block] | None = None, *, batches: Iterable | None = None, max_params: int | None = None,
          max_bytes: int | None = None, block_scale: str = "auto", calibration: Iterable | None = None) -> nn.Module:
    """A copy of `model` keeping `keep` of its removable blocks (rounded to whole blocks), or the most blocks that fit
    a budget, the others removed as by `remove_blocks`. BatchNorm statistics are left as they were: follow with
    `recalibrate`. The command line's `sdcompress prune` ranks and budgets with the same functions (`pruning`).

    A network trained with stochastic depth adds p_l f(x) for block l at evaluation (the paper's rule for the full
    network). A pruned one is a single draw in which every kept block runs, and in a training step a block that
    runs adds f(x); `block_scale` chooses p_l^t f(x), as `sdcompress prune --block-scale` does, folded into each kept
    block's scale layer (`Block.scale`, its last BatchNorm in a ResNet): "survival" is t = 1, "unit" t = 0, "auto"
    (default) re-estimates BatchNorm for each candidate on `calibration` and keeps the lowest loss there, trying 1
    and 0, then below 0 (kept blocks amplified for the removed ones) while the loss falls, else 0.5
    (`pruning.search_exponent`); without `calibration` the blocks keep the t they have (1 as trained). It applies
    where p_l is known: the project's ResNets (their spec) and a model with `stats` recorded by
    `train_stochastic_depth`.

    Args:
        model: the network (not modified).
        keep: fraction of the removable blocks kept, in (0, 1] (default 0.6 when no budget is given).
        stats: drop effects, measured (`measure_drop_effects`) or recorded in training (`train_stochastic_depth`);
            with them the default strategy is "stats": in each stage (`Block.stage`) as many blocks as
            "every-other" removes there, those whose removal raises the loss least (drop effects are marginal:
            ranked over the whole network they pile removals into one stage, which costs far more); without them
            "top" (the highest blocks go first).
        strategy: "stats", "top", "every-other" (removals spread evenly over the depth, from the top) or
            "sensitivity" (greedy: each step removes the block whose removal raises the loss on `batches` least;
            one evaluation of `batches` per candidate and step).
        blocks: the model's blocks (default those of `stats`, else `find_blocks(model)`).
        batches: for "sensitivity", a few `(inputs, targets)` batches of training images (a list, so that every
            candidate sees the same ones); the loss is their mean cross-entropy in evaluation mode.
        max_params: instead of `keep`, remove the fewest blocks, in the strategy's order, that leave at most this
            many parameters.
        max_bytes: instead of `keep`, the same for the bytes of the model's saved `state_dict` (1-bit layers
            counted as stored, in bits).
        block_scale: "auto", "survival" or "unit", above.
        calibration: for `block_scale="auto"`, `(inputs, targets)` batches of training images with the training
            augmentation (as for `recalibrate`): the first 40 are taken once, and every candidate is re-estimated
            and scored on them.

    Returns:
        The pruned module.

    Raises:
        InputError: `keep` outside (0, 1], `keep` and a budget together, a budget no network meets, an unknown
            strategy or block scale, "stats" without stats, "sensitivity" without batches, "unit" where p_l is not
            known, or stats of another model.

    Example:
        >>> trained = sdcompress.train_stochastic_depth(model, train_loader, epochs=2)
        >>> calib = [batch for batch, _ in zip(train_loader, range(40))]
        >>> small = sdcompress.prune(trained.model, keep=0.6, stats=trained.stats, calibration=calib)
        >>> small = sdcompress.recalibrate(small, train_loader)
        >>> tiny = sdcompress.prune(trained.model, max_params=400_000, stats=trained.stats)
    """
    return _prune(model, keep, stats, strategy, blocks, batches=batches, max_params=max_params, max_bytes=max_bytes,
                  block_scale=block_scale, calibration=calibration)[0]


def _prune(model: nn.Module, keep: float | None = None, stats: DropEffects | None = None, strategy: str | None = None,
           blocks: list[Block] | None = None, *, batches: Iterable | None = None, max_params: int | None = None,
           max_bytes: int | None = None, block_scale: str = "auto", calibration: Iterable | None = None) -> tuple[nn.Module, dict]:
    """`prune`, and a record of what it did (the removed blocks' paths, the block scale chosen and why)."""
    if block_scale not in ("auto", "survival", "unit"):
        raise InputError(f"unknown block scale {block_scale!r}; choose auto, survival or unit")
    budgets = [(n, v) for n, v in (("max_params", max_params), ("max_bytes", max_bytes)) if v is not None]
    given = ["keep"] * (keep is not None) + [n for n, _ in budgets]
    if len(given) > 1:
        raise InputError(f"give keep or one budget (max_params or max_bytes), not {' and '.join(given)}")
    for n, v in budgets:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{n} must be a whole number, got {type(v).__name__} {v!r:.40}")
        if v <= 0:
            raise InputError(f"{n} must be positive, got {v}")
    if not budgets:
        keep = 0.6 if keep is None else keep
        _check_fraction("keep", keep)
    if stats is not None and not isinstance(stats, DropEffects):
        raise TypeError(f"stats must be the DropEffects of measure_drop_effects, got {type(stats).__name__}")
    blocks = blocks if blocks is not None else (list(stats.blocks) if stats is not None else find_blocks(model))
    if stats is not None:
        modules = dict(model.named_modules())
        foreign = [b.path for b in stats.blocks if b.path not in modules or type(modules[b.path]).__name__ != b.kind]
        params = sum(p.numel() for p in model.parameters())
        if foreign or (stats.params is not None and stats.params != params):
            why = f"it has no block {foreign[0]!r}" if foreign else f"{stats.params:,} parameters measured, this model has {params:,}"
            raise InputError(f"stats were measured on another model ({why}); measure this model's drop effects")
    strategy = strategy or ("stats" if stats is not None else "top")
    from .pruning import Candidates, Ranking, within_budget

    if strategy not in ("stats", "top", "every-other", "sensitivity"):
        raise InputError(f"unknown strategy {strategy!r}; choose stats, top, every-other or sensitivity")
    if strategy == "stats" and stats is None:
        raise InputError("strategy 'stats' needs measured drop effects (measure_drop_effects)")
    loss_fn = None
    if strategy == "sensitivity":
        if batches is None:
            raise InputError("strategy 'sensitivity' needs batches of training images to measure the loss on")
        loss_fn = _loss_on(list(batches))
    here = {b.path for b in _present(model, blocks)}  # `blocks` may list blocks removed before (a sidecar's list)
    present = [b.index for b in blocks if b.removable and b.path in here]
    stage = {b.index: b.stage for b in blocks}
    effects = {i: stats.effect[i] for i in present} if stats is not None else None
    cut = lambda removed: remove_blocks(model, removed, blocks)  # noqa: E731
    ranking = Ranking(strategy, Candidates(model, None, present, loss_fn, stage.__getitem__, effects, cut))
    if budgets:
        removed = within_budget(ranking, cut, max_params, max_bytes)
    else:
        removed = ranking.removal(len(present) - math.floor(keep * len(present) + 0.5))
    small = cut(removed)
    record = {"removed": [blocks[i].path for i in removed], "block_scale": None}
    if removed:
        small, record["block_scale"] = _choose_block_scale(small, blocks, stats, block_scale, calibration)
    return small, record


CALIBRATION_BATCHES = 40  # batches of `calibration` the block scale is chosen on, as the command line recalibrates


def _survival_layers(model: nn.Module, blocks: list[Block], stats: DropEffects | None) -> tuple[dict[str, tuple[float, str]] | None, float]:
    """(p_l < 1, its scale layer) of each present block whose evaluation-time output is scaled by it, by path (None: not known), and
    the exponent t with which those blocks add p_l^t f(x) now: the project's ResNets from their spec, any other model
    from drop effects recorded by `train_stochastic_depth` (their drop rates are 1 - p_l). t is the module's
    `scale_exponent`, which `_rescale` records on every module it rescales (1, as trained, when it has none), so a
    block is never rescaled twice: `prune` refuses drop effects of another model (its parameters differ), and
    `binarize` takes those recorded before pruning with the t that prune left. Measured drop effects say nothing of
    p_l."""
    from .nets import ResNet

    if isinstance(model, ResNet):
        numbers = _spec_numbers(model) or {}
        probs = model.block_survival()
        return {path: (probs[n], "bn2") for path, n in numbers.items() if probs[n] < 1.0}, getattr(model, "scale_exponent", 1.0)
    if stats is None or stats.source != "training":
        return None, 1.0
    present = {b.path for b in _present(model, blocks)}
    return {b.path: (1.0 - r, b.scale) for b, r in zip(stats.blocks, stats.drop_rates)
            if r is not None and b.scale and b.path in present and r > 0.0}, getattr(model, "scale_exponent", 1.0)


@torch.no_grad()
def _rescale(model: nn.Module, probs: dict[str, tuple[float, str]], have: float, want: float) -> nn.Module:
    """A copy whose blocks in `probs` (path -> p_l, scale layer) add p_l^want f(x) instead of p_l^have f(x). The
    copy records t as `scale_exponent` (a ResNet's own field; an attribute of any other module, kept by `save`), so
    that a later stage reaches another t from it and never applies one twice."""
    from .nets import ResNet, rescale_blocks

    new = copy.deepcopy(model)
    if isinstance(new, ResNet):
        rescale_blocks(new, want)
        return new
    for path, (p_l, scale) in probs.items():
        for p in new.get_submodule(path).get_submodule(scale).parameters():
            if p.is_floating_point():
                p.mul_(p_l ** (want - have))
    new.scale_exponent = want
    return new


def _choose_block_scale(small: nn.Module, blocks: list[Block], stats: DropEffects | None, mode: str,
                        calibration: Iterable | None) -> tuple[nn.Module, dict]:
    """`prune`'s block-scale choice: the rule and search of `pruning.choose_block_scale` (p_l^t f(x), t from 1 down),
    each candidate re-estimated and scored on the user's calibration batches."""
    from .pruning import decide_exponent

    probs, have = _survival_layers(small, blocks, stats)
    if not probs:
        if probs is None and mode == "unit":
            raise InputError("the 'unit' block scale needs each block's survival probability p_l: a network of the project's, "
                             "or the drop effects recorded by train_stochastic_depth for this model")
        if probs is None:
            return small, {"chosen": None, "why": "p_l not known (no stats recorded by train_stochastic_depth): the kept blocks add what they added"}
        return small, {"chosen": "unit", "folded": False, "why": "every kept block already adds f(x) at evaluation: nothing to choose"}
    loss_at, n = None, 0
    if mode == "auto" and calibration is not None:
        calibration = list(islice(calibration, CALIBRATION_BATCHES))
        if not calibration:
            raise InputError("calibration holds no batch: give (inputs, targets) batches of training images")
        score, n = _loss_on(calibration), len(calibration)

        def loss_at(t: float) -> float:  # each candidate re-estimated on the batches, then scored on them
            return score(recalibrate(_rescale(small, probs, have, t), calibration, num_batches=n))

    t, record = decide_exponent(mode, have, loss_at, f"{n} calibration batches after recalibration", "no calibration batches to choose by")
    return (small if t == have else _rescale(small, probs, have, t)), record


def _loss_on(batches: list) -> Callable[[nn.Module], float]:
    """Mean cross-entropy of an evaluation-time network on fixed `(inputs, targets)` batches."""
    if not batches or any(not isinstance(b, (tuple, list)) or len(b) < 2 for b in batches):
        raise InputError("batches must be a non-empty list of (inputs, targets) batches")

    @torch.no_grad()
    def loss(candidate: nn.Module) -> float:
        candidate.eval()
        dev = next(candidate.parameters()).device
        total, n = 0.0, 0
        for x, y, *_ in batches:
            total += F.cross_entropy(candidate(x.to(dev)), y.to(dev), reduction="sum").item()
            n += len(y)
        return total / n

    return loss


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, atol: float = 1e-4) -> dict:
    """Export the evaluation-time `model` to one self-contained float ONNX file, verified with onnxruntime on
    `example_input` before it is put in place; `export` also writes `.ort` and Core ML and the smaller weight forms.

    Args:
        model: the network (left in the mode it came in).
        path: the `.onnx` file to write.
        example_input: an input batch as the model takes it.
        atol: the largest difference from PyTorch allowed, relative to the largest logit (at least 1).

    Returns:
        {"bytes": the file's size, "max_abs_diff": the largest difference from PyTorch}.

    Raises:
        RuntimeError: the file does not reproduce the model; nothing is written.

    Example:
        >>> sdcompress.export_onnx(small, "small.onnx", torch.randn(1, 3, 32, 32))
    """
    if not torch.is_tensor(example_input):
        raise TypeError(f"example_input must be a tensor (an input batch), got {type(example_input).__name__}")
    was_training = model.training
    model.eval()
    try:
        return _export_onnx_eval(model, path, example_input, atol)
    finally:
        model.train(was_training)  # the caller's model is left in the mode it came in


def _export_onnx_eval(model: nn.Module, path, example_input: torch.Tensor, atol: float) -> dict:
    import logging
    import warnings

    import onnxruntime as ort

    from .files import staged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(model, (example_input,), dynamo=True, external_data=False, verbose=False,
                                 input_names=["input"], output_names=["output"])
    data = prog.model_proto.SerializeToString()
    with torch.no_grad():
        ref = model(example_input).numpy()
    with staged(path) as tmp:
        Path(tmp).write_bytes(data)
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: example_input.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        if not diff <= atol * max(1.0, float(np.abs(ref).max())):
            raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g}; nothing written")
    return {"bytes": Path(path).stat().st_size, "max_abs_diff": diff}


def _present(model: nn.Module, blocks: list[Block]) -> list[Block]:
    """The blocks of `blocks` still in `model` (not removed to their shortcut)."""
    from .usermodel import MARK

    modules = dict(model.named_modules())
    return [b for b in blocks if b.path in modules and type(modules[b.path]).__name__ == b.kind and not hasattr(modules[b.path], MARK)]


def _example(example_input, what: str) -> torch.Tensor:
    if not torch.is_tensor(example_input) or not example_input.is_floating_point() or example_input.dim() != 4 or not len(example_input):
        shown = tuple(example_input.shape) if torch.is_tensor(example_input) else type(example_input).__name__
        raise InputError(f"{what} must be a float batch of images (N, C, H, W), as the model takes them; got {shown}")
    return example_input.detach().cpu().float()


def binarize(model: nn.Module, example_input: torch.Tensor | None = None, blocks: list[Block] | None = None, *, stem: bool = False,
             head: bool = False, full_precision: Iterable[str] = (), block_scale: str | None = None,
             stats: DropEffects | None = None, calibration: Iterable | None = None) -> nn.Module:
    """A copy of `model` whose convolution and linear layers inside its residual blocks hold 1-bit weights: sign(w)
    times one scale per output channel (the mean |w| of that channel).

    The layers keep latent float weights, so `finetune` trains them (straight-through estimator); their
    `state_dict`, `save` and every exported file store the signs as bits. Depthwise and grouped convolutions and
    attention projections stay float, and so do the stem and the classifier unless asked.

    What each kept block of a stochastic-depth network adds, p_l^t f(x) (see `prune`), can be chosen again for the
    1-bit network, as `sdcompress binarize --block-scale` does: a t that suited the float network (amplified
    blocks, t < 0) amplifies the 1-bit error too. Choose it when the 1-bit network is used without fine-tuning;
    `finetune` learns the scale, so leave it (`block_scale=None`) before fine-tuning.

    Args:
        example_input: an input batch, to find the blocks (`find_blocks`) when `blocks` is not given.
        blocks: the model's blocks (e.g. `stats.blocks`); those already removed are skipped.
        stem, head: binarize the first convolution outside the blocks / the last linear layer too.
        full_precision: layer names to keep float (e.g. ["layer1.0.conv1"]).
        block_scale: None (default) keeps the t the blocks have; "auto", "survival" or "unit" as in `prune`.
        stats: for a model other than the project's networks, the drop effects `train_stochastic_depth` recorded on
            it before pruning (they give p_l of each kept block; `prune` recorded its t on the pruned module).
        calibration: for "auto", `(inputs, targets)` batches of training images with the training augmentation:
            each candidate t is re-estimated and scored on the first 40.

    Returns:
        The binarized module (in the mode `model` was in). With `block_scale`, follow with `recalibrate`.

    Raises:
        InputError: a model already binarized, no block left, nothing left to binarize, an unknown block scale,
            "unit" where p_l is not known, or stats of another model.

    Example:
        >>> tiny = sdcompress.binarize(small, torch.randn(2, 3, 32, 32))
        >>> tiny, history = sdcompress.finetune(tiny, train_loader, teacher=trained.model, epochs=1)
        >>> as_is = sdcompress.recalibrate(sdcompress.binarize(small, x, block_scale="auto", stats=trained.stats,
        ...                                                    calibration=calib), train_loader)
    """
    from .binary import BinaryConv2d, BinaryLinear, apply_binary, binary_layer_names, default_targets

    if any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in model.modules()):
        raise InputError("the model is already binarized; binarize the full-precision model")
    if isinstance(full_precision, str):
        raise TypeError("full_precision must be a list of layer names, not one string")
    blocks = list(blocks) if blocks is not None else find_blocks(model, example_input)
    paths = [b.path for b in _present(model, blocks)]
    if not paths:
        raise InputError("the model has no residual block left to binarize")
    try:
        names = default_targets(model, stem, head, tuple(full_precision), paths=paths)
    except ValueError as e:
        raise InputError(str(e).replace("--full-precision", "full_precision")) from None
    if not names:
        raise InputError("nothing left to binarize: every layer inside the blocks is kept float")
    if block_scale not in (None, "auto", "survival", "unit"):
        raise InputError(f"unknown block scale {block_scale!r}; choose auto, survival or unit (or None to keep it)")
    if calibration is not None and block_scale != "auto":
        raise InputError("calibration is what block_scale='auto' chooses on: give block_scale='auto' too, or no calibration")
    if stats is not None and block_scale is None:
        raise InputError("stats give p_l for choosing the kept blocks' scale: give block_scale too, or no stats")
    if stats is not None:
        if not isinstance(stats, DropEffects):
            raise TypeError(f"stats must be the DropEffects of train_stochastic_depth, got {type(stats).__name__}")
        known = {s.path: s.kind for s in stats.blocks}
        foreign = [b.path for b in _present(model, blocks) if known.get(b.path) != b.kind]  # every kept block, as recorded
        if foreign:
            raise InputError(f"stats were recorded on another model (block {foreign[0]!r}); pass the drop effects of this model's training")
    new = copy.deepcopy(model)
    apply_binary(new, names)
    if _spec_numbers(new) is not None:  # a network built from a spec: the spec names its 1-bit layers, as `binarize` writes it
        from dataclasses import replace

        new.spec = replace(new.spec, binarized=tuple(binary_layer_names(new)))
    if block_scale is not None:
        new, _ = _choose_block_scale(new, blocks, stats, block_scale, calibration)
    return new.train(model.training)


EXPORT_SUFFIXES = {".onnx": "onnx", ".ort": "ort", ".mlpackage": "coreml", ".pte": "pte", ".tflite": "tflite"}


def export(model: nn.Module, out: str | Path, example_input: torch.Tensor, *, formats: Iterable[str] | None = None,
           classes: list[str] | None = None, mean: Iterable[float] | None = None, std: Iterable[float] | None = None,
           weights: str = "auto", batch: int | None = 1, coreml_precision: str = "float16", name: str | None = None,
           threads: int = 1, force: bool = False) -> dict:
    """Export the evaluation-time `model` for phones: ONNX (`.onnx`), ONNX Runtime Mobile (`.ort`), Core ML
    (`.mlpackage`) and, with the `executorch` / `litert` extras, ExecuTorch for XNNPACK (`.pte`) and LiteRT
    (`.tflite`), each written under a temporary name, reloaded and verified against PyTorch on `example_input`
    before it is put in place (what `sdcompress export` runs).

    Args:
        out: a file whose suffix names its format (`small.onnx`, `small.ort`, `Small.mlpackage`, `small.pte`), or a
            folder that receives each of `formats` (default onnx, ort and coreml: model.onnx, model.ort, NAME.mlpackage;
            "pte" and "tflite" write model.pte and model.tflite) and report.json.
        example_input: real inputs as the model takes them (e.g. a batch of normalized test images); at most 64
            are used to verify.
        classes: the names of the outputs, written into the files (default "0", "1", ...).
        mean, std: the per-channel normalization of pixel / 255 that the model's inputs had. With them the Core ML
            package takes an image and normalizes it itself (verified on `example_input` as 0-255 pixels); without
            them it takes the normalized tensor.
        weights: ONNX / ORT weight storage: "auto" (float; a binarized model's 1-bit layers as int8 in .onnx and as
            bits in .ort), "float", "int8", "int4" or "1bit"; .pte takes "auto" (float), "float" or "1bit"; .tflite "auto"
            (float; int8 for a binarized model), "float" or "int8".
        batch: the batch size fixed in the graphs and a Core ML tensor input (None: any; .pte and .tflite need a fixed one).
        coreml_precision: "float16" or "float32".
        name: the Core ML package's (and Swift class's) name (default from the model's class name).

    Returns:
        The report: per format its file, bytes, verification (max difference and top-1 agreement with PyTorch),
        latency and onnxruntime's mobile usability check.

    Raises:
        InputError: bad arguments, an existing `out` without `force`, or a model whose outputs are not (N, classes)
            logits; nothing is written.

    Example:
        >>> images, labels = next(iter(test_loader))
        >>> sdcompress.export(small, "phone/", images, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
        >>> sdcompress.export(small, "small.ort", images)
    """
    import tempfile
    from types import SimpleNamespace

    from .checkpoint import DataInfo
    from .exporters.coreml import check_name, package_name
    from .exporters.onnx import WEIGHTS
    from .files import atomic_write_json, check_output_folder, output_folder
    from .pipeline import check_formats, check_runtime_formats, write_exports

    out = Path(out)
    x = _example(example_input, "example_input")[:64]
    single = EXPORT_SUFFIXES.get(out.suffix)
    if single and formats is not None and tuple(formats) != (single,):
        raise InputError(f"{out.name} names the {single} format; formats={list(formats)} does not match (give a folder for several)")
    formats = (single,) if single else tuple(formats) if formats is not None else ("onnx", "ort", "coreml")
    if isinstance(formats, str) or not formats:
        raise InputError("formats must be a list of onnx, ort and coreml")
    check_formats(formats)
    if weights not in WEIGHTS:
        raise InputError(f"unknown weight form {weights!r}; choose one of {', '.join(WEIGHTS)}")
    check_runtime_formats(formats, weights, batch)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or not 1 <= batch <= 1024):
        raise InputError(f"batch must be 1 to 1024 or None (any), got {batch!r:.40}")
    if coreml_precision not in ("float16", "float32"):
        raise InputError(f"coreml_precision must be float16 or float32, got {coreml_precision!r:.40}")
    c = x.shape[1]
    if (mean is None) != (std is None):
        raise InputError("give both mean and std (the normalization the model's inputs had), or neither")
    if mean is not None:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != c or len(std) != c or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise InputError(f"mean and std need {c} finite values each (std > 0), one per input channel")
    try:
        name = check_name(name if name is not None else type(model).__name__)
    except ValueError as e:
        if name is None:  # a class name that is no Swift identifier
            name = package_name(type(model).__name__)
        else:
            raise InputError(str(e).replace("--name", "name")) from None
    if single and out.exists() and not force:
        raise InputError(f"{out} exists; pass force=True to replace it")
    if not single:
        check_output_folder(out, force, flag="out")
    work = copy.deepcopy(model).cpu().eval()
    pixels = None
    if mean is not None:  # the images as a phone's camera gives them: whole pixel values, then the same normalization
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        pixels = ((x * s + m).clamp(0, 1) * 255).round()
        x = (pixels / 255 - m) / s
    with torch.no_grad():
        logits = work(x)
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise InputError(f"the model must return a (N, classes) tensor of logits to be exported, got "
                         f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
    if not torch.isfinite(logits).all():
        raise InputError("the model's own outputs on example_input are not finite (NaN or infinite logits): nothing to export")
    classes = [str(k) for k in range(logits.shape[1])] if classes is None else [str(k) for k in classes]
    if len(classes) != logits.shape[1] or len(set(classes)) != len(classes):
        raise InputError(f"classes needs {logits.shape[1]} distinct names, one per output; got {len(classes)}")
    data = DataInfo("example_input", "", tuple(classes), tuple(x.shape[1:]), mean, std, {})
    meta = SimpleNamespace(data=data)
    desc = f"{type(model).__name__} image classifier, {len(classes)} classes; exported by sdcompress"
    card = {"description": desc, "author": "unspecified", "license": "unspecified", "version": ""}
    kw = dict(threads=threads, weights=weights, batch=batch, precision=coreml_precision, coreml_input="image" if mean else "tensor",
              name=name, card=card)
    head = {"stage": "export", "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                                         "params": sum(p.numel() for p in model.parameters())}}
    if not single:
        with output_folder(out) as folder:
            files = write_exports(work, meta, folder, x, pixels, "example_input", formats, **kw)
            result = {**head, "formats": files}
            atomic_write_json(folder / "report.json", result)
        return result
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        files = write_exports(work, meta, Path(tmp), x, pixels, "example_input", formats, **kw)
        entry = files[single]
        made = Path(tmp) / entry["file"]
        if single == "ort":
            Path(tmp, "model.required_operators.config").replace(out.with_suffix(".required_operators.config"))
        if made.is_dir() and out.exists():  # a package is a folder: the old one goes with the temporary folder
            out.replace(Path(tmp) / "replaced")
        made.replace(out)
        entry["file"] = out.name
    return {**head, "formats": files}


def footprint(model: nn.Module, example_input: torch.Tensor, blocks: list[Block] | None = None) -> dict:
    """The footprint of `model` as data, what `sdcompress report` renders: parameters, memory at each layer's
    precision (1-bit layers at 1 bit per weight plus a float32 scale per output channel), MACs and output shape
    per layer and per block, from one forward pass of one image of `example_input`'s shape.

    Args:
        model: the network (not modified).
        example_input: an input batch as the model takes it; one image of its shape is run.
        blocks: the model's blocks (default `find_blocks(model, example_input)`); removed ones are skipped.

    Returns:
        {"layers": [...], "blocks": [...], "totals": {...}}: per layer and per block its parameters, bytes at its
        precision, MACs and output shape; the totals of the model.

    Example:
        >>> fp = sdcompress.footprint(small, torch.randn(1, 3, 32, 32))
        >>> fp["totals"]["params"], fp["totals"]["macs"]
    """
    from .footprints import footprint as _footprint

    x = _example(example_input, "example_input")
    blocks = list(blocks) if blocks is not None else find_blocks(model, x[:2])
    return _footprint(model, tuple(x.shape[1:]), blocks=_present(model, blocks))
