"""Frozen configs, one per stage. Flags are the kebab-case forms of these field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TrainConfig:
    """Training as in the stochastic depth paper unless told otherwise."""

    arch: str = "resnet56"  # a registered CIFAR ResNet (resnet20 ... resnet1202)
    data: str = "digits"  # digits | torchvision name | .npz | ImageFolder folder
    data_dir: str | None = None  # where a torchvision dataset lies
    val_size: int | None = None  # images held out for validation (None: 5,000 for CIFAR-sized data, else 10%)
    split_seed: int = 0  # seed of the train/validation split
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
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last memory format on CUDA (ignored on CPU)
    stats_window: int = 2000  # recent steps used by the drop-effect regression
    contrib_every: int = 4  # measure ||f(x)|| / ||x|| every this many steps (the norms cost a little)
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (statistics over the global batch) instead of per-process BN

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
