"""Core ML export: an ML program (.mlpackage) with an image input, a classifier output and 1-bit weights.

The package holds the evaluation-time network (every kept block scaled by p_l, no random ops), converted from
`torch.export` by coremltools. Binarized convolutions, whose weights (after BatchNorm is folded into them) take
two values per output channel, are palettized to a 1-bit lookup table per output channel, which is exact for
such weights; this needs the iOS 18 deployment target (the default for a binarized model). For iOS 16 and 17
(`deployment_target`) they are stored as linear int8 with one scale per output channel instead, which is exact as
well (the two values are +-127 steps). Float models target iOS 16 unless asked. The classifier stays in float:
1-bit palettization of it is lossy.

The package is named after the model (`package_name`: resnet56-sd -> ResNet56SD.mlpackage), because Xcode
generates a Swift class of that name.

Verification reloads the written package. On macOS Core ML itself predicts; elsewhere (Core ML prediction is
macOS-only) the package's own ML program is loaded with coremltools' MIL loader, compressed weights are expanded
by coremltools' own decompression functions, and the program's ops are evaluated in torch (float32). That
reference evaluation relies on coremltools internals, which is why coremltools is pinned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..binary import BinaryConv2d
from ..checkpoint import Sidecar
from ..nets import ResNet
from ..zoo import CARD_FIELDS
from .onnx import deployable_copy, spec_json

PRECISIONS = ("float16", "float32")
TARGETS = ("iOS16", "iOS17", "iOS18")
_WORDS = {"resnet": "ResNet", "mobilenet": "MobileNet", "convnext": "ConvNeXt", "efficientnet": "EfficientNet", "regnet": "RegNet",
          "regnety": "RegNetY", "vit": "ViT", "swin": "Swin", "densenet": "DenseNet", "resnext": "ResNeXt"}
SWIFT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
INPUTS = ("image", "tensor")
DEBUG_FILES = ("executorch_debug_handle_mapping.json",)  # debugging aid coremltools writes; not part of the model


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Keep coremltools' import notices (untested torch version, scikit-learn, missing macOS libraries) and its
    conversion progress bars from reaching the user, unless verbose."""
    if verbose:
        yield
        return
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def import_coremltools(verbose: bool = False):
    with quiet(verbose):
        import coremltools as ct
    return ct


