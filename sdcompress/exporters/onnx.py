"""ONNX export of the evaluation-time network: one self-contained file, in the weight form a runtime keeps small.

The exported graph is the evaluation-time network only (every kept block; no random ops), in a mobile-friendly
form: the per-block p_l scaling is folded into the branch's last BatchNorm (and so into its convolution), option-A
shortcuts concatenate zeros instead of a channel `Pad`, global average pooling is `GlobalAveragePool`, and the
batch is fixed (1 by default for mobile targets; `batch=None` keeps it dynamic).

Weight forms (`WEIGHTS`):
- `float`: float32 initializers.
- `int8`, `int4`: every Conv / Gemm / MatMul weight as a standard `DequantizeLinear` of int8 (int4) values with one
  float32 scale per output channel (symmetric, axis 0 for convolutions). A binarized layer (sign(w) * alpha) is
  exact in either; a float layer is rounded, and the PyTorch reference the file is verified against has the same
  rounded weights (`deployable_copy(quantize=...)`), so verification stays exact and the rounding is reported apart.
- `1bit`: binarized layers as their sign bits packed 8 to a byte (uint8) plus one scale per output channel; the
  weight is rebuilt in the graph by a table lookup (Cast to int32, Gather from a shared 256 x 8 table of +-1, Mul
  by the scales, Reshape), standard ops that onnxruntime and OpenCV DNN both run. Other layers stay float.
- `auto`: float for a float model; for a binarized model its binarized layers in the smallest exact form that the
  target keeps small (see `auto_form`), the rest float.

onnxruntime folds the 1-bit lookup at session creation (no cost per run) - and so does its ORT-format converter,
which therefore writes the float weights back into the `.ort` file. `ort_format` converts with the converter's own
settings, except that constant folding is left out when the graph holds 1-bit lookups: the `.ort` file keeps the
bits and rebuilds the weights on every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..binary import BinaryConv2d, BinaryLinear
from ..checkpoint import Sidecar
from ..nets import ResNet, Shortcut, scale_blocks
from . import swap_binary_layers

OPSET = 18
OPSET_INT4 = 21  # int4 tensors (and DequantizeLinear of them) need opset 21
WEIGHTS = ("auto", "float", "int8", "int4", "1bit")
QMAX = {"int8": 127, "int4": 7}
SIGN_TABLE = "sign_table"


class ConcatShortcut(nn.Module):
    """Option-A shortcut as a deployment graph has it: stride-2 subsampling, then zero channels concatenated on
    both sides (the same values as `Shortcut`'s channel `Pad`, which Core ML's ML-program EP does not take)."""

    def __init__(self, s: Shortcut):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = s.in_channels, s.out_channels, s.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if not extra:
            return x
        n, _, h, w = x.shape
        lo, hi = extra // 2, extra - extra // 2
        return torch.cat([x.new_zeros(n, lo, h, w), x, x.new_zeros(n, hi, h, w)], dim=1)


def _fake_quantize(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """w rounded to qmax levels per output channel (symmetric): q * s with s = max|w| / qmax."""
    flat = w.reshape(w.shape[0], -1)
    s = flat.abs().amax(1).clamp_min(torch.finfo(w.dtype).tiny) / qmax
    return (torch.round(flat / s[:, None]).clamp(-qmax, qmax) * s[:, None]).reshape(w.shape)


def fold_survival(m: nn.Module) -> None:
    """In place: each block's evaluation-time p_l scaling folded into its last BatchNorm (p * bn2(z) == bn2'(z) with
    gamma' = p * gamma, beta' = p * beta, `nets.scale_blocks(m, 1)`), so the graph has no multiply for it."""
    if not isinstance(m, ResNet):  # torchvision / timm networks do not scale their blocks
        return
    scale_blocks(m, 1)
    for b in m.block_ids:
        m.blocks[str(b)].survival_prob = 1.0


def deployable_copy(model: nn.Module, quantize: str | None = None) -> tuple[nn.Module, list[str]]:
    """The network an exported file computes, as a PyTorch module, and the names of its binarized layers.

    Binary layers become ordinary layers holding sign(w) * alpha; in the project's ResNets the p_l scaling of each
    block is folded into its last BatchNorm and option-A shortcuts become `ConcatShortcut`s (same outputs).
    `quantize` ("int8" / "int4") rounds every convolution and linear weight of a float model as the file stores it;
    a binarized model is left as it is (its binary layers are exact in either form, its float layers stay float).
    """
    m, names = swap_binary_layers(model)
    if isinstance(m, ResNet):
        fold_survival(m)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, Shortcut) and (mod.stride != 1 or mod.in_channels != mod.out_channels):
                m.set_submodule(name, ConcatShortcut(mod))
    if quantize is not None and not names:
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    mod.weight.copy_(_fake_quantize(mod.weight, QMAX[quantize]))
    return m, names


def auto_form(model: nn.Module, target: str) -> str:
    """The weight form `auto` means: float for a float model; for a binarized one, the smallest exact form that
    survives the target's own conversion. `onnx` (a file users convert themselves): int8, because onnxruntime's
    ORT-format converter folds 1-bit lookups back to float and refuses int4. `ort` (converted here): 1bit."""
    binary = any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in model.modules())
    if not binary:
        return "float"
    return "1bit" if target == "ort" else "int8"


def _export_proto(model: nn.Module, input_shape: tuple[int, ...], batch: int | None, opset: int):
    import onnx  # noqa: F401 - fail early with a clear import error

    x = torch.zeros(batch or 2, *input_shape)
    dynamic = None if batch else {"x": {0: torch.export.Dim("batch")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(model, (x,), dynamo=True, external_data=False, opset_version=opset, verbose=False,
                                 input_names=["input"], output_names=["logits"], dynamic_shapes=dynamic)
    return prog.model_proto


def _global_average_pool(proto) -> int:
    """Replace ReduceMean over H and W of a 4-D tensor by GlobalAveragePool (plus Flatten when the mean dropped
    those axes): the form every mobile runtime's pooling kernel takes. Returns how many were replaced."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto)
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.graph.value_info, *inferred.graph.input]}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    replaced = 0
    for node in list(graph.node):
        if node.op_type != "ReduceMean" or len(node.input) < 2 or rank.get(node.input[0]) != 4:
            continue
        axes = consts.get(node.input[1])
        if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
            continue
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        at = list(graph.node).index(node)
        graph.node.remove(node)
        if keep:
            new = [helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]])]
        else:
            pooled = f"{node.output[0]}_gap"
            new = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled]),
                   helper.make_node("Flatten", [pooled], [node.output[0]], axis=1)]
        for j, n in enumerate(new):
            graph.node.insert(at + j, n)
        replaced += 1
    used = {i for n in graph.node for i in n.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return replaced


def _explicit_constant_values(graph) -> None:
    """Give ConstantOfShape nodes their (default, zero) `value` explicitly: OpenCV DNN refuses one without it."""
    from onnx import TensorProto, helper

    for node in graph.node:
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])))


