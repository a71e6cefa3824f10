"""The loops every stage shares: evaluation, one training step, fine-tuning, BatchNorm re-estimation.

Each runs the network as it is evaluated and exported unless it says otherwise: every kept block on (the
project's ResNets scale each block by p_l), no random ops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .data import Dataset, ImageSet, Normalize, augment, augmentation
from .config import TrainConfig
from .errors import InputError, TrainingDiverged
from .precision import Precision, resolve_precision, to_layout
from .survival import draw_run_mask


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda:"):  # a torchrun rank's own GPU
        return torch.device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def to_device(item, dev: torch.device):
    """An `(inputs, targets)` batch on `dev` (targets may be None or any object a loss takes)."""
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and torch.is_tensor(item[0])):
        raise InputError(f"each batch must be (inputs, targets) tensors, got {type(item).__name__}")
    x, y = item[0], item[1]
    return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True) if torch.is_tensor(y) else y


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, normalize: Normalize, batch_size: int = 500, device: torch.device | None = None) -> dict:
    """Top-1 accuracy and mean cross-entropy of the evaluation-time network (every block, scaled by p_l)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, len(data)
    try:
        for i in range(0, n, batch_size):
            x = normalize(data.images[i : i + batch_size].to(device))
            y = data.labels[i : i + batch_size].to(device)
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    return {"top1": correct / n if n else math.nan, "loss": loss_sum / n if n else math.nan, "n": n}


@dataclass(frozen=True)
class Distill:
    """Learning from a teacher (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the loss is
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, labels).
    T^2 keeps the soft term's gradients at the scale of the hard one's as T grows."""

    teacher: nn.Module  # the network before the stage: unpruned, or full precision
    temperature: float = 4.0
    alpha: float = 0.9


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y, temperature: float, alpha: float,
                 hard: Callable = F.cross_entropy) -> torch.Tensor:
    """The `Distill` loss of one batch (mean over the batch); `hard(logits, y)` the labels' term."""
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1.0 - alpha) * hard(logits, y)


