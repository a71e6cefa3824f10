"""Remove whole residual blocks: importance (scores per block), policy (which to remove), mechanics (remove).

A network trained with stochastic depth has learned to work while blocks are missing, so whole blocks can be
removed after training. Removed blocks are deleted: no parameters of theirs remain in memory, in `model.pt` or
in anything exported; a removed downsampling block becomes its parameter-free shortcut. A kept block adds
p_l^t f(x) at evaluation: t = 1 as in the full network, 0 as in a training step where it ran, below 0 amplified for
the removed blocks (`choose_block_scale`).
BatchNorm statistics are then re-estimated on training images, running the evaluation-time network with only
BatchNorm in train mode and cumulative averages (momentum reset), because the removed blocks changed the
statistics every later layer sees.
"""

from __future__ import annotations

import copy
import io
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .data import ImageSet, Normalize, train_augmentation
from .checkpoint import Sidecar, SurvivalTable
from .config import check_recovery
from .errors import InputError
from .nets import EXPONENT_RANGE, ResNet, build_model, count_macs, count_params, rescale_blocks
from .loops import batch_loss, recalibrate_bn

STRATEGIES = ("stats", "top", "every-other", "sensitivity")  # IMPORTANCE's entries, and the positional every-other
BLOCK_SCALES = ("auto", "survival", "unit")  # the kept blocks' evaluation-time scale after removal
NAMED_EXPONENTS = {"survival": 1.0, "unit": 0.0}  # block l adds p_l^t f(x): t = 1 the stochastic depth rule, 0 f(x)
EXPONENT_FLOOR = EXPONENT_RANGE[0]  # auto's search goes no lower (blocks amplified by 1/p_l^2, 4x for p_L 0.5)
SCALE_RULE = "p_l^t, t searched from 1 down"  # what `auto` does, in a sweep's settings: points made by an earlier rule are made again
SCALE_BATCHES = 10  # batches of training images the "auto" block scale is chosen on


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
    block_scale: str = "auto"  # kept blocks add p_l^t f(x): t = 1 (survival), 0 (unit); auto: searched, the lowest loss after recalibration
    distill: bool = True  # fine-tune from the unpruned model as teacher as well as from the labels
    distill_temperature: float = 4.0
    distill_alpha: float = 0.9  # weight of the teacher's softened outputs; 1 - alpha on the labels
    teacher: str | None = None  # another checkpoint as teacher instead of the unpruned model
    precision: str = "auto"  # of the fine-tuning steps: auto | fp32 | bf16 (precision.resolve_precision)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        given = sum(x is not None for x in (self.blocks_to_keep, self.max_size, self.max_params))
        if given > 1:
            raise InputError("give one of --blocks-to-keep, --max-size, --max-params")
        if given == 0 and (self.keep is None or not 0.0 < self.keep <= 1.0 or math.isnan(self.keep)):
            raise InputError(f"--keep must be in (0, 1], got {self.keep}")
        if self.block_scale not in BLOCK_SCALES:
            raise InputError(f"unknown block scale {self.block_scale!r}; choose one of {', '.join(BLOCK_SCALES)}")
        if self.recalibrate < 0 or self.finetune < 0 or self.sensitivity_batches < 1 or self.batch_size < 1:
            raise InputError("--recalibrate and --finetune must be >= 0, --sensitivity-batches and --batch-size >= 1")
        check_recovery(self)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- what the importance functions read ----------------------------------------------------------------------
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
                      start: list[int] | None = None, remove: Callable[[list[int]], torch.nn.Module] | None = None) -> list[int]:
    """Greedy: repeatedly remove the block whose removal raises the measured loss least (after `start`).
    `remove(blocks)` builds a candidate network (default: `remove_blocks(model, blocks)`)."""
    remove = remove or (lambda r: remove_blocks(model, r))
    removed: list[int] = list(start or [])
    while len(removed) < n_remove:
        best, best_loss = None, math.inf
        for l in present:
            if l in removed:
                continue
            loss = loss_fn(remove(removed + [l]))
            if loss < best_loss:  # a NaN loss is never the best
                best, best_loss = l, loss
        if best is None:
            raise InputError(f"strategy 'sensitivity': every candidate removal gave a non-finite loss after removing {removed}; "
                             f"the model or the data is broken")
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
    if isinstance(model, ResNet):
        new.scale_exponent = getattr(model, "scale_exponent", 1.0)
    return new.to(next(model.parameters()).device)


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


