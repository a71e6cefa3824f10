"""`sdcompress eval`: top-1 accuracy of a checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .common import _ckpt_arg, _positive_int, _resolve_ckpt


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a checkpoint", description="Evaluate a checkpoint.")
    _ckpt_arg(p)
    p.add_argument("--data", default=None, help="default: the bundled evaluation set for bundled models, else the training data")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="auto", choices=["auto", "val", "test", "train", "all"],
                   help="auto: the test split if the data has one; else, on the checkpoint's own training data, the validation "
                        "split held out in training, and on any other data every image")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="images per evaluation batch")
    p.add_argument("--json", type=Path, default=None, help="write a report.json here")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=run)


_SPLITS = {"all": "every image", "test": "test split", "val": "validation split held out in training", "train": "training split"}


def run(a) -> int:
    from ..checkpoint import load_checkpoint, resolve
    from ..files import atomic_write_json, check_output_file
    from ..evaluate import evaluate_checkpoint
    from ..report import model_report

    path = _resolve_ckpt(a.ckpt)
    check_output_file(a.json, a.force, "--json", (path,))
    model, meta = load_checkpoint(path)
    acc = evaluate_checkpoint(model, meta, path, a.data, a.data_dir, a.split, a.batch_size)
    print(f"{meta.spec.arch}  blocks {len(model.block_ids)}/{model.spec.blocks_total}  "
          f"top-1 {acc['top1']:.4f}  loss {acc['loss']:.4f}  on {acc['dataset']} ({_SPLITS[acc['split']] + ', ' if acc['split'] else ''}n={acc['n']})")
    if a.json:
        atomic_write_json(a.json, model_report(model, meta.data.input_shape, resolve(path)[0], acc))
        print(f"wrote {a.json}")
    return 0
