"""An output folder is one unit: interrupted at any point of its writing, or out of disk space, a command leaves
the old checkpoint whole or the new one whole, never a mix, and no temporary folder behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdcompress import errors
from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main

WATCHED = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkdtemp", "tempfile.mkstemp",
           "os.chmod")


class _Tripwire:
    """An audit hook that counts file-system events under `root` and, when armed, raises Ctrl-C at event `at`
    the way the CLI's signal handler does (remembered, then raised)."""

    def __init__(self):
        self.root, self.at, self.seen = None, None, 0

    def __call__(self, event, args):
        if self.root is None or event not in WATCHED or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)) or not str(path).startswith(self.root):
            return
        self.seen += 1
        if self.at is not None and self.seen == self.at:
            self.root = None  # one interruption per run
            errors.signal_received(KeyboardInterrupt)

    def arm(self, root: Path, at: int | None):
        self.root, self.at, self.seen = str(root), at, 0


_TRIP = _Tripwire()
sys.addaudithook(_TRIP)  # audit hooks cannot be removed; this one is idle unless armed


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.iterdir())}


def _pair(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "model.pt").read_bytes(), (folder / "model.json").read_bytes()


@pytest.mark.timeout(600)
def test_ctrl_c_at_every_write_of_prune_force_leaves_old_or_new(digits_run, tmp_path, capsys):
    outs = tmp_path / "outs"
    target = outs / "P"
    args = ["prune", str(digits_run), "--recalibrate", "2", "--no-progress"]
    assert main([*args, "--keep", "0.8", "--out", str(target)]) == 0
    (target / "model.onnx").write_bytes(b"an export of the old model")  # a stale output of another stage
    old = _snapshot(target)
    ref = tmp_path / "ref"
    assert main([*args, "--keep", "0.5", "--out", str(ref)]) == 0
    new = _pair(ref)
    assert new != _pair(target)

    _TRIP.arm(outs, None)  # count the file-system events of one uninterrupted run
    shutil.copytree(target, tmp_path / "old_copy")
    assert main([*args, "--keep", "0.5", "--force", "--out", str(target)]) == 0
    events = _TRIP.seen
    _TRIP.arm(Path("/nonexistent"), None)
    assert _pair(target) == new and not (target / "model.onnx").exists()  # the stale export went with the old folder
    assert events >= 8, events

    outcomes = {"old": 0, "new": 0}
    for k in range(1, events + 1):
        shutil.rmtree(target)
        shutil.copytree(tmp_path / "old_copy", target)
        _TRIP.arm(outs, k)
        rc = main([*args, "--keep", "0.5", "--force", "--out", str(target)])
        _TRIP.arm(Path("/nonexistent"), None)
        capsys.readouterr()
        assert rc in (0, 130), (k, rc)
        left = sorted(p.name for p in outs.iterdir())
        assert left == ["P"], f"event {k}: {left}"  # no temporary or old folder left beside it
        if _snapshot(target) == old:
            outcomes["old"] += 1
        else:
            assert _pair(target) == new, f"event {k}: a mix of two checkpoints"
            assert not (target / "model.onnx").exists()
            load_checkpoint(target)
            outcomes["new"] += 1
    assert outcomes["old"] >= 1 and outcomes["new"] >= 1, outcomes  # interruptions landed on both sides of the swap


def _mount_tmpfs(where: Path, size_kib: int) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


@pytest.mark.timeout(300)
def test_full_disk_leaves_the_old_checkpoint_whole(digits_run, tmp_path, capsys):
    disk = tmp_path / "disk"
    probe = tmp_path / "probe"
    if not _mount_tmpfs(probe, 64):
        pytest.skip("cannot mount a small tmpfs here (needs Linux and root); the full-disk case is not exercised")
    subprocess.run(["umount", str(probe)], check=True)
    args = ["prune", str(digits_run), "--recalibrate", "2", "--no-progress"]
    staging = tmp_path / "staging"
    assert main([*args, "--keep", "0.8", "--out", str(staging / "P")]) == 0
    used = sum(p.stat().st_size for p in (staging / "P").iterdir())
    # room for the old checkpoint and a third of a new one: the new one cannot be written completely
    assert _mount_tmpfs(disk, (used + used // 3) // 1024 + 8)
    try:
        shutil.copytree(staging / "P", disk / "P")
        old = _snapshot(disk / "P")
        rc = main([*args, "--keep", "0.6", "--force", "--out", str(disk / "P")])
        err = capsys.readouterr().err
        assert rc == 1 and "No space left" in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["P"]
        assert _snapshot(disk / "P") == old
        load_checkpoint(disk / "P")
        # without --force into a new folder: nothing at all is left
        rc = main([*args, "--keep", "0.6", "--out", str(disk / "Q")])
        assert rc == 1 and sorted(p.name for p in disk.iterdir()) == ["P"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
