"""Training stages on any residual network and the user's own batches: stochastic depth (from scratch or from
pretrained weights), BatchNorm re-estimation, fine-tuning with a teacher.

    trained = sdcompress.train_stochastic_depth(model, train_loader, epochs=2)   # dropped blocks are not computed
    small = sdcompress.prune(trained.model, keep=0.6, stats=trained.stats)      # ranked by the recorded drop effects
    small = sdcompress.recalibrate(small, train_loader)
    small, _ = sdcompress.finetune(small, train_loader, teacher=trained.model)  # distillation from the full network

Stochastic depth (Huang et al. 2016): block l of L survives a mini-batch with probability p_l = 1 - l/L (1 - p_L)
(the linear rule); a dropped block is swapped, for that one step, for what is left of it (nothing, or its own
shortcut sharing its weights), so it is not computed and its parameters get no gradient. At evaluation every
block runs, its residual branch scaled by p_l. For a block whose branch ends in an affine layer (its last
BatchNorm, convolution or linear layer: `Block.scale`, found and checked by `find_blocks`) that scale lives in
the weights: training starts with that layer's weight and bias divided by p_l, so the evaluation-time network at
step 0 is exactly the pretrained one, and ends with them multiplied back by p_l, so the model handed back is an
ordinary module of the user's class that evaluates as the paper's network. A block without such a layer runs at
full weight in training and at evaluation (as in LayerDrop); `history["unscaled"]` lists those.

While training, the loss of every step and which blocks were dropped are kept; the drop effect of each block (how
much the loss rises when it is missing) is the least-squares fit of the loss on the drop indicators with a
quadratic trend in the step number, as in the command-line trainer. `Trained.stats` feeds `prune(stats=...)`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .files import MAX_WEIGHTS_BYTES, atomic_torch_save, first_line, read_untrusted_check
from .families import Block, replacement
from .loops import SGD, distill_loss, reestimate_bn, sgd_loop as _loop, steps_per_epoch, to_device as _batch
from .survival import SurvivalStats, draw_run_mask


CHECKPOINT_KIND = "sdcompress.train_stochastic_depth/1"


class Trained(NamedTuple):
    """What `train_stochastic_depth` gives back: the trained model (a new module), the drop effects recorded while
    training (`DropEffects`, for `prune`), and what ran (epochs, steps, seconds, mean loss of each epoch,
    precision, survival probabilities)."""

    model: nn.Module
    stats: "DropEffects"  # noqa: F821 - api.DropEffects
    history: dict


def _check_batches(batches, epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if epochs > 1 and isinstance(batches, Iterator):
        raise InputError(f"batches is a one-shot iterator and epochs={epochs} passes over it; give a list or a DataLoader")


def _positive(name: str, v, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise InputError(f"{name} must be a number in ({lo:g}, {hi:g}], got {v!r:.40}")
    return float(v)


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _fold(model: nn.Module, blocks: list[Block], factor: dict[int, float]) -> None:
    """Multiply the weights of each block's `scale` layer by factor[block index]."""
    with torch.no_grad():
        for b in blocks:
            if b.scale and b.index in factor:
                for p in model.get_submodule(b.path).get_submodule(b.scale).parameters():
                    p.mul_(factor[b.index])


def _scales_itself(model: nn.Module) -> bool:
    """Whether the network scales each block by p_l at evaluation itself (the project's ResNets do; torchvision and
    timm networks as the command line wraps them run every block at full weight)."""
    from .nets import ResNet

    return isinstance(model, ResNet)


def survival_probs(blocks: list[Block], p_last: float) -> dict[int, float]:
    """The linear rule: p_l = 1 - l/L (1 - p_last) for block l = 1..L; a block that cannot be removed always runs."""
    n = len(blocks)
    return {b.index: (1.0 - (b.index + 1) / n * (1.0 - p_last)) if b.removable else 1.0 for b in blocks}


