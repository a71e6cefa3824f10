"""Frozen configs, one per stage. Flags are the kebab-case forms of these field names."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import InputError

MAX_LR = 10.0  # beyond this SGD on these networks only diverges; a typo (1e5 for 1e-5) is caught before any work


def check_number(flag: str, v: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in its range, or an InputError naming the flag: one check for every numeric flag."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise InputError(f"{flag} must be a finite number in {rng}, got {v}")
    return v


def check_lr(flag: str, v: float) -> float:
    return check_number(flag, v, 0.0, MAX_LR, lo_open=True)


def check_distill(temperature: float, alpha: float) -> None:
    """The distillation settings of fine-tuning (`loops.Distill`)."""
    check_number("--distill-temperature", temperature, 0.0, 100.0, lo_open=True)
    check_number("--distill-alpha", alpha, 0.0, 1.0)


def check_teacher(teacher, finetune: int, distill: bool) -> None:
    """--teacher is a checkpoint that fine-tuning learns from, so it needs fine-tuning and distillation on."""
    if teacher is None:
        return
    if not finetune:
        raise InputError("--teacher is what fine-tuning learns from: give --finetune EPOCHS too")
    if not distill:
        raise InputError("--teacher needs --distill on (with --distill off fine-tuning learns from the labels alone)")


@dataclass(frozen=True)
class TrainConfig:
    """Training as in the stochastic depth paper unless told otherwise."""

    arch: str = "resnet56"  # a registered CIFAR ResNet (resnet20 ... resnet1202), or torchvision:NAME / timm:NAME
    weights: str | None = None  # start from this state_dict (a pretrained network; default: random weights)
    weights_map: str | None = None  # renames of the weights' key prefixes, "OLD=NEW,..." (default: found; train.map_keys)
    mean: tuple[float, ...] | None = None  # input normalization of the pretrained network (default: the data's own)
    std: tuple[float, ...] | None = None
    data: str = "digits"  # digits | torchvision name | .npz | ImageFolder folder
    data_dir: str | None = None  # where a torchvision dataset lies
    val_size: int | None = None  # images held out for validation (None: 5,000 for CIFAR-sized data, else 10%)
    split_seed: int = 0  # seed of the train/validation split
    train_limit: int | None = None  # train on the first N images of the (shuffled) training split only
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (per step) | step (lr / 10 at 50% and 75% of the epochs, as the paper)
    warmup_epochs: float = 0.0  # linear warmup from 0 over this many epochs (for large batches; the paper used none)
    survival_rule: str = "linear"  # linear | uniform | none (constant depth)
    p_last: float = 0.5  # survival probability of the last block (the paper's p_L)
    augment: str = "auto"  # auto (crop+flip for colour images, none otherwise) | standard | crop | none
    seed: int = 0  # weights, shuffling, drop draws and augmentation
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast + channels_last where the device runs bf16 fast) | fp32 | bf16
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) one-hot + e / K (the fast recipes use 0.1)
    compile: bool = False  # torch.compile each block's residual branch (graphs that never change; the skipping stays eager)
    stats_window: int = 2000  # recent steps used by the drop-effect regression
    contrib_every: int = 4  # measure ||f(x)|| / ||x|| every this many steps (the norms cost a little)
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (statistics over the global batch) instead of per-process BN

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_recovery(cfg) -> None:
    """The recovery settings a stage's config shares (prune, binarize): recalibration, fine-tuning, distillation."""
    from .precision import check_precision

    check_number("--recalibrate", cfg.recalibrate, 0, 100_000)
    check_number("--finetune", cfg.finetune, 0, 10_000)
    check_lr("--finetune-lr", cfg.finetune_lr)
    check_distill(cfg.distill_temperature, cfg.distill_alpha)
    check_teacher(cfg.teacher, cfg.finetune, cfg.distill)
    check_precision("--precision", cfg.precision)
