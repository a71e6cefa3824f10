"""A user's own model class on the command line: `--arch python:package.module:function`.

The builder is imported because the user named it on this command line (never because a file names it). Each
command loads the model, calls the Python API's functions (`train_stochastic_depth`, `prune`, `recalibrate`,
`finetune`, `export`) and saves with `sdcompress.save`: a folder of `weights.pt` and `blocks.json`, which also
keeps the data's name, classes and normalization for the next command.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

PREFIX = "python:"


def is_python(arch: str | None) -> bool:
    return bool(arch) and arch.startswith(PREFIX)


def _data(name: str, data_dir, val_size=None, seed: int = 0):
    from ..data import load_dataset

    return load_dataset(name, data_dir, val_size, seed)


def _batches(ds, images, mean, std, batch_size: int, train: bool, seed: int, augment: str = "auto"):
    from types import SimpleNamespace

    from ..data import ImageBatches, augmentation

    pad, flip = augmentation(SimpleNamespace(augment=augment), ds.input_shape) if train else (0, False)
    return ImageBatches(images, mean, std, batch_size, train, pad, flip, seed)


def _top1(model, images, mean, std) -> float | None:
    from ..data import Normalize
    from ..loops import evaluate

    return None if images is None else evaluate(model, images, Normalize(mean, std))["top1"]


def check_arch(arch: str, command: str) -> None:
    """--arch on a command other than train names a user's builder, nothing else."""
    from ..errors import InputError

    if not is_python(arch):
        raise InputError(f"--arch {arch!r}: {command} takes --arch only for your own class, as python:package.module:function")


def _eval_split(ds):
    return (ds.val, "validation split") if ds.val is not None and len(ds.val) else (ds.test, "test split") if ds.test is not None else (None, None)


def _load(folder, arch: str):
    from ..errors import InputError
    from ..usermodel import load

    folder = Path(folder)
    if not (folder / "blocks.json").is_file():
        raise InputError(f"{folder}: not a folder saved by sdcompress.save (no blocks.json); --arch python:... takes such a folder")
    model, side = load(folder, builder=arch)
    data = side.get("data") or {}
    if not isinstance(data.get("source"), str) or len(data.get("mean") or []) != len(data.get("std") or []) or not data.get("mean"):
        raise InputError(f"{folder}/blocks.json: no data record (source, mean, std); pass a folder written by `sdcompress train --arch python:...`")
    return model, side, data


def _need_folder(a, command: str) -> None:
    from ..errors import InputError

    if a.ckpt is None:
        raise InputError(f"--arch python:... needs the folder of the model (sdcompress {command} FOLDER --arch ...)")


def _load_with_data(a):
    """The model in a.ckpt, its sidecar, its data record and that data (or --data), split as in training."""
    model, side, data = _load(a.ckpt, a.arch)
    split = data.get("split") or {}
    ds = _data(a.data or data["source"], a.data_dir or data.get("data_dir"), split.get("val_size"), split.get("seed", 0))
    return model, side, data, ds