# ---- importance: one score per removable block, lower = removed first ------------------------------------------
@dataclass(frozen=True)
class Candidates:
    """What an importance function scores: the model, its sidecar, its removable blocks, and (for `sensitivity`)
    the loss of a candidate network on training images."""

    model: ResNet
    meta: Sidecar | None
    present: list[int]
    loss_fn: Callable[[ResNet], float] | None = None
    stage_of: Callable[[int], int] | None = None  # default: the spec's stages (a module without one: `Block.stage`)
    effects: dict[int, float | None] | None = None  # drop effects given directly (`sdcompress.prune`), not by the sidecar
    remove: Callable[[list[int]], torch.nn.Module] | None = None  # builds a candidate network; default `remove_blocks`


Importance = Callable[[Candidates, int, "dict[int, float] | None"], "dict[int, float]"]
IMPORTANCE: dict[str, Importance] = {}  # strategy name -> scores(candidates, n_remove, scores so far)
RANKED_BY: dict[str, str] = {"every-other": "position (evenly spread)"}  # what each strategy ranks by, for reports
GREEDY: set[str] = set()  # strategies whose scores are only valid up to the count asked for (extended, not redone)
PER_STAGE = {"stats"}  # strategies that rank within each stage, with every-other's count of removals per stage


def importance(name: str, ranked_by: str, greedy: bool = False):
    """Register an importance function under a strategy name, with what it ranks by (shown in reports)."""
    def register(fn: Importance) -> Importance:
        IMPORTANCE[name], RANKED_BY[name] = fn, ranked_by
        if greedy:
            GREEDY.add(name)
        return fn

    return register


@importance("stats", "drop effect, within each stage")
def stats_scores(c: Candidates, n_remove: int, prior=None) -> dict[int, float]:
    """Rank in `stats_order` (learned or measured drop effect; contribution where drop effects say nothing), or by
    the drop effects given (`sdcompress.prune(stats=...)`), a block without one last."""
    if c.effects is not None:
        return {b: c.effects[b] if c.effects.get(b) is not None else math.inf for b in c.present}
    order = stats_order(c.meta.survival_stats, c.present, stats_basis(c.meta.survival_stats, c.present)[0])
    return {b: float(i) for i, b in enumerate(order)}


@importance("top", "depth (highest first)")
def top_scores(c: Candidates, n_remove: int, prior=None) -> dict[int, float]:
    """Depth: the highest block first (the rule for networks trained without layer dropout)."""
    return {b: -float(b) for b in c.present}


@importance("sensitivity", "measured loss of each removal", greedy=True)
def sensitivity_scores(c: Candidates, n_remove: int, prior: dict[int, float] | None = None) -> dict[int, float]:
    """Step of the greedy search at which a block is removed (`sensitivity_order`); blocks not reached score inf.
    `prior`, scores of a shorter search, is extended rather than repeated."""
    if c.loss_fn is None:
        raise InputError("strategy 'sensitivity' needs data to measure the loss on")
    start = sorted((b for b, v in (prior or {}).items() if v != math.inf), key=lambda b: prior[b])
    order = sensitivity_order(c.model, c.present, n_remove, c.loss_fn, start, c.remove)
    return {b: float(order.index(b)) if b in order else math.inf for b in c.present}


