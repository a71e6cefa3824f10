"""Checkpoints: `model.pt` (a plain state_dict, loadable with weights_only=True) plus the `model.json` sidecar.

The sidecar carries the schema version, the network spec (including which blocks are kept), the data
description (classes, normalization, split), the config of every stage applied so far, metrics, and the
per-block survival statistics. Nothing is pickled beyond tensors: a model is rebuilt from its spec, then its
weights are loaded and checked against that spec. The sidecar is one typed tree (`Sidecar`), validated in full
on load before anything is built from it; the files themselves are read within limits (`files.py`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .files import (MAX_WEIGHTS_BYTES, SIDECAR, WEIGHTS, atomic_torch_save, atomic_write_json, first_line, parse_untrusted_json,
                    read_untrusted_check)
from .nets import MAX_CLASSES, MAX_IN_CHANNELS, NetSpec, ResNet, build_model

SCHEMA = "sdcompress.checkpoint/1"


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) paths of a checkpoint given as its folder, its model.pt or its model.json."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    elif p.suffix == ".json":
        p = p.with_name(WEIGHTS) if p.name == SIDECAR else p.with_suffix(".pt")
    if not p.exists():
        if (p.parent / "blocks.json").is_file() and (p.parent / "weights.pt").is_file():
            raise InputError(f"{path} holds a model of your own class (sdcompress.save): name its builder with --arch "
                             f"python:package.module:function")
        raise InputError(f"checkpoint {path}: no such file ({p})")
    side = p.with_name(SIDECAR) if p.name == WEIGHTS else p.with_suffix(".json")
    if not side.exists():
        raise InputError(f"checkpoint {path}: sidecar {side.name} is missing beside {p.name}; it holds the architecture")
    return p, side


def read_sidecar(path: str | Path) -> "Sidecar":
    """Parse a sidecar file under the size and depth limits and validate it in full (`Sidecar.from_dict`)."""
    meta = parse_untrusted_json(path, "sidecar")
    if not isinstance(meta, dict) or not isinstance(meta.get("schema"), str) or not meta["schema"].startswith("sdcompress.checkpoint/"):
        raise InputError(f"{path}: not an sdcompress checkpoint sidecar (no 'schema': '{SCHEMA}')")
    if meta["schema"] != SCHEMA:
        raise InputError(f"{path}: schema {meta['schema']} is not supported by this sdcompress ({SCHEMA}); upgrade sdcompress")
    try:
        return Sidecar.from_dict(meta)
    except SidecarError as e:
        raise InputError(f"{path}: bad sidecar, {e}") from None


def load_sidecar(path: str | Path) -> "Sidecar":
    """The typed sidecar of a checkpoint (given as its folder or one of its files)."""
    return read_sidecar(resolve(path)[1])


# ---- the sidecar, typed ----------------------------------------------------------------------------------------
MAX_SIDE = 4096  # image height and width


class SidecarError(InputError):
    """A sidecar field is missing, of the wrong type or out of range."""


def _fail(where: str, msg: str):
    raise SidecarError(f"field {where}: {msg}")


def _get(d: dict, key: str, where: str, required: bool = True):
    if not isinstance(d, dict):
        _fail(where, f"must be an object, got {type(d).__name__}")
    if key not in d or d[key] is None:
        if required:
            _fail(f"{where}.{key}" if where else key, "is missing")
        return None
    return d[key]


def _int(v, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, f"must be a whole number, got {v!r:.40}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(where, f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}")
    return v


def _num(v, where: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, f"must be a number, got {v!r:.40}")
    v = float(v)
    if not math.isfinite(v):
        _fail(where, f"must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(where, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        _fail(where, f"must be <= {hi}, got {v}")
    return v


def _opt_num(v, where: str, lo: float | None = None, hi: float | None = None) -> float | None:
    return None if v is None else _num(v, where, lo, hi)


def _str(v, where: str) -> str:
    if not isinstance(v, str):
        _fail(where, f"must be text, got {type(v).__name__}")
    return v


def _list(v, where: str, n: int | None = None, max_len: int = 1_000_000) -> list:
    if not isinstance(v, list):
        _fail(where, f"must be a list, got {type(v).__name__}")
    if n is not None and len(v) != n:
        _fail(where, f"must have {n} entries, has {len(v)}")
    if len(v) > max_len:
        _fail(where, f"has {len(v):,} entries, more than {max_len:,}")
    return v


@dataclass(frozen=True)
class DataInfo:
    """What the network takes: classes, input shape, normalization, and where its training data came from."""

    name: str
    source: str  # the --data the model was trained on
    classes: tuple[str, ...]  # one name per output
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]  # per channel, of pixel / 255
    std: tuple[float, ...]  # per channel, > 0
    split: dict  # {"val_size", "seed", "train_size"}: the held-out validation split

    @classmethod
    def from_dict(cls, d, spec: NetSpec) -> "DataInfo":
        w = "data"
        shape = _list(_get(d, "input_shape", w), f"{w}.input_shape", 3)
        c = _int(shape[0], f"{w}.input_shape[0]", 1, MAX_IN_CHANNELS)
        h, wd = (_int(v, f"{w}.input_shape[{i + 1}]", 1, MAX_SIDE) for i, v in enumerate(shape[1:]))
        if c != spec.in_channels:
            _fail(f"{w}.input_shape[0]", f"{c} channels, the spec's network takes {spec.in_channels}")
        classes = _list(_get(d, "classes", w), f"{w}.classes", max_len=MAX_CLASSES)
        classes = [_str(x, f"{w}.classes[{i}]") for i, x in enumerate(classes)]
        if len(classes) != spec.num_classes:
            _fail(f"{w}.classes", f"{len(classes)} names for a network with {spec.num_classes} outputs")
        mean = [_num(x, f"{w}.mean[{i}]", -10, 10) for i, x in enumerate(_list(_get(d, "mean", w), f"{w}.mean", c))]
        std = [_num(x, f"{w}.std[{i}]", 0.0, 10, lo_open=True) for i, x in enumerate(_list(_get(d, "std", w), f"{w}.std", c))]
        split = _get(d, "split", w, required=False) or {}
        if not isinstance(split, dict):
            _fail(f"{w}.split", "must be an object")
        for k in ("val_size", "seed", "train_size"):
            if split.get(k) is not None:
                _int(split[k], f"{w}.split.{k}", 0)
        return cls(_str(_get(d, "name", w), f"{w}.name"), _str(_get(d, "source", w), f"{w}.source"), tuple(classes),
                   (c, h, wd), tuple(mean), tuple(std), dict(split))


@dataclass(frozen=True)
class BlockStats:
    """Survival statistics of one block (None where never measured)."""

    block: int
    p_scheduled: float
    runs: int
    survival_rate: float | None
    contribution: float | None  # mean ||f(x)|| / ||x|| on steps it ran
    drop_effect: float | None  # rise in loss when missing
    drop_effect_se: float | None  # its standard error


@dataclass(frozen=True)
class SurvivalTable:
    steps: int
    window: int
    regression_steps: int
    blocks: tuple[BlockStats, ...]
    source: str = "training"  # training (recorded by `sdcompress train`) | measured (`sdcompress stats --measure`)

    @classmethod
    def from_dict(cls, d, spec: NetSpec) -> "SurvivalTable":
        w = "survival_stats"
        rows = _list(_get(d, "blocks", w), f"{w}.blocks", spec.blocks_total)
        blocks = []
        for i, r in enumerate(rows):
            rw = f"{w}.blocks[{i}]"
            if _int(_get(r, "block", rw), f"{rw}.block") != i:
                _fail(f"{rw}.block", f"must be {i} (blocks in order)")
            blocks.append(BlockStats(i, _num(_get(r, "p_scheduled", rw), f"{rw}.p_scheduled", 0.0, 1.0, lo_open=True),
                                     _int(_get(r, "runs", rw), f"{rw}.runs", 0),
                                     _opt_num(r.get("survival_rate"), f"{rw}.survival_rate", 0.0, 1.0),
                                     _opt_num(r.get("contribution"), f"{rw}.contribution", 0.0),
                                     _opt_num(r.get("drop_effect"), f"{rw}.drop_effect"),
                                     _opt_num(r.get("drop_effect_se"), f"{rw}.drop_effect_se", 0.0)))
        source = _str(d.get("source", "training"), f"{w}.source")
        if source not in ("training", "measured"):
            _fail(f"{w}.source", f"must be training or measured, got {source!r:.40}")
        return cls(_int(_get(d, "steps", w), f"{w}.steps", 0), _int(d.get("window", 0), f"{w}.window", 0),
                   _int(d.get("regression_steps", 0), f"{w}.regression_steps", 0), tuple(blocks), source)


@dataclass(frozen=True)
class Sidecar:
    """model.json, typed: validated in full by `from_dict` before any network is built from it."""

    spec: NetSpec
    data: DataInfo
    stages: tuple[dict, ...]  # {"stage": "train" | "prune" | "binarize", "config": {...}, ...}, oldest first
    survival_stats: SurvivalTable | None  # None: not trained by sdcompress
    metrics: dict
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the JSON as read, carried into derived sidecars

    @property
    def block_exponent(self) -> float:
        """t where each kept block adds p_l^t f(x) at evaluation: 1 as trained, unless a prune stage chose another
        (folded into each kept block's last BatchNorm; the spec's p_l still says what the block was trained at) or
        `sdcompress.save` wrote a network so pruned. The last stage that says decides; a stage that fine-tuned with
        stochastic depth after it (`finetune_survival`) trained the blocks back to the paper's rule, t = 1."""
        from .nets import check_exponent

        t = 1.0
        for i, st in enumerate(self.stages):
            scale = st.get("block_scale")
            if isinstance(scale, dict) and scale.get("folded", True) and scale.get("chosen") is not None:
                t = check_exponent(scale.get("exponent", {"unit": 0.0, "survival": 1.0}.get(scale["chosen"], scale["chosen"])),
                                   f"field stages[{i}].block_scale.exponent")
            cfg = st.get("config") if isinstance(st.get("config"), dict) else {}
            if cfg.get("finetune") and cfg.get("finetune_survival"):
                t = 1.0
        return t

    @property
    def train_config(self) -> dict:
        """The training run's config (the first stage's), as recorded."""
        return self.stages[0].get("config", {})

    def to_dict(self) -> dict:
        """The sidecar as JSON data (a deep copy of what was read)."""
        return json.loads(json.dumps(self.raw))

    def derive(self, spec: NetSpec, stage: dict, metrics: dict) -> "Sidecar":
        """The sidecar of a model made from this one by one more stage (prune, binarize)."""
        d = self.to_dict()
        d["spec"] = spec.to_dict()
        d["stages"] = d["stages"] + [stage]
        d["metrics"] = metrics
        return Sidecar.from_dict(d)

    @classmethod
    def from_dict(cls, meta) -> "Sidecar":
        if not isinstance(meta, dict):
            raise SidecarError("not a JSON object")
        raw = _get(meta, "spec", "")
        if not isinstance(raw, dict):
            _fail("spec", "must be an object")
        for k in ("survival_rule", "p_last", "arch", "num_classes", "in_channels"):
            _get(raw, k, "spec")  # no silent defaults: a missing rule would change every block's scaling
        _str(raw["arch"], "spec.arch")
        _str(raw["survival_rule"], "spec.survival_rule")
        _num(raw["p_last"], "spec.p_last", 0.0, 1.0, lo_open=True)
        _int(raw["num_classes"], "spec.num_classes", 2, MAX_CLASSES)
        _int(raw["in_channels"], "spec.in_channels", 1, MAX_IN_CHANNELS)
        if raw.get("blocks_kept") is not None:
            for i, b in enumerate(_list(raw["blocks_kept"], "spec.blocks_kept", max_len=10_000)):
                _int(b, f"spec.blocks_kept[{i}]", 0)
        for i, n in enumerate(_list(raw.get("binarized", []), "spec.binarized", max_len=100_000)):
            _str(n, f"spec.binarized[{i}]")
        try:
            spec = NetSpec.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise SidecarError(f"field spec: {e}") from None
        data = DataInfo.from_dict(_get(meta, "data", ""), spec)
        stages = _list(_get(meta, "stages", ""), "stages", max_len=10_000)
        if not stages:
            _fail("stages", "is empty; the first stage is the training run")
        for i, st in enumerate(stages):
            _str(_get(st, "stage", f"stages[{i}]"), f"stages[{i}].stage")
            if not isinstance(st.get("config", {}), dict):
                _fail(f"stages[{i}].config", "must be an object")
        stats = meta.get("survival_stats")
        metrics = meta.get("metrics") or {}
        if not isinstance(metrics, dict):
            _fail("metrics", "must be an object")
        return cls(spec, data, tuple(stages), SurvivalTable.from_dict(stats, spec) if stats is not None else None, metrics,
                   {**meta, "schema": meta.get("schema", SCHEMA)})


