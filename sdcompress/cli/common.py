"""Argument types and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

OUT_ROOT = Path("sdcompress-out")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def cores() -> int:
    """CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _threads(s: str) -> int:
    """A thread count from 1 to this machine's cores: more only oversubscribes them (and each thread costs memory)."""
    v = _positive_int(s)
    if v > cores():
        raise argparse.ArgumentTypeError(f"must be 1 to {cores()} (this machine's cores), got {v}")
    return v


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {s!r}")


def _names(s: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one layer")
    return names


def _fresh_out(out: Path, force: bool, inputs: tuple = ()) -> Path:
    """An output folder checked before any work (see checkpoint.check_output_folder)."""
    from ..files import check_output_folder

    return check_output_folder(out, force, inputs)


def _ckpt_arg(p) -> None:
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint file or folder (default: the bundled model)")


def _model_name(path: Path) -> str:
    """The name output folders are called after: the checkpoint's folder."""
    from ..files import checkpoint_folder

    return checkpoint_folder(path).name


def _resolve_ckpt(ckpt):
    from ..zoo import bundled

    return Path(ckpt) if ckpt else bundled()


def _precision_arg(p, default: str) -> None:
    from ..precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=default,
                   help="of the training steps: auto (bf16 autocast and channels_last where the device runs bf16 fast: CUDA "
                        "with bf16, a CPU with AMX; else fp32), fp32 or bf16; weights stay float32")


def _finetune_line(record: dict | None) -> str | None:
    """What a stage's fine-tuning ran: epochs, precision and layout, time."""
    if not record:
        return None
    return (f"fine-tuned {record['epochs']} epochs at lr {record['lr']:g}{' (distilled)' if record.get('distill') else ''}, "
            f"{record.get('precision', 'fp32')} ({record.get('memory_format', 'contiguous (NCHW)')}), {record['seconds']:.0f} s")


def _recovery_args(p, d, out_default: str) -> None:
    """Flags shared by the stages that change a trained network: recovery, data, output."""
    p.add_argument("--recalibrate", type=int, default=d.recalibrate, metavar="N", help="BatchNorm recalibration batches (0: off)")
    p.add_argument("--finetune", type=int, default=d.finetune, metavar="EPOCHS", help="fine-tuning epochs afterwards (needs --data)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-survival", type=_bool, default=d.finetune_survival, metavar="on|off",
                   help=f"stochastic depth while fine-tuning (default {'on' if d.finetune_survival else 'off'})")
    p.add_argument("--distill", type=_bool, default=d.distill, metavar="on|off",
                   help=f"fine-tune from the model before this stage as teacher as well as from the labels (default {'on' if d.distill else 'off'})")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature, metavar="T",
                   help=f"softmax temperature of the teacher's and student's outputs (default {d.distill_temperature:g})")
    p.add_argument("--distill-alpha", type=float, default=d.distill_alpha, metavar="A",
                   help=f"weight of the teacher's term; 1 - A on the labels (default {d.distill_alpha:g})")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="fine-tune from this checkpoint as teacher instead of the model before this stage (e.g. the unpruned "
                        "float model when binarizing a pruned one); same input and classes")
    _precision_arg(p, d.precision)
    p.add_argument("--data", default=None, help="training data for recalibration/fine-tuning, and evaluation data (default: bundled sets or the checkpoint's data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the recalibration batches, the sensitivity sample and fine-tuning")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {out_default})")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true")
