"""Files sdcompress writes and reads: outputs staged and put in place as one unit, untrusted files read within limits.

Writing: every file goes to a temporary name beside its target and is renamed into place (`staged`); a command's
whole output folder is built beside `--out` and swapped in at once (`output_folder`). Reading: a file that
comes from a user (a checkpoint, a report) is opened only if it is a regular file under a size limit, and JSON
is checked for nesting depth before it is parsed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import torch

from . import errors
from .errors import InputError, check_interrupt

WEIGHTS = "model.pt"
SIDECAR = "model.json"
# Limits on untrusted files, checked before a byte is read: a sidecar or report is a few hundred KiB (training
# history included), weights of the largest registered network (resnet1202, 19.4 M parameters) about 75 MiB.
MAX_JSON_BYTES = 32 * 1024**2
MAX_WEIGHTS_BYTES = 2 * 1024**3
MAX_JSON_DEPTH = 64
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def staged(path: str | Path):
    """Stage one file under a temporary name beside `path`; put it in place only if the block completes.

    Yields the temporary path to write. On success, a signal that a library swallowed meanwhile is raised instead
    of committing (see errors.check_interrupt); otherwise the file replaces any old one by a rename. On failure
    nothing is left. (A command's whole output folder is staged by `output_folder`.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        check_interrupt()
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Names sdcompress writes into an output folder. A folder is written and replaced as one unit, so a folder holding
# anything else is never used as an output (replacing it would delete the user's files).
OUTPUT_NAMES = frozenset({
    WEIGHTS, SIDECAR, "train_state.pt", "report.json", "report.md", "blocks.png", "stats.png", "stats.json", "model.onnx",
    "model.ort", "model.required_operators.config", "model.mlpackage", "export", "point.json", "points", "sweep.json", "sweep.md", "tradeoff.png", "settings.json",
})


def _is_ours(name: str, listed: frozenset = frozenset()) -> bool:
    return name in OUTPUT_NAMES or name in listed or (name.startswith(".") and (".tmp" in name or ".old-" in name))  # leftovers of a kill


def exported_files(folder: Path, rep: dict | None = None) -> dict[str, dict]:
    """The files an export's report.json in `folder` (or the report `rep`, already read) lists (`{file: its
    entry}`), plain names only; {} where there is no readable export report."""
    if rep is None:
        try:
            rep = parse_untrusted_json(folder / "report.json", "export report") if (folder / "report.json").is_file() else None
        except Exception:  # noqa: BLE001 - unreadable: lists nothing
            return {}
    stage = rep.get("stage") if isinstance(rep, dict) else None
    formats = rep.get("formats") if stage in ("export", "export-depths") else None
    if not isinstance(formats, dict):
        return {}
    entries = list(formats.values())
    if stage == "export-depths":  # a depth family: its per-depth files and manifest too
        depths = rep.get("depths") if isinstance(rep.get("depths"), list) else []
        entries += [d.get("onnx") for d in depths if isinstance(d, dict)] + [{"file": "depths.json"}]
    out = {}
    for entry in entries:
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str) and name and "/" not in name and "\\" not in name and not name.startswith("."):
            out[name] = entry
    return out


