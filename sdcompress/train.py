"""Training with stochastic depth: a run is set up (or resumed), then each epoch trains, records the survival
statistics, validates and writes a resumable checkpoint as one unit."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import SCHEMA, Sidecar, read_sidecar, save_checkpoint
from .config import TrainConfig, check_lr, check_number
from .data import Dataset, ImageSet, Normalize, augmentation, load_dataset
from .distributed import Dist, setup as setup_processes
from .errors import InputError
from .files import MAX_WEIGHTS_BYTES, atomic_torch_save, first_line, output_folder, read_untrusted_check
from .nets import NetSpec, ResNet, build_model, scale_blocks
from .loops import SGD, DeviceBatches, evaluate, resolve_device, sgd_loop
from .precision import Precision, check_precision, resolve_precision, to_layout
from .survival import SurvivalStats, draw_run_mask

TRAIN_STATE = "train_state.pt"


def data_meta(ds: Dataset, cfg: TrainConfig) -> dict:
    return {
        "name": ds.name,
        "source": cfg.data,
        "classes": ds.classes,
        "input_shape": list(ds.input_shape),
        "layout": "NCHW, RGB (or grey), pixel / 255 then (x - mean) / std",
        "mean": ds.mean,
        "std": ds.std,
        "split": ds.split,
    }


def net_spec(cfg: TrainConfig, ds: Dataset) -> NetSpec:
    """The spec of the network `cfg.arch` names for this data (a CIFAR ResNet, or torchvision:NAME / timm:NAME)."""
    if ":" not in cfg.arch:
        return NetSpec(cfg.arch, ds.input_shape[0], len(ds.classes), cfg.survival_rule, cfg.p_last)
    from .families.model import describe

    try:
        return describe(cfg.arch, ds.input_shape, len(ds.classes), cfg.survival_rule, cfg.p_last)
    except ValueError as e:
        raise InputError(f"--arch {cfg.arch}: {e}") from None


def read_start_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a pretrained network's file: a state_dict, or a training checkpoint holding one under
    "state_dict" or "model" beside other entries (epoch, best accuracy); a `module.` prefix (saved from
    DataParallel) is stripped. Loaded with weights_only=True: a file that would run code is refused."""
    from .checkpoint import load_state_dict

    try:
        obj = load_state_dict(Path(path), unwrap=True)
    except InputError as e:
        raise InputError(f"--weights: {e}") from None
    if not obj:
        raise InputError(f"--weights {path}: an empty state_dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def map_keys(state: dict, arch: str, mapping: str | None) -> tuple[dict, str]:
    """The weights' names in the project's ResNet, and how they were found.

    `mapping` "OLD=NEW,...": each key starting with OLD gets NEW instead (the first that matches). Without one, the
    names are used as they are if they are the project's, else the layout of the common CIFAR ResNet code
    (He et al.'s option A as most repositories write it: `conv1`/`bn1` stem, `layerS.i` blocks, `linear` or `fc`
    classifier) is mapped: `layerS.i` becomes block n(S-1)+i of the n blocks per stage.
    """
    from .nets import ARCHS

    if mapping:
        rules = []
        for part in mapping.split(","):
            old, sep, new = part.partition("=")
            if not sep or not old.strip():
                raise InputError(f"--weights-map: expected OLD=NEW,... prefix renames, got {part!r}")
            rules.append((old.strip(), new.strip()))
        renamed = {}
        for k, v in state.items():
            old, new = next(((o, n) for o, n in rules if k.startswith(o)), ("", ""))
            renamed[new + k[len(old):]] = v
        return renamed, f"--weights-map {mapping}"
    if "stem.weight" in state:
        return state, "the project's names"
    n = ARCHS[arch]
    renamed = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head == "conv1":
            k = f"stem.{rest}"
        elif head == "bn1":
            k = f"stem_bn.{rest}"
        elif head in ("linear", "fc"):
            k = f"fc.{rest}"
        elif head.startswith("layer") and head[5:].isdigit():
            i, _, tail = rest.partition(".")
            if i.isdigit():
                k = f"blocks.{n * (int(head[5:]) - 1) + int(i)}.{tail}"
        renamed[k] = v
    return renamed, "conv1/bn1/layerS.i/linear (the common CIFAR ResNet layout) mapped to stem/stem_bn/blocks.N/fc"


def load_start_weights(model, path: str, mapping: str | None = None) -> dict:
    """Start from a pretrained network's weights. A torchvision or timm model takes a state_dict of the plain model
    (e.g. `torch.save(m.state_dict(), F)`); the project's ResNets take their own names, the common CIFAR ResNet
    layout, or the names `mapping` gives, and get 1/p_l folded into each block's last BatchNorm (`nets.scale_blocks`).
    A classifier of another number of classes is left at its fresh initialization, and the line says so. Returns
    what the sidecar records of the start."""
    state = read_start_state(path)
    how = "the library's names"
    if isinstance(model, ResNet):
        state, how = map_keys(state, model.spec.arch, mapping)
        target = model
    else:
        target = model.net
    own = target.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise InputError(f"--weights {path}: {len(unknown)} tensors ({unknown[0]}, ...) are not in {model.spec.arch} (names read as "
                         f"{how}); is it a state_dict of that model? (--weights-map OLD=NEW renames key prefixes)")
    resized = sorted(k for k in state if state[k].shape != own[k].shape)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))  # older files lack the counter
    if len(resized) + len(missing) > 2:  # more than a classifier's weight and bias
        raise InputError(f"--weights {path}: {len(resized)} tensors of another shape and {len(missing)} missing "
                         f"({(resized + missing)[0]}, ...); is it a state_dict of {model.spec.arch}?")
    target.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    if resized or missing:
        tqdm.write(f"--weights: {', '.join(resized + missing)} left freshly initialized (another number of classes)")
    folded = isinstance(model, ResNet) and any(p < 1 for p in model.spec.probs())
    if folded:
        scale_blocks(model, -1)
    from .files import file_sha256

    return {"weights": str(path), "sha256": file_sha256(path), "names": how, "fresh": resized + missing,
            "survival_folded": "1/p_l folded into each block's bn2" if folded else None}


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_top1: float
    val_top1: float | None
    val_loss: float | None
    lr: float
    epoch_s: float
    images_per_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Run:
    """One training run between epochs: the network and its optimizer settings, the data, the generators of
    shuffling, drop draws and augmentation, and the statistics and history so far."""

    cfg: TrainConfig
    dd: Dist
    device: torch.device
    ds: Dataset
    spec: NetSpec
    model: torch.nn.Module
    net: torch.nn.Module  # what the training step calls: the model, or its DDP wrapper
    sgd: SGD  # the optimizer and its schedule, as `loops.sgd_loop` runs them
    shuffle_gen: torch.Generator
    drop_gen: torch.Generator
    aug_gen: torch.Generator
    stats: SurvivalStats
    steps_per_epoch: int
    local_batch: int
    history: list
    precision: Precision
    start: dict | None = None  # the pretrained weights the run started from (load_start_weights), or None
    start_epoch: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def compile_branches(model: torch.nn.Module) -> None:
    """torch.compile the residual branch of every block of a project ResNet, each on its own.

    With stochastic depth the network's graph changes every step (which blocks run is drawn per mini-batch), so
    compiling the whole model would recompile nearly every step. A block's branch never changes: compiled alone,
    it is one graph per block shape and mode (5 shapes for a CIFAR ResNet: three stages and two downsampling
    blocks, each in training and in evaluation mode: 10 graphs, reused by every block of that shape), and the draw
    still decides in Python which branches run at all. All blocks share one code object, so the recompile limit
    is raised above those 10 (at the default 8, two shapes would fall back to eager). `uncompile_branches` undoes it.
    """
    import torch._dynamo.config as dynamo_config

    if not isinstance(model, ResNet):
        raise InputError("--compile is for the project's ResNets (resnet20 ... resnet1202)")
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    for block in model.blocks.values():
        if hasattr(block, "branch"):
            block.branch = torch.compile(block.branch, dynamic=False)


