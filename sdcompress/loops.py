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
from tqdm import tqdm

from .data import Dataset, ImageSet, Normalize, augment, augmentation
from .config import TrainConfig
from .errors import InputError, TrainingDiverged
from .precision import resolve_precision, to_layout
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


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """The `Distill` loss of one batch (mean over the batch)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1.0 - alpha) * F.cross_entropy(logits, y)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               run_mask: dict[int, bool] | None, bf16: bool = False, teacher_logits: torch.Tensor | None = None,
               distill: "Distill | None" = None, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on one mini-batch with the given drop draw (and, with `distill`, the teacher's logits of the
    same batch). Returns (loss, logits), not synchronized."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x, run_mask)
        if distill is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        else:
            loss = distill_loss(logits.float(), teacher_logits.float(), y, distill.temperature, distill.alpha)
    opt.zero_grad(set_to_none=True)  # a dropped block's grads stay None, so SGD leaves it untouched
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


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


def sgd_loop(work: nn.Module, batches: Iterable, epochs: int, lr: float, weight_decay: float, dev: torch.device,
             precision: str, progress: bool, desc: str, loss_of: Callable, on_step: Callable | None = None,
             also: tuple[nn.Module, ...] = (), lr_hint: str = "lr", on_epoch: Callable[[dict], None] | None = None,
             resume: dict | None = None) -> dict:
    """The one training loop of every stage that trains an existing network (fine-tuning after pruning or
    binarizing, on the command line and in the API; stochastic depth on a pretrained network): SGD with Nesterov
    momentum 0.9 and a cosine schedule over all steps, `loss_of(x, y, step)` one step's loss, computed under the
    precision's autocast. `also`: modules that run beside it (a teacher), put in the same memory layout and handed
    back in theirs. A non-finite loss or weight stops it with `TrainingDiverged` naming `lr_hint`.

    `on_epoch(state)` is called after every epoch with what a later call needs to go on from there (`epoch`,
    `step`, `epoch_loss`, `seconds`, `optimizer`); `resume` is such a state: the loop starts after its epoch, with
    its optimizer and at its step of the schedule."""
    prec = resolve_precision(precision, dev)
    steps = steps_per_epoch(batches)
    total = steps * epochs if steps else None
    opt = torch.optim.SGD([p for p in work.parameters() if p.requires_grad], lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
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
    written = "; nothing was written" if lr_hint != "lr" else ""  # the commands write nothing when they stop; the API returns nothing
    t0 = time.perf_counter()
    try:
        for epoch in range(first, epochs):
            total_loss, n = torch.zeros((), device=dev), 0
            for item in batches:
                x, y = to_device(item, dev)
                angle = math.pi * min(step, total) / total if total else math.pi * epoch / epochs
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(angle))
                with prec.autocast(dev):
                    loss = loss_of(prec.layout(x), y, step)
                opt.zero_grad(set_to_none=True)  # a dropped block's grads stay None: SGD leaves it untouched
                loss.backward()
                opt.step()
                detached = loss.detach()
                total_loss, n, step = total_loss + detached, n + 1, step + 1
                if on_step is not None:  # a value every step: a host sync every step
                    on_step(step - 1, float(detached))
                if step % 10 == 0 or (total and step == total):  # the guard, without a host sync on every step
                    value = float(detached)
                    if not math.isfinite(value):
                        raise TrainingDiverged(f"{desc}: the loss became non-finite at step {step}{f' of {total}' if total else ''}"
                                               f"{written}; try a lower {lr_hint} (it was {lr:g})")
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{value:.3f}")
                bar.update(1)
            if n == 0:
                raise InputError("batches is empty: give (inputs, targets) batches of training images")
            mean = float(total_loss) / n
            if not math.isfinite(mean):
                raise TrainingDiverged(f"{desc}: the loss became non-finite in epoch {epoch + 1}{written}; try a lower {lr_hint} (it was {lr:g})")
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
        raise TrainingDiverged(f"{desc} left non-finite weights{written}; try a lower {lr_hint} (it was {lr:g})")
    return {"epochs": epochs, "steps": step, "seconds": round(before + time.perf_counter() - t0, 1), "epoch_loss": losses,
            "lr": lr, **prec.to_dict()}


class _Epoch:
    """One pass over an `ImageSet` in `batch_size` batches (the last partial one dropped), reshuffled from `gen` and
    augmented from `aug_gen` each pass, normalized: the batches the command-line stages train on."""

    def __init__(self, x, y, batch_size, gen, aug_gen, pad, flip, normalize):
        self.x, self.y, self.bs, self.gen, self.aug_gen = x, y, batch_size, gen, aug_gen
        self.pad, self.flip, self.normalize = pad, flip, normalize

    def __len__(self) -> int:
        return len(self.y) // self.bs

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.gen).to(self.x.device)
        for i in range(len(self)):
            idx = perm[i * self.bs : (i + 1) * self.bs]
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
    batches = _Epoch(ds.train.images.to(dev), ds.train.labels.to(dev), batch_size, gen,
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

    history = sgd_loop(model, batches, epochs, lr, 1e-4, dev, precision, progress,
                       "fine-tune, distilled" if teacher is not None else "fine-tune", loss_of,
                       also=(teacher,) if teacher is not None else (), lr_hint="--finetune-lr")
    if survival and hasattr(model, "scale_exponent"):  # trained with the draws again: at evaluation each block adds p_l times what a step adds, as trained
        model.scale_exponent = 1.0
    val = evaluate(model, ds.val, normalize) if ds.val is not None else None
    return {**history, "survival": survival, "val_top1": val and val["top1"],
            "distill": {"temperature": distill.temperature, "alpha": distill.alpha} if distill is not None else None}
