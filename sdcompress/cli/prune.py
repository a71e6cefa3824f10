"""`sdcompress prune`: remove whole blocks by their learned survival statistics."""

from __future__ import annotations

import argparse
import sys

from .common import OUT_ROOT, _ckpt_arg, _finetune_line, _fresh_out, _model_name, _positive_int, _recovery_args, _resolve_ckpt


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1000, "m": 1000**2}


def parse_size(s: str) -> int:
    """'200KiB', '1.5MiB', '300000', '300k' -> a whole number."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise argparse.ArgumentTypeError(f"expected a number with an optional unit (B, KiB, MiB, kB, MB, k, M), got {s!r}")
    v = float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)
    if int(v) <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s!r}")
    return int(v)


def _keep(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _block_list(s: str) -> tuple[int, ...]:
    try:
        blocks = tuple(sorted({int(b) for b in s.split(",") if b.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {s!r}") from None
    if not blocks:
        raise argparse.ArgumentTypeError("name at least one block")
    return blocks


def add_parser(sub) -> None:
    from ..pruning import BLOCK_SCALES, STRATEGIES, PruneConfig

    d = PruneConfig()
    p = sub.add_parser("prune", help="remove whole blocks by their learned survival statistics",
                       description="Remove whole residual blocks, recalibrate BatchNorm, optionally fine-tune.")
    _ckpt_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=_keep, default=d.keep, help="fraction of the blocks kept, rounded to whole blocks (default 0.6)")
    g.add_argument("--blocks-to-keep", type=_block_list, default=None, metavar="0,2,5,...")
    g.add_argument("--max-size", type=parse_size, default=None, metavar="SIZE", help="keep the most blocks whose model.pt fits, e.g. 1MiB")
    g.add_argument("--max-params", type=parse_size, default=None, metavar="N", help="keep the most blocks whose parameters fit, e.g. 300k")
    p.add_argument("--strategy", default=d.strategy, choices=list(STRATEGIES))
    p.add_argument("--sensitivity-batches", type=_positive_int, default=d.sensitivity_batches)
    p.add_argument("--block-scale", default=d.block_scale, choices=list(BLOCK_SCALES),
                   help="what a kept block adds at evaluation, p_l^t f(x): survival (t = 1, the stochastic depth rule), unit (t = 0, f(x) as in "
                        "a training step where it ran), auto (default: the lowest loss on training images after recalibration, trying 1 and 0, "
                        "then below 0 in steps of 0.5 while the loss falls, else 0.5)")
    p.add_argument("--arch", default=None, metavar="python:PACKAGE.MODULE:FUNCTION",
                   help="your own model class: the builder of the model in CKPT, a folder written by `sdcompress train --arch "
                        "python:...` or sdcompress.save; imported because you name it here, never because a file does")
    _recovery_args(p, d, "sdcompress-out/NAME-prune-keepK")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..pruning import PruneConfig
    from ..pipeline import run_prune
    from .user import check_arch, run_prune as run_user_prune

    if a.arch is not None:
        check_arch(a.arch, "prune")
        return run_user_prune(a)

    cfg = PruneConfig(keep=None if (a.blocks_to_keep or a.max_size or a.max_params) else a.keep, blocks_to_keep=a.blocks_to_keep,
                      max_size=a.max_size, max_params=a.max_params, strategy=a.strategy, recalibrate=a.recalibrate,
                      sensitivity_batches=a.sensitivity_batches, block_scale=a.block_scale, finetune=a.finetune, finetune_lr=a.finetune_lr,
                      finetune_survival=a.finetune_survival, seed=a.seed, distill=a.distill,
                      distill_temperature=a.distill_temperature, distill_alpha=a.distill_alpha, teacher=a.teacher, precision=a.precision)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    tag = f"keep{a.keep}" if cfg.keep is not None else "budget" if cfg.blocks_to_keep is None else "blocks"
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-prune-{tag}", a.force, (path, a.teacher))
    report = run_prune(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress)
    from ..report import summary_line

    warning = report["prune"]["ranking"]["warning"]
    if warning:
        print(f"sdcompress prune: warning: {warning}", file=sys.stderr)
    print(summary_line(report["before"], report["after"]))
    if _finetune_line(report["prune"]["finetune"]):
        print(_finetune_line(report["prune"]["finetune"]))
    print(f"wrote {out}/model.pt, {out}/report.json, {out}/report.md")
    return 0