class _Deployable(nn.Module):
    """What the package computes: optional per-channel normalization, the network, softmax."""

    def __init__(self, net: nn.Module, inv_std: list[float] | None):
        super().__init__()
        self.net = net
        self.register_buffer("scale", None if inv_std is None else torch.tensor(inv_std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        if self.scale is not None:
            x = x * self.scale
        return torch.softmax(self.net(x), dim=1)


def _image_input(ct, dm: dict):
    """The ImageType and the in-graph per-channel factor (None when one scale expresses the normalization).

    Core ML applies `scale * pixel + bias[c]` to an image input. (pixel / 255 - mean_c) / std_c is that form when
    every channel has the same std; otherwise the image input yields pixel / 255 - mean_c and the graph's first op
    multiplies by 1 / std_c.
    """
    c, h, w = dm.input_shape
    mean, std = list(dm.mean), list(dm.std)
    layout = ct.colorlayout.GRAYSCALE if c == 1 else ct.colorlayout.RGB
    if c not in (1, 3):
        raise ValueError(f"an image input needs 1 or 3 channels, this model takes {c}; use --coreml-input tensor")
    if max(std) - min(std) <= 1e-6 * max(std):
        s = std[0]
        bias = [-m / s for m in mean]
        return ct.ImageType(name="image", shape=(1, c, h, w), scale=1 / (255 * s), bias=bias if c == 3 else bias[0], color_layout=layout), None
    bias = [-m for m in mean]
    return ct.ImageType(name="image", shape=(1, c, h, w), scale=1 / 255, bias=bias if c == 3 else bias[0], color_layout=layout), [1 / s for s in std]


def package_name(model_name: str) -> str:
    """A Swift type name for a model's package: resnet56-sd -> ResNet56SD, resnet56-sd-prune -> ResNet56SDPrune."""
    out = []
    for part in re.split(r"[^0-9A-Za-z]+", model_name):
        if not part:
            continue
        word = re.match(r"[A-Za-z]*", part).group(0).lower()
        if word in _WORDS:
            out.append(_WORDS[word] + part[len(word):])
        elif part.isalpha() and len(part) <= 3:
            out.append(part.upper())  # sd, vit: initials
        else:
            out.append(part[0].upper() + part[1:])
    name = "".join(out)[:100] or "Model"
    return name if name[0].isalpha() else f"Model{name}"


def check_name(name: str) -> str:
    if not SWIFT_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: a package name must be a Swift identifier (letters, digits, _; not starting with a digit)")
    return name


def _binary_conv_ops(prog) -> list[str]:
    """Names of conv ops whose constant weight takes at most two values per output channel (binarized layers)."""
    names = []
    for op in prog.functions["main"].operations:
        if op.op_type != "conv" or op.weight.val is None:
            continue
        w = np.asarray(op.weight.val).reshape(op.weight.shape[0], -1)
        if w.shape[1] > 2 and all(np.unique(row).size <= 2 for row in w):
            names.append(op.name)
    return names


def _two_value_lut(w: np.ndarray):
    """The exact 1-bit table of one output channel whose weights take two values (+-alpha after BatchNorm folding):
    the two values, and which one each weight is. Found directly; k-means would find the same table, slower."""
    flat = np.asarray(w).reshape(-1)
    lo, hi = flat.min(), flat.max()
    return np.array([lo, hi], dtype=flat.dtype), (flat == hi).astype(np.uint8)


def convert(model: ResNet, meta: Sidecar, precision: str, input_kind: str, card: dict, verbose: bool = False, batch: int | None = 1,
            target: str | None = None, keep_batchnorm: bool = False):
    """The converted (in-memory) MLModel and facts about it; `card` is `zoo.card_fields` (description, author,
    license, version). `batch`: the batch of a tensor input (None: 1 to 1024); an image input takes one image.
    `target`: the minimum deployment target (TARGETS; default iOS18 for a binarized model, else iOS16).
    `keep_batchnorm`: leave BatchNorm apart from the convolutions (so that networks differing only in BatchNorm
    statistics have identical convolution weights, which a multifunction package stores once)."""
    ct = import_coremltools(verbose)
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig, linear_quantize_weights,
                                             palettize_weights)

    if precision not in PRECISIONS or input_kind not in INPUTS:
        raise ValueError(f"precision {precision!r} / input {input_kind!r}: expected one of {PRECISIONS} / {INPUTS}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown deployment target {target!r}; choose one of {', '.join(TARGETS)}")
    plain, binary_names = deployable_copy(model)
    dm = meta.data
    c, h, w = dm.input_shape
    if input_kind == "image":
        if dm.mean is None:
            raise ValueError("an image input builds the normalization in: give the mean and std of the model's input")
        inp, inv_std = _image_input(ct, dm)
        dyn = None
        example = torch.rand(1, c, h, w) * 255
    else:
        if batch is None:
            inp = ct.TensorType(name="input", shape=(ct.RangeDim(1, 1024, 1), c, h, w), dtype=np.float32)
            inv_std, dyn = None, {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
            example = torch.randn(2, c, h, w)
        else:
            inp = ct.TensorType(name="input", shape=(batch, c, h, w), dtype=np.float32)
            inv_std, dyn = None, None
            example = torch.randn(batch, c, h, w)
    wrapped = _Deployable(plain, inv_std).eval()
    target = target or ("iOS18" if binary_names else "iOS16")
    with quiet(verbose):
        ep = torch.export.export(wrapped, (example,), dynamic_shapes=dyn).run_decompositions({})
        passes = None
        if keep_batchnorm:
            passes = ct.PassPipeline.DEFAULT
            passes.remove_passes(["common::fuse_conv_batchnorm"])
        ml = ct.convert(ep, inputs=[inp], classifier_config=ct.ClassifierConfig(list(dm.classes)), pass_pipeline=passes,
                        convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32)
        binary_convs = _binary_conv_ops(ml._mil_program) if binary_names else []
        if binary_convs and target == "iOS18":
            one_bit = OpPalettizerConfig(mode="custom", lut_function=_two_value_lut, granularity="per_grouped_channel", group_size=1,
                                         weight_threshold=0)
            ml = palettize_weights(ml, OptimizationConfig(global_config=None, op_name_configs={n: one_bit for n in binary_convs}))
        elif binary_convs:  # iOS 16 / 17: no per-channel tables; +-alpha per channel is exact as symmetric int8
            int8 = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
            ml = linear_quantize_weights(ml, OptimizationConfig(global_config=None, op_name_configs={n: int8 for n in binary_convs}))
    n_conv = sum(isinstance(model.get_submodule(n), BinaryConv2d) for n in binary_names)
    if len(binary_convs) != n_conv:
        raise RuntimeError(f"{len(binary_convs)} convolutions compressed (1-bit table or int8), but the model has {n_conv} binarized ones")
    ml.short_description, ml.author, ml.license = card["description"], card["author"], card["license"]
    if card.get("version"):
        ml.version = card["version"]
    if input_kind == "image":
        ml.input_description["image"] = f"{'RGB' if c == 3 else 'grayscale'} image, {w}x{h} pixels; normalization is built in"
    else:
        ml.input_description["input"] = (f"NCHW float32 batch of shape (N, {c}, {h}, {w}): pixel / 255, then (x - mean) / std per channel, "
                                         f"mean {list(dm.mean)}, std {list(dm.std)}" if dm.mean is not None else
                                         f"NCHW float32 batch of shape (N, {c}, {h}, {w}), as the PyTorch model takes it")
    ml.output_description["classLabel"] = "most likely class"
    ml.output_description["classLabel_probs"] = "probability of each class"
    ml.user_defined_metadata.update({"sdcompress_spec": spec_json(model),
                                     **({"mean": str(list(dm.mean)), "std": str(list(dm.std))} if dm.mean is not None else {})})
    facts = {"deployment_target": target, "precision": precision, "input": input_kind,
             "binary_layers": {"form": ("1-bit table per output channel" if target == "iOS18" else "int8, one scale per output channel")
                               if binary_convs else None, "count": len(binary_convs)},
             "batch": 1 if input_kind == "image" else (batch or "1 to 1024"),
             "card": {k: card.get(k) for k in CARD_FIELDS}}
    return ml, facts


def _short_names(spec) -> None:
    """Rename the program's internal values and ops to short names (v12, op7). The converter's names
    (`_native_batch_norm_legit_no_training_3_cast_fp16`, ...) mean nothing to an app and weigh: model.mlmodel of
    the pruned, binarized ResNet-56 went from 64,522 to 46,786 bytes. The inputs and outputs keep theirs."""
    for fn in spec.mlProgram.functions.values():
        keep = {i.name for i in fn.inputs}
        for block in fn.block_specializations.values():
            keep |= set(block.outputs)
            mapping: dict[str, str] = {}
            for k, op in enumerate(block.operations):
                for arg in op.inputs.values():
                    for b in arg.arguments:
                        if b.WhichOneof("binding") == "name" and b.name in mapping:
                            b.name = mapping[b.name]
                for o in op.outputs:
                    if o.name not in keep:
                        mapping[o.name] = f"v{len(mapping)}"
                        o.name = mapping[o.name]
                if "name" in op.attributes:
                    op.attributes["name"].immediateValue.tensor.strings.values[0] = f"op{k}"
            if any(len(op.blocks) for op in block.operations):
                raise RuntimeError("nested blocks are not expected in an exported ResNet")


def _shared_consts(spec) -> None:
    """Declare each constant once per function: later const ops with the same type and value (a conv's strides,
    pads, dilations and groups, BatchNorm's epsilon, ...) are dropped and their users read the first. The converter
    declares them per op: 359 const ops with 23 distinct values in the full ResNet-56 with BatchNorm kept apart. The
    weights in weight.bin are untouched."""
    for fn in spec.mlProgram.functions.values():
        keep = {i.name for i in fn.inputs}
        for block in fn.block_specializations.values():
            keep |= set(block.outputs)
            first: dict[bytes, str] = {}
            alias: dict[str, str] = {}
            kept = []
            for op in block.operations:
                for arg in op.inputs.values():
                    for b in arg.arguments:
                        if b.WhichOneof("binding") == "name" and b.name in alias:
                            b.name = alias[b.name]
                if op.type == "const" and len(op.outputs) == 1 and op.outputs[0].name not in keep and not len(op.blocks):
                    key = op.outputs[0].type.SerializeToString(deterministic=True) + b"|" + \
                        op.attributes["val"].SerializeToString(deterministic=True)
                    if key in first:
                        alias[op.outputs[0].name] = first[key]
                        continue
                    first[key] = op.outputs[0].name
                kept.append(op)
            if len(kept) < len(block.operations):
                ops = [type(op)() for op in kept]
                for new, old in zip(ops, kept):
                    new.CopyFrom(old)
                del block.operations[:]
                block.operations.extend(ops)


def save(ml, path: Path, verbose: bool = False) -> None:
    """Write the package with each constant declared once, short internal names and without coremltools'
    debugging files."""
    ct = import_coremltools(verbose)
    spec = ml.get_spec()
    _shared_consts(spec)
    _short_names(spec)
    with quiet(verbose):
        slim = ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True)
        slim.save(str(path))
    for name in DEBUG_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
    for f in [path, *path.rglob("*")]:
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


# ---- verification --------------------------------------------------------------------------------------------
def _load_program(path: Path, verbose: bool = False):
    ct = import_coremltools(verbose)
    from coremltools.converters.mil.frontend.milproto.load import load

    with quiet(verbose):
        m = ct.models.MLModel(str(path), skip_model_load=True)
        spec = m.get_spec()
        return load(spec, spec.specificationVersion, m.weights_dir)


def _const(op) -> np.ndarray:
    """A constant op's value; compressed constants expanded by coremltools' own decompression."""
    if op.op_type == "const":
        return op.outputs[0].val
    if op.op_type == "constexpr_lut_to_dense":
        if "shape" in op.inputs:  # iOS 16 form
            return type(op).decompress(op.lut.val, op.indices.val, op.shape.val)
        return type(op).decompress(op.indices.val, op.lut.val, None if op.vector_axis is None else op.vector_axis.val)
    if op.op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_cast"):
        return op.materialized_val_inference() if hasattr(op, "materialized_val_inference") else op.value_inference()
    raise NotImplementedError(op.op_type)


def _t(v) -> torch.Tensor:
    a = np.asarray(v)
    return torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64))


