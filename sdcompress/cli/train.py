"""`sdcompress train`: train a stochastic-depth ResNet."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from .common import OUT_ROOT, _bool, _fresh_out, _positive_int, _precision_arg


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _p_last(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _arch(s: str) -> str:
    from ..nets import ARCHS

    if ":" in s or s in ARCHS:
        return s
    raise argparse.ArgumentTypeError(f"unknown architecture {s!r}; choose one of {', '.join(ARCHS)}, or torchvision:NAME, timm:NAME, "
                                     f"python:package.module:function")


def add_parser(sub) -> None:
    from ..config import TrainConfig
    from ..nets import ARCHS
    from ..survival import SURVIVAL_RULES

    p = sub.add_parser("train", help="train a network with stochastic depth", description="Train a network with stochastic depth: the project's CIFAR ResNets, or a torchvision or timm residual network.")
    d = TrainConfig()
    p.add_argument("--arch", default=d.arch, type=_arch, metavar="ARCH",
                   help=f"{', '.join(ARCHS)}; or torchvision:NAME (resnet18, mobilenet_v2, convnext_tiny, ...) or timm:NAME; or your "
                        f"own class, python:package.module:function (its builder, imported because you name it; see the README)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="start from a pretrained network's state_dict (or a checkpoint holding one under 'state_dict'): stochastic "
                        "depth retrofitted onto it; the project's ResNets get 1/p_l folded into each block's last BatchNorm so "
                        "that the evaluation-time network starts as the pretrained one (default: random weights)")
    p.add_argument("--weights-map", default=None, metavar="OLD=NEW,...",
                   help="rename the weights' key prefixes (default: the project's names, or the common CIFAR ResNet layout "
                        "conv1/bn1/layerS.i/linear, found by itself)")
    p.add_argument("--mean", type=_floats, default=None, metavar="M,M,M",
                   help="input normalization mean, one per channel, of the pretrained network (default: the data's own)")
    p.add_argument("--std", type=_floats, default=None, metavar="S,S,S", help="input normalization std, with --mean")
    p.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                   help="train on the first N images of the shuffled training split only")
    p.add_argument("--data", default=d.data, help="digits | cifar10 | cifar100 | svhn | mnist | fashion-mnist | FILE.npz | FOLDER")
    p.add_argument("--data-dir", default=None, help="folder of a torchvision dataset (never downloaded)")
    p.add_argument("--val-size", type=int, default=None, help="images held out for validation (default 5000 for CIFAR, else 10%%)")
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--nesterov", type=_bool, default=d.nesterov, metavar="on|off")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=["cosine", "step"])
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear learning-rate warmup (default 0, as the paper)")
    p.add_argument("--survival-rule", default=d.survival_rule, choices=list(SURVIVAL_RULES))
    p.add_argument("--p-last", type=_p_last, default=d.p_last, help="survival probability of the last block, in (0, 1]")
    p.add_argument("--augment", default=d.augment, choices=["auto", "standard", "crop", "none"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    _precision_arg(p, d.precision)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, metavar="E",
                   help="cross-entropy against smoothed labels, (1 - E) one-hot + E / classes (default 0)")
    p.add_argument("--compile", type=_bool, default=d.compile, metavar="on|off",
                   help="torch.compile each residual branch once (static graphs; dropped blocks are still skipped); the "
                        "project's ResNets only (default off)")
    p.add_argument("--stats-window", type=_positive_int, default=d.stats_window)
    p.add_argument("--contrib-every", type=int, default=d.contrib_every)
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm over the global batch (default: per-process BN)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder (default sdcompress-out/ARCH-DATA-train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete epoch")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from tqdm import tqdm

    from ..config import TrainConfig
    from ..train import train
    from .user import is_python, run_train

    if is_python(a.arch):
        return run_train(a)

    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    out = a.out or OUT_ROOT / f"{cfg.arch.replace(':', '-')}-{Path(cfg.data).stem}-train"
    if not a.resume:
        _fresh_out(out, a.force)

    def on_epoch(r):
        val = f"  val top-1 {r.val_top1:.4f}" if r.val_top1 is not None else ""
        tqdm.write(f"epoch {r.epoch:>3}/{cfg.epochs}  loss {r.train_loss:.4f}  train top-1 {r.train_top1:.4f}{val}  "
              f"{r.images_per_s:.0f} img/s  {r.epoch_s:.1f} s")

    from ..distributed import launched_by_torchrun, teardown

    try:
        _, meta = train(cfg, out, resume=a.resume, progress=not a.no_progress, on_epoch=on_epoch)
    finally:
        teardown()
    if launched_by_torchrun() and os.environ["RANK"] != "0":
        return 0  # rank 0 reports
    m = meta.metrics
    val = f"val top-1 {m['val_top1']:.4f}" if m.get("val_top1") is not None else "no validation split"
    print(f"wrote {out}/model.pt  {val}  epochs {m['epochs']}  wall {m['wall_s']} s  device {m['device']}  "
          f"{m.get('precision', 'fp32')} ({m.get('memory_format', 'contiguous (NCHW)')})")
    return 0
