"""More stochastic-depth epochs for a command-line checkpoint, through the Python API, resumable.

Loads a checkpoint (default: the bundled `models/resnet56-sd`), trains it on with `train_stochastic_depth` (its own
survival rule and p_L, a cosine schedule from --lr) on the 45,000-image training split of `../shared/data/cifar10`
(seed 0, with the checkpoint's own augmentation and normalization), optionally learning from the checkpoint as it
was (`--teacher`: distillation, T 4, alpha 0.9), and saves the result as a checkpoint every command reads
(`OUT/model`). The state after every epoch is `OUT/state.pt`: rerun the same command to go on.

    python tools/continue_retrofit.py --epochs 8 --lr 0.01 --out runs/cont
    python tools/continue_retrofit.py --epochs 8 --lr 0.01 --teacher --out runs/contkd

Then, as for the bundled model: `sdcompress eval OUT/model --data ../shared/data/cifar10-test` and
`sdcompress prune OUT/model --keep 0.6 --data ../shared/data/cifar10 --out OUT/k06`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdcompress  # noqa: E402
from sdcompress.data import ImageBatches, load_dataset, train_augmentation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", default=str(ROOT / "models" / "resnet56-sd"), help="a command-line checkpoint folder")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--teacher", action="store_true", help="distil from the start checkpoint as it was (full depth)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, side = sdcompress.load(args.start)
    meta = side["checkpoint"]
    pad, flip = train_augmentation(meta)  # as the checkpoint was trained
    ds = load_dataset("cifar10", args.data_dir)
    train = ImageBatches(ds.train, meta.data.mean, meta.data.std, 128, train=True, pad=pad, flip=flip)
    args.out.mkdir(parents=True, exist_ok=True)
    state = args.out / "state.pt"
    t = time.perf_counter()
    trained = sdcompress.train_stochastic_depth(model, train, args.epochs, lr=args.lr, recalibrate_batches=0, progress=True,
                                                checkpoint=state, resume=state.exists(), teacher=model if args.teacher else None)
    print("history", json.dumps({k: v for k, v in trained.history.items() if k != "survival"}), flush=True)
    sdcompress.save(trained.model, args.out / "model", stats=trained.stats, checkpoint=side["checkpoint"], force=True)
    print(f"wrote {args.out / 'model'} ({time.perf_counter() - t:.0f} s in this call)", flush=True)


if __name__ == "__main__":
    main()