def run_program(prog, inputs: dict[str, np.ndarray], function: str = "main") -> dict[str, torch.Tensor]:
    """Evaluate one function of an ML program (its ops, in torch, float32); every intermediate, by name."""
    import torch.nn.functional as F

    env: dict[str, torch.Tensor] = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()}
    f = prog.functions[function]

    def val(var):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return _t(var.val)
        raise KeyError(var.name)

    def arg(op, k, default=None):
        v = op.inputs.get(k)
        return default if v is None else val(v)

    for op in f.operations:
        t = op.op_type
        if t == "const" or t.startswith("constexpr_"):
            v = np.asarray(_const(op))
            if v.dtype.kind in "fiub":  # strings (pad_type, dtype names) stay attributes, read from the op
                env[op.outputs[0].name] = _t(v)
            continue
        x = arg(op, "x")
        if t == "conv":
            wt, b = arg(op, "weight"), arg(op, "bias")
            pad = [int(p) for p in arg(op, "pad", torch.zeros(4)).tolist()]
            if op.pad_type.val not in ("custom", "valid"):
                raise NotImplementedError(f"conv pad_type {op.pad_type.val}")
            x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
            y = F.conv2d(x, wt, b, stride=tuple(arg(op, "strides").tolist()), dilation=tuple(arg(op, "dilations").tolist()), groups=int(arg(op, "groups")))
        elif t == "linear":
            y = F.linear(x, arg(op, "weight"), arg(op, "bias"))
        elif t == "relu":
            y = torch.relu(x)
        elif t in ("add", "sub", "mul", "real_div"):
            a, b = x, arg(op, "y")
            y = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div}[t](a, b)
        elif t == "cast":
            y = x.float() if op.dtype.val.startswith("fp") else x.long()
        elif t == "slice_by_index":
            begin, end, stride = arg(op, "begin").tolist(), arg(op, "end").tolist(), arg(op, "stride").tolist()
            bm = op.begin_mask.val if op.begin_mask is not None else [False] * x.dim()
            em = op.end_mask.val if op.end_mask is not None else [False] * x.dim()
            idx = tuple(slice(None if bm[d] else begin[d], None if em[d] else end[d], stride[d]) for d in range(x.dim()))
            y = x[idx]
        elif t == "pad":
            p = arg(op, "pad").tolist()
            if op.mode.val != "constant":
                raise NotImplementedError(f"pad mode {op.mode.val}")
            torch_pad = []
            for d in reversed(range(len(p) // 2)):
                torch_pad += [int(p[2 * d]), int(p[2 * d + 1])]
            y = F.pad(x, torch_pad, value=float(op.constant_val.val))
        elif t == "reduce_mean":
            y = x.mean(dim=tuple(int(a) for a in arg(op, "axes").tolist()), keepdim=bool(op.keep_dims.val))
        elif t in ("max_pool", "avg_pool"):
            y = _pool(op, x, arg)
        elif t == "clip":
            y = torch.clamp(x, float(arg(op, "alpha")), float(arg(op, "beta")))
        elif t == "transpose":
            y = x.permute(*[int(d) for d in arg(op, "perm").tolist()])
        elif t == "layer_norm":
            axes = [int(a) % x.dim() for a in arg(op, "axes").tolist()]
            mean = x.mean(dim=axes, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
            y = (x - mean) / torch.sqrt(var + float(arg(op, "epsilon", torch.tensor(1e-5))))
            g, b = arg(op, "gamma"), arg(op, "beta")
            y = y * g if g is not None else y
            y = y + b if b is not None else y
        elif t == "batch_norm":
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x - arg(op, "mean").view(shape)) / torch.sqrt(arg(op, "variance").view(shape) + float(arg(op, "epsilon", torch.tensor(1e-5))))
            g, b = arg(op, "gamma"), arg(op, "beta")
            y = y * g.view(shape) if g is not None else y
            y = y + b.view(shape) if b is not None else y
        elif t == "gelu":
            mode = op.mode.val if op.mode is not None else "EXACT"
            y = F.gelu(x, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none") if mode != "SIGMOID_APPROXIMATION" else x * torch.sigmoid(1.702 * x)
        elif t == "sigmoid":
            y = torch.sigmoid(x)
        elif t == "silu":
            y = F.silu(x)
        elif t == "sigmoid_hard":
            y = torch.clamp(float(arg(op, "alpha")) * x + float(arg(op, "beta")), 0.0, 1.0)
        elif t == "matmul":
            a, b = x, arg(op, "y")
            a = a.transpose(-1, -2) if op.transpose_x is not None and op.transpose_x.val else a
            b = b.transpose(-1, -2) if op.transpose_y is not None and op.transpose_y.val else b
            y = torch.matmul(a, b)
        elif t == "concat":
            parts = [val(v) for v in op.values]
            y = torch.cat([p.to(parts[0].dtype).reshape(-1) if p.dim() == 0 else p.to(parts[0].dtype) for p in parts], dim=int(op.axis.val))
        elif t == "shape":
            y = torch.tensor(list(x.shape), dtype=torch.int64)
        elif t == "fill":
            y = torch.full([int(d) for d in arg(op, "shape").tolist()], float(arg(op, "value", torch.tensor(0.0))))
        elif t == "gather":
            ax, idx = int(arg(op, "axis", torch.tensor(0))), arg(op, "indices").long()
            y = torch.index_select(x, ax, idx.reshape(-1)).reshape(list(x.shape[:ax]) + list(idx.shape) + list(x.shape[ax + 1:]))
        elif t in ("squeeze", "expand_dims"):
            axes = [int(a) for a in arg(op, "axes").tolist()] if op.axes is not None else None
            if t == "squeeze":
                y = x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))
            else:
                y = x
                for a in sorted(a % (x.dim() + len(axes)) for a in axes):
                    y = y.unsqueeze(a)
        elif t == "reshape":
            y = x.reshape([int(s) for s in arg(op, "shape").tolist()])
        elif t == "softmax":
            y = torch.softmax(x, dim=int(op.axis.val))
        elif t == "classify":
            env["__probabilities__"] = val(op.probabilities)
            continue
        else:
            raise NotImplementedError(f"reference evaluation has no op {t!r}")
        env[op.outputs[0].name] = y
    return env


def _pool(op, x: torch.Tensor, arg) -> torch.Tensor:
    """MIL max_pool / avg_pool (custom or valid padding; `same` computed as TensorFlow does)."""
    import torch.nn.functional as F

    k = [int(v) for v in arg(op, "kernel_sizes").tolist()]
    st = [int(v) for v in arg(op, "strides").tolist()]
    kind = op.pad_type.val
    if kind == "custom":
        pad = [int(v) for v in arg(op, "pad").tolist()]
    elif kind == "valid":
        pad = [0] * 4
    elif kind == "same":
        pad = []
        for d, (kk, ss) in enumerate(zip(k, st)):
            n = x.shape[2 + d]
            total = max((math.ceil(n / ss) - 1) * ss + kk - n, 0)
            pad += [total // 2, total - total // 2]
    else:
        raise NotImplementedError(f"pool pad_type {kind}")
    ceil = bool(op.ceil_mode.val) if op.ceil_mode is not None else False
    if op.op_type == "max_pool":
        x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]), value=-math.inf)
        return F.max_pool2d(x, k, st, ceil_mode=ceil)
    exclude = bool(op.exclude_padding_from_average.val) if op.exclude_padding_from_average is not None else False
    ones = F.pad(torch.ones_like(x[:1, :1]), (pad[2], pad[3], pad[0], pad[1]))
    x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    y = F.avg_pool2d(x, k, st, ceil_mode=ceil)
    return y / F.avg_pool2d(ones, k, st, ceil_mode=ceil) if exclude else y