def _weight_inputs(graph) -> dict[str, int]:
    """Initializers that are a Conv, Gemm or MatMul weight, with the axis of their output channels."""
    inits = {i.name for i in graph.initializer}
    found = {}
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Conv":
            found[node.input[1]] = 0
        elif node.op_type == "Gemm":
            found[node.input[1]] = 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
        elif node.op_type == "MatMul":
            found[node.input[1]] = 1
    return found


def _per_channel(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _quantize_initializer(graph, init, axis: int, form: str) -> bool:
    """Replace a weight whose values are q * s per output channel (|q| <= qmax) by DequantizeLinear(q, s)."""
    from onnx import TensorProto, helper, numpy_helper

    qmax = QMAX[form]
    w = numpy_helper.to_array(init).astype(np.float32)
    flat = _per_channel(w, axis)
    amax = np.abs(flat).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -qmax, qmax)
    if not np.allclose(q * scale[:, None], flat, rtol=1e-5, atol=1e-7 * max(float(amax.max()), 1e-30)):
        return False  # not on qmax levels per channel (the export changed it): leave it in float
    q = np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis).astype(np.int8)
    name = init.name
    if form == "int8":
        qt = numpy_helper.from_array(q, f"{name}_q")
    else:  # two 4-bit values a byte, low nibble first (the ONNX int4 layout)
        nib = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        qt = helper.make_tensor(f"{name}_q", TensorProto.INT4, q.shape, (nib[0::2] | (nib[1::2] << 4)).tobytes(), raw=True)
    graph.initializer.remove(init)
    graph.initializer.extend([qt, numpy_helper.from_array(scale, f"{name}_scale")])
    graph.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale"], [name], axis=axis))
    return True


