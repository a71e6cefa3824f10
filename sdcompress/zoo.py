"""The bundled models and evaluation set (top-level `models/`, shipped in the wheel as `sdcompress.models`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import InputError

DEFAULT_MODEL = "resnet56-sd"
EVAL_SET = "cifar10-eval2k.npz"
CALIB_SET = "cifar10-calib.npz"  # training-split images for BatchNorm recalibration and sensitivity


def models_dir() -> Path | None:
    """Where the bundled models lie: the installed package data, or the source checkout's `models/`."""
    try:
        p = Path(str(resources.files("sdcompress.models")))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    p = Path(__file__).resolve().parents[1] / "models"
    return p if p.is_dir() else None


def bundled(name: str = DEFAULT_MODEL) -> Path:
    """Folder of a bundled model, or an InputError saying there is none."""
    root = models_dir()
    if root is None or not (root / name / "model.pt").exists():
        raise InputError(f"no bundled model {name!r} in this installation; give a checkpoint path")
    return root / name


def _bundled_file(name: str) -> Path | None:
    root = models_dir()
    return root / name if root is not None and (root / name).exists() else None


def bundled_eval_set() -> Path | None:
    """The bundled evaluation set (validation images never trained on), if installed."""
    return _bundled_file(EVAL_SET)


def is_bundled(path: str | Path) -> bool:
    root = models_dir()
    if root is None:
        return False
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def bundled_calib_set() -> Path | None:
    """The bundled calibration set (training-split images for BatchNorm recalibration), if installed."""
    return _bundled_file(CALIB_SET)
