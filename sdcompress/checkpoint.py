"""Checkpoints: `model.pt` (a plain state_dict, loadable with weights_only=True) plus the `model.json` sidecar.

The sidecar carries the schema version, the network spec (including which blocks are kept), the data
description (classes, normalization, split), the config of every stage applied so far, metrics, and the
per-block survival statistics. Nothing is pickled beyond tensors: a model is rebuilt from its spec, then its
weights are loaded and checked against that spec. Every file is written to a temporary file in the same
folder and renamed into place, so a reader sees the old file or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InputError, check_interrupt
from .nets import NetSpec, ResNet, build_model

SCHEMA = "sdcompress.checkpoint/1"
_UMASK = os.umask(0)
os.umask(_UMASK)
WEIGHTS = "model.pt"
SIDECAR = "model.json"


@contextlib.contextmanager
def staged(path: str | Path, folder: bool = False):
    """Stage an output under a temporary name beside `path`; put it in place only if the block completes.

    Yields the temporary path to write (a file, or with `folder` a folder path that does not exist yet, for
    writers that create their own folder, like a .mlpackage). On success, a signal that a library swallowed
    meanwhile is raised instead of committing (see errors.check_interrupt); otherwise the output replaces any old
    one by a rename (a folder: the old one is moved aside first and removed after). On failure nothing is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        box = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp = box / path.name
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        box = tmp = Path(name)
    try:
        yield tmp
        check_interrupt()
        if folder:
            old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
            if old is not None:
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
            os.replace(tmp, path)
    finally:
        if box.is_dir():
            shutil.rmtree(box, ignore_errors=True)
        elif box.exists():
            box.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    with staged(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_folder(path: str | Path) -> Path:
    """The folder a checkpoint (given as its folder or one of its files) lives in."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def path_bytes(path: str | Path) -> int:
    """Size of a file, or of every file under a folder (a .mlpackage)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) paths of a checkpoint given as its folder, its model.pt or its model.json."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    elif p.suffix == ".json":
        p = p.with_name(WEIGHTS) if p.name == SIDECAR else p.with_suffix(".pt")
    if not p.exists():
        raise InputError(f"checkpoint {path}: no such file ({p})")
    side = p.with_name(SIDECAR) if p.name == WEIGHTS else p.with_suffix(".json")
    if not side.exists():
        raise InputError(f"checkpoint {path}: sidecar {side.name} is missing beside {p.name}; it holds the architecture")
    return p, side


def read_sidecar(path: str | Path) -> dict:
    """Parse and check a sidecar as data."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt sidecar, not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("schema"), str) or not meta["schema"].startswith("sdcompress.checkpoint/"):
        raise InputError(f"{path}: not an sdcompress checkpoint sidecar (no 'schema': '{SCHEMA}')")
    if meta["schema"] != SCHEMA:
        raise InputError(f"{path}: schema {meta['schema']} is not supported by this sdcompress ({SCHEMA}); upgrade sdcompress")
    if not isinstance(meta.get("spec"), dict):
        raise InputError(f"{path}: sidecar has no 'spec' (the architecture)")
    try:
        NetSpec.from_dict(meta["spec"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: bad architecture spec in sidecar ({e})") from None
    return meta


def save_checkpoint(out_dir: str | Path, model: ResNet, meta: dict) -> Path:
    """Write model.pt then model.json into `out_dir` (each atomically). Returns the weights' path."""
    out = Path(out_dir)
    meta = dict(meta)
    meta["schema"] = SCHEMA
    meta["spec"] = model.spec.to_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out / WEIGHTS)
    atomic_write_json(out / SIDECAR, meta)
    return out / WEIGHTS


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:120]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused to load: it holds more than tensors ({_first_line(e)})") from None
    except Exception as e:  # truncated or not a torch file
        raise InputError(f"{path}: corrupt or not a PyTorch state_dict ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state_dict of tensors")
    return state


def load_checkpoint(path: str | Path) -> tuple[ResNet, dict]:
    """Rebuild a model from its sidecar, load its weights and check they match. Returns (model, sidecar)."""
    weights, side = resolve(path)
    meta = read_sidecar(side)
    try:
        model = build_model(NetSpec.from_dict(meta["spec"]))
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise InputError(f"{side}: the sidecar's spec does not describe a network this sdcompress builds ({_first_line(e)})") from None
    state = load_state_dict(weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise InputError(f"{weights}: weights do not match the sidecar's architecture ({what}); the two files belong to different models")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise InputError(f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, the sidecar's architecture needs {tuple(v.shape)}")
    model.load_state_dict(state)
    model.eval()
    return model, meta