def _pack_initializer(graph, init, axis: int) -> bool:
    """Replace a +-scale-per-output-channel weight by packed sign bits, scales and a table lookup."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.to_array(init).astype(np.float32)
    if axis != 0:
        return False
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1)
    if not np.allclose(np.abs(flat), scale[:, None], rtol=1e-6, atol=0):
        return False  # not two values per output channel: leave it in float
    c, n = flat.shape
    bits = np.packbits(flat >= 0, axis=1, bitorder="little")
    nb = bits.shape[1]
    name = init.name
    if SIGN_TABLE not in {i.name for i in graph.initializer}:  # row b: bit k of b as +-1, k = 0..7
        table = np.where((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1, 1.0, -1.0).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(table, SIGN_TABLE))
    graph.initializer.remove(init)
    consts = {f"{name}_bits": bits.astype(np.uint8), f"{name}_shape": np.array(w.shape, dtype=np.int64)}
    nodes = [helper.make_node("Cast", [f"{name}_bits"], [f"{name}_idx"], to=TensorProto.INT32),
             helper.make_node("Gather", [SIGN_TABLE, f"{name}_idx"], [f"{name}_signs"], axis=0)]  # (c, nb, 8)
    signs = f"{name}_signs"
    if n % 8:  # the last byte of each channel is padded: cut the padding off
        consts.update({f"{name}_flat": np.array([c, nb * 8], dtype=np.int64), f"{name}_start": np.array([0], dtype=np.int64),
                       f"{name}_end": np.array([n], dtype=np.int64), f"{name}_axis": np.array([1], dtype=np.int64)})
        nodes += [helper.make_node("Reshape", [signs, f"{name}_flat"], [f"{name}_sflat"]),
                  helper.make_node("Slice", [f"{name}_sflat", f"{name}_start", f"{name}_end", f"{name}_axis"], [f"{name}_scut"])]
        signs = f"{name}_scut"
        consts[f"{name}_scale"] = scale.astype(np.float32).reshape(c, 1)
    else:
        consts[f"{name}_scale"] = scale.astype(np.float32).reshape(c, 1, 1)
    nodes += [helper.make_node("Mul", [signs, f"{name}_scale"], [f"{name}_w"]),
              helper.make_node("Reshape", [f"{name}_w", f"{name}_shape"], [name])]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    return True


def spec_json(model: nn.Module) -> str:
    """What an exported file says it holds: the project's network spec, or a user's module's class and blocks."""
    spec = getattr(model, "spec", None)
    if hasattr(spec, "to_dict"):
        return json.dumps(spec.to_dict())
    return json.dumps({"class": f"{type(model).__module__}.{type(model).__qualname__}",
                       "params": sum(p.numel() for p in model.parameters())})


