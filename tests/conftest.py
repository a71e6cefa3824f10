from __future__ import annotations

from pathlib import Path

import pytest

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
