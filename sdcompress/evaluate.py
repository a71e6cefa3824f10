"""Evaluate a checkpoint on the data a user names, or on the data its sidecar says it was held out from."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .checkpoint import Sidecar
from .data import Dataset, ImageSet, Normalize, load_dataset, load_eval_set
from .errors import InputError
from .nets import ResNet
from .loops import evaluate
from .zoo import bundled_calib_set, bundled_eval_set, same_data_as_bundled


@lru_cache(maxsize=2)
def _load(data: str, data_dir: str | None, val_size: int | None, seed: int) -> Dataset:
    return load_dataset(data, data_dir, val_size, seed)  # decoded once per process (CIFAR takes seconds)


def check_fits(images: ImageSet, meta: Sidecar, name: str) -> ImageSet:
    """Images a model can take: its channels and image size, labels within its classes, at least one image.
    Called before any work on them (recalibration, fine-tuning, scoring)."""
    dm = meta.data
    want = dm.input_shape
    got = tuple(images.images.shape[1:])
    if len(images) == 0:
        raise InputError(f"{name}: no images")
    if got[0] != want[0]:
        raise InputError(f"{name}: images have {got[0]} channels, the model takes {want[0]} ({want[0]}x{want[1]}x{want[2]} CHW)")
    if got[1:] != want[1:]:
        raise InputError(f"{name}: images are {got[1]}x{got[2]}, the model was trained on {want[1]}x{want[2]}; resize them first")
    top = int(images.labels.max())
    if top >= len(dm.classes):
        raise InputError(f"{name}: label {top} out of range for a {len(dm.classes)}-class model")
    return images


def checkpoint_dataset(meta: Sidecar, data: str | None, data_dir: str | None) -> Dataset:
    """The named dataset (default: the checkpoint's training data), split as in training when it is that data."""
    if data is None:
        data, data_dir = meta.data.source, data_dir or meta.train_config.get("data_dir")
    sp = meta.data.split if is_training_data(meta, data) else {}
    return _load(data, data_dir, sp.get("val_size"), sp.get("seed", 0))


def calibration_images(meta: Sidecar, ckpt, data: str | None, data_dir: str | None) -> tuple[ImageSet, Dataset | None, str]:
    """Training images for BatchNorm recalibration (and the training set, when there is one to fine-tune on).

    A bundled model without --data uses the bundled calibration set, drawn from its training split.
    """
    if data is None and same_data_as_bundled(ckpt, meta) and bundled_calib_set() is not None:
        return check_fits(load_eval_set(bundled_calib_set()), meta, "bundled calibration set"), None, "bundled calibration set"
    try:
        ds = checkpoint_dataset(meta, data, data_dir)
    except InputError as e:
        raise InputError(f"{e}; pass --data (and --data-dir) with the training data") from None
    for part, split in ((ds.train, "train"), (ds.val, "val")):
        if part is not None:
            check_fits(part, meta, f"{ds.name}-{split}")
    return ds.train, ds, f"{ds.name}-train"


def is_training_data(meta: Sidecar, data: str) -> bool:
    """Whether `data` names the very data the checkpoint was trained on (same name, or the same file or folder)."""
    source = meta.data.source
    if data == source:
        return True
    a, b = Path(data), Path(source)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def eval_data(meta: Sidecar, ckpt: str | Path, data: str | None, data_dir: str | None, split: str = "auto") -> tuple[ImageSet, str]:
    """The images to evaluate a checkpoint on, and a name for them (`DATA-SPLIT`); see `eval_split`."""
    images, name, split = eval_split(meta, ckpt, data, data_dir, split)
    return images, _label(name, split)


def _label(name: str, split: str | None) -> str:
    return name if split is None else f"{name}-{split}"


def eval_split(meta: Sidecar, ckpt: str | Path, data: str | None, data_dir: str | None, split: str = "auto") -> tuple[ImageSet, str, str | None]:
    """The images to evaluate a checkpoint on, the data's name and the split taken (None: a bundled set), checked
    against the model (`check_fits`)."""
    images, name, split = _eval_split(meta, ckpt, data, data_dir, split)
    return check_fits(images, meta, _label(name, split)), name, split


def _eval_split(meta: Sidecar, ckpt: str | Path, data: str | None, data_dir: str | None, split: str = "auto") -> tuple[ImageSet, str, str | None]:
    """The images to evaluate a checkpoint on, the data's name and the split taken (None: a bundled set).

    With no `data`: a bundled model uses the bundled evaluation set; any other model its training data's
    validation split (same seed and size as in training, so never trained on). `split="auto"` on the
    checkpoint's own training data takes its test split, else the recorded validation split; on any other data
    it takes the test split if the data has one, else every image (nothing of it was trained on).
    """
    if data is None and same_data_as_bundled(ckpt, meta) and bundled_eval_set() is not None:
        return load_eval_set(bundled_eval_set()), "bundled eval set", None
    if data is None:
        data, data_dir = meta.data.source, data_dir or meta.train_config.get("data_dir")
    own = is_training_data(meta, data)
    if data.endswith(".npz") and not own and split in ("auto", "all"):
        return load_eval_set(data), Path(data).name, "all"  # a held-out evaluation file: all of it
    if not own and split == "auto":
        ds = _load(data, data_dir, 0, 0)  # foreign data: no validation split held out
        return (ds.test, ds.name, "test") if ds.test is not None else (ds.train, ds.name, "all")
    ds = checkpoint_dataset(meta, data, data_dir)
    if split == "auto":
        split = "test" if ds.test is not None else ("val" if ds.val is not None else "all")
    if split == "test" and ds.test is None:
        raise InputError(f"{data}: has no test split; use --split val or all")
    if split == "val" and ds.val is None:
        raise InputError(f"{data}: has no validation split (val size 0)")
    if split == "all":
        parts = [s for s in (ds.train, ds.val) if s is not None]
        return ImageSet(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts])), ds.name, "all"
    return {"test": ds.test, "val": ds.val, "train": ds.train}[split], ds.name, split


def evaluate_checkpoint(model: ResNet, meta: Sidecar, ckpt, data=None, data_dir=None, split="auto", batch_size=500) -> dict:
    """Top-1 and loss of a loaded checkpoint; checks the data fits the model first."""
    images, name, split = eval_split(meta, ckpt, data, data_dir, split)
    res = evaluate(model, images, Normalize(meta.data.mean, meta.data.std), batch_size)
    return {**res, "dataset": _label(name, split), "split": split}