def _reference_outputs(path: Path, inputs: np.ndarray, input_name: str, verbose: bool, function: str = "main"):
    prog = _load_program(path, verbose)
    softmax = [op for op in prog.functions[function].operations if op.op_type == "softmax"][-1]
    shape = prog.functions[function].inputs[input_name].shape
    chunks = [inputs[i:i + 1] for i in range(len(inputs))] if isinstance(shape[0], int) else [inputs]  # an image input is one image
    logits, probs = [], []
    for x in chunks:
        env = run_program(prog, {input_name: x}, function)
        logits.append(env[softmax.x.name].numpy())
        probs.append(env["__probabilities__"].numpy())
    return np.concatenate(logits), np.concatenate(probs)


def _macos_outputs(path: Path, inputs: np.ndarray, input_kind: str, classes: list, verbose: bool, function: str = "main"):
    ct = import_coremltools(verbose)
    from PIL import Image

    ml = ct.models.MLModel(str(path), **({} if function == "main" else {"function_name": function}))
    probs = []
    for x in inputs:
        if input_kind == "image":
            arr = x.astype(np.uint8)
            img = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
            out = ml.predict({"image": img})
        else:
            out = ml.predict({"input": x[None].astype(np.float32)})
        d = out["classLabel_probs"]
        probs.append([d[str(k)] for k in classes])
    return None, np.asarray(probs, np.float32)


