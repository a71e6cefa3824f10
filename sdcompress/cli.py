"""The `sdcompress` command line: each subcommand parses flags, builds a config, calls the API and prints.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 anything else, 130 / 143 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from .errors import InputError, Terminated, check_interrupt, clear_pending, signal_received

OUT_ROOT = Path("sdcompress-out")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _p_last(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {s!r}")


def _fresh_out(out: Path, force: bool, inputs: tuple = ()) -> Path:
    """An output folder checked before any work (see checkpoint.check_output_folder)."""
    from .files import check_output_folder

    return check_output_folder(out, force, inputs)


# ---- train ---------------------------------------------------------------------------------------------------
def _arch(s: str) -> str:
    from .nets import ARCHS

    if ":" in s or s in ARCHS:
        return s
    raise argparse.ArgumentTypeError(f"unknown architecture {s!r}; choose one of {', '.join(ARCHS)}, or torchvision:NAME, timm:NAME")


def add_train(sub) -> None:
    from .config import TrainConfig
    from .nets import ARCHS
    from .survival import SURVIVAL_RULES

    p = sub.add_parser("train", help="train a stochastic-depth ResNet", description="Train a stochastic-depth ResNet.")
    d = TrainConfig()
    p.add_argument("--arch", default=d.arch, type=_arch, metavar="ARCH",
                   help=f"{', '.join(ARCHS)}; or torchvision:NAME (resnet18, mobilenet_v2, convnext_tiny, ...) or timm:NAME")
    p.add_argument("--weights", default=None, help="start a torchvision/timm model from this state_dict file (default: random weights)")
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
    p.add_argument("--amp", type=_bool, default=d.amp, metavar="on|off", help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", type=_bool, default=d.channels_last, metavar="on|off")
    p.add_argument("--stats-window", type=_positive_int, default=d.stats_window)
    p.add_argument("--contrib-every", type=int, default=d.contrib_every)
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm over the global batch (default: per-process BN)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder (default sdcompress-out/ARCH-DATA-train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete epoch")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(a) -> int:
    from tqdm import tqdm

    from .config import TrainConfig
    from .train import train

    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    out = a.out or OUT_ROOT / f"{cfg.arch.replace(':', '-')}-{Path(cfg.data).stem}-train"
    if not a.resume:
        _fresh_out(out, a.force)

    def on_epoch(r):
        val = f"  val top-1 {r.val_top1:.4f}" if r.val_top1 is not None else ""
        tqdm.write(f"epoch {r.epoch:>3}/{cfg.epochs}  loss {r.train_loss:.4f}  train top-1 {r.train_top1:.4f}{val}  "
              f"{r.images_per_s:.0f} img/s  {r.epoch_s:.1f} s")

    from .distributed import launched_by_torchrun, teardown

    try:
        _, meta = train(cfg, out, resume=a.resume, progress=not a.no_progress, on_epoch=on_epoch)
    finally:
        teardown()
    if launched_by_torchrun() and os.environ["RANK"] != "0":
        return 0  # rank 0 reports
    m = meta.metrics
    val = f"val top-1 {m['val_top1']:.4f}" if m.get("val_top1") is not None else "no validation split"
    print(f"wrote {out}/model.pt  {val}  epochs {m['epochs']}  wall {m['wall_s']} s  device {m['device']}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------------
def _ckpt_arg(p) -> None:
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint file or folder (default: the bundled model)")


def _model_name(path: Path) -> str:
    """The name output folders are called after: the checkpoint's folder."""
    from .files import checkpoint_folder

    return checkpoint_folder(path).name


def _resolve_ckpt(ckpt):
    from .zoo import bundled

    return Path(ckpt) if ckpt else bundled()


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a checkpoint", description="Evaluate a checkpoint.")
    _ckpt_arg(p)
    p.add_argument("--data", default=None, help="default: the bundled evaluation set for bundled models, else the training data")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="auto", choices=["auto", "val", "test", "train", "all"],
                   help="auto: the test split if the data has one; else, on the checkpoint's own training data, the validation "
                        "split held out in training, and on any other data every image")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--json", type=Path, default=None, help="write a report.json here")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=cmd_eval)


_SPLITS = {"all": "every image", "test": "test split", "val": "validation split held out in training", "train": "training split"}


