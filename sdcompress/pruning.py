"""Remove whole residual blocks: importance (scores per block), policy (which to remove), mechanics (remove).

A network trained with stochastic depth has learned to work while blocks are missing, so whole blocks can be
removed after training. Removed blocks are deleted: no parameters of theirs remain in memory, in `model.pt` or
in anything exported; a removed downsampling block becomes its parameter-free shortcut. The kept blocks keep
their evaluation-time scaling p_l. BatchNorm statistics are then re-estimated on training images, running the
evaluation-time network with only BatchNorm in train mode and cumulative averages (momentum reset), because the
removed blocks changed the statistics every later layer sees.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .data import ImageSet, Normalize, augment
from .checkpoint import Sidecar, SurvivalTable
from .config import check_lr, check_number
from .errors import InputError
from .nets import ResNet, build_model, count_macs, count_params
from .train import train_augmentation

STRATEGIES = ("stats", "top", "every-other", "sensitivity")


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to recover."""

    keep: float | None = 0.6  # fraction of the present blocks kept (rounded to whole blocks)
    blocks_to_keep: tuple[int, ...] | None = None  # an explicit list instead of --keep
    max_size: int | None = None  # budget: the most blocks whose model.pt fits in this many bytes
    max_params: int | None = None  # budget: the most blocks whose parameter count fits
    strategy: str = "stats"  # stats | top | every-other | sensitivity
    recalibrate: int = 40  # BatchNorm re-estimation batches (0: off), augmented as in training
    batch_size: int = 128  # recalibration and sensitivity batch size
    sensitivity_batches: int = 4  # batches per candidate evaluation of the sensitivity strategy
    finetune: int = 0  # fine-tuning epochs after removal (needs training data)
    finetune_lr: float = 0.01
    finetune_survival: bool = False  # keep stochastic depth on while fine-tuning
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        given = sum(x is not None for x in (self.blocks_to_keep, self.max_size, self.max_params))
        if given > 1:
            raise InputError("give one of --blocks-to-keep, --max-size, --max-params")
        if given == 0 and (self.keep is None or not 0.0 < self.keep <= 1.0 or math.isnan(self.keep)):
            raise InputError(f"--keep must be in (0, 1], got {self.keep}")
        if self.recalibrate < 0 or self.finetune < 0 or self.sensitivity_batches < 1 or self.batch_size < 1:
            raise InputError("--recalibrate and --finetune must be >= 0, --sensitivity-batches and --batch-size >= 1")
        check_number("--recalibrate", self.recalibrate, 0, 100_000)
        check_number("--finetune", self.finetune, 0, 10_000)
        check_lr("--finetune-lr", self.finetune_lr)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- importance ----------------------------------------------------------------------------------------------
def _need(table: SurvivalTable | None) -> SurvivalTable:
    if table is None:
        raise InputError("strategy 'stats' needs the survival statistics of training; this checkpoint has none (use --strategy top)")
    return table


def stats_basis(table: SurvivalTable | None, present: list[int]) -> tuple[str, str | None]:
    """What the `stats` strategy ranks by, and a warning when it cannot rank by drop effects.

    Drop effects are used when at least a third of the present blocks have one distinguishable from zero
    (|effect| > 2 standard errors). Otherwise (a constant-depth network never dropped a block; a fit on a few
    steps is noise) the ranking falls back to contribution ||f(x)|| / ||x||, and says so.
    """
    rows = _need(table).blocks
    known = [rows[b] for b in present if rows[b].drop_effect is not None]
    if not known:
        return "contribution", ("the checkpoint has no drop effects (no block was ever dropped in training): blocks are ranked by "
                                "contribution ||f(x)||/||x|| instead; --strategy sensitivity measures the loss of each removal")
    clear = sum(1 for r in known if r.drop_effect_se is not None and abs(r.drop_effect) > 2 * r.drop_effect_se)
    if 3 * clear < len(present):
        return "contribution", (f"only {clear} of {len(present)} blocks have a drop effect distinguishable from zero (|effect| > 2 SE, "
                                f"fitted on {table.regression_steps} steps): blocks are ranked by contribution "
                                f"||f(x)||/||x|| instead; --strategy sensitivity measures the loss of each removal")
    return ("drop effect (measured without training)" if table.source == "measured" else "drop effect"), None


