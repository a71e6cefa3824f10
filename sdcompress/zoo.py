"""The bundled models and evaluation set (top-level `models/`, shipped in the wheel as `sdcompress.models`)."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from .errors import InputError

DEFAULT_MODEL = "resnet56-sd"
EVAL_SET = "cifar10-test2k.npz"  # CIFAR-10 test images (../shared/data/cifar10-test) no bundled model trained on
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
    """The bundled evaluation set (test images no bundled model trained on), if installed."""
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


def same_data_as_bundled(ckpt: str | Path, meta) -> bool:
    """Whether a checkpoint is bundled, or was trained on the very data and split of a bundled model (a pruned or
    binarized bundled model, say), so that the bundled evaluation and calibration sets are held out for it."""
    if is_bundled(ckpt):
        return True
    return meta.data in _bundled_data()


@functools.lru_cache(maxsize=1)
def _bundled_data() -> tuple:
    """The `DataInfo` of every bundled model (data, normalization and split)."""
    from .checkpoint import read_sidecar

    root = models_dir()
    found = []
    for side in sorted(root.glob("*/model.json")) if root is not None else []:
        try:
            found.append(read_sidecar(side).data)
        except InputError:
            continue
    return tuple(found)


def bundled_calib_set() -> Path | None:
    """The bundled calibration set (training-split images for BatchNorm recalibration), if installed."""
    return _bundled_file(CALIB_SET)


CARD_FIELDS = ("description", "author", "license", "version")


def own_card(ckpt: str | Path, meta) -> dict:
    """What a model's card says of it (description, author, license, version): from a MODEL_CARD.md beside the
    checkpoint (its title; `| author |`, `| license |` and `| version |` rows), else as carried from the model it was
    made from (prune and binarize record it in their stage), else nothing."""
    from .files import checkpoint_folder, read_untrusted

    card = checkpoint_folder(ckpt) / "MODEL_CARD.md"
    fields: dict = {}
    if card.is_file():
        for line in read_untrusted(card, 1024**2, "model card").decode("utf-8", errors="replace").splitlines():
            if line.startswith("# ") and "description" not in fields:
                fields["description"] = line[2:].strip()
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] in CARD_FIELDS[1:]:
                fields[cells[0]] = cells[1]
        return fields
    for st in reversed(meta.stages):
        carried = st.get("source_card")
        if isinstance(carried, dict):
            return {k: v[:1000] for k, v in carried.items() if k in CARD_FIELDS and isinstance(v, str)}
    return fields


def card_fields(ckpt: str | Path, meta) -> dict:
    """Description, author, license and version for an exported file: the model's card (`own_card`) and the
    compression stages the checkpoint went through. Without a card: a description from the sidecar, author
    sdcompress, license unspecified."""
    fields = {"author": "sdcompress", "license": "unspecified", **own_card(ckpt, meta)}
    steps = []
    for st in meta.stages[1:]:
        if st.get("stage") == "prune":
            steps.append(f"pruned to {len(st.get('kept', []))} residual blocks")
        elif st.get("stage") == "binarize":
            steps.append(f"{len(st.get('layers', []))} layers binarized")
    base = fields.get("description") or f"{meta.spec.arch} image classifier, {len(meta.data.classes)} classes ({meta.data.name})"
    fields["description"] = base + (f"; {', '.join(steps)} by sdcompress" if steps else "")
    return fields