def check_output_folder(out: str | Path, force: bool, inputs: tuple = (), flag: str = "--out") -> Path:
    """Check, before any work, that `out` can become this command's output folder.

    It must be a folder or not exist, not be the folder of an input (it is replaced as a whole), hold nothing but
    sdcompress outputs, hold none at all unless `force`, and lie where this user can write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder")
    for src in inputs:
        if src is not None and out.exists() and checkpoint_folder(src).resolve() == out.resolve():
            raise InputError(f"{flag} {out}: is the folder of the input checkpoint; write to another folder")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        listed = frozenset(exported_files(out))  # the Core ML package is named after the model
        foreign = [n for n in names if not _is_ours(n, listed)]
        if foreign:
            raise InputError(f"{flag} {out}: holds files sdcompress did not write ({', '.join(foreign[:3])}); the output folder "
                             f"is replaced as a whole, so give an empty or new folder")
        if names and not force:
            raise InputError(f"{flag} {out}: already holds {', '.join(n for n in names if not n.startswith('.'))[:80]}; "
                             f"pass --force to replace it, or another {flag}")
    base = out.absolute().parent  # the temporary folder is made, and renamed, here
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: cannot write in {base} (not a writable folder)")
    return out


def check_output_file(path: str | Path | None, force: bool, flag: str, inputs: tuple = ()) -> Path | None:
    """Check, before any work, that `path` can become this command's output file: not a folder or anything but a
    regular file, not one of the command's inputs (or their checkpoints' files), absent unless `force`, and in a
    folder where a file can really be created (a probe file, made and removed: a permission bit says nothing on a
    read-only or virtual file system, nor to root)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give the path of a file")
    if path.exists() and not path.is_file():
        raise InputError(f"{flag} {path}: exists and is not a regular file")
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        taken = [src] + ([checkpoint_folder(src) / WEIGHTS, checkpoint_folder(src) / SIDECAR] if src.is_dir() or src.suffix == ".pt" else [])
        if any(path.resolve() == t.resolve() for t in taken):
            raise InputError(f"{flag} {path}: is one of this command's inputs; write to another file")
    if path.exists() and not force:
        raise InputError(f"{flag} {path}: exists; pass --force to overwrite")
    base = path.absolute().parent
    while not base.exists():
        base = base.parent
    try:
        if not base.is_dir():
            raise OSError(f"{base} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".sdcompress-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {base} ({first_line(e)})") from None
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL (a filesystem without exchange), ENOSYS: fall back


@contextlib.contextmanager
def output_folder(out: str | Path):
    """Write a command's whole output folder as one unit.

    Yields a new temporary folder beside `out`. When the block completes (and no signal was swallowed meanwhile,
    see errors.check_interrupt) it takes the place of `out` in one step (an atomic exchange of the two folders
    where the system has one; otherwise two renames with signals held), so a reader sees the old folder whole or
    the new one whole, never a mix, and no file of the old output survives in the new one. On any failure (an
    interruption, a full disk) the temporary folder is removed and `out` is as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        os.mkdir(tmp)  # named first, so that cleanup finds it whenever an interruption lands
        yield tmp
        check_interrupt()
        if not out.exists():
            os.rename(tmp, out)
        elif not _exchange(tmp, out):
            import signal

            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.rename(out, old)
                os.rename(tmp, out)
                os.rename(old, tmp)  # removed below with the temporary folder
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
    finally:
        _remove_tree(tmp)  # the unfinished new output, or after an exchange the old one


def _remove_tree(path: Path) -> None:
    """rmtree that finishes even when Ctrl-C lands in the middle; the interruption is raised afterwards."""
    caught = None
    while True:
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except (KeyboardInterrupt, errors.Terminated) as e:
            caught = caught or e
    if caught is not None:
        raise caught


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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def path_bytes(path: str | Path) -> int:
    """Size of a file, or of every file under a folder (a .mlpackage)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def read_untrusted(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file no larger than `limit`: a link to a device, a FIFO or a huge file is refused
    before anything is read from it (a FIFO would block forever, /dev/zero never ends)."""
    path = Path(path)
    read_untrusted_check(path, limit, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise InputError(f"{path}: grew past {limit:,} bytes while being read")
    return data


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_untrusted_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES):
    """Read and parse a JSON file under the size and nesting limits; an InputError names what is wrong."""
    raw = read_untrusted(path, limit, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; a {what} is JSON") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise InputError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; not a {what}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{path}: corrupt {what}, not valid JSON ({first_line(e)})") from None


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


def first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:120]


def read_untrusted_check(path: str | Path, limit: int, what: str) -> None:
    """The checks of `read_untrusted` (regular file, size) without reading, for files a library opens itself."""
    path = Path(path)
    try:
        st = path.stat()  # follows links: what counts is what would be read
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a device, FIFO or folder); a {what} must be a plain file")
    if st.st_size > limit:
        raise InputError(f"{path}: {st.st_size:,} bytes, more than the {limit:,} a {what} may have")


