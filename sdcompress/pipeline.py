"""Stages run on checkpoints: load, measure before, transform, save, measure after, report."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, resolve, save_checkpoint
from .data import Normalize
from .evaluate import calibration_images, eval_data
from .errors import InputError
from .prune import PruneConfig, prune_model
from .report import format_stats_table, model_report, plot_stats, prune_markdown
from .train import evaluate, finetune


def _accuracy(model, meta, images, name) -> dict | None:
    if images is None:
        return None
    acc = evaluate(model, images, Normalize(meta["data"]["mean"], meta["data"]["std"]))
    return {"top1": acc["top1"], "dataset": name, "n": acc["n"]}


def run_prune(ckpt: str | Path, cfg: PruneConfig, out: Path, data: str | None = None, data_dir: str | None = None,
              device: str = "auto", progress: bool = True) -> dict:
    """Prune a checkpoint into `out` (model.pt, model.json, report.json, report.md, blocks.png)."""
    model, meta = load_checkpoint(ckpt)
    weights = resolve(ckpt)[0]
    try:
        images, eval_name = eval_data(meta, ckpt, data, data_dir)
    except InputError:
        if data is not None:
            raise
        images, eval_name = None, None  # the training data is not here: report no accuracy
    need_train = bool(cfg.recalibrate) or cfg.finetune or cfg.strategy == "sensitivity"
    calib, ds, calib_name = calibration_images(meta, ckpt, data, data_dir) if need_train else (None, None, None)
    before = model_report(model, meta, weights, _accuracy(model, meta, images, eval_name))

    def tune(m):
        if ds is None:
            raise InputError("--finetune needs the training data: pass --data (and --data-dir)")
        return finetune(m, ds, cfg.finetune, cfg.finetune_lr, cfg.finetune_survival, seed=cfg.seed, device=device, progress=progress)

    pruned, record = prune_model(model, meta, cfg, calib, tune)
    pruned = pruned.cpu()
    record.update(config=cfg.to_dict(), calibration_data=calib_name)
    new_meta = copy.deepcopy(meta)
    new_meta["stages"] = meta.get("stages", []) + [{"stage": "prune", "config": cfg.to_dict(), "removed": record["removed"],
                                                    "recalibrated_images": record["recalibrated_images"], "finetune": record["finetune"]}]
    after_acc = _accuracy(pruned, meta, images, eval_name)
    new_meta["metrics"] = {"top1": after_acc and after_acc["top1"], "dataset": eval_name}
    save_checkpoint(out, pruned, new_meta)
    after = model_report(pruned, new_meta, out / "model.pt", after_acc)
    report = {"schema": "sdcompress.report/1", "stage": "prune", "before": before, "after": after, "prune": record}
    new_meta = {**new_meta, "spec": pruned.spec.to_dict()}
    if isinstance(new_meta.get("survival_stats"), dict):
        plot_stats(new_meta, out / "blocks.png")
        table = format_stats_table(new_meta)
    else:
        table = "(no survival statistics in this checkpoint)"
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", prune_markdown(report, table).encode())
    assert os.path.getsize(out / "model.pt") == after["bytes"]["checkpoint"]
    return report