TOLERANCE = {"float32": {"atol": 1e-4, "agree": 1.0}, "float16": {"atol": 1e-2, "agree": 0.98}}


def verify(path: Path, model: ResNet, meta: Sidecar, images_uint8: torch.Tensor, input_kind: str, precision: str, verbose: bool = False,
           function: str = "main") -> dict:
    """Reload the written package, run it (its `function`) on real images and compare with PyTorch (probabilities
    and logits)."""
    from ..data import Normalize

    dm = meta.data
    return verify_inputs(path, model, dm.classes, Normalize(dm.mean, dm.std)(images_uint8), images_uint8.float(), input_kind, precision,
                         verbose, function)


def verify_inputs(path: Path, model: nn.Module, classes, x: torch.Tensor, pixels: torch.Tensor | None, input_kind: str, precision: str,
                  verbose: bool = False, function: str = "main") -> dict:
    """`verify` on model inputs `x` (what the PyTorch model takes) and, for an image input, the same images as
    pixel values 0-255 (`pixels`)."""
    with torch.no_grad():
        ref_logits = model.cpu().eval()(x)
    ref_probs = torch.softmax(ref_logits, 1).numpy()
    feed = pixels.float().numpy() if input_kind == "image" else x.numpy()
    if sys.platform == "darwin":
        logits, probs = _macos_outputs(path, feed, input_kind, classes, verbose, function)
        how = "Core ML prediction (macOS)"
    else:
        logits, probs = _reference_outputs(path, feed, "image" if input_kind == "image" else "input", verbose, function)
        how = "reference evaluation of the package's ML program (coremltools loader, torch ops)"
    ok_shape = probs.shape == ref_probs.shape
    diff = float(np.abs(probs - ref_probs).max()) if ok_shape else math.inf
    ldiff = float(np.abs(logits - ref_logits.numpy()).max()) if logits is not None and logits.shape == ref_logits.shape else None
    agree = float((probs.argmax(1) == ref_probs.argmax(1)).mean()) if ok_shape else 0.0
    tol = TOLERANCE[precision]
    ok = ok_shape and diff <= tol["atol"] and agree >= tol["agree"]
    return {"max_abs_diff": diff, "max_abs_diff_logits": ldiff, "top1_agreement": agree, "n": int(len(feed)),
            "compared": "class probabilities", "atol": tol["atol"], "min_top1_agreement": tol["agree"], "method": how, "ok": ok}