def run_train(a) -> int:
    """`sdcompress train --arch python:...`: the user's model, their weights when given, stochastic depth."""
    import torch

    from .. import api
    from ..errors import InputError
    from ..files import check_output_folder
    from ..loops import resolve_device
    from ..train import TRAIN_STATE, read_start_state
    from ..usermodel import build

    out = a.out or Path("sdcompress-out") / f"{a.arch.rsplit(':', 1)[-1]}-{Path(a.data).stem}-train"
    state_file = Path(out) / TRAIN_STATE  # written after every epoch; --resume goes on from it
    check_output_folder(out, a.force or a.resume)
    if a.resume and not state_file.is_file():
        raise InputError(f"--resume: no {TRAIN_STATE} in {out}; start without --resume")
    torch.manual_seed(a.seed)  # the builder's initialization, as for the project's networks
    model = build(a.arch)
    start = "random weights"
    if a.weights:
        state = read_start_state(a.weights)
        if a.weights_map:
            from ..train import map_keys

            state, _ = map_keys(state, a.arch, a.weights_map)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise InputError(f"--weights {a.weights}: does not fit {type(model).__name__} ({(lines[1] if len(lines) > 1 else lines[0]).strip()[:160]})") from None
        start = a.weights
    ds = _data(a.data, a.data_dir, a.val_size, a.split_seed)
    if (a.mean is None) != (a.std is None):
        raise InputError("give --mean and --std together")
    mean, std = (list(a.mean), list(a.std)) if a.mean else (ds.mean, ds.std)
    if len(mean) != ds.input_shape[0] or len(std) != ds.input_shape[0]:
        raise InputError(f"--mean / --std need {ds.input_shape[0]} values, one per channel of {ds.name}")
    images = ds.train if a.train_limit is None else ds.train.subset(torch.arange(min(a.train_limit, len(ds.train))))
    train = _batches(ds, images, mean, std, a.batch_size, True, a.seed, a.augment)
    held, held_name = _eval_split(ds)
    example = next(iter(_batches(ds, images, mean, std, 2, False, 0)))[0]
    blocks = api.find_blocks(model, example)
    before = _top1(model, held, mean, std) if a.weights else None
    if not a.resume:
        state_file.unlink(missing_ok=True)  # a stopped run's state in a folder --force replaces
    trained = api.train_stochastic_depth(model, train, a.epochs, blocks=blocks, p_last=a.p_last, lr=a.lr, weight_decay=a.weight_decay,
                                         precision=a.precision, device=resolve_device(a.device), seed=a.seed, progress=not a.no_progress,
                                         checkpoint=state_file, resume=a.resume)
    after = _top1(trained.model, held, mean, std)
    data = {"name": ds.name, "source": a.data, "data_dir": a.data_dir, "classes": list(ds.classes), "input_shape": list(ds.input_shape),
            "mean": list(mean), "std": list(std), "split": ds.split}
    api.save(trained.model, out, stats=trained.stats, force=True, data=data, arch=a.arch)  # the folder was checked above
    h = trained.history
    acc = "" if after is None else f"; {held_name} top-1 {'' if before is None else f'{100 * before:.2f}% -> '}{100 * after:.2f}%"
    went_on = f" (resumed after epoch {h['resumed_after_epoch']})" if h["resumed_after_epoch"] else ""
    print(f"{len(blocks)} blocks found; {h['epochs']} epochs of stochastic depth from {start}{went_on}, {h['precision']}, {h['seconds']:.0f} s{acc}")
    print(f"wrote {out}/weights.pt, {out}/blocks.json")
    return 0