def uncompile_branches(model: torch.nn.Module) -> None:
    """The plain methods back (a compiled one bound to a block would follow the block into a deepcopy)."""
    for block in getattr(model, "blocks", {}).values():
        block.__dict__.pop("branch", None)


def _check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.stats_window < 10:
        raise InputError("--epochs and --batch-size must be >= 1, --stats-window >= 10")
    check_number("--label-smoothing", cfg.label_smoothing, 0.0, 1.0, hi_open=True)
    if cfg.compile and ":" in cfg.arch:
        raise InputError(f"--compile is for the project's ResNets (resnet20 ... resnet1202), not {cfg.arch}")
    check_lr("--lr", cfg.lr)
    check_number("--momentum", cfg.momentum, 0.0, 1.0, hi_open=True)
    check_number("--weight-decay", cfg.weight_decay, 0.0, 1.0, hi_open=True)
    check_number("--warmup-epochs", cfg.warmup_epochs, 0.0, cfg.epochs, hi_open=True)
    check_precision("--precision", cfg.precision)


def setup(cfg: TrainConfig, dataset: Dataset | None = None, resume: bool = False) -> Run:
    """Processes, device, data, network, optimizer and generators of a fresh run (`resume` then loads its state)."""
    _check_config(cfg)
    dd, device_name = setup_processes(cfg.device)
    if dd.world > 1 and cfg.batch_size % dd.world:
        raise InputError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the {dd.world} processes")
    if cfg.sync_bn and not dd.enabled:
        raise InputError("--sync-bn needs several processes: launch with torchrun --nproc_per_node N")
    device = resolve_device(device_name)
    if cfg.sync_bn and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices (SyncBatchNorm runs only on GPUs); drop it to keep per-process BatchNorm")
    ds = dataset or load_dataset(cfg.data, cfg.data_dir, cfg.val_size, cfg.split_seed)
    if cfg.train_limit is not None:
        ds = ds.limit_train(cfg.train_limit)
    if len(ds.train) < cfg.batch_size:
        raise InputError(f"the training split has {len(ds.train)} images{' (--train-limit)' if cfg.train_limit else ''}, "
                         f"fewer than --batch-size {cfg.batch_size}")
    if cfg.mean is not None or cfg.std is not None:  # the pretrained network's normalization, not the data's own
        c = ds.input_shape[0]
        if cfg.mean is None or cfg.std is None or len(cfg.mean) != c or len(cfg.std) != c:
            raise InputError(f"--mean and --std: give both, one value per image channel ({c})")
        for v in cfg.std:
            check_number("--std", v, 0.0, 1e3, lo_open=True)
        for v in cfg.mean:
            check_number("--mean", v, -1e3, 1e3)
        ds = replace(ds, mean=[float(v) for v in cfg.mean], std=[float(v) for v in cfg.std])
    spec = net_spec(cfg, ds)
    if spec.family != "cifar_resnet" and dd.enabled:
        raise InputError(f"{cfg.arch}: training under torchrun is for the project's own ResNets; train it in one process")
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.weights_map and not cfg.weights:
        raise InputError("--weights-map renames the keys of --weights: give --weights FILE too")
    start = load_start_weights(model, cfg.weights, cfg.weights_map) if cfg.weights and not resume else None
    precision = resolve_precision(cfg.precision, device)
    model = to_layout(model.to(device), precision.channels_last)
    if cfg.compile:
        compile_branches(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    net = model
    if dd.enabled:
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Every rank draws the same blocks to drop at every step (drop_gen is seeded alike everywhere), so all
        # ranks run the same graph. The parameters of dropped blocks then get no gradient on any rank; DDP must
        # be told (find_unused_parameters) or it would wait forever for their all-reduce. Parameters unused on
        # every rank keep grad None (nothing is averaged in for them), so SGD leaves their weights and momentum
        # alone, exactly as in a single process.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                        find_unused_parameters=any(p < 1 for p in spec.probs()))
    sgd = SGD(cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.schedule, cfg.warmup_epochs)
    steps_per_epoch = len(ds.train) // cfg.batch_size  # drop the last partial batch: BN needs full batches
    local_batch = cfg.batch_size // dd.world
    if dd.main:
        tqdm.write(f"precision: {precision.describe()}")
    if dd.enabled and dd.main:
        tqdm.write(f"distributed: {dd.world} processes ({dd.backend}), global batch {cfg.batch_size} "
                   f"({local_batch} per process){', SyncBatchNorm' if cfg.sync_bn else ''}")
    return Run(cfg, dd, device, ds, spec, model, net, sgd,
               shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1), drop_gen=torch.Generator().manual_seed(cfg.seed + 2),
               aug_gen=torch.Generator(device=device).manual_seed(cfg.seed + 3 + 1000 * dd.rank),  # each rank its own crops
               stats=SurvivalStats(spec.probs(), cfg.stats_window), steps_per_epoch=steps_per_epoch, local_batch=local_batch,
               history=[], precision=precision, start=start)


