"""Write the bundled evaluation set (test images) or calibration set (training images).

With `--split all` the pool is a folder of images no bundled model trained on (the CIFAR-10 test images of
`../shared/data/cifar10-test`), and the first N of a seeded permutation of it are taken. With `--split train` or
`val` the pool is the CIFAR-10 training folder in ImageFolder order, split as `sdcompress train` splits it (seeded
permutation, 5,000 validation images first), and the first N images of that split are taken. The images are
stored as their original JPEG bytes (so nothing is re-encoded), with labels, class names, their index in the pool
and their file names.

    python tools/make_eval_set.py ../shared/data/cifar10-test models/cifar10-test2k.npz --n 2000 --split all
    python tools/make_eval_set.py ../shared/data/cifar10 models/cifar10-calib.npz --n 2560 --split train
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.files import atomic_write_bytes  # noqa: E402
from sdcompress.data import default_val_size, list_image_folder, split_indices  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--split", choices=["all", "val", "train"], default="all")
    args = ap.parse_args()
    root = args.data_dir / "train" if (args.data_dir / "train").is_dir() else args.data_dir
    files, labels, classes = list_image_folder(root)
    if args.split == "all":
        chosen = np.random.default_rng(args.split_seed).permutation(len(files))[: args.n].tolist()
    else:
        train_idx, val_idx = split_indices(len(files), default_val_size(len(files)), args.split_seed)
        chosen = (val_idx if args.split == "val" else train_idx)[: args.n].tolist()
    blobs = [files[i].read_bytes() for i in chosen]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    buf = io.BytesIO()
    np.savez(
        buf,
        jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8),
        offsets=offsets,
        y=np.array([labels[i] for i in chosen], dtype=np.uint8),
        classes=np.array(classes),
        pool_index=np.array(chosen, dtype=np.int32),
        files=np.array([f"{files[i].parent.name}/{files[i].name}" for i in chosen]),
    )
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {len(chosen)} images, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