# ---- policy: how many, and which -------------------------------------------------------------------------------
class Ranking:
    """The blocks to remove for any count: scores computed once by the strategy's importance function (extended
    when a greedy search must go further), or for `every-other` positions spread over the depth."""

    def __init__(self, strategy: str, candidates: Candidates):
        self.strategy, self.c = strategy, candidates
        self.scores: dict[int, float] | None = None
        self.scored = -1  # the largest count the scores are valid for

    def removal(self, n_remove: int) -> list[int]:
        if self.strategy == "every-other":
            return every_other(self.c.present, n_remove)
        if self.scored < n_remove:
            self.scores = IMPORTANCE[self.strategy](self.c, n_remove, self.scores)
            self.scored = n_remove if self.strategy in GREEDY else len(self.c.present)
        if self.strategy in PER_STAGE:
            return self._per_stage(n_remove)
        return sorted(self.c.present, key=lambda b: (self.scores[b], b))[:n_remove]

    def _per_stage(self, n_remove: int) -> list[int]:
        return per_stage(self.c.present, n_remove, self.c.stage_of or self.c.model.spec.block_stage, lambda b: self.scores[b])


def per_stage(present: list[int], n_remove: int, stage_of: Callable[[int], int], score: Callable[[int], float]) -> list[int]:
    """As many removals from each stage as `every_other` makes there, the lowest-scored blocks of the stage (ties
    by position): the policy of the `stats` strategy, for checkpoints and for `sdcompress.prune` alike.

    Drop effects are marginal: each was learned with the other blocks present at their survival rates. Taken
    alone, they pile the removals into the stage whose blocks were rarely dropped (the first, under the linear
    rule), which the network never learned to lose together: the retrofitted ResNet-56 at keep 0.6 scored 69.9%
    that way, 85.8% with the stage counts fixed (docs/results.md)."""
    quota = Counter(stage_of(b) for b in every_other(present, n_remove))
    chosen: list[int] = []
    for s, k in quota.items():
        chosen += sorted((b for b in present if stage_of(b) == s), key=lambda b: (score(b), b))[:k]
    return sorted(chosen)


def blocks_to_remove(model: ResNet, meta: Sidecar, cfg: PruneConfig, loss_fn: Callable[[ResNet], float] | None = None,
                     ranking: Ranking | None = None) -> list[int]:
    """Which present blocks to remove under the config's keep ratio, explicit list or budget. `keep` is a fraction
    of the removable blocks: a block without a residual path (a MobileNet block that changes the width) stays.
    `ranking`: the strategy's ranking of this model, when one is shared by several calls (a depth family)."""
    present = removable(model)
    if cfg.blocks_to_keep is not None:
        bad = sorted(set(cfg.blocks_to_keep) - set(model.block_ids))
        if bad:
            raise InputError(f"--blocks-to-keep names blocks {bad} that this model does not have (present: {model.block_ids})")
        return [l for l in present if l not in set(cfg.blocks_to_keep)]
    ranking = ranking or Ranking(cfg.strategy, Candidates(model, meta, present, loss_fn))
    if cfg.max_size is None and cfg.max_params is None:
        n_keep = math.floor(cfg.keep * len(present) + 0.5)
        return ranking.removal(len(present) - n_keep)
    return within_budget(ranking, lambda r: remove_blocks(model, r), cfg.max_params, cfg.max_size)


def within_budget(ranking: Ranking, remove: Callable[[list[int]], torch.nn.Module], max_params: int | None = None,
                  max_bytes: int | None = None) -> list[int]:
    """The fewest removals of `ranking` that bring the network under the budget (parameters, or bytes of its
    saved state), for checkpoints (`--max-params`, `--max-size`) and for `sdcompress.prune` alike."""
    if (max_params is None) == (max_bytes is None):
        raise InputError("give one budget: a number of parameters or of bytes")
    size = (lambda m: count_params(m)) if max_params is not None else state_bytes
    limit = max_params if max_params is not None else max_bytes
    for n_remove in range(len(ranking.c.present) + 1):  # the most blocks that fit
        if size(remove(ranking.removal(n_remove))) <= limit:
            return ranking.removal(n_remove)
    unit = "parameters" if max_params is not None else "bytes"
    raise InputError(f"no model meets the budget of {limit:,} {unit}: even with every removable block removed it has "
                     f"{size(remove(list(ranking.c.present))):,}")