def resume_from(run: Run, out: Path) -> dict:
    """Load `out/train_state.pt` into a freshly set-up run: weights, every generator, statistics. Returns the state
    `loops.sgd_loop` goes on from (optimizer, epoch, step of the schedule)."""
    state_path = out / TRAIN_STATE
    if not state_path.exists():
        raise InputError(f"--resume: no {TRAIN_STATE} in {out}; start without --resume")
    read_untrusted_check(state_path, 2 * MAX_WEIGHTS_BYTES, "training state")
    try:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused pickle, truncated file
        raise InputError(f"--resume: {state_path} cannot be loaded ({first_line(e)})") from None
    cfg, dd = run.cfg, run.dd
    if st.get("world_size", 1) != dd.world:
        raise InputError(f"--resume: the run in {out} used {st.get('world_size', 1)} processes; resume it with as many")
    old = dict(st["config"])
    ran = st.get("precision_ran")
    if "precision" not in old:  # saved before --precision: bf16 autocast on CUDA with --amp on (the default), else fp32
        ran = "bf16" if old.get("amp", True) and run.cuda else "fp32"
        old["precision"] = cfg.precision
    if ran is not None and ran != run.precision.name:
        tqdm.write(f"--resume: the run in {out} trained in {ran}; it continues in {run.precision.describe()}")
    # a run saved before a setting existed had its default; settings since removed (amp, channels_last) are ignored
    saved = {k: v for k, v in {**TrainConfig().to_dict(), **old}.items() if k in TrainConfig().to_dict()}
    if saved != cfg.to_dict():
        changed = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k))
        raise InputError(f"--resume: the run in {out} used a different config ({', '.join(changed)}); use the same flags")
    run.model.load_state_dict(st["model"])
    run.shuffle_gen.set_state(st["shuffle_gen"])
    run.drop_gen.set_state(st["drop_gen"])
    aug = (st["aug_gen_ranks"] if "aug_gen_ranks" in st else [st["aug_gen"]])[dd.rank]
    run.aug_gen.set_state(aug.to(run.aug_gen.get_state().device))
    torch.set_rng_state(st["torch_rng"])
    run.stats.load_state_dict(st["stats"])
    run.history = list(st["history"])
    run.start = st.get("start")
    run.start_epoch = st["epoch"]
    return {"optimizer": st["optimizer"], "epoch": st["epoch"], "step": st["epoch"] * run.steps_per_epoch,
            "epoch_loss": [h["train_loss"] for h in run.history], "seconds": st["wall_s"]}


