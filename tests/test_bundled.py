"""The bundled models and evaluation set: loadable safely, consistent, and honest about their accuracy."""

import hashlib
import re
import zipfile

import numpy as np
import pytest
import torch

from sdcompress.checkpoint import load_checkpoint, read_sidecar
from sdcompress.data import Normalize, load_eval_set
from sdcompress.loops import evaluate
from sdcompress.zoo import DEFAULT_MODEL, EVAL_SET, bundled, models_dir
from tests.conftest import ROOT

MODELS = ["resnet56-sd", "resnet56-constant", "resnet32-constant"]


@pytest.fixture(scope="module")
def eval_set():
    return load_eval_set(models_dir() / EVAL_SET)


@pytest.mark.parametrize("name", MODELS)
def test_bundled_checkpoint_loads_matches_sidecar_and_card(name, eval_set):
    folder = bundled(name)
    state = torch.load(folder / "model.pt", weights_only=True)  # plain tensors only
    model, meta = load_checkpoint(folder)
    assert set(state) == set(model.state_dict())
    assert (meta.spec.arch, len(model.block_ids)) == ((name.split("-")[0]), {"resnet56": 27, "resnet32": 15}[name.split("-")[0]])
    assert (folder / "model.pt").stat().st_size + (folder / "stats.png").stat().st_size < 4 * 2**20  # small enough to ship
    assert meta.survival_stats.steps > 0
    acc = evaluate(model, eval_set, Normalize(meta.data.mean, meta.data.std))
    card = (folder / "MODEL_CARD.md").read_text()
    stated = re.search(r"bundled evaluation set top-1[^|]*\| ([\d.]+)% \((\d+)/(\d+)\)", card)
    assert stated, "the card states the bundled evaluation set accuracy"
    assert int(stated.group(3)) == acc["n"] == 2000
    assert abs(100 * acc["top1"] - float(stated.group(1))) <= 0.1
    assert f"{model.spec.arch}" in card and f"{(folder / 'model.pt').stat().st_size:,} bytes" in card


def test_default_model_is_the_stochastic_depth_one():
    meta = read_sidecar(bundled() / "model.json")
    assert bundled().name == DEFAULT_MODEL
    assert meta.spec.survival_rule == "linear" and meta.spec.p_last == 0.5


def test_eval_set_is_compact_and_balanced(eval_set):
    assert len(eval_set) == 2000 and tuple(eval_set.images.shape[1:]) == (3, 32, 32)
    assert (models_dir() / EVAL_SET).stat().st_size < 2.5 * 2**20
    assert torch.bincount(eval_set.labels, minlength=10).min() > 150


def test_eval_set_was_never_trained_on(cifar10, eval_set):
    """The bundled models started from a network trained on all 50,000 training images: every bundled evaluation
    image is a CIFAR-10 test image of ../shared/data/cifar10-test, and none is among the training images."""
    from sdcompress.data import load_dataset
    from tests.conftest import CIFAR_DIR

    test_dir = CIFAR_DIR.parent / "cifar10-test"
    for name in MODELS:
        split = read_sidecar(bundled(name) / "model.json").data.split
        assert split == cifar10.split
    digest = lambda t: hashlib.sha1(t.numpy().tobytes()).digest()  # noqa: E731
    pool = {digest(img) for part in (cifar10.train, cifar10.val) for img in part.images}
    test = {digest(img) for img in load_dataset(str(test_dir), None, 0).train.images}
    hashes = [digest(img) for img in eval_set.images]
    assert not any(h in pool for h in hashes)
    assert all(h in test for h in hashes)
    with np.load(models_dir() / EVAL_SET) as f:
        assert len(set(f["pool_index"].tolist())) == 2000


def test_cli_uses_the_bundled_model_by_default(capsys):
    from sdcompress.cli import main

    assert main(["eval"]) == 0
    assert "bundled eval set (n=2000)" in capsys.readouterr().out


@pytest.mark.slow
def test_wheel_ships_the_bundled_models(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sdcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in MODELS:
        assert f"sdcompress/models/{name}/model.pt" in names and f"sdcompress/models/{name}/model.json" in names
    assert f"sdcompress/models/{EVAL_SET}" in names