def save_checkpoint(out_dir: str | Path, model: ResNet, meta: "dict | Sidecar") -> Path:
    """Write model.pt then model.json into `out_dir` (each atomically; the folder as a unit is `output_folder`'s
    business). Returns the weights' path."""
    out = Path(out_dir)
    meta = meta.to_dict() if isinstance(meta, Sidecar) else dict(meta)
    meta["schema"] = SCHEMA
    meta["spec"] = model.spec.to_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out / WEIGHTS)
    atomic_write_json(out / SIDECAR, meta)
    return out / WEIGHTS


def load_state_dict(path: Path, unwrap: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed. Only a regular
    file under MAX_WEIGHTS_BYTES is opened. `unwrap`: also take a training checkpoint that holds the state_dict under
    "state_dict" or "model" beside other entries (epoch, best accuracy)."""
    read_untrusted_check(path, MAX_WEIGHTS_BYTES, "weights file (model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused to load: it holds more than tensors ({first_line(e)})") from None
    except Exception as e:  # truncated or not a torch file
        raise InputError(f"{path}: corrupt or not a PyTorch state_dict ({first_line(e)})") from None
    if unwrap and isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state_dict of tensors")
    return state


_META_LOCK = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside this block put each parameter and buffer on the meta device as it is registered, so a
    network is built without its weights' memory (at most one layer's, for a moment), while the builders' own
    arithmetic on real tensors (a RegNet's widths) still runs. It patches `nn.Module` for the process: held under a
    lock, and no other thread of sdcompress builds modules meanwhile."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        register_parameter(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    with _META_LOCK:
        nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
        try:
            yield
        finally:
            nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _check_against_weights(model: nn.Module, state: dict, weights: Path) -> None:
    """The built network's tensor names and shapes against the weights file's."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise InputError(f"{weights}: weights do not match the sidecar's architecture ({what}); the two files belong to different models")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise InputError(f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, the sidecar's architecture needs {tuple(v.shape)}")


def _check_family_skeleton(spec: NetSpec, input_shape, state: dict, weights: Path, side: Path) -> None:
    """A model of another family is built by its library's builder from the sidecar's spec: build it first with its
    parameters on the meta device and check it against the weights' names and shapes, and that it takes the
    sidecar's input shape, so that a tampered spec (another builder, other arguments, another image size) is refused
    before a network of its size is allocated or run."""
    try:
        with _parameters_on_meta():
            skeleton = build_model(spec)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, AssertionError) as e:
        raise InputError(f"{side}: the sidecar's spec does not describe a network this sdcompress builds ({first_line(e)})") from None
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e):
            return  # a builder that computes with its own parameters cannot be built on meta: the real build checks it
        raise InputError(f"{side}: the sidecar's spec does not describe a network this sdcompress builds ({first_line(e)})") from None
    _check_against_weights(skeleton, state, weights)
    try:
        with torch.no_grad():
            skeleton.eval()(torch.empty(1, *input_shape, device="meta"))
    except NotImplementedError:
        pass  # an operation without a meta kernel: the real network's first forward pass checks this instead
    except RuntimeError as e:
        if "meta" not in str(e):
            raise InputError(f"{side}: the model does not take the sidecar's input shape {tuple(input_shape)} ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the library's own refusal, e.g. "Input shape indivisible by patch size!"
        raise InputError(f"{side}: the model does not take the sidecar's input shape {tuple(input_shape)} "
                         f"({first_line(e) or type(e).__name__})") from None


def _check_header(spec: NetSpec, state: dict, weights: Path) -> None:
    """The sizes a sidecar sets (classes, input channels) against the weights' own tensors, before anything is
    allocated from them."""
    if spec.family != "cifar_resnet":
        if spec.in_channels != 3:
            raise InputError(f"{weights.parent / SIDECAR}: {spec.arch} takes 3-channel images, the sidecar says {spec.in_channels}")
        if not any(t.dim() >= 2 and t.shape[0] == spec.num_classes for t in state.values()):  # linear or 1x1-conv head
            raise InputError(f"{weights}: no classifier of {spec.num_classes} classes among the weights, as the sidecar says; the two "
                             f"files belong to different models")
        return
    for key, want in (("fc.weight", (spec.num_classes, None)), ("stem.weight", (None, spec.in_channels))):
        t = state.get(key)
        if t is None:
            raise InputError(f"{weights}: weights do not match the sidecar's architecture (missing {key!r}); the two files belong to different models")
        got = tuple(t.shape[:2])
        if any(w is not None and w != g for w, g in zip(want, got)):
            raise InputError(f"{weights}: tensor {key} has shape {tuple(t.shape)}, but the sidecar says {spec.num_classes} classes and "
                             f"{spec.in_channels} input channels; the two files belong to different models")


def load_checkpoint(path: str | Path) -> tuple[ResNet, Sidecar]:
    """Rebuild a model from its sidecar, load its weights and check they match. Returns (model, sidecar)."""
    weights, side = resolve(path)
    meta = read_sidecar(side)
    spec = meta.spec
    state = load_state_dict(weights)
    _check_header(spec, state, weights)
    if spec.family != "cifar_resnet":
        _check_family_skeleton(spec, meta.data.input_shape, state, weights, side)
    try:
        model = build_model(spec)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise InputError(f"{side}: the sidecar's spec does not describe a network this sdcompress builds ({first_line(e)})") from None
    _check_against_weights(model, state, weights)
    model.load_state_dict(state)
    if isinstance(model, ResNet):
        model.scale_exponent = meta.block_exponent
    model.eval()
    return model, meta