def stats_order(table: SurvivalTable | None, present: list[int], by: str = "drop effect") -> list[int]:
    """Present blocks, cheapest to remove first: by learned drop effect (contribution as the tie-breaker), or with
    `by="contribution"` by contribution alone.

    A block with no drop-effect estimate is ordered by its contribution, after every block that has an estimate.
    """
    rows = _need(table).blocks

    def key(l: int):
        eff, contrib = rows[l].drop_effect, rows[l].contribution
        contrib = contrib if contrib is not None else math.inf
        if by == "contribution":
            return (contrib,)
        return (eff is None, eff if eff is not None else 0.0, contrib)

    return sorted(present, key=key)


def every_other(present: list[int], n_remove: int) -> list[int]:
    """LayerDrop's rule: removals spread evenly over the depth, starting from the top."""
    if n_remove == 0:
        return []
    n = len(present)
    # positions counted from the top, evenly spaced: keep 0.5 removes every other block
    picks = {n - 1 - math.floor(i * n / n_remove) for i in range(n_remove)}
    return sorted(present[p] for p in picks)


def sensitivity_order(model: ResNet, present: list[int], n_remove: int, loss_fn: Callable[[ResNet], float],
                      start: list[int] | None = None) -> list[int]:
    """Greedy: repeatedly remove the block whose removal raises the measured loss least (after `start`)."""
    removed: list[int] = list(start or [])
    while len(removed) < n_remove:
        best, best_loss = None, math.inf
        for l in present:
            if l in removed:
                continue
            loss = loss_fn(remove_blocks(model, removed + [l]))
            if loss < best_loss:
                best, best_loss = l, loss
        removed.append(best)
    return removed


# ---- mechanics -----------------------------------------------------------------------------------------------
def remove_blocks(model: ResNet, remove) -> ResNet:
    """A new network without the given blocks: rebuilt from the spec, the kept weights copied, nothing else."""
    remove = set(remove)
    kept = [l for l in model.spec.kept if l not in remove]
    new = build_model(model.spec.with_kept(kept))
    state = model.state_dict()
    new.load_state_dict({k: state[k] for k in new.state_dict()}, strict=True)
    new.train(model.training)
    return new.to(next(model.parameters()).device)


@torch.no_grad()
def recalibrate_bn(model: ResNet, images: ImageSet, normalize: Normalize, batches: int, batch_size: int, seed: int = 0,
                   pad: int = 0, flip: bool = False) -> int:
    """Re-estimate BatchNorm statistics on the evaluation-time network. Returns the number of images used.

    Batches get the training augmentation (`pad`, `flip`, as in training): the weights were learned against
    statistics of augmented batches. Clean batches cost accuracy even with no block removed
    (`tools/bench_prune.py`, bundled constant-depth ResNet-56, keep 1.0, 5k validation split: 87.7% before,
    85.3% after recalibrating on clean batches, 87.6% on augmented ones).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all recalibration batches
    model.eval()
    for m in bns:
        m.train()
    g = torch.Generator().manual_seed(seed)
    per_pass = max(1, len(images) // batch_size)
    used = 0
    try:
        for i in range(batches):  # more batches than the data holds: new passes, new augmentation draws
            if i % per_pass == 0:
                order = torch.randperm(len(images), generator=g)
            idx = order[(i % per_pass) * batch_size : (i % per_pass + 1) * batch_size]
            x = augment(images.images[idx], pad, flip, g)
            model(normalize(x))  # keep=None: every kept block, scaled by p_l, as at evaluation
            used += len(idx)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return used


# ---- footprint -----------------------------------------------------------------------------------------------
def state_bytes(model: ResNet) -> int:
    """Bytes of model.pt as `save_checkpoint` writes it."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.tell()


def footprint(model: ResNet, input_shape) -> dict:
    return {"blocks": len(model.block_ids), "params": count_params(model), "macs": count_macs(model, tuple(input_shape))["total"]}


def removable(model) -> list[int]:
    """Present blocks that can be removed (all of them in the project's ResNets)."""
    return [b for b in model.block_ids if b not in model.spec.fixed]