def run_prune(a) -> int:
    """`sdcompress prune FOLDER --arch python:...`: prune by the recorded statistics, recalibrate, fine-tune."""
    from .. import api
    from ..errors import InputError
    from ..files import check_output_folder
    from ..loops import resolve_device
    from ..pruning import PruneConfig, training_sample

    _need_folder(a, "prune")
    if a.blocks_to_keep or a.teacher:
        raise InputError("with --arch python:..., prune takes --keep, --max-size or --max-params (not --blocks-to-keep or --teacher)")
    budget = {"max_bytes": a.max_size} if a.max_size is not None else {"max_params": a.max_params} if a.max_params is not None else {}
    keep = None if budget else (0.6 if a.keep is None else a.keep)
    label = f"keep{keep}" if keep is not None else "budget"
    out = a.out or Path("sdcompress-out") / f"{Path(a.ckpt).name}-prune-{label}"
    check_output_folder(out, a.force, (a.ckpt,))
    model, side, data, ds = _load_with_data(a)
    mean, std = data["mean"], data["std"]
    train = _batches(ds, ds.train, mean, std, 128, True, a.seed)
    held, held_name = _eval_split(ds)
    stats = side["stats"]  # ranks (--strategy stats) and gives the blocks' p_l (--block-scale), when they are this model's
    if stats is not None and stats.params not in (None, sum(p.numel() for p in model.parameters())):
        stats = None  # kept from the network this one was pruned from (`save(small, stats=trained.stats)`)
    if a.strategy == "stats" and stats is None:
        raise InputError(f"{a.ckpt} holds no drop effects of this model; use --strategy every-other or top")
    sample = calibration = None
    if a.strategy == "sensitivity":  # the loss on a fixed sample of training images, as for a checkpoint
        size = PruneConfig().batch_size
        sample = list(_batches(ds, training_sample(ds.train, a.sensitivity_batches, size, a.seed), mean, std, size, False, a.seed))
    if a.block_scale == "auto" and stats is not None and a.recalibrate:  # each candidate re-estimated and scored on augmented training batches
        calibration = list(islice(iter(train), a.recalibrate))
    small, record = api._prune(model, keep, stats=stats, strategy=a.strategy, blocks=side["blocks"] or None, batches=sample,
                               block_scale=a.block_scale, calibration=calibration, **budget)
    if a.recalibrate:
        small = api.recalibrate(small, train, num_batches=a.recalibrate, device=resolve_device(a.device))
    tuned = None
    if a.finetune:  # tuned: the fine-tuning record
        small, tuned = api.finetune(small, train, teacher=model if a.distill else None, epochs=a.finetune, lr=a.finetune_lr,
                                    temperature=a.distill_temperature, alpha=a.distill_alpha, precision=a.precision, device=resolve_device(a.device),
                                    progress=not a.no_progress)
    before, after = _top1(model, held, mean, std), _top1(small, held, mean, std)
    present = api._present(small, side["blocks"])
    api.save(small, out, blocks=present, force=a.force, data=data, arch=side.get("arch") or a.arch)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    acc = "" if after is None else f", {held_name} top-1 {100 * before:.2f}% -> {100 * after:.2f}%"
    t = (record["block_scale"] or {}).get("exponent")
    shown = "" if t is None else "; kept blocks add " + {1.0: "p_l f(x)", 0.0: "f(x)"}.get(t, f"p_l^{t:g} f(x)")
    print(f"blocks {len(side['blocks'])} -> {len(present)} ({a.strategy}), params {n(model):,} -> {n(small):,}{acc}{shown}")
    if tuned:
        print(f"fine-tuned {tuned['epochs']} epochs{' (distilled)' if a.distill else ''}, {tuned['seconds']:.0f} s")
    print(f"wrote {out}/weights.pt, {out}/blocks.json")
    return 0


def run_export(a) -> int:
    """`sdcompress export FOLDER --arch python:...`: the API's `export`, verified on the held-out images."""
    from .. import api
    from ..errors import InputError
    from ..report import format_bytes

    _need_folder(a, "export")
    if a.depths:
        raise InputError("--depths is not available with --arch python:...")
    model, side, data, ds = _load_with_data(a)
    held, held_name = _eval_split(ds)
    if held is None:
        raise InputError(f"{ds.name} has no held-out images to verify the files on")
    x = next(iter(_batches(ds, held, data["mean"], data["std"], 64, False, 0)))[0]
    out = a.out or Path("sdcompress-out") / f"{Path(a.ckpt).name}-export"
    rep = api.export(model, out, x, formats=a.format or ("onnx", "ort", "coreml"), classes=data.get("classes"),
                     mean=data["mean"] if a.coreml_input == "image" else None, std=data["std"] if a.coreml_input == "image" else None,
                     weights=a.weights, batch=a.batch, coreml_precision=a.coreml_precision, name=a.name, threads=a.threads, force=a.force)
    for f in rep["formats"].values():
        v = f["verification"]
        print(f"{f['file']} {format_bytes(f['bytes'])}; top-1 agreement with PyTorch {100 * v['top1_agreement']:.1f}% on {v['n']} images "
              f"of the {held_name}, max difference {v['max_abs_diff']:.2g}")
    print(f"wrote {', '.join(str(Path(out) / f['file']) for f in rep['formats'].values())}, {out}/report.json")
    return 0
