"""`sdcompress sweep`: the accuracy / size / latency tradeoff across keep fractions and 1-bit weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .common import OUT_ROOT, _bool, _ckpt_arg, _model_name, _names, _positive_int, _precision_arg, _resolve_ckpt, _threads


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _onoff_list(s: str) -> tuple[bool, ...]:
    return tuple(_bool(v.strip()) for v in s.split(",") if v.strip())


def add_parser(sub) -> None:
    from ..pruning import STRATEGIES
    from ..sweep import SweepConfig

    d = SweepConfig()
    p = sub.add_parser("sweep", help="the accuracy / size / latency tradeoff across keep fractions and 1-bit weights",
                       description="For every keep fraction, with and without 1-bit weights: prune (BatchNorm recalibrated), "
                                   "binarize, export, verify, measure top-1, parameters, MACs, file sizes and onnxruntime "
                                   "latency. Writes DIR/sweep.json, DIR/sweep.md and DIR/tradeoff.png; finished points are reused.")
    _ckpt_arg(p)
    p.add_argument("--keep", type=_floats, default=d.keeps, metavar="1.0,0.9,...", help="keep fractions (default 1.0,0.9,...,0.4)")
    p.add_argument("--binarize", type=_onoff_list, default=d.binarize, metavar="off,on", help="without and/or with 1-bit weights (default off,on)")
    p.add_argument("--formats", type=_names, default=d.formats, metavar="onnx,ort,coreml", help="files to export and verify per point (also pte: ExecuTorch, an optional extra)")
    p.add_argument("--strategy", default=d.strategy, choices=list(STRATEGIES))
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS", help="fine-tuning epochs after pruning and binarizing (needs --data)")
    p.add_argument("--distill", type=_bool, default=d.distill, metavar="on|off",
                   help="fine-tune from the model before each stage as teacher as well as from the labels (default on)")
    p.add_argument("--depth-family", type=_bool, default=d.depth_family, metavar="on|off",
                   help="also export the float keeps as one depth family in DIR/family (one Core ML package with a function "
                        "per keep, as `export --depths`) and set each nested depth beside the point pruned alone (default off)")
    _precision_arg(p, d.precision)
    p.add_argument("--coreml-precision", choices=("float16", "float32"), default=d.coreml_precision, help="Core ML compute precision and weights")
    p.add_argument("--threads", type=_threads, default=d.threads, help="onnxruntime threads for every latency figure")
    p.add_argument("--data", default=None, help="evaluation and calibration data (default: the bundled sets for bundled models)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default sdcompress-out/NAME-sweep)")
    p.add_argument("--force", action="store_true", help="redo points already measured in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..sweep import SweepConfig, run_sweep

    if a.finetune < 0:
        raise InputError(f"--finetune must be >= 0, got {a.finetune}")
    cfg = SweepConfig(keeps=a.keep, binarize=a.binarize, formats=a.formats, strategy=a.strategy, finetune=a.finetune,
                      distill=a.distill, precision=a.precision, coreml_precision=a.coreml_precision, threads=a.threads,
                      depth_family=a.depth_family)
    path = _resolve_ckpt(a.ckpt)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or folder")
    name = _model_name(path)
    out = a.out or OUT_ROOT / f"{name}-sweep"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    s = run_sweep(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress, force=a.force)
    from ..sweep import render_markdown

    print(render_markdown(s).split("![tradeoff]")[0].rstrip())
    print(f"wrote {out}/sweep.json, {out}/sweep.md, {out}/tradeoff.png ({s['reused_points']} of {len(s['points'])} points reused)")
    return 0