# ---- policy --------------------------------------------------------------------------------------------------
def blocks_to_remove(model: ResNet, meta: Sidecar, cfg: PruneConfig, loss_fn: Callable[[ResNet], float] | None = None) -> list[int]:
    """Which present blocks to remove under the config's keep ratio, explicit list or budget. `keep` is a fraction
    of the removable blocks: a block without a residual path (a MobileNet block that changes the width) stays."""
    present = removable(model)
    if cfg.blocks_to_keep is not None:
        bad = sorted(set(cfg.blocks_to_keep) - set(model.block_ids))
        if bad:
            raise InputError(f"--blocks-to-keep names blocks {bad} that this model does not have (present: {model.block_ids})")
        return [l for l in present if l not in set(cfg.blocks_to_keep)]

    order_cache: list[int] | None = None

    def removal(n_remove: int) -> list[int]:
        nonlocal order_cache
        if cfg.strategy == "every-other":
            return every_other(present, n_remove)
        if cfg.strategy == "top":
            return sorted(present, reverse=True)[:n_remove]
        if cfg.strategy == "stats":
            return stats_order(meta.survival_stats, present, stats_basis(meta.survival_stats, present)[0])[:n_remove]
        if order_cache is None or len(order_cache) < n_remove:  # sensitivity: greedy, nested
            if loss_fn is None:
                raise InputError("strategy 'sensitivity' needs data to measure the loss on")
            order_cache = sensitivity_order(model, present, n_remove, loss_fn, order_cache)
        return order_cache[:n_remove]

    if cfg.max_size is None and cfg.max_params is None:
        n_keep = math.floor(cfg.keep * len(present) + 0.5)
        return removal(len(present) - n_keep)
    for n_remove in range(len(present) + 1):  # the most blocks that fit
        candidate = remove_blocks(model, removal(n_remove))
        size = state_bytes(candidate) if cfg.max_size is not None else count_params(candidate)
        if size <= (cfg.max_size if cfg.max_size is not None else cfg.max_params):
            return removal(n_remove)
    smallest = remove_blocks(model, present)
    what = f"{state_bytes(smallest):,} bytes" if cfg.max_size is not None else f"{count_params(smallest):,} parameters"
    raise InputError(f"no model meets the budget: even with every block removed it has {what}")


# ---- the stage -----------------------------------------------------------------------------------------------
@torch.no_grad()
def batch_loss(model: ResNet, images: ImageSet, normalize: Normalize, batches: int, batch_size: int) -> float:
    """Mean cross-entropy of the evaluation-time network on the first `batches` batches."""
    model.eval()
    total, n = 0.0, 0
    for i in range(min(batches, math.ceil(len(images) / batch_size))):
        x = normalize(images.images[i * batch_size : (i + 1) * batch_size])
        y = images.labels[i * batch_size : (i + 1) * batch_size]
        total += torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item()
        n += len(y)
    return total / n


def prune_model(model: ResNet, meta: Sidecar, cfg: PruneConfig, calib: ImageSet | None,
                finetune: Callable[[ResNet], dict] | None = None) -> tuple[ResNet, dict]:
    """Remove blocks, recalibrate BatchNorm and optionally fine-tune. Returns the pruned model and a record.

    Args:
        model: the network to prune (not modified).
        meta: its sidecar (survival statistics, data normalization).
        cfg: the prune config.
        calib: training images for BatchNorm recalibration and the sensitivity strategy (never evaluation data).
        finetune: trains the pruned network in place when cfg.finetune > 0; returns a record.
    """
    normalize = Normalize(meta.data.mean, meta.data.std)
    loss_fn = None
    if cfg.strategy == "sensitivity":
        if calib is None:
            raise InputError("strategy 'sensitivity' needs training data (--data)")
        order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(cfg.seed))
        sens_images = calib.subset(order[: cfg.sensitivity_batches * cfg.batch_size])

        def loss_fn(candidate: ResNet) -> float:
            return batch_loss(candidate, sens_images, normalize, cfg.sensitivity_batches, cfg.batch_size)

    removed = sorted(blocks_to_remove(model, meta, cfg, loss_fn))
    pruned = remove_blocks(model, removed).eval()
    record = {"removed": removed, "kept": pruned.block_ids, "recalibrated_images": 0, "finetune": None}
    if cfg.blocks_to_keep is not None:
        record["ranking"] = {"by": "the blocks named", "warning": None}
    elif cfg.strategy == "stats":
        by, warning = stats_basis(meta.survival_stats, removable(model))
        record["ranking"] = {"by": by, "warning": warning}
    else:
        record["ranking"] = {"by": {"top": "depth (highest first)", "every-other": "position (evenly spread)",
                                    "sensitivity": "measured loss of each removal"}[cfg.strategy], "warning": None}
    if cfg.recalibrate and removed:
        if calib is None:
            raise InputError("BatchNorm recalibration needs training data (--data), or pass --recalibrate 0")
        record["recalibrated_images"] = recalibrate_bn(pruned, calib, normalize, cfg.recalibrate, cfg.batch_size, cfg.seed,
                                                       *train_augmentation(meta))
    if cfg.finetune:
        if finetune is None:
            raise InputError("--finetune needs training data (--data)")
        record["finetune"] = finetune(pruned)
        pruned.eval()
    return pruned, record