def export_onnx(model: nn.Module, meta: Sidecar, weights: str = "float", batch: int | None = None) -> tuple[bytes, dict, nn.Module]:
    """The ONNX file's bytes for a model, facts about it, and the PyTorch module it computes (the reference to
    verify it against: the same as `model` except for int8/int4 rounding of float layers). `meta` is anything with
    the sidecar's `data` (a `checkpoint.DataInfo`: input shape, classes, and mean / std or None).

    `weights` is one of WEIGHTS other than auto (resolve it with `auto_form`); `batch` fixes the batch size (None:
    dynamic)."""
    import onnx

    if weights not in WEIGHTS[1:]:
        raise ValueError(f"weights {weights!r}: expected one of {WEIGHTS[1:]}")
    reference, binary_names = deployable_copy(model, weights if weights in QMAX else None)
    if weights == "1bit" and not binary_names:
        raise ValueError("--weights 1bit needs a binarized model (sdcompress binarize); this one has no binary layers")
    proto = _export_proto(reference, meta.data.input_shape, batch, OPSET_INT4 if weights == "int4" else OPSET)
    graph = proto.graph
    for node in graph.node:  # per-node debugging metadata: tens of KB, no use to an app
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.value_info[:]  # intermediate shapes: onnxruntime infers them at load time
    pools = _global_average_pool(proto)
    _explicit_constant_values(graph)
    axes = _weight_inputs(graph)
    binary_weights = {f"{n}.weight" for n in binary_names}
    stored = {"float": 0, weights: 0}
    for init in [i for i in graph.initializer if i.name in axes]:
        # a binarized model's float layers (stem, classifier, ...) stay float in every form
        target = weights != "float" and (not binary_weights or init.name in binary_weights)
        if target and weights == "1bit":
            target = _pack_initializer(graph, init, axes[init.name])
        elif target:
            target = _quantize_initializer(graph, init, axes[init.name], weights)
        stored[weights if target else "float"] += 1
    if weights == "1bit" and stored["1bit"] != len(binary_weights):
        raise RuntimeError(f"only {stored['1bit']} of {len(binary_weights)} binarized layers could be stored as bits")
    if weights in QMAX and stored[weights] != (len(binary_weights) if binary_weights else len(axes)):
        raise RuntimeError(f"only {stored[weights]} weights are on {weights} levels after export; nothing written")
    dm = meta.data
    props = {
        "input_layout": "NCHW float32, RGB" if dm.input_shape[0] == 3 else "NCHW float32",
        "input_shape": json.dumps([batch or "N", *dm.input_shape]),
        **({"preprocessing": "pixel / 255, then (x - mean) / std per channel", "mean": json.dumps(dm.mean), "std": json.dumps(dm.std)}
           if dm.mean is not None else {"preprocessing": "none here: the input the PyTorch model takes"}),
        "class_names": json.dumps(dm.classes),
        "output": "logits (apply softmax for probabilities)",
        "weights": weights,
        "sdcompress_spec": spec_json(model),
    }
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "sdcompress"
    onnx.checker.check_model(proto)
    facts = {"opset": proto.opset_import[0].version, "weights": weights, "layers_by_form": stored, "batch": batch or "dynamic",
             "global_average_pools": pools, "rounded": weights in QMAX and not binary_names, "metadata": sorted(props)}
    return proto.SerializeToString(), facts, reference


@contextlib.contextmanager
def _silent():
    """onnxruntime's tools print and log what they do; an export reports it instead."""
    log = logging.getLogger("ort_format_model.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def consumer_ort_bytes(onnx_path: Path) -> int | None:
    """Size of the `.ort` file onnxruntime's own converter (`convert_onnx_models_to_ort`, its defaults) makes of a
    file, or None where the converter refuses it (int4 weights)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in" / "model.onnx"
        src.parent.mkdir()
        src.write_bytes(Path(onnx_path).read_bytes())
        try:
            with _silent():
                convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "out", optimization_styles=[OptimizationStyle.Fixed])
            ort_session(str(Path(tmp) / "out" / "model.ort"))  # it writes int4 files that onnxruntime then refuses to load
            return (Path(tmp) / "out" / "model.ort").stat().st_size
        except Exception:  # noqa: BLE001 - the converter's refusal is the answer
            return None


def ort_format(onnx_path: Path, ort_path: Path, config_path: Path, keep_bits: bool) -> dict:
    """Convert to ORT format as onnxruntime's converter does for ARM targets (`--target_platform arm`: level all, no
    NCHWc, int8 QDQ allowed), leaving constant folding out when the graph rebuilds 1-bit weights (`keep_bits`), and
    write the reduced build's operator configuration."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(ort_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    disabled = ["NchwcTransformer"] + (["ConstantFolding"] if keep_bits else [])
    try:
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        ort_session(str(ort_path))  # onnxruntime writes int4 weights in ORT format, then refuses to load them
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"onnxruntime cannot write this graph in ORT format: {str(e).splitlines()[0][:200]}") from None
    with _silent():
        create_config_from_models([ort_path], config_path, False)
    return {"constant_folding": not keep_bits, "operator_config": config_path.name}