def cmd_eval(a) -> int:
    from .checkpoint import load_checkpoint, resolve
    from .files import atomic_write_json
    from .evaluate import evaluate_checkpoint
    from .report import model_report

    if a.json and a.json.exists() and not a.force:
        raise InputError(f"--json {a.json}: exists; pass --force to overwrite")
    path = _resolve_ckpt(a.ckpt)
    model, meta = load_checkpoint(path)
    acc = evaluate_checkpoint(model, meta, path, a.data, a.data_dir, a.split, a.batch_size)
    print(f"{meta.spec.arch}  blocks {len(model.block_ids)}/{model.spec.blocks_total}  "
          f"top-1 {acc['top1']:.4f}  loss {acc['loss']:.4f}  on {acc['dataset']} ({_SPLITS[acc['split']] + ', ' if acc['split'] else ''}n={acc['n']})")
    if a.json:
        atomic_write_json(a.json, model_report(model, meta.data.input_shape, resolve(path)[0], acc))
        print(f"wrote {a.json}")
    return 0


# ---- stats ---------------------------------------------------------------------------------------------------
def add_stats(sub) -> None:
    p = sub.add_parser("stats", help="per-block survival statistics (table + PNG)", description="Show survival statistics.")
    _ckpt_arg(p)
    p.add_argument("--out", type=Path, default=None, help="folder for stats.png and stats.json, and with --measure the "
                   "checkpoint with measured statistics (default sdcompress-out/NAME-stats, NAME-measured)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--measure", action="store_true", help="measure drop effects without training: random removals on "
                   "training images at evaluation time, loss regressed on them; writes a checkpoint with them")
    p.add_argument("--data", default=None, help="with --measure: training images (default: the bundled calibration set or the checkpoint's data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=_positive_int, default=40, help="with --measure: batches of 128 images (default 40)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="with --measure: passes over the batches, new draws each (default 3)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_stats)


def cmd_stats(a) -> int:
    from .checkpoint import read_sidecar, resolve
    from .files import atomic_write_json, output_folder
    from .report import format_stats_table, plot_stats

    path = _resolve_ckpt(a.ckpt)
    meta = read_sidecar(resolve(path)[1])
    if a.measure:
        from .measure import run_measure

        out = _fresh_out(a.out or OUT_ROOT / f"{resolve(path)[0].parent.name}-measured", a.force, (path,))
        meta = run_measure(path, out, a.data, a.data_dir, a.batches, a.rounds)
        print(format_stats_table(meta))
        print(f"wrote {out}/model.pt, {out}/model.json (measured drop effects), {out}/stats.png")
        return 0
    if meta.survival_stats is None:
        raise InputError(f"{path}: the checkpoint holds no survival statistics (was it trained by sdcompress?)")
    name = resolve(path)[0].parent.name
    out = a.out or OUT_ROOT / f"{name}-stats"
    if not a.no_plot:
        _fresh_out(out, a.force, (path,))
    print(format_stats_table(meta))
    if not a.no_plot:
        with output_folder(out) as folder:
            atomic_write_json(folder / "stats.json", meta.raw["survival_stats"])
            plot_stats(meta, folder / "stats.png")
        print(f"wrote {out}/stats.png, {out}/stats.json")
    return 0


# ---- prune ---------------------------------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1000, "m": 1000**2}


def parse_size(s: str) -> int:
    """'200KiB', '1.5MiB', '300000', '300k' -> a whole number."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise argparse.ArgumentTypeError(f"expected a number with an optional unit (B, KiB, MiB, kB, MB, k, M), got {s!r}")
    v = float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
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


def _recovery_args(p, d, out_default: str) -> None:
    """Flags shared by the stages that change a trained network: recovery, data, output."""
    p.add_argument("--recalibrate", type=int, default=d.recalibrate, metavar="N", help="BatchNorm recalibration batches (0: off)")
    p.add_argument("--finetune", type=int, default=d.finetune, metavar="EPOCHS", help="fine-tuning epochs afterwards (needs --data)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-survival", type=_bool, default=d.finetune_survival, metavar="on|off",
                   help=f"stochastic depth while fine-tuning (default {'on' if d.finetune_survival else 'off'})")
    p.add_argument("--data", default=None, help="training data for recalibration/fine-tuning, and evaluation data (default: bundled sets or the checkpoint's data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {out_default})")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true")


def add_prune(sub) -> None:
    from .pruning import STRATEGIES, PruneConfig

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
    _recovery_args(p, d, "sdcompress-out/NAME-prune-keepK")
    p.set_defaults(func=cmd_prune)


def cmd_prune(a) -> int:
    from .pruning import PruneConfig
    from .pipeline import run_prune

    cfg = PruneConfig(keep=None if (a.blocks_to_keep or a.max_size or a.max_params) else a.keep, blocks_to_keep=a.blocks_to_keep,
                      max_size=a.max_size, max_params=a.max_params, strategy=a.strategy, recalibrate=a.recalibrate,
                      sensitivity_batches=a.sensitivity_batches, finetune=a.finetune, finetune_lr=a.finetune_lr,
                      finetune_survival=a.finetune_survival, seed=a.seed)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    tag = f"keep{a.keep}" if cfg.keep is not None else "budget" if cfg.blocks_to_keep is None else "blocks"
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-prune-{tag}", a.force, (path,))
    report = run_prune(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress)
    from .report import summary_line

    warning = report["prune"]["ranking"]["warning"]
    if warning:
        print(f"sdcompress prune: warning: {warning}", file=sys.stderr)
    print(summary_line(report["before"], report["after"]))
    print(f"wrote {out}/model.pt, {out}/report.json, {out}/report.md")
    return 0


# ---- binarize ------------------------------------------------------------------------------------------------
def _names(s: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one layer")
    return names


def add_binarize(sub) -> None:
    from .binarize import BinarizeConfig

    d = BinarizeConfig()
    p = sub.add_parser("binarize", help="1-bit weights (sign * per-channel alpha), stored as bits",
                       description="Binarize the conv weights inside the residual blocks; optionally fine-tune with the STE.")
    _ckpt_arg(p)
    p.add_argument("--binarize-stem", action="store_true", help="binarize the first conv too")
    p.add_argument("--binarize-head", action="store_true", help="binarize the classifier too")
    p.add_argument("--full-precision", type=_names, default=(), metavar="LAYER,...", help="layers to keep in full precision, e.g. blocks.0.conv1")
    _recovery_args(p, d, "sdcompress-out/NAME-binarize")
    p.set_defaults(func=cmd_binarize)


def cmd_binarize(a) -> int:
    from .binarize import BinarizeConfig
    from .pipeline import run_binarize
    from .report import format_bytes

    cfg = BinarizeConfig(a.binarize_stem, a.binarize_head, a.full_precision, a.recalibrate, a.finetune, a.finetune_lr,
                         a.finetune_survival, a.seed)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-binarize", a.force, (path,))
    r = run_binarize(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress)
    b, f = r["before"], r["after"]
    acc = f", top-1 {100 * b['accuracy']['top1']:.1f}% -> {100 * f['accuracy']['top1']:.1f}%" if b.get("accuracy") and f.get("accuracy") else ""
    print(f"{len(r['binarize']['layers'])} layers binarized, 1-bit params {f['params']['by_bits'].get('1', 0):,}, "
          f"size {format_bytes(b['bytes']['checkpoint'])} -> {format_bytes(f['bytes']['checkpoint'])}{acc}")
    print(f"wrote {out}/model.pt, {out}/report.json, {out}/report.md")
    return 0


# ---- export --------------------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX and Core ML files, verified against PyTorch on real inputs",
                       description="Export the evaluation-time network to ONNX and Core ML; reload each file and verify it "
                                   "against PyTorch on real images; report sizes, verification figures and latency.")
    _ckpt_arg(p)
    p.add_argument("--format", type=_names, default=("onnx", "coreml"), metavar="onnx,coreml", help="formats to write (default both)")
    p.add_argument("--precision", choices=("float16", "float32"), default="float16", help="Core ML compute precision and weights (default float16)")
    p.add_argument("--coreml-input", choices=("image", "tensor"), default="image",
                   help="Core ML input: an image with the normalization built in (default), or the normalized float tensor")
    p.add_argument("--data", default=None, help="images to verify on (default: the bundled evaluation set or the checkpoint's validation split)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads for the latency figure")
    p.add_argument("--out", type=Path, default=None, help="output folder (default sdcompress-out/NAME-export)")
    p.add_argument("--force", action="store_true", help="overwrite exported files already in --out")
    p.add_argument("--verbose", action="store_true", help="let coremltools' own notices and progress bars through")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from .pipeline import check_formats, run_export
    from .report import format_bytes

    check_formats(a.format)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-export", a.force, (path,))
    r = run_export(path, a.format, out, a.data, a.data_dir, a.threads, precision=a.precision, coreml_input=a.coreml_input, verbose=a.verbose)
    print(f"checkpoint {format_bytes(r['bytes']['checkpoint'])}")
    if "onnx" in r["formats"]:
        o = r["formats"]["onnx"]
        v = o["verification"]
        print(f"model.onnx {format_bytes(o['bytes'])}, opset {o['opset']}, max |onnxruntime - torch| {v['max_abs_diff']:.2g} (logits), "
              f"top-1 agreement {100 * v['top1_agreement']:.1f}% on {v['n']} images, "
              f"latency {o['latency_ms']['onnxruntime_cpu_b1']:.2f} ms (onnxruntime CPU, batch 1, {o['latency_ms']['threads']} thread)")
    if "coreml" in r["formats"]:
        c = r["formats"]["coreml"]
        v = c["verification"]
        print(f"model.mlpackage {format_bytes(c['bytes'])}, {c['precision']}, {c['input']} input, {c['deployment_target']}, "
              f"{c['binary_layers_palettized']} layers as 1-bit tables, max |Core ML - torch| {v['max_abs_diff']:.2g} (probabilities), "
              f"top-1 agreement {100 * v['top1_agreement']:.1f}% on {v['n']} images ({v['method']})")
    files = ", ".join(f"{out}/{f['file']}" for f in r["formats"].values())
    print(f"wrote {files}, {out}/report.json, {out}/report.md")
    return 0


# ---- report --------------------------------------------------------------------------------------------------
def add_report(sub) -> None:
    p = sub.add_parser("report", help="footprint per block and layer: parameters, memory and MACs by precision",
                       description="The footprint of one model per block and per layer, totals, exported files beside the "
                                   "checkpoint, and accuracy when data is given (or for the bundled model).")
    _ckpt_arg(p)
    p.add_argument("--data", default=None, help="measure top-1 on this data (default: none, except the bundled model's evaluation set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the rendered tables (Markdown) here")
    p.add_argument("--force", action="store_true", help="overwrite --json / --md")
    p.set_defaults(func=cmd_report)


def cmd_report(a) -> int:
    from .checkpoint import load_checkpoint
    from .files import atomic_write_bytes, atomic_write_json
    from .evaluate import evaluate_checkpoint
    from .footprint import footprint, render_markdown

    for f in (a.json, a.md):
        if f is not None and f.exists() and not a.force:
            raise InputError(f"{f}: exists; pass --force to overwrite")
        if f is not None and not f.parent.is_dir():
            raise InputError(f"{f}: folder {f.parent} does not exist")
    path = _resolve_ckpt(a.ckpt)
    model, meta = load_checkpoint(path)
    acc = None
    if a.data is not None or a.ckpt is None:
        acc = evaluate_checkpoint(model, meta, path, a.data, a.data_dir, "auto", 500)
    fp = footprint(model, meta.data.input_shape, path, acc)
    md = render_markdown(fp)
    print(md, end="")
    if a.json:
        atomic_write_json(a.json, fp)
    if a.md:
        atomic_write_bytes(a.md, md.encode())
    return 0


# ---- sweep ---------------------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _onoff_list(s: str) -> tuple[bool, ...]:
    return tuple(_bool(v.strip()) for v in s.split(",") if v.strip())


def add_sweep(sub) -> None:
    from .pruning import STRATEGIES
    from .sweep import SweepConfig

    d = SweepConfig()
    p = sub.add_parser("sweep", help="the accuracy / size / latency tradeoff across keep fractions and 1-bit weights",
                       description="For every keep fraction, with and without 1-bit weights: prune (BatchNorm recalibrated), "
                                   "binarize, export, verify, measure top-1, parameters, MACs, file sizes and onnxruntime "
                                   "latency. Writes DIR/sweep.json, DIR/sweep.md and DIR/tradeoff.png; finished points are reused.")
    _ckpt_arg(p)
    p.add_argument("--keep", type=_floats, default=d.keeps, metavar="1.0,0.9,...", help="keep fractions (default 1.0,0.9,...,0.4)")
    p.add_argument("--binarize", type=_onoff_list, default=d.binarize, metavar="off,on", help="without and/or with 1-bit weights (default off,on)")
    p.add_argument("--formats", type=_names, default=d.formats, metavar="onnx,coreml", help="files to export and verify per point")
    p.add_argument("--strategy", default=d.strategy, choices=list(STRATEGIES))
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS", help="fine-tuning epochs after pruning and binarizing (needs --data)")
    p.add_argument("--precision", choices=("float16", "float32"), default=d.precision, help="Core ML precision")
    p.add_argument("--threads", type=_positive_int, default=d.threads, help="onnxruntime threads for every latency figure")
    p.add_argument("--data", default=None, help="evaluation and calibration data (default: the bundled sets for bundled models)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default sdcompress-out/NAME-sweep)")
    p.add_argument("--force", action="store_true", help="redo points already measured in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(a) -> int:
    from .sweep import SweepConfig, run_sweep

    if a.finetune < 0:
        raise InputError(f"--finetune must be >= 0, got {a.finetune}")
    cfg = SweepConfig(keeps=a.keep, binarize=a.binarize, formats=a.formats, strategy=a.strategy, finetune=a.finetune,
                      precision=a.precision, threads=a.threads)
    path = _resolve_ckpt(a.ckpt)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or folder")
    name = _model_name(path)
    out = a.out or OUT_ROOT / f"{name}-sweep"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    s = run_sweep(path, cfg, out, a.data, a.data_dir, a.device, progress=not a.no_progress, force=a.force)
    from .sweep import render_markdown

    print(render_markdown(s).split("![tradeoff]")[0].rstrip())
    print(f"wrote {out}/sweep.json, {out}/sweep.md, {out}/tradeoff.png ({s['reused_points']} of {len(s['points'])} points reused)")
    return 0


# ---- compare -------------------------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="reports side by side: old -> new with ratios",
                       description="Any reports sdcompress writes (report, eval, prune, binarize, export, sweep points), "
                                   "side by side: one row per metric, the first file as the baseline.")
    p.add_argument("reports", nargs="+", type=Path, help="two or more report JSON files")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a) -> int:
    from .files import atomic_write_json
    from .compare import compare, load_report, render

    if len(a.reports) < 2:
        raise InputError("compare needs at least two reports")
    if a.json and a.json.exists() and not a.force:
        raise InputError(f"--json {a.json}: exists; pass --force to overwrite")
    reports = [load_report(p) for p in a.reports]
    cmp = compare(reports, [str(p) for p in a.reports])
    print(render(cmp), end="")
    if a.json:
        atomic_write_json(a.json, cmp)
    return 0


COMMANDS = (add_train, add_eval, add_stats, add_prune, add_binarize, add_export, add_report, add_sweep, add_compare)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sdcompress", description="Compress stochastic-depth ResNets for mobile deployment.")
    parser.add_argument("--version", action="version", version=f"sdcompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # `--debug` works before or after the command
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    a = parser.parse_args(argv)
    restore = _handle_signals()
    try:
        return _run(a)
    finally:
        restore()


def _handle_signals():
    """Ctrl-C and SIGTERM raise (KeyboardInterrupt, Terminated) and are remembered, so that a library that swallows
    the exception cannot make the command carry on and commit its outputs. Returns what puts the old handlers back."""
    import threading

    clear_pending()
    if threading.current_thread() is not threading.main_thread():
        return clear_pending
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, lambda signum, frame: signal_received(Terminated))
    signal.signal(signal.SIGINT, lambda signum, frame: signal_received(KeyboardInterrupt))

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
        clear_pending()  # a signal belongs to the command it interrupted

    return restore


def _run(a) -> int:
    try:
        try:
            return a.func(a)
        except Exception:
            # a signal raised inside a library's C++ code can come out as that library's own error
            check_interrupt()
            raise
    except InputError as e:
        if a.debug:
            traceback.print_exc()
        print(f"sdcompress {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdcompress {a.command}: interrupted; outputs already written are complete, nothing was half-written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"sdcompress {a.command}: terminated; outputs already written are complete, nothing was half-written", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if a.debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sdcompress {a.command}: error: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
