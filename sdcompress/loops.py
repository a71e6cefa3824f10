"""The loops every stage shares: evaluation, one training step, fine-tuning, BatchNorm re-estimation.

Each runs the network as it is evaluated and exported unless it says otherwise: every kept block on (the
project's ResNets scale each block by p_l), no random ops.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Dataset, ImageSet, Normalize, augment, augmentation
from .config import TrainConfig
from .errors import InputError, TrainingDiverged
from .survival import draw_keep_mask


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


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               keep: dict[int, bool] | None, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on one mini-batch with the given drop draw. Returns (loss, logits), not synchronized."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x, keep)
        loss = F.cross_entropy(logits.float(), y)
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


def finetune(model: nn.Module, ds: Dataset, epochs: int, lr: float = 0.01, survival: bool = False, batch_size: int = 128,
             seed: int = 0, device: str = "auto", progress: bool = True, augment_with: tuple[int, bool] | None = None) -> dict:
    """Plain training of an existing (e.g. pruned) network in place, cosine schedule from `lr`.

    With `survival` off the evaluation-time network itself is trained (every kept block, scaled by p_l), so
    what is trained is what is evaluated and exported; with it on, kept blocks keep dropping at their p_l.
    `augment_with` is the (pad, flip) the network was trained with (`train_augmentation(meta)`); None: the
    default for the data.
    """
    dev = resolve_device(device)
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
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(epochs * steps), disable=not progress, unit="step", dynamic_ncols=True, desc="fine-tune"):
        i = step % steps
        if i == 0:
            perm = torch.randperm(len(y_all), generator=gen).to(dev)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        keep = dict(zip(ids, draw_keep_mask(probs, gen).tolist())) if survival else None
        loss, _ = train_step(model, opt, normalize(augment(x_all[idx], pad, flip, aug_gen)), y_all[idx], keep, dev.type == "cuda")
        sched.step()
        if (step + 1) % 10 == 0 or step + 1 == epochs * steps:  # the guard of training: stop before saving garbage
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"fine-tuning loss became non-finite at step {step + 1} of {epochs * steps}; nothing was "
                                       f"written; try a lower --finetune-lr (it was {lr:g})")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(f"fine-tuning left non-finite weights; nothing was written; try a lower --finetune-lr (it was {lr:g})")
    model.eval()
    val = evaluate(model, ds.val, normalize) if ds.val is not None else None
    return {"epochs": epochs, "lr": lr, "survival": survival, "seconds": round(time.perf_counter() - t0, 1),
            "val_top1": val and val["top1"]}
