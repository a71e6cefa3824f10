import numpy as np
import pytest
import torch

from sdcompress.data import augment, load_dataset
from sdcompress.errors import InputError
from tests.conftest import CIFAR_DIR


def test_digits_split_is_seeded_and_disjoint():
    a = load_dataset("digits", seed=1)
    b = load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    assert a.input_shape == (1, 8, 8) and len(a.classes) == 10
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == 180
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert a.train.images.dtype == torch.uint8


def test_npz_nhw_and_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "g.npz", x=rng.integers(0, 255, (40, 12, 12), dtype=np.uint8), y=np.arange(40) % 4)
    np.savez(tmp_path / "c.npz", x=rng.integers(0, 255, (40, 12, 12, 3), dtype=np.uint8), y=np.arange(40) % 4)
    assert load_dataset(str(tmp_path / "g.npz")).input_shape == (1, 12, 12)
    ds = load_dataset(str(tmp_path / "c.npz"), val_size=8)
    assert ds.input_shape == (3, 12, 12) and len(ds.val) == 8 and ds.classes == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "x,y,match",
    [
        (np.zeros((10, 8, 8), np.float32), np.zeros(10, int), "uint8"),
        (np.zeros((10, 8), np.uint8), np.zeros(10, int), "NHWC"),
        (np.zeros((10, 8, 8), np.uint8), np.zeros(9, int), "one label per image"),
        (np.zeros((10, 8, 8), np.uint8), -np.ones(10, int), ">= 0"),
        (np.zeros((10, 8, 8), np.uint8), np.zeros(10, float), "integers"),
    ],
)
def test_bad_npz(tmp_path, x, y, match):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(InputError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_missing_data_and_missing_torchvision_dir(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(InputError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(InputError, match="never downloads"):
        load_dataset("svhn", str(tmp_path))


def test_image_folder_with_train_and_test(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(str(tmp_path), val_size=2)
    assert ds.classes == ["cat", "dog"] and len(ds.test) == 12 and len(ds.train) == 10
    assert ds.input_shape == (3, 10, 10)


def test_augment_crops_by_shifting_and_flips():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(4, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    outs = [augment(x, 2, True, g) for _ in range(20)]
    for y in outs:
        assert y.shape == x.shape and y.dtype == torch.uint8
        for n in range(4):
            # every output is a shifted window of the zero-padded (possibly flipped) image
            padded = torch.nn.functional.pad(x[n], (2, 2, 2, 2))
            found = any(
                torch.equal(y[n], w[:, dy : dy + 8, dx : dx + 8])
                for w in (padded, padded.flip(2))
                for dy in range(5)
                for dx in range(5)
            )
            assert found
    assert any(not torch.equal(y, x) for y in outs)


def test_cifar10_image_folder_has_standard_labels(cifar10):
    assert cifar10.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(cifar10.train) == 45000 and len(cifar10.val) == 5000
    assert cifar10.input_shape == (3, 32, 32)
    counts = torch.bincount(torch.cat([cifar10.train.labels, cifar10.val.labels]), minlength=10)
    assert counts.tolist() == [5000] * 10
    # ImageFolder order: class folder name -> standard CIFAR-10 id
    from sdcompress.data import list_image_folder

    files, labels, classes = list_image_folder(CIFAR_DIR / "train")
    assert files[0].parent.name == "airplane" and labels[0] == 0 and files[-1].parent.name == "truck" and labels[-1] == 9
    assert np.allclose(cifar10.mean, [0.491, 0.482, 0.447], atol=0.003)
