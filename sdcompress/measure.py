"""`sdcompress stats --measure`: drop effects of a finished checkpoint, without training.

Random subsets of blocks are removed on batches of training images at evaluation time (block l with
probability (l+1)/L x max_drop, the stochastic depth paper's linear rule), the loss of each batch is regressed on
the removal indicators (`api.measure_drop_effects`), and the effects with their standard errors are written into
the sidecar of a new checkpoint folder (the weights unchanged, `survival_stats.source` = "measured"), which
`prune --strategy stats` then reads like the statistics of training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .api import find_blocks, measure_drop_effects
from .checkpoint import Sidecar, load_checkpoint, save_checkpoint
from .config import check_number
from .data import Normalize
from .evaluate import calibration_images
from .files import atomic_write_json, check_output_folder, output_folder
from .report import plot_stats


def run_measure(ckpt, out: Path, data=None, data_dir=None, batches: int = 40, rounds: int = 3, batch_size: int = 128,
                max_drop: float = 0.5, seed: int = 0) -> Sidecar:
    """Measure the drop effects of a checkpoint on training images and write it, with them, into `out`."""
    check_number("--batches", batches, 1, 100_000)
    check_number("--rounds", rounds, 1, 1_000)
    check_number("--max-drop", max_drop, 0.0, 1.0, lo_open=True, hi_open=True)
    check_output_folder(out, force=True, inputs=(ckpt,))
    model, meta = load_checkpoint(ckpt)
    images, _, source = calibration_images(meta, ckpt, data, data_dir)  # training images, never evaluation data
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    norm = Normalize(meta.data.mean, meta.data.std)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    work = [(norm(images.images[c]), images.labels[c]) for c in chunks if len(c) == batch_size or len(chunks) == 1]
    blocks = find_blocks(model)
    fx = measure_drop_effects(model, work, blocks, rounds=rounds, max_drop=max_drop, seed=seed)
    number = {model.spec.block_path(n): n for n in model.block_ids}  # module path -> block number of the spec
    d = meta.to_dict()
    d["survival_stats"] = fx.to_table(number, meta.spec.blocks_total, meta.survival_stats)
    d["stages"] = d["stages"] + [{"stage": "measure", "config": {"batches": len(work), "rounds": rounds, "batch_size": batch_size,
                                                                 "max_drop": max_drop, "seed": seed}, "data": source}]
    new = Sidecar.from_dict(d)
    with output_folder(out) as folder:
        save_checkpoint(folder, model, new)
        atomic_write_json(folder / "stats.json", d["survival_stats"])
        plot_stats(new, folder / "stats.png")
    return new