def train_stochastic_depth(model: nn.Module, batches: Iterable, epochs: int = 1, *, blocks: list[Block] | None = None,
                           p_last: float = 0.5, lr: float = 0.01, weight_decay: float = 1e-4,
                           loss_fn: Callable = F.cross_entropy, recalibrate_batches: int = 100, precision: str = "auto",
                           device: str | torch.device | None = None, seed: int = 0, progress: bool = False,
                           checkpoint: str | Path | None = None, resume: bool = False, teacher: nn.Module | None = None,
                           temperature: float = 4.0, alpha: float = 0.9) -> Trained:
    """Train `model` with stochastic depth on `batches`, from its current (e.g. pretrained) weights.

    With `teacher` (usually the pretrained network itself, full depth), every drawn network also learns the
    teacher's outputs on the same batch: alpha T^2 KL(teacher / T || student / T) + (1 - alpha) `loss_fn`, the
    distillation of `finetune`. The networks with blocks missing then learn to answer as the whole network does,
    which is what a pruned network is asked to do; the recorded drop effects are rises of that loss.

    Args:
        model: any residual network (not modified; a trained copy is returned).
        batches: (inputs, targets) batches of training images, e.g. a shuffling, augmenting DataLoader.
        epochs: passes over `batches`.
        blocks: the blocks (default: `find_blocks` on the first batch).
        p_last: survival probability of the last block (the paper's 0.5). A network loaded from a command-line
            checkpoint (`load(folder)`) keeps its own rule and p_L, as its evaluation-time scaling says.
        lr: the start of a cosine schedule (0.1 from scratch; 0.01 to 0.02 from pretrained weights).
        weight_decay: SGD weight decay.
        loss_fn: loss(outputs, targets).
        recalibrate_batches: batches of `batches` on which BatchNorm statistics of the evaluation-time network are
            re-estimated at the end (their running averages were gathered on networks with blocks missing); 0: not.
        precision: "auto", "fp32" or "bf16" (autocast; weights stay float32).
        device: where to train (default: where the model's parameters are).
        seed: seed of the drop draws.
        progress: a progress bar.
        checkpoint: a file written after every epoch (replaced whole, never half-written): the weights, optimizer,
            drop draws and losses so far, and the state of `batches` where it has `state_dict()` (as
            `ImageBatches` and torchdata's `StatefulDataLoader` do). A run that stops can go on from its last
            epoch with `resume=True`.
        resume: go on from `checkpoint` after its last epoch. Call with the same model (its weights are replaced by
            the checkpoint's), batches and settings; the result is that of a run never stopped (same draws, same
            schedule, and the same batches where their state was saved; `torch`'s global random state, which a
            shuffling DataLoader draws from, is restored too).
        teacher: a network to distil from (not modified), evaluated as it is (all blocks) on each batch.
        temperature: softmax temperature T of both outputs, with `teacher`.
        alpha: weight of the teacher's term, with `teacher`; 1 - alpha on `loss_fn`.

    Returns:
        `Trained(model, stats, history)`.

    Raises:
        InputError: a bad setting; `resume` without a readable checkpoint of this model and these settings; a
            `checkpoint` that exists when not resuming (it would be overwritten).

    Example:
        >>> trained = sdcompress.train_stochastic_depth(model, loader, epochs=2, lr=0.02)
        >>> small = sdcompress.prune(trained.model, keep=0.6, stats=trained.stats)
    """
    from .api import DropEffects, _spec_numbers, find_blocks

    _check_batches(batches, epochs)
    p_last = _positive("p_last", p_last, 0.0, 1.0)
    lr = _positive("lr", lr, 0.0, 10.0)
    if isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) or recalibrate_batches < 0:
        raise InputError(f"recalibrate_batches must be a whole number >= 0, got {recalibrate_batches!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    temperature = _positive("temperature", temperature, 0.0, 100.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r:.40}")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if resume and checkpoint is None:
        raise InputError("resume=True goes on from a checkpoint: give checkpoint=FILE")
    if checkpoint is not None and not resume and checkpoint.exists():
        raise InputError(f"checkpoint {checkpoint} exists: pass resume=True to go on from it, or remove it to start again")
    dev = _device_of(model, device)
    work = copy.deepcopy(model).to(dev)
    if blocks is None:
        first = next(iter(batches), None)
        if first is None:
            raise InputError("batches is empty: give (inputs, targets) batches of training images")
        blocks = find_blocks(work, _batch(first, dev)[0][:2])
    probs = survival_probs(blocks, p_last)
    idx = [b.index for b in blocks if b.removable]
    if not idx:
        raise InputError("the model has no removable block")
    numbers = _spec_numbers(work)  # a network built from a spec (a command-line checkpoint) scales its blocks itself
    if numbers is not None:
        if work.spec.survival_rule == "none":
            raise InputError(f"this {work.spec.arch} was built at constant depth from its checkpoint's spec, which sets no survival "
                             f"rule; retrofit stochastic depth onto its weights with `sdcompress train --arch {work.spec.arch} "
                             f"--weights CKPT/model.pt`, which sets one (and, for the project's ResNets, compensates its "
                             f"evaluation-time scaling in the starting weights)")
        spec_p = work.block_survival()  # its own rule (the spec's p_L, not p_last): the paper's training draw, run_mask
        probs = {b.index: spec_p[numbers[b.path]] if b.removable else 1.0 for b in blocks}
        p_last = work.spec.p_last
    skip = {i: replacement(work, blocks[i], share=True) for i in idx}
    block_of = {i: work.get_submodule(blocks[i].path) for i in idx}
    p = torch.tensor([probs[i] for i in idx])
    gen = torch.Generator().manual_seed(seed)
    if numbers is None:
        _fold(work, blocks, {i: 1.0 / probs[i] for i in idx})
    table = SurvivalStats([probs[i] for i in idx], window=None)  # every step: the statistics table `sdcompress train` keeps
    draws: list[np.ndarray] = []  # this epoch's draw of each step, with its loss below
    losses: list[torch.Tensor] = []  # recorded in `table` at the epoch's end: one host sync an epoch, not one a step
    settings = {"epochs": epochs, "p_last": p_last, "lr": lr, "weight_decay": float(weight_decay), "seed": seed,
                "blocks": [blocks[i].path for i in idx], "survival": [probs[i] for i in idx],
                "steps_per_epoch": steps_per_epoch(batches)}  # another batch or data size: another schedule
    guide = copy.deepcopy(teacher).to(dev).eval() if teacher is not None else None
    if guide is not None:
        settings["distill"] = {"temperature": float(temperature), "alpha": float(alpha)}

    def loss_on(out: torch.Tensor, x: torch.Tensor, y) -> torch.Tensor:
        out = out.float()
        if guide is None:
            return loss_fn(out, y)
        with torch.no_grad():
            soft = guide(x).float()
        return distill_loss(out, soft, y, temperature, alpha, hard=loss_fn)
    state = _read_state(checkpoint, settings) if resume else None
    if state is not None:
        try:
            work.load_state_dict(state["model"])
        except RuntimeError as e:
            raise InputError(f"checkpoint {checkpoint}: its weights do not fit this {type(model).__name__} ({first_line(e)})") from None
        try:
            gen.set_state(state["draws"])
            if "stats" in state:
                table.load_state_dict(state["stats"])
            else:  # written before the table: the drop indicators and losses of every step
                for d, v in zip(state["dropped"].numpy(), state["step_loss"].tolist()):
                    table.record(d == 0, v)
            if state.get("batches") is not None and hasattr(batches, "load_state_dict"):
                batches.load_state_dict(state["batches"])
            torch.set_rng_state(state["torch_rng"])
            if dev.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], dev)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise InputError(f"checkpoint {checkpoint}: incomplete or damaged ({type(e).__name__}: {first_line(e)})") from None

    def end_epoch(loop: dict) -> None:
        for d, v in zip(draws, torch.stack(losses).float().cpu().tolist()):
            table.record(d, v)
        draws.clear()
        losses.clear()
        if checkpoint is not None:
            save_state(loop)

    def save_state(loop: dict) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)  # made with the first epoch, not before
        atomic_torch_save({"kind": CHECKPOINT_KIND, "settings": settings, "model": work.state_dict(), "loop": loop,
                           "draws": gen.get_state(), "stats": table.state_dict(), "torch_rng": torch.get_rng_state(),
                           "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                           "batches": batches.state_dict() if hasattr(batches, "state_dict") else None}, checkpoint)

    def loss_of(x, y, step):
        draws.append(draw_run_mask(p, gen).numpy())
        runs = draws[-1].tolist()
        if numbers is not None:  # a running block adds f(x) unscaled, a dropped one is not computed (nets.ResNet)
            mask = dict.fromkeys(work.block_ids, True)  # blocks not drawn (not in `blocks`) always run
            mask.update({numbers[blocks[i].path]: r for i, r in zip(idx, runs)})
            return loss_on(work(x, mask), x, y)
        gone = [i for i, r in zip(idx, runs) if not r]
        try:
            for i in gone:
                work.set_submodule(blocks[i].path, skip[i])
            out = work(x)
        finally:
            for i in gone:
                work.set_submodule(blocks[i].path, block_of[i])
        return loss_on(out, x, y)

    history = _loop(work, batches, epochs, SGD(lr, weight_decay), dev, precision, progress,
                    "stochastic depth, distilled" if guide is not None else "stochastic depth", loss_of, also=(guide,) if guide is not None else (),
                    on_step=lambda step, v: losses.append(v), on_epoch=end_epoch,
                    resume=state and state["loop"])
    if numbers is None:
        _fold(work, blocks, {i: probs[i] for i in idx})
    if numbers is not None or hasattr(work, "scale_exponent"):
        # trained with the draws: at evaluation each block adds p_l times what a step adds (an earlier prune's t is spent)
        work.scale_exponent = 1.0
    if recalibrate_batches:
        work = recalibrate(work, batches, recalibrate_batches, device=dev)
    stats = DropEffects.from_fit(blocks, idx, table.refresh(), table.dropped(), [1.0 - probs[i] for i in idx],
                                 sum(q.numel() for q in work.parameters()), source="training")
    history.update({"resumed_after_epoch": state["loop"]["epoch"] if state else None, "p_last": p_last, "survival": [probs[b.index] for b in blocks],
                    "unscaled": [b.path for b in blocks if b.removable and not b.scale and not _scales_itself(work)],
                    "recalibrated_batches": recalibrate_batches, "distill": settings.get("distill")})
    return Trained(work, stats, history)


def _read_state(path: Path, settings: dict) -> dict:
    """The per-epoch state `train_stochastic_depth` wrote at `path`, checked against this call's settings."""
    if not path.exists():
        raise InputError(f"resume: no checkpoint {path}; start without resume=True")
    read_untrusted_check(path, 4 * MAX_WEIGHTS_BYTES, "training state")  # weights, momentum, the logs
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: nothing is run
    except Exception as e:  # noqa: BLE001 - truncated, not torch's format, or an object weights_only refuses
        raise InputError(f"resume: {path} cannot be loaded ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND or not isinstance(state.get("loop"), dict):
        raise InputError(f"resume: {path} is not a checkpoint of train_stochastic_depth")
    saved = state.get("settings") or {}
    changed = sorted(k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k))
    if changed:
        raise InputError(f"resume: {path} was written with other settings ({', '.join(changed)}); call with the same ones")
    return state


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, num_batches: int = 100, device: str | torch.device | None = None) -> nn.Module:
    """A copy of `model` with its BatchNorm statistics re-estimated on up to `num_batches` of `batches` (a
    cumulative average, the evaluation-time network: what is left after pruning, as it will run). Use training
    batches with the training augmentation: the weights were learned against statistics of augmented batches.

    Args:
        model: the network to recalibrate (left unchanged).
        batches: an iterable of `(images, labels)` or of images, normalized as the model takes them.
        num_batches: the most batches to average over.
        device: where to run (default: where the model's parameters are).

    Returns:
        A new module in evaluation mode with re-estimated running means and variances.

    Raises:
        InputError: `num_batches` is not a whole number >= 1, or `batches` holds no batch.

    Example:
        >>> small = sdcompress.recalibrate(sdcompress.prune(model, keep=0.6, stats=stats), train_loader)
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise InputError(f"num_batches must be a whole number >= 1, got {num_batches!r}")
    dev = _device_of(model, device)
    work = copy.deepcopy(model).to(dev).eval()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in work.modules())
    if has_bn and reestimate_bn(work, batches, num_batches, dev) == 0:
        raise InputError("batches is empty: give (inputs, targets) batches of training images")
    return work


def finetune(model: nn.Module, batches: Iterable, teacher: nn.Module | None, epochs: int = 1, *, lr: float = 0.01,
             weight_decay: float = 1e-4, temperature: float = 4.0, alpha: float = 0.9, precision: str = "auto",
             device: str | torch.device | None = None, progress: bool = False) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of `model` (e.g. pruned) on `batches`, learning from `teacher` as well as the labels.

    The loss is alpha T^2 KL(teacher / T || student / T) + (1 - alpha) cross-entropy (Hinton et al. 2015), the
    teacher's logits computed on the same batch; `teacher=None` trains on the labels alone. The evaluation-time
    network is what is trained (no block drops).

    Args:
        model: the network to fine-tune (left unchanged).
        batches: an iterable of `(images, labels)` batches that can be passed over `epochs` times (a list or a
            `DataLoader`, not a one-shot iterator).
        teacher: the network to distil from, usually the one before pruning or binarizing; None for labels only.
        epochs: passes over `batches`; the learning rate follows a cosine schedule from `lr`.
        lr: SGD learning rate (momentum 0.9, nesterov).
        weight_decay: SGD weight decay.
        temperature: softmax temperature T of both outputs.
        alpha: weight of the teacher's term; 1 - alpha on the labels.
        precision: "auto" (bf16 autocast where the device runs it fast), "fp32" or "bf16".
        device: where to train (default: where the model's parameters are).
        progress: show a tqdm bar.

    Returns:
        (model, history): the fine-tuned copy in evaluation mode, and a dict with the epochs, steps, seconds and
        mean loss of each epoch.

    Raises:
        InputError: a bad number, or `batches` a one-shot iterator with `epochs` > 1.

    Example:
        >>> small, history = sdcompress.finetune(small, train_loader, teacher=trained.model, epochs=1)
    """
    _check_batches(batches, epochs)
    lr = _positive("lr", lr, 0.0, 10.0)
    temperature = _positive("temperature", temperature, 0.0, 100.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r:.40}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    dev = _device_of(model, device)
    work = copy.deepcopy(model).to(dev)
    guide = copy.deepcopy(teacher).to(dev).eval() if teacher is not None else None

    def loss_of(x, y, step):
        out = work(x).float()
        if guide is None:
            return F.cross_entropy(out, y)
        with torch.no_grad():
            soft = guide(x).float()
        return distill_loss(out, soft, y, temperature, alpha)

    history = _loop(work, batches, epochs, SGD(lr, weight_decay), dev, precision, progress,
                    "fine-tune, distilled" if guide is not None else "fine-tune", loss_of)
    history["distill"] = {"temperature": temperature, "alpha": alpha} if guide is not None else None
    return work, history