class _Epochs:
    """What one run's epochs record beside `loops.sgd_loop`: each step's drop draw, loss, correct predictions and
    measured contributions, turned into the survival statistics, the validation and the checkpoint at every
    epoch's end (`close`)."""

    def __init__(self, run: Run, out: Path, meta: dict, normalize: Normalize, on_epoch: Callable | None, on_step: Callable | None):
        self.run, self.out, self.meta, self.normalize, self.on_epoch, self.on_step = run, out, meta, normalize, on_epoch, on_step
        self.probs = torch.tensor(run.spec.probs())
        self.masks, self.losses, self.correct, self.contribs = [], [], [], []
        self.t0 = time.perf_counter()
        self.saved = run.start_epoch > 0  # a checkpoint of a complete epoch is in `out`

    def stop_note(self) -> str:
        """What a run that stops now leaves, for the divergence message."""
        return f"; the last good checkpoint is kept in {self.out}" if self.saved else "; nothing was written"

    def loss_of(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One step: the drop draw (every rank draws alike), the forward pass of the blocks that run, the loss."""
        run, cfg = self.run, self.run.cfg
        run_mask = draw_run_mask(self.probs, run.drop_gen)
        record = cfg.contrib_every > 0 and step % run.steps_per_epoch % cfg.contrib_every == 0
        run.model.set_record_contribution(record)
        if self.on_step:
            self.on_step(step, run_mask.tolist())
        logits = run.net(x, dict(zip(run.model.block_ids, run_mask.tolist())))
        self.masks.append(run_mask.numpy())
        self.correct.append((logits.argmax(1) == y).sum())
        # a dropped block measured nothing this step: NaN, skipped when recorded
        self.contribs.append(torch.stack([_or_nan(c, run.device) for c in run.model.contributions().values()]) if record else None)
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)

    def close(self, loop: dict) -> None:
        """The end of an epoch: statistics recorded, BatchNorm agreed, validation, history, checkpoint (rank 0)."""
        run, cfg, dd, model = self.run, self.run.cfg, self.run.dd, self.run.model
        epoch, t_close = loop["epoch"] - 1, time.perf_counter()
        # the drop-effect regression uses the loss of the global batch: the mean over ranks, step by step
        loss_arr = dd.all_mean(torch.stack(self.losses).float()).cpu().numpy()
        measured = [c for c in self.contribs if c is not None]
        measured = iter(dd.all_mean(torch.stack(measured).float()).cpu().tolist()) if measured else iter(())
        for k, l, c in zip(self.masks, loss_arr, self.contribs):
            ran = dict(zip(model.block_ids, next(measured))) if c is not None else {}  # a contribution counts only where the block ran
            run.stats.record(k, float(l), {b: v for b, v in ran.items() if k[b]})
        run.stats.refresh()
        train_s = time.perf_counter() - self.t0
        train_top1 = dd.all_sum(torch.stack(self.correct).sum()).item() / (run.steps_per_epoch * cfg.batch_size)
        if dd.enabled:  # BatchNorm running statistics of rank 0 everywhere: the model that is saved and validated
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)
        val = _validate(model, run.ds.val, self.normalize, dd) if run.ds.val is not None else None
        total = cfg.epochs * run.steps_per_epoch
        rec = EpochRecord(epoch + 1, float(loss_arr.mean()), train_top1, val and val["top1"], val and val["loss"],
                          run.sgd.lr_at(loop["step"], total, epoch + 1, cfg.epochs, run.steps_per_epoch), train_s,
                          run.steps_per_epoch * cfg.batch_size / train_s)
        run.history.append(rec.to_dict())
        self.meta.update(metrics={
            "epochs": epoch + 1,
            "val_top1": rec.val_top1,
            "val_loss": rec.val_loss,
            "val_n": len(run.ds.val) if run.ds.val is not None else 0,
            "wall_s": round(loop["seconds"] + time.perf_counter() - t_close, 1),  # this epoch's validation included
            "train_images_per_s": round(float(np.median([h["images_per_s"] for h in run.history])), 1),
            "device": torch.cuda.get_device_name(run.device) if run.cuda else "cpu",
            **run.precision.to_dict(),
            "torch": torch.__version__,
        }, history=run.history, survival_stats=run.stats.to_dict())
        aug_states = dd.gather_objects(run.aug_gen.get_state().cpu())
        if dd.main:
            save_epoch(run, self.out, loop, self.meta, aug_states)
            if self.on_epoch:
                self.on_epoch(rec)
        dd.barrier()
        self.saved = True
        self.masks, self.losses, self.correct, self.contribs = [], [], [], []
        self.t0 = time.perf_counter()


def save_epoch(run: Run, out: Path, loop: dict, meta: dict, aug_states: list) -> None:
    """The epoch's checkpoint and training state, written as one unit (never a mix of two epochs); rank 0 only."""
    with output_folder(out) as folder:
        atomic_torch_save(
            {
                "epoch": loop["epoch"],
                "wall_s": meta["metrics"]["wall_s"],
                "config": run.cfg.to_dict(),
                "model": {k: v.cpu().contiguous() for k, v in run.model.state_dict().items()},
                "optimizer": loop["optimizer"],
                "shuffle_gen": run.shuffle_gen.get_state(),
                "drop_gen": run.drop_gen.get_state(),
                "aug_gen_ranks": aug_states,  # one augmentation generator per rank (older runs saved one "aug_gen")
                "world_size": run.dd.world,
                "torch_rng": torch.get_rng_state(),
                "stats": run.stats.state_dict(),
                "history": run.history,
                "start": run.start,
                "precision_ran": run.precision.name,
            },
            folder / TRAIN_STATE,
        )
        save_checkpoint(folder, run.model, meta)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    dataset: Dataset | None = None,
    on_step: Callable[[int, list[bool]], None] | None = None,
) -> tuple[torch.nn.Module, Sidecar]:
    """Train a network with stochastic depth; write a checkpoint to `out_dir` after every epoch.

    The steps are those of `loops.sgd_loop`, the one loop of `sdcompress.train_stochastic_depth` and fine-tuning;
    this function adds what the command line keeps: the data on the device, the per-block statistics table with
    contributions, validation and a resumable checkpoint every epoch, and data-parallel processes under torchrun.

    Args:
        cfg: the training config.
        out_dir: checkpoint folder (model.pt, model.json, train_state.pt).
        resume: continue from `out_dir/train_state.pt`.
        progress: show a tqdm bar.
        on_epoch: called with each epoch's record (the CLI prints it).
        dataset: an already loaded dataset (else loaded from cfg).
        on_step: called with the global step number and the drop draw of every step.

    Under torchrun (see `distributed.py`) every process runs this with its shard of each global batch of
    `cfg.batch_size` images; only rank 0 writes, logs and shows progress.

    Returns:
        The trained model and its sidecar.
    """
    out = Path(out_dir)
    run = setup(cfg, dataset, resume)
    loop_state = resume_from(run, out) if resume else None
    dd, model, device = run.dd, run.model, run.device
    meta = {"data": data_meta(run.ds, cfg), "stages": [{"stage": "train", "config": cfg.to_dict()}], "binarized": False,
            "distributed": {"world_size": dd.world, "global_batch": cfg.batch_size, "per_process_batch": run.local_batch,
                            "backend": dd.backend, "sync_bn": cfg.sync_bn}}
    normalize = Normalize(run.ds.mean, run.ds.std, device)
    if run.start is not None and run.start_epoch == 0 and run.ds.val is not None and "val_top1" not in run.start:
        before = _validate(model, run.ds.val, normalize, dd)
        run.start.update(val_top1=before["top1"], val_loss=before["loss"])  # the evaluation-time network as loaded
        if dd.main:
            tqdm.write(f"start: val top-1 {before['top1']:.4f} (the pretrained weights, evaluation-time network, before training)")
    if run.start is not None:
        meta["stages"][0]["start"] = run.start
    pad, flip = augmentation(cfg, run.ds.input_shape)
    batches = DeviceBatches(run.ds.train.images.to(device), run.ds.train.labels.to(device), cfg.batch_size, run.shuffle_gen,
                            run.aug_gen, pad, flip, normalize, dist=dd, seed=cfg.seed + 1)
    epochs = _Epochs(run, out, meta, normalize, on_epoch, on_step)
    try:
        sgd_loop(model, batches, cfg.epochs, run.sgd, device, run.precision, progress and dd.main, "train", epochs.loss_of,
                 on_step=lambda step, loss: epochs.losses.append(loss), lr_hint="--lr", resume=loop_state, agree=dd.all_mean,
                 on_epoch=epochs.close, stop_note=epochs.stop_note)
    finally:
        model.set_record_contribution(False)
        uncompile_branches(model)
        to_layout(model, False)
        model.eval()
    if run.start_epoch >= cfg.epochs:  # resumed a finished run: nothing left to do
        return model, read_sidecar(out / "model.json")
    return model, Sidecar.from_dict({**meta, "schema": SCHEMA, "spec": model.spec.to_dict()})


def _validate(model: ResNet, val: ImageSet, normalize: Normalize, dd: Dist) -> dict:
    """Validation top-1 and loss; under torchrun each rank scores its shard and the sums are reduced."""
    if not dd.enabled:
        return evaluate(model, val, normalize)
    shard = ImageSet(val.images[dd.rank :: dd.world], val.labels[dd.rank :: dd.world])
    r = evaluate(model, shard, normalize)
    dev = next(model.parameters()).device
    tot = dd.all_sum(torch.tensor([r["top1"] * r["n"] if r["n"] else 0.0, r["loss"] * r["n"] if r["n"] else 0.0, float(r["n"])],
                                  dtype=torch.float64, device=dev))
    n = int(tot[2].item())
    return {"top1": tot[0].item() / n, "loss": tot[1].item() / n, "n": n}


def _or_nan(v: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return v if v is not None else torch.tensor(math.nan, device=device)


