"""`sdcompress binarize`: 1-bit weights (sign * per-channel alpha), stored as bits."""

from __future__ import annotations

import sys

from .common import OUT_ROOT, _ckpt_arg, _finetune_line, _fresh_out, _model_name, _names, _recovery_args, _resolve_ckpt


def add_parser(sub) -> None:
    from ..binarization import BinarizeConfig
    from ..pruning import BLOCK_SCALES

    d = BinarizeConfig()
    p = sub.add_parser("binarize", help="1-bit weights (sign * per-channel alpha), stored as bits",
                       description="Binarize the conv weights inside the residual blocks; optionally fine-tune with the STE.")
    _ckpt_arg(p)
    p.add_argument("--binarize-stem", action="store_true", help="binarize the first conv too")
    p.add_argument("--binarize-head", action="store_true", help="binarize the classifier too")
    p.add_argument("--full-precision", type=_names, default=(), metavar="LAYER,...", help="layers to keep in full precision, e.g. blocks.0.conv1")
    _recovery_args(p, d, "sdcompress-out/NAME-binarize")
    p.add_argument("--block-scale", default=d.block_scale, choices=list(BLOCK_SCALES),
                   help="without --finetune, what each block of a stochastic-depth network adds: p_l^t f(x), t chosen again on "
                        "training images for the 1-bit network (auto, default), or t = 1 (survival) or 0 (unit)")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..binarization import BinarizeConfig
    from ..pipeline import run_binarize
    from ..report import block_scale_text, format_bytes

    cfg = BinarizeConfig(a.binarize_stem, a.binarize_head, a.full_precision, a.recalibrate, a.finetune, a.finetune_lr,
                         a.finetune_survival, a.seed, a.distill, a.distill_temperature, a.distill_alpha, a.teacher, a.precision,
                         a.block_scale)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-binarize", a.force, (path, a.teacher))
    r = run_binarize(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress)
    b, f = r["before"], r["after"]
    acc = f", top-1 {100 * b['accuracy']['top1']:.1f}% -> {100 * f['accuracy']['top1']:.1f}%" if b.get("accuracy") and f.get("accuracy") else ""
    print(f"{len(r['binarize']['layers'])} layers binarized, 1-bit params {f['params']['by_bits'].get('1', 0):,}, "
          f"size {format_bytes(b['bytes']['checkpoint'])} -> {format_bytes(f['bytes']['checkpoint'])}{acc}")
    if r["binarize"].get("block_scale"):
        print(block_scale_text(r["binarize"]["block_scale"], "blocks").removeprefix("- "))
    if _finetune_line(r["binarize"]["finetune"]):
        print(_finetune_line(r["binarize"]["finetune"]))
    print(f"wrote {out}/model.pt, {out}/report.json, {out}/report.md")
    if not cfg.finetune:
        lost = (f" (top-1 {100 * b['accuracy']['top1']:.1f}% -> {100 * f['accuracy']['top1']:.1f}% here)"
                if b.get("accuracy") and f.get("accuracy") else "")
        print(f"sdcompress binarize: warning: not fine-tuned: 1-bit weights lose accuracy until they are trained{lost}; "
              f"--finetune EPOCHS --data DATA recovers it", file=sys.stderr)
    return 0