def mobile_usability(onnx_path: Path, optimize: bool = True) -> dict:
    """onnxruntime's mobile usability check of a file: how its nodes partition for NNAPI and the Core ML EPs.
    `optimize`: first optimize at level basic as the checker does (False for a graph kept as is, as an ORT file
    converted without constant folding is)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    with tempfile.TemporaryDirectory() as tmp, _silent():
        checked = Path(onnx_path)
        if optimize:
            checked = Path(tmp) / "model.onnx"
            uc.optimize_model(Path(onnx_path), checked, use_external_initializers=True)  # as the checker does: level basic
        model = ModelProtoWithShapeInfo(checked).model_with_shape_info
        infos = {"nnapi": uc.check_nnapi_partitions(model, True),
                 "coreml_neuralnetwork": uc.check_coreml_partitions(model, True, "coreml_supported_neuralnetwork_ops.md"),
                 "coreml_mlprogram": uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md")}
    return {ep: {"nodes": i.num_nodes, "supported": i.num_supported_nodes, "partitions": i.num_partitions,
                 "unsupported_ops": sorted(i.unsupported_ops), "dynamic_input_nodes": i.nodes_unsupported_due_to_dynamic_input,
                 "verdict": i.suitability().name.lower()} for ep, i in infos.items()}


def ort_session(data: bytes | str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def fixed_batch(session) -> int | None:
    b = session.get_inputs()[0].shape[0]
    return b if isinstance(b, int) else None


def latency_ms(session, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10) -> float:
    """Median onnxruntime latency of one run at the graph's batch (its fixed batch size, else 1), after warm-up."""
    x = np.random.default_rng(0).standard_normal((fixed_batch(session) or 1, *input_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def interleaved_latency(sessions: dict[str, object], input_shape, rounds: int = 5, runs: int = 20) -> dict[str, float]:
    """Median latency of each onnxruntime session at its batch (its fixed batch size, else 1), all timed in this one run
    in interleaved rounds. A value may be (session, extra inputs) for a graph that takes more than the image (a depth
    family's `depth_index`)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for k, v in sessions.items():
        s, extra = v if isinstance(v, tuple) else (v, {})
        x = rng.standard_normal((fixed_batch(s) or 1, *input_shape)).astype(np.float32)
        feeds[k] = (s, {s.get_inputs()[0].name: x, **extra})
    for s, feed in feeds.values():
        for _ in range(10):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, (s, feed) in feeds.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def latency_entry(ms: float, batch: int | None, **more) -> dict:
    """A file's latency as reports give it: `onnxruntime_cpu_b1` for a graph that runs one image (batch 1 or dynamic);
    a graph fixed at another batch has no batch-1 figure, and `ms` is one run of its `batch` images."""
    b = batch or 1
    return {"onnxruntime_cpu_b1": ms if b == 1 else None, "batch": b, "ms": ms, **more}


def run_batches(session, x: np.ndarray, extra: dict | None = None) -> np.ndarray:
    """The session's outputs on x, in batches of its fixed batch size where it has one (`extra`: more inputs)."""
    b = fixed_batch(session) or len(x)
    name = session.get_inputs()[0].name
    outs = []
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        n = len(chunk)
        if n < b:  # pad the last batch of a fixed-batch graph
            chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {name: chunk, **(extra or {})})[0][:n])
    return np.concatenate(outs)


def compare_outputs(got: np.ndarray, ref: np.ndarray, atol: float = 1e-5, rtol: float = 1e-3) -> dict:
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else math.inf
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if got.shape == ref.shape else 0.0
    ok = got.shape == ref.shape and bool(np.allclose(got, ref, atol=atol, rtol=rtol))
    return {"max_abs_diff": diff, "top1_agreement": agree, "n": int(ref.shape[0]), "atol": atol, "rtol": rtol, "ok": ok}


def verify_onnx(session, model: nn.Module, x: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-3) -> dict:
    """Compare onnxruntime with PyTorch on a batch of real (normalized) inputs."""
    with torch.no_grad():
        ref = model.cpu().eval()(x).numpy()
    return compare_outputs(run_batches(session, x.numpy()), ref, atol, rtol)