# ---- the stage -----------------------------------------------------------------------------------------------
def training_sample(calib: ImageSet, batches: int, batch_size: int, seed: int) -> ImageSet:
    """A fixed, seeded sample of `batches` x `batch_size` training images: what candidate networks are compared on
    (the sensitivity strategy, the block-scale choice), for checkpoints and a user's class alike."""
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
    return calib.subset(order[: batches * batch_size])


def _sensitivity_loss(calib: ImageSet | None, normalize: Normalize, cfg: PruneConfig) -> Callable[[ResNet], float]:
    """The loss a candidate network is ranked by: its cross-entropy on a fixed sample of training images."""
    if calib is None:
        raise InputError("strategy 'sensitivity' needs training data (--data)")
    sample = training_sample(calib, cfg.sensitivity_batches, cfg.batch_size, cfg.seed)
    return lambda candidate: batch_loss(candidate, sample, normalize, cfg.sensitivity_batches, cfg.batch_size)


def scale_name(t: float) -> str:
    """survival (t = 1), unit (0), amplified (< 0) or between."""
    return {1.0: "survival", 0.0: "unit"}.get(t, "amplified" if t < 0 else "between")


def search_exponent(loss_at: Callable[[float], float]) -> tuple[float, dict[float, float]]:
    """The exponent t of the kept blocks' scale p_l^t with the lowest `loss_at(t)`: p_l f(x) (1) and f(x) (0)
    first; if f(x) is lower, on down in steps of 0.5 (blocks amplified to make up for the removed ones) while the
    loss keeps falling, to `EXPONENT_FLOOR`; else 0.5 between them. Returns t and every loss measured."""
    loss = {t: loss_at(t) for t in (1.0, 0.0)}
    finite = lambda t: loss[t] if math.isfinite(loss[t]) else math.inf  # noqa: E731
    if finite(0.0) < finite(1.0):
        t = 0.0
        while t - 0.5 >= EXPONENT_FLOOR:
            loss[t - 0.5] = loss_at(t - 0.5)
            if not finite(t - 0.5) < finite(t):
                break
            t -= 0.5
    else:
        loss[0.5] = loss_at(0.5)
    return min(loss, key=finite), loss


def decide_exponent(mode: str, have: float, loss_at: Callable[[float], float] | None, scored_on: str, why_not: str) -> tuple[float, dict]:
    """The t of a block-scale `mode` and its record, for checkpoints and a user's module alike: `auto` with a
    `loss_at(t)` searches (`search_exponent`, scored on `scored_on`); `survival` / `unit` name t; `auto` without one
    keeps `have`, for `why_not`."""
    if mode == "auto" and loss_at is not None:
        t, loss = search_exponent(loss_at)
        return t, {"chosen": scale_name(t), "exponent": t, "why": f"lowest loss on {scored_on}",
                   "loss": {f"{k:g}": round(v, 5) for k, v in sorted(loss.items(), reverse=True)}}
    t = NAMED_EXPONENTS.get(mode, have)
    return t, {"chosen": scale_name(t), "exponent": t, "why": "asked for" if mode != "auto" else why_not}