def train_step(opt: torch.optim.Optimizer, loss_of: Callable, x: torch.Tensor, y, step: int, prec: Precision,
               dev: torch.device) -> torch.Tensor:
    """One SGD step of `sgd_loop`: `loss_of(x, y, step)` under the precision's autocast, on `x` in its memory layout,
    then backward and the update. A block that did not run gets no gradient: its grads stay None and SGD leaves its
    weights and momentum untouched. Returns the loss, detached and not synchronized."""
    with prec.autocast(dev):
        loss = loss_of(prec.layout(x), y, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def batch_loss(model: nn.Module, images: ImageSet, normalize: Normalize, batches: int, batch_size: int) -> float:
    """Mean cross-entropy of the evaluation-time network on the first `batches` batches."""
    model.eval()
    total, n = 0.0, 0
    for i in range(min(batches, math.ceil(len(images) / batch_size))):
        x = normalize(images.images[i * batch_size : (i + 1) * batch_size])
        y = images.labels[i * batch_size : (i + 1) * batch_size]
        total += torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item()
        n += len(y)
    return total / n


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, limit: int, dev: torch.device) -> int:
    """BatchNorm re-estimation in place, the one mechanic of the command line's `--recalibrate` and of
    `sdcompress.recalibrate`: running statistics reset and re-estimated as cumulative averages over up to `limit`
    inputs of `batches` (tensors, or `(inputs, targets)` batches), running the evaluation-time network with only
    BatchNorm in train mode. Returns the number of batches run; a model without BatchNorm is left as it is (0)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:  # LayerNorm / GroupNorm only (ConvNeXt, ViT): no running statistics to re-estimate
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all recalibration batches
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    try:
        for item in batches:
            if seen == limit:
                break
            model(item.to(dev) if torch.is_tensor(item) else to_device(item, dev)[0])  # every kept block, as at evaluation
            seen += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return seen


def recalibrate_bn(model: nn.Module, images: ImageSet, normalize: Normalize, batches: int, batch_size: int, seed: int = 0,
                   pad: int = 0, flip: bool = False) -> int:
    """Re-estimate BatchNorm statistics on the evaluation-time network (`reestimate_bn`) from `batches` batches of
    `images`. Returns the number of images used.

    Batches get the training augmentation (`pad`, `flip`, as in training): the weights were learned against
    statistics of augmented batches. Clean batches cost accuracy even with no block removed
    (`tools/bench_prune.py`, bundled constant-depth ResNet-56, keep 1.0, 5k validation split: 87.7% before,
    85.3% after recalibrating on clean batches, 87.6% on augmented ones).
    """
    g = torch.Generator().manual_seed(seed)
    per_pass = max(1, len(images) // batch_size)
    used = [0]

    def draws():
        for i in range(batches):  # more batches than the data holds: new passes, new augmentation draws
            if i % per_pass == 0:
                order = torch.randperm(len(images), generator=g)
            idx = order[(i % per_pass) * batch_size : (i % per_pass + 1) * batch_size]
            used[0] += len(idx)
            yield normalize(augment(images.images[idx], pad, flip, g))

    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return used[0] if reestimate_bn(model, draws(), batches, dev) else 0


def _channels_last(model: nn.Module) -> bool:
    """Whether a model's 4-D weights are in channels_last (a model without any counts as contiguous)."""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def steps_per_epoch(batches: Iterable) -> int | None:
    """The batches of one pass, where `batches` knows (a list, a DataLoader, `ImageBatches`); None for a generator."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class SGD:
    """SGD and its learning-rate schedule, as every training loop of the project runs them: the paper's optimizer
    (momentum 0.9, Nesterov) and a schedule over all steps of the run, with an optional linear warmup."""

    lr: float
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"  # cosine (per step, to 0) | step (lr / 10 at 50% and 75% of the steps, as the paper)
    warmup_epochs: float = 0.0  # lr rises linearly from lr / warmup steps to lr over this many epochs

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "step"):
            raise InputError(f"--schedule must be cosine or step, got {self.schedule!r}")
        if self.nesterov and self.momentum <= 0:
            raise InputError("--nesterov on needs --momentum above 0 (Nesterov momentum without momentum is plain SGD): "
                             "give --nesterov off")

    def optimizer(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay)

    def lr_at(self, step: int, total: int | None, epoch: int, epochs: int, steps_per_epoch: int | None) -> float:
        """The learning rate of step `step` (from 0) of `total`; where the batches do not say how many they hold
        (`total` None), cosine by epoch."""
        if total is None:
            if self.schedule != "cosine" or self.warmup_epochs:
                raise InputError("batches of unknown length: only the cosine schedule without warmup can be run")
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        else:
            decay = 0.1 ** sum(step >= int(f * total) for f in (0.5, 0.75))
        warm = int(self.warmup_epochs * steps_per_epoch)
        return self.lr * (decay * min(1.0, (step + 1) / warm)) if warm else self.lr * decay  # as LambdaLR: lr * factor


def sgd_loop(work: nn.Module, batches: Iterable, epochs: int, sgd: SGD, dev: torch.device, precision: str | Precision,
             progress: bool, desc: str, loss_of: Callable, on_step: Callable | None = None, also: tuple[nn.Module, ...] = (),
             lr_hint: str = "lr", on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
             stop_note: str | Callable[[], str] = "", agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """The one training loop of the project: stochastic-depth training on the command line (`train.train`) and in
    the API (`sdcompress.train_stochastic_depth`), fine-tuning after pruning or binarizing (both faces). `sgd` the
    optimizer and schedule, `loss_of(x, y, step)` one step's loss (the drop draw, the teacher, label smoothing are
    the caller's), computed under the precision's autocast on inputs in its memory layout. `also`: modules that run
    beside it (a teacher), put in the same layout and handed back in theirs.

    Per epoch, `batches.set_epoch(epoch)` is called where it exists (the convention of torch's DistributedSampler),
    then every batch is one step. `on_step(step, loss)` gets each step's loss as a tensor (no host sync);
    `on_epoch(state)` is called after every epoch with what a later call needs to go on from there (`epoch`,
    `step`, `epoch_loss`, `seconds`, `optimizer`), and `resume` is such a state: the loop starts after its epoch,
    with its optimizer and at its step of the schedule. `agree` makes the processes of a data-parallel run see one
    value before deciding anything (the mean over ranks: all stop together). A non-finite loss or weight stops it
    with `TrainingDiverged` naming `lr_hint`, `stop_note` (or what it returns then) saying what was kept."""
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision, dev)
    agree = agree or (lambda t: t)
    steps = steps_per_epoch(batches)
    total = steps * epochs if steps else None
    opt = sgd.optimizer([p for p in work.parameters() if p.requires_grad])
    losses, step, first, before = [], 0, 0, 0.0
    if resume is not None:
        try:
            opt.load_state_dict(resume["optimizer"])
            losses, step, first, before = list(resume["epoch_loss"]), int(resume["step"]), int(resume["epoch"]), float(resume["seconds"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"the state to resume from is incomplete or of another model ({type(e).__name__}: {str(e)[:120]})") from None
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True, desc=f"{desc} ({prec.name})")
    layouts = [(m, _channels_last(m)) for m in (work, *also)]
    for m, _ in layouts:
        to_layout(m, prec.channels_last)
    work.train()

    def diverged(where: str) -> TrainingDiverged:
        note = stop_note() if callable(stop_note) else stop_note
        return TrainingDiverged(f"{desc}: {where}{note}; try a lower {lr_hint} (it was {sgd.lr:g})")

    t0 = time.perf_counter()
    try:
        for epoch in range(first, epochs):
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            total_loss, n = torch.zeros((), device=dev), 0
            for item in batches:
                x, y = to_device(item, dev)
                lr_now = sgd.lr_at(step, total, epoch, epochs, steps)
                for g in opt.param_groups:
                    g["lr"] = lr_now
                detached = train_step(opt, loss_of, x, y, step, prec, dev)
                total_loss, n, step = total_loss + detached, n + 1, step + 1
                if on_step is not None:
                    on_step(step - 1, detached)
                if step % 10 == 0 or (total and step == total):  # the guard, without a host sync on every step
                    value = float(agree(detached))
                    if not math.isfinite(value):
                        raise diverged(f"the loss became non-finite at step {step}{f' of {total}' if total else ''}")
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{value:.3f}")
                bar.update(1)
            if n == 0:
                raise InputError("batches is empty: give (inputs, targets) batches of training images")
            mean = float(agree(total_loss / n))
            if not math.isfinite(mean):
                raise diverged(f"the loss became non-finite in epoch {epoch + 1}")
            losses.append(round(mean, 5))
            if on_epoch is not None:
                on_epoch({"epoch": epoch + 1, "step": step, "epoch_loss": list(losses),
                          "seconds": round(before + time.perf_counter() - t0, 1), "optimizer": opt.state_dict()})
    finally:
        bar.close()
        for m, was in layouts:
            to_layout(m, was)
        work.eval()
    if not all(torch.isfinite(p).all() for p in work.parameters()):
        raise diverged("left non-finite weights")
    return {"epochs": epochs, "steps": step, "seconds": round(before + time.perf_counter() - t0, 1), "epoch_loss": losses,
            "lr": sgd.lr, **prec.to_dict()}


class DeviceBatches:
    """Training batches of an `ImageSet` held on the device, `batch_size` images a step (the last partial batch
    dropped: BatchNorm needs full ones), reshuffled from `gen` and augmented from `aug_gen` every pass, normalized:
    what the command line trains and fine-tunes on. In a data-parallel run (`dist` of several processes) each
    process takes its share of every global batch from its shard of torch's `DistributedSampler`, reshuffled for
    the epoch `set_epoch` names, as a DataLoader with that sampler would."""

    def __init__(self, x, y, batch_size, gen, aug_gen, pad, flip, normalize, dist=None, seed: int = 0):
        self.x, self.y, self.bs, self.gen, self.aug_gen = x, y, batch_size, gen, aug_gen
        self.pad, self.flip, self.normalize = pad, flip, normalize
        self.dist, self.seed, self.epoch = (dist if dist is not None and dist.enabled else None), seed, 0
        self.local = batch_size // dist.world if self.dist is not None else batch_size

    def __len__(self) -> int:
        return len(self.y) // self.bs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.dist is not None:  # this rank's shard, reshuffled every epoch
            sampler = DistributedSampler(range(len(self.y)), self.dist.world, self.dist.rank, shuffle=True, seed=self.seed,
                                         drop_last=True)
            sampler.set_epoch(self.epoch)
            perm = torch.tensor(list(sampler), dtype=torch.long).to(self.x.device)
        else:
            perm = torch.randperm(len(self.y), generator=self.gen).to(self.x.device)
        for i in range(len(self)):
            idx = perm[i * self.local : (i + 1) * self.local]
            yield self.normalize(augment(self.x[idx], self.pad, self.flip, self.aug_gen)), self.y[idx]


def finetune(model: nn.Module, ds: Dataset, epochs: int, lr: float = 0.01, survival: bool = False, batch_size: int = 128,
             seed: int = 0, device: str = "auto", progress: bool = True, augment_with: tuple[int, bool] | None = None,
             distill: Distill | None = None, precision: str = "auto") -> dict:
    """Training of an existing (e.g. pruned) network in place, cosine schedule from `lr`; with `distill`, from a
    teacher as well as the labels (the teacher's logits computed once per batch, on the same augmented images).
    The loop is `sgd_loop`, the one `sdcompress.finetune` runs.

    With `survival` off the evaluation-time network itself is trained (every kept block, scaled by p_l), so
    what is trained is what is evaluated and exported; with it on, kept blocks keep dropping at their p_l.
    `augment_with` is the (pad, flip) the network was trained with (`train_augmentation(meta)`); None: the
    default for the data. `precision` (auto | fp32 | bf16, `precision.resolve_precision`) is that of the training
    steps, the teacher's forward pass included; the weights stay float32, and the model and teacher are handed back
    in the memory layout they came in.
    """
    dev = resolve_device(device)
    model.to(dev)
    if len(ds.train) // batch_size == 0:
        raise InputError(f"the training split has {len(ds.train)} images, fewer than the batch size {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    pad, flip = augment_with if augment_with is not None else augmentation(TrainConfig(), ds.input_shape)
    normalize = Normalize(ds.mean, ds.std, dev)
    batches = DeviceBatches(ds.train.images.to(dev), ds.train.labels.to(dev), batch_size, gen,
                     torch.Generator(device=dev).manual_seed(seed + 1), pad, flip, normalize)
    ids = model.block_ids
    probs = torch.tensor([model.block_survival()[b] for b in ids])
    teacher = distill.teacher.to(dev).eval() if distill is not None else None

    def loss_of(x, y, step):
        run_mask = dict(zip(ids, draw_run_mask(probs, gen).tolist())) if survival else None  # after the pass's shuffle
        logits = model(x, run_mask).float()
        if teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            soft = teacher(x).float()
        return distill_loss(logits, soft, y, distill.temperature, distill.alpha)

    history = sgd_loop(model, batches, epochs, SGD(lr), dev, precision, progress,
                       "fine-tune, distilled" if teacher is not None else "fine-tune", loss_of,
                       also=(teacher,) if teacher is not None else (), lr_hint="--finetune-lr", stop_note="; nothing was written")
    if survival and hasattr(model, "scale_exponent"):  # trained with the draws again: at evaluation each block adds p_l times what a step adds, as trained
        model.scale_exponent = 1.0
    val = evaluate(model, ds.val, normalize) if ds.val is not None else None
    return {**history, "survival": survival, "val_top1": val and val["top1"],
            "distill": {"temperature": distill.temperature, "alpha": distill.alpha} if distill is not None else None}
