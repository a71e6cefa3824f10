from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR_DIR = SHARED_DATA / "cifar10"


@pytest.fixture(scope="session")
def cifar10():
    """The CIFAR-10 training set from ../shared/data, decoded once per session, with the 45k/5k split."""
    if not (CIFAR_DIR / "train").is_dir():
        pytest.skip(f"{CIFAR_DIR} is absent (the shared CIFAR-10 data is only on development and CI machines)")
    from sdcompress.data import load_dataset

    return load_dataset("cifar10", str(CIFAR_DIR))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small stochastic-depth model trained on digits through the CLI (shared by several tests)."""
    from sdcompress.cli import main

    out = tmp_path_factory.mktemp("digits") / "run"
    rc = main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """320 colour 32x32 images of 2 classes that differ in brightness: learnable in one short epoch."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 320).astype(np.uint8)
    x = rng.integers(0, 96, (320, 32, 32, 3)).astype(np.uint8) + (y * 120).astype(np.uint8)[:, None, None, None]
    path = tmp_path_factory.mktemp("data") / "colour.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def resnet18_ckpt(colour_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "r18"
    from sdcompress.cli import main

    rc = main(["train", "--arch", "torchvision:resnet18", "--data", str(colour_data), "--epochs", "2", "--batch-size", "32",
               "--lr", "0.05", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """A digits model trained briefly with stochastic depth, pruned, binarized, and both (the export tests' inputs)."""
    from sdcompress.cli import main

    root = tmp_path_factory.mktemp("variants")
    run = root / "full"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["prune", str(run), "--keep", "0.6", "--out", str(root / "pruned")]) == 0
    assert main(["binarize", str(run), "--out", str(root / "binary")]) == 0
    assert main(["binarize", str(root / "pruned"), "--out", str(root / "both")]) == 0
    return root


def tree(root: Path) -> dict:
    """Every path under `root` with its size and modification time: what "no file changed" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def refusal_failures(cases: list[tuple[str, list[str]]], root: Path, capsys) -> list[str]:
    """Each (name, argv) run through the CLI must exit 2 with one line on stderr, no traceback, and change nothing
    under `root`; the cases that do not, each with what went wrong."""
    from sdcompress.cli import main

    failures = []
    for name, argv in cases:
        before = tree(root)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        problems = [p for p, bad in ((f"exit {rc}", rc != 2), (f"{len(lines)} lines", len(lines) != 1),
                                     ("traceback", "Traceback" in err), ("files changed", tree(root) != before)) if bad]
        if problems:
            failures.append(f"{name}: {'; '.join(problems)} | {err.strip()[:240]}")
    return failures
