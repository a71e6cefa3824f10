"""The loops every stage shares: evaluation, one training step, fine-tuning, BatchNorm re-estimation.

Each runs the network as it is evaluated and exported unless it says otherwise: every kept block on (the
project's ResNets scale each block by p_l), no random ops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
def recalibrate_bn(model: nn.Module, images: ImageSet, normalize: Normalize, batches: int, batch_size: int, seed: int = 0,
                   pad: int = 0, flip: bool = False) -> int:
    """Re-estimate BatchNorm statistics on the evaluation-time network. Returns the number of images used.

    Batches get the training augmentation (`pad`, `flip`, as in training): the weights were learned against
    statistics of augmented batches. Clean batches cost accuracy even with no block removed
    (`tools/bench_prune.py`, bundled constant-depth ResNet-56, keep 1.0, 5k validation split: 87.7% before,
    85.3% after recalibrating on clean batches, 87.6% on augmented ones).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:  # LayerNorm / GroupNorm only (ConvNeXt, ViT): no running statistics to re-estimate
        return 0
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
            model(normalize(x))  # run_mask None: every kept block, scaled by p_l, as at evaluation
            used += len(idx)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return used


def _channels_last(model: nn.Module) -> bool:
    """Whether a model's 4-D weights are in channels_last (a model without any counts as contiguous)."""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def finetune(model: nn.Module, ds: Dataset, epochs: int, lr: float = 0.01, survival: bool = False, batch_size: int = 128,
             seed: int = 0, device: str = "auto", progress: bool = True, augment_with: tuple[int, bool] | None = None,
             distill: Distill | None = None, precision: str = "auto") -> dict:
    """Training of an existing (e.g. pruned) network in place, cosine schedule from `lr`; with `distill`, from a
    teacher as well as the labels (the teacher's logits computed once per batch, on the same augmented images).

    With `survival` off the evaluation-time network itself is trained (every kept block, scaled by p_l), so
    what is trained is what is evaluated and exported; with it on, kept blocks keep dropping at their p_l.
    `augment_with` is the (pad, flip) the network was trained with (`train_augmentation(meta)`); None: the
    default for the data. `precision` (auto | fp32 | bf16, `precision.resolve_precision`) is that of the training
    steps, the teacher's forward pass included; the weights stay float32, and the model and teacher are handed back
    in the memory layout they came in.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    steps = len(ds.train) // batch_size
    if steps == 0:
        raise InputError(f"the training split has {len(ds.train)} images, fewer than the batch size {batch_size}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, epochs * steps) / (epochs * steps))))
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    pad, flip = augment_with if augment_with is not None else augmentation(TrainConfig(), ds.input_shape)
    normalize = Normalize(ds.mean, ds.std, dev)
    ids = model.block_ids
    probs = torch.tensor([model.block_survival()[b] for b in ids])
    x_all, y_all = ds.train.images.to(dev), ds.train.labels.to(dev)
    teacher = distill.teacher.to(dev).eval() if distill is not None else None
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs * steps), disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"fine-tune ({'distilled, ' if distill is not None else ''}{prec.name})")
    layouts = [(m, _channels_last(m)) for m in (model, teacher) if m is not None]  # handed back as they came
    for m, _ in layouts:
        to_layout(m, prec.channels_last)
    try:
        for step in bar:
            i = step % steps
            if i == 0:
                perm = torch.randperm(len(y_all), generator=gen).to(dev)
            idx = perm[i * batch_size : (i + 1) * batch_size]
            run_mask = dict(zip(ids, draw_run_mask(probs, gen).tolist())) if survival else None
            x = prec.layout(normalize(augment(x_all[idx], pad, flip, aug_gen)))
            with torch.no_grad(), prec.autocast(dev):
                soft = teacher(x) if teacher is not None else None
            loss, _ = train_step(model, opt, x, y_all[idx], run_mask, prec.bf16, soft, distill)
            sched.step()
            if (step + 1) % 25 == 0:
                bar.set_postfix(epoch=f"{step // steps + 1}/{epochs}", loss=f"{loss.item():.3f}")
            if (step + 1) % 10 == 0 or step + 1 == epochs * steps:  # the guard of training: stop before saving garbage
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"fine-tuning loss became non-finite at step {step + 1} of {epochs * steps}; nothing "
                                           f"was written; try a lower --finetune-lr (it was {lr:g})")
    finally:
        for m, was in layouts:
            to_layout(m, was)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(f"fine-tuning left non-finite weights; nothing was written; try a lower --finetune-lr (it was {lr:g})")
    model.eval()
    val = evaluate(model, ds.val, normalize) if ds.val is not None else None
    return {"epochs": epochs, "lr": lr, "survival": survival, "seconds": round(time.perf_counter() - t0, 1), **prec.to_dict(),
            "val_top1": val and val["top1"],
            "distill": {"temperature": distill.temperature, "alpha": distill.alpha} if distill is not None else None}

