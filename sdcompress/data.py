"""Datasets as uint8 tensors held in memory, seeded splits, and batch augmentation on the training device.

Sources (the DATA argument of the CLI):
  digits                       scikit-learn's bundled 8x8 handwritten digits (offline default)
  FILE.npz                     `x` uint8 (NHWC or NHW) and `y` integer labels
  FOLDER                       ImageFolder layout (class subfolders); `train/` and `test/` inside are splits
  cifar10 cifar100 svhn mnist fashion-mnist   torchvision datasets, read from --data-dir (never downloaded);
                               a --data-dir in ImageFolder layout is read as such
Small datasets are decoded once and held as uint8 NCHW tensors; augmentation (padded random crop and
horizontal flip) runs on whole batches where the batch lives, so a GPU is not starved by per-image PIL work.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .nets import MAX_CLASSES

TORCHVISION_SETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Images as a uint8 NCHW tensor with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class Dataset:
    """A dataset's splits (train is the pool left after holding out val), class names and normalization."""

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    classes: list[str]
    mean: list[float]
    std: list[float]
    split: dict  # {"val_size": int, "seed": int, "train_size": int}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def limit_train(self, n: int) -> "Dataset":
        """The dataset with only the first `n` images of its (already shuffled) training split; the split says so."""
        if not 1 <= n <= len(self.train):
            raise InputError(f"--train-limit must be in [1, {len(self.train)}] for this training split, got {n}")
        return replace(self, train=self.train.subset(torch.arange(n)), split={**self.split, "train_size": n, "train_limit": n})


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str) -> ImageSet:
    if x.dtype != np.uint8:
        raise InputError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, :, :, None]
    if x.ndim != 4:
        raise InputError(f"{where}: images must be NHWC or NHW, got shape {tuple(x.shape)}")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{where}: labels must be 1-D with one label per image ({len(x)}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{where}: labels must be integers, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise InputError(f"{where}: labels must be >= 0")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)))


