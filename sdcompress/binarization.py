"""The binarize stage on a checkpoint's network: the chosen layers become 1-bit layers (`binary.py`), BatchNorm is
re-estimated on training images, and the network is optionally fine-tuned with the straight-through estimator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .binary import default_targets
from .config import check_recovery
from .data import Normalize, train_augmentation
from .errors import InputError
from .loops import recalibrate_bn


@dataclass(frozen=True)
class BinarizeConfig:
    """Which layers get 1-bit weights, and how accuracy is recovered."""

    binarize_stem: bool = False  # the first conv (full precision by default)
    binarize_head: bool = False  # the classifier (full precision by default)
    full_precision: tuple[str, ...] = ()  # layers to leave in full precision
    recalibrate: int = 40  # BatchNorm re-estimation batches after binarizing (0: off)
    finetune: int = 0  # STE fine-tuning epochs (needs training data)
    finetune_lr: float = 0.01
    finetune_survival: bool = True  # stochastic depth on while fine-tuning (the network was trained with it)
    seed: int = 0
    distill: bool = True  # fine-tune from the full-precision model as teacher as well as from the labels
    distill_temperature: float = 4.0
    distill_alpha: float = 0.9  # weight of the teacher's softened outputs; 1 - alpha on the labels
    teacher: str | None = None  # another checkpoint as teacher instead of the full-precision model
    precision: str = "auto"  # of the fine-tuning steps: auto | fp32 | bf16 (precision.resolve_precision)
    block_scale: str = "auto"  # what each block adds when not fine-tuned: auto (chosen again on training images) | survival | unit

    def __post_init__(self):
        from .pruning import BLOCK_SCALES

        check_recovery(self)
        if self.block_scale not in BLOCK_SCALES:
            raise InputError(f"unknown block scale {self.block_scale!r}; choose one of {', '.join(BLOCK_SCALES)}")
        if self.block_scale != "auto" and self.finetune:
            raise InputError("--block-scale is for a binarized network that is not fine-tuned (fine-tuning learns the scale); drop one")

    def to_dict(self) -> dict:
        return asdict(self)


def binarize_model(model, cfg: BinarizeConfig):
    """A binarized copy of a network: the chosen layers become 1-bit layers, latent weights from the originals
    (`sdcompress.binarize`, with the command line's checks and wording)."""
    from .api import binarize

    if model.spec.binarized:
        raise InputError(f"the checkpoint is already binarized ({len(model.spec.binarized)} layers); binarize the full-precision checkpoint")
    if cfg.recalibrate < 0 or cfg.finetune < 0:
        raise InputError("--recalibrate and --finetune must be >= 0")
    try:
        names = default_targets(model, cfg.binarize_stem, cfg.binarize_head, cfg.full_precision)  # --full-precision checked
    except ValueError as e:
        raise InputError(str(e)) from None
    if not names:
        raise InputError("nothing left to binarize")
    new = binarize(model, blocks=None, stem=cfg.binarize_stem, head=cfg.binarize_head, full_precision=cfg.full_precision)
    return new.cpu().eval()


def binarize_stage(model, meta, cfg: BinarizeConfig, calib, tune) -> tuple[nn.Module, dict]:
    """The binarize stage: binarize, re-estimate BatchNorm on training images, optionally fine-tune with the STE.

    Args:
        model, meta: the network and its sidecar.
        cfg: the binarize config.
        calib: training images for BatchNorm recalibration (never evaluation data).
        tune: `tune(model, cfg)` fine-tunes in place as `cfg` says and returns a record.
    """
    from .pruning import choose_block_scale

    new = binarize_model(model, cfg)
    record = {"layers": list(new.spec.binarized), "recalibrated_images": 0, "finetune": None}
    norm = Normalize(meta.data.mean, meta.data.std)
    recal = lambda m: recalibrate_bn(m, calib, norm, cfg.recalibrate, 128, cfg.seed, *train_augmentation(meta))  # noqa: E731
    if cfg.recalibrate:
        if calib is None:
            raise InputError("BatchNorm recalibration needs training data (--data), or pass --recalibrate 0")
        record["recalibrated_images"] = recal(new)
        record["calibration_set_size"] = len(calib)
    if cfg.finetune:
        record["finetune"] = tune(new, cfg)
    elif any(p < 1.0 for p in new.block_survival().values()):
        # The scale chosen for the float network (an amplified one after pruning) amplifies the 1-bit error too:
        # chosen again as prune chooses it, on the binarized network (fine-tuning learns it instead).
        new, record["block_scale"] = choose_block_scale(new, cfg.block_scale, calib, norm, recal, recalibrate=cfg.recalibrate, seed=cfg.seed)
    return new, record