def choose_block_scale(pruned: ResNet, mode: str, calib: ImageSet | None, normalize: Normalize, recal: Callable[[ResNet], int],
                       *, recalibrate: int, seed: int, batch_size: int = 128) -> tuple[ResNet, dict]:
    """What each kept block of a pruned network adds at evaluation: p_l^t f(x). t = 1 (`survival`) is the stochastic
    depth paper's rule for the full network: every block runs, weighted by how often it ran in training; t = 0
    (`unit`) adds f(x), as in a training step where the block was drawn; below 0 the kept blocks are amplified,
    making up for the removed ones. The factor is folded into each kept block's last BatchNorm
    (`nets.rescale_blocks`). `auto` recalibrates each candidate and keeps the lowest loss on `SCALE_BATCHES` batches
    of training images (a fixed sample, never evaluation data; `search_exponent`); without training images it
    keeps the t the network has. A network pruned before keeps the t it was given (`ResNet.scale_exponent`,
    restored from its checkpoint's stages): another t is reached from it, never applied twice.
    `recal` re-estimates a candidate's BatchNorm (on `recalibrate` batches of `batch_size`; 0: not); the sample
    scored is drawn with `seed`. Measured on the retrofitted ResNet-56 (docs/results.md)."""
    probs = pruned.block_survival() if isinstance(pruned, ResNet) else {}
    if not any(p < 1.0 for p in probs.values()):
        return pruned, {"chosen": "unit", "folded": False, "why": "every kept block already adds f(x) at evaluation: nothing to choose"}
    have = pruned.scale_exponent
    nets_by = {have: pruned}

    def net_at(t: float) -> ResNet:  # each candidate made (rescaled, recalibrated) once
        if t not in nets_by:
            nets_by[t] = net = copy.deepcopy(pruned)
            rescale_blocks(net, t)
            if recalibrate and calib is not None:
                recal(net)
        return nets_by[t]

    sample = training_sample(calib, SCALE_BATCHES, batch_size, seed + 1) if calib is not None and mode == "auto" else None
    loss_at = (lambda t: batch_loss(net_at(t), sample, normalize, SCALE_BATCHES, batch_size)) if sample is not None else None  # noqa: E731
    why_not = "--recalibrate 0 and no training data: not compared" if not recalibrate else "no training images to choose by"
    if have != 1.0:
        why_not += "; an earlier stage chose it"
    t, record = decide_exponent(mode, have, loss_at, f"{len(sample):,} training images" if sample is not None else "", why_not)
    return net_at(t), record


def prune_model(model: ResNet, meta: Sidecar, cfg: PruneConfig, calib: ImageSet | None,
                finetune: Callable[[ResNet, PruneConfig], dict] | None = None) -> tuple[ResNet, dict]:
    """Remove blocks, recalibrate BatchNorm and optionally fine-tune. Returns the pruned model and a record.

    Args:
        model: the network to prune (not modified).
        meta: its sidecar (survival statistics, data normalization).
        cfg: the prune config.
        calib: training images for BatchNorm recalibration and the sensitivity strategy (never evaluation data).
        finetune: `finetune(pruned, cfg)` trains the pruned network in place when cfg.finetune > 0 (from the
            unpruned model as teacher when cfg.distill); returns a record.
    """
    normalize = Normalize(meta.data.mean, meta.data.std)
    loss_fn = _sensitivity_loss(calib, normalize, cfg) if cfg.strategy == "sensitivity" else None
    removed = sorted(blocks_to_remove(model, meta, cfg, loss_fn))
    pruned = remove_blocks(model, removed).eval()
    record = {"removed": removed, "kept": pruned.block_ids, "recalibrated_images": 0, "finetune": None}
    recal = lambda m: recalibrate_bn(m, calib, normalize, cfg.recalibrate, cfg.batch_size, cfg.seed, *train_augmentation(meta))  # noqa: E731
    if cfg.blocks_to_keep is not None:
        record["ranking"] = {"by": "the blocks named", "warning": None}
    elif cfg.strategy == "stats":
        by, warning = stats_basis(meta.survival_stats, removable(model))
        record["ranking"] = {"by": by, "warning": warning}
    else:
        record["ranking"] = {"by": RANKED_BY[cfg.strategy], "warning": None}
    if cfg.recalibrate and removed:
        if calib is None:
            raise InputError("BatchNorm recalibration needs training data (--data), or pass --recalibrate 0")
        record["calibration_set_size"] = len(calib)
        record["recalibrated_images"] = recal(pruned)
    if removed:
        pruned, record["block_scale"] = choose_block_scale(pruned, cfg.block_scale, calib, normalize, recal, recalibrate=cfg.recalibrate,
                                                           seed=cfg.seed, batch_size=cfg.batch_size)
    if cfg.finetune:
        if finetune is None:
            raise InputError("--finetune needs training data (--data)")
        record["finetune"] = finetune(pruned, cfg)
        pruned.eval()
    return pruned, record