def _load_digits() -> tuple[ImageSet, None, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _check_arrays(x, d.target, "digits"), None, [str(i) for i in range(10)]


def _load_npz(path: Path) -> tuple[ImageSet, None, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "y" not in f or ("x" not in f and not ("jpeg" in f and "offsets" in f)):
                raise InputError(f"{path}: an .npz dataset needs arrays 'x' (uint8 images) and 'y' (labels)")
            y = f["y"]
            if "x" in f:
                x = f["x"]
            else:  # encoded images: one byte array and the offsets that cut it into files
                blob, off = f["jpeg"].tobytes(), f["offsets"]
                x = _decode_images([blob[off[i] : off[i + 1]] for i in range(len(off) - 1)], str(path))
            classes = [str(c) for c in f["classes"]] if "classes" in f else None
    except InputError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise InputError(f"{path}: not a readable .npz dataset ({e})") from None
    s = _check_arrays(x, y, str(path))
    n_cls = int(s.labels.max()) + 1 if len(s) else 0
    if classes is None and n_cls > MAX_CLASSES:
        raise InputError(f"{path}: label {n_cls - 1} would make {n_cls:,} classes (at most {MAX_CLASSES:,}); labels must be 0..K-1")
    if classes is None:
        classes = [str(i) for i in range(n_cls)]
    elif n_cls > len(classes):
        raise InputError(f"{path}: label {n_cls - 1} out of range for {len(classes)} classes")
    return s, None, classes


def list_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an ImageFolder tree in torchvision's order: classes sorted, then file names."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise InputError(f"{root}: no class subfolders (expected ImageFolder layout: {root}/<class>/<image>)")
    classes = classes or found
    if set(found) - set(classes):
        raise InputError(f"{root}: class folders {sorted(set(found) - set(classes))} not in the training classes")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        names = [f for f in sorted(os.listdir(root / c)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not names:
            raise InputError(f"{root}: class folder {c!r} holds no images; remove it or add its images")
        files += [root / c / f for f in names]
        labels += [index[c]] * len(names)
    if not files:
        raise InputError(f"{root}: no image files in the class subfolders")
    return files, labels, classes


def _decode_images(blobs, where: str) -> np.ndarray:
    """Decode encoded images (paths or bytes) with PIL on a thread pool; all must share one size."""
    from PIL import Image

    def decode(src) -> np.ndarray:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey: scaled to 8 bits, not clipped at 255
                return np.clip(np.round(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            return np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))

    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            arrays = list(pool.map(decode, blobs, chunksize=256))
    except OSError as e:
        raise InputError(f"{where}: an image could not be decoded ({e})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"{where}: images differ in size or mode ({sorted(shapes)[:3]}...); resize them to one size")
    return np.stack(arrays)


def _decode_folder(root: Path, classes: list[str] | None = None) -> tuple[ImageSet, list[str]]:
    files, labels, classes = list_image_folder(root, classes)
    return _check_arrays(_decode_images(files, str(root)), np.array(labels), str(root)), classes




def _load_folder(root: Path) -> tuple[ImageSet, ImageSet | None, list[str]]:
    if (root / "train").is_dir():
        train, classes = _decode_folder(root / "train")
        test = _decode_folder(root / "test", classes)[0] if (root / "test").is_dir() else None
        return train, test, classes
    train, classes = _decode_folder(root)
    return train, None, classes


def _is_image_folder(root: Path) -> bool:
    """ImageFolder layout: root/train/<class>/<image>, or root/<class>/<image>."""
    base = root / "train" if (root / "train").is_dir() else root
    for d in base.iterdir():
        if d.is_dir():
            return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(d)[:50])
    return False


def _load_torchvision(name: str, data_dir: str | None) -> tuple[ImageSet, ImageSet | None, list[str]]:
    if not data_dir:
        raise InputError(f"dataset {name!r} needs --data-dir (sdcompress never downloads)")
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"--data-dir {data_dir}: no such folder")
    if _is_image_folder(root):
        return _load_folder(root)
    import torchvision.datasets as tvd

    def arrays(ds, train: bool):
        if name in ("cifar10", "cifar100"):
            return np.asarray(ds.data), np.asarray(ds.targets)
        if name == "svhn":
            return np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels)
        return ds.data.numpy(), ds.targets.numpy()

    make = {
        "cifar10": lambda t: tvd.CIFAR10(data_dir, train=t, download=False),
        "cifar100": lambda t: tvd.CIFAR100(data_dir, train=t, download=False),
        "svhn": lambda t: tvd.SVHN(data_dir, split="train" if t else "test", download=False),
        "mnist": lambda t: tvd.MNIST(data_dir, train=t, download=False),
        "fashion-mnist": lambda t: tvd.FashionMNIST(data_dir, train=t, download=False),
    }[name]
    try:
        tr, te = make(True), make(False)
    except (RuntimeError, OSError) as e:
        raise InputError(f"{name} not found in {data_dir} ({str(e).splitlines()[0]}); sdcompress is offline and never downloads") from None
    classes = list(getattr(tr, "classes", [str(i) for i in range(10)]))
    return _check_arrays(*arrays(tr, True), name), _check_arrays(*arrays(te, False), name), classes


def default_val_size(n: int) -> int:
    """5,000 for CIFAR-sized pools (the paper's 45k/5k split), else 10%."""
    return 5000 if n >= 50000 else max(1, round(0.1 * n))


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into a pool of n images: a seeded permutation, validation first."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_dataset(data: str, data_dir: str | None = None, val_size: int | None = None, seed: int = 0) -> Dataset:
    """Load a dataset and hold out a seeded validation split from its training pool.

    Args:
        data: "digits", a torchvision dataset name, an .npz file or an ImageFolder folder.
        data_dir: where a torchvision dataset lies.
        val_size: images held out for validation (None: `default_val_size`; 0: none).
        seed: seed of the split's permutation.
    """
    if data == "digits":
        pool, test, classes = _load_digits()
    elif data in TORCHVISION_SETS:
        pool, test, classes = _load_torchvision(data, data_dir)
    else:
        path = Path(data)
        if not path.exists():
            raise InputError(f"data {data!r}: no such file or folder, and not one of digits, {', '.join(TORCHVISION_SETS)}")
        if path.is_dir():
            pool, test, classes = _load_folder(path)
        elif path.suffix == ".npz":
            pool, test, classes = _load_npz(path)
        else:
            raise InputError(f"data {data!r}: expected an .npz file or an ImageFolder folder")
    if len(pool) < 2:
        raise InputError(f"data {data!r}: needs at least 2 images, found {len(pool)}")
    if int(pool.labels.max()) >= len(classes):
        raise InputError(f"data {data!r}: label {int(pool.labels.max())} out of range for {len(classes)} classes")
    counts = torch.bincount(pool.labels, minlength=len(classes))
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:  # a gap in the labels, or a stray outlier that made K too large
        names = ", ".join(repr(classes[i]) for i in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise InputError(f"data {data!r}: {len(empty)} of {len(classes)} classes have no image ({names}); labels must be 0..K-1 "
                         f"with every class present (largest label {int(pool.labels.max())})")
    n = len(pool)
    val_size = default_val_size(n) if val_size is None else val_size
    if not 0 <= val_size < n:
        raise InputError(f"--val-size must be in [0, {n - 1}] for {n} images, got {val_size}")
    train_idx, val_idx = split_indices(n, val_size, seed)
    val = pool.subset(val_idx) if val_size else None
    train = pool.subset(train_idx)
    x = train.images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    name = data if data in TORCHVISION_SETS or data == "digits" else Path(data).name
    split = {"val_size": val_size, "seed": seed, "train_size": len(train)}
    return Dataset(name, train, val, test, classes, mean, std, split)


def load_eval_set(path: str | Path) -> ImageSet:
    """An .npz evaluation set (x, y), e.g. the one bundled with the models."""
    return _load_npz(Path(path))[0]


class Normalize:
    """uint8 NCHW batch -> float, normalized per channel."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Padded random crop (zero padding of `pad` pixels) and random horizontal flip of a uint8 batch.

    Runs on whatever device `x` is on; the generator must live on the same device.
    """
    n, c, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def augmentation(cfg, shape: tuple[int, int, int]) -> tuple[int, bool]:
    """(pad, flip) for a dataset: CIFAR's 4-pixel crop scales with image size; flips only for colour images."""
    mode = cfg.augment
    if mode == "auto":
        mode = "standard" if shape[0] == 3 else "none"
    if mode not in ("standard", "crop", "none"):
        raise InputError(f"--augment must be auto, standard, crop or none, got {cfg.augment!r}")
    pad = max(1, shape[1] // 8) if mode in ("standard", "crop") else 0
    return pad, mode == "standard"


def train_augmentation(meta) -> tuple[int, bool]:
    """(pad, flip) that a checkpoint was trained with, from its sidecar."""
    from .config import TrainConfig

    return augmentation(TrainConfig.from_dict(meta.train_config), meta.data.input_shape)


class ImageBatches:
    """`(inputs, labels)` batches of an ImageSet for the Python API's stages: shuffled, padded-cropped and flipped on
    each pass over it when `train`, then normalized as the model expects; what a DataLoader with those transforms
    would give. Can be iterated again (a new shuffle each time)."""

    def __init__(self, images: ImageSet, mean, std, batch_size: int = 128, train: bool = True, pad: int = 0, flip: bool = False,
                 seed: int = 0):
        self.images, self.batch_size, self.train, self.pad, self.flip = images, batch_size, train, pad, flip
        self.gen = torch.Generator().manual_seed(seed)
        self.normalize = Normalize(list(mean), list(std))

    def __len__(self) -> int:
        n = len(self.images.labels)
        return max(1, n // self.batch_size) if self.train else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        """Where the shuffling and augmentation stand (as torchdata's `StatefulDataLoader`): a training checkpoint
        keeps it, so that a resumed run sees the batches an unbroken one would."""
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def __iter__(self):
        n = len(self.images.labels)
        order = torch.randperm(n, generator=self.gen) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images.images[idx]
            if self.train and (self.pad or self.flip):
                x = augment(x, self.pad, self.flip, self.gen)
            yield self.normalize(x), self.images.labels[idx]
