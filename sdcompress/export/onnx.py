"""ONNX export of the evaluation-time network: one self-contained file, dynamic batch, bits stored as bits.

The exported graph is the evaluation-time network only (every kept block, scaled by p_l; no random ops).
Binarized convolutions are first turned into plain convolutions with weights sign(w) * alpha; after export
(where BatchNorm folds into them, which keeps two values per output channel), each such weight initializer is
replaced by its sign bits packed into a uint8 initializer plus one scale per output channel, and a small subgraph
of standard ops (BitShift, BitwiseAnd, Cast, Mul, Sub, Reshape; opset 18) rebuilds the weight. onnxruntime folds
that subgraph when the session is created, so it costs nothing at run time.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings

import numpy as np
import torch
from torch import nn

from ..binarize import BinaryConv2d, BinaryLinear
from ..checkpoint import Sidecar
from ..nets import ResNet

OPSET = 18


def _plain_copy(model: ResNet) -> tuple[ResNet, list[str]]:
    """A copy whose binary layers are ordinary layers holding their binarized weights; and those layers' names."""
    m = copy.deepcopy(model).cpu().eval()
    names = []
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (BinaryConv2d, BinaryLinear)):
            if isinstance(mod, BinaryConv2d):
                plain = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups, mod.bias is not None)
            else:
                plain = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(mod.binary_weight())
                if mod.bias is not None:
                    plain.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, plain)
            names.append(name)
    return m, names


def _export_proto(model: nn.Module, input_shape: tuple[int, ...]):
    import onnx  # noqa: F401 - fail early with a clear import error

    x = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(model, (x,), dynamo=True, external_data=False, opset_version=OPSET, verbose=False,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return prog.model_proto


SHARED = {  # constants every unpacking subgraph uses, stored once per file
    "unpack_shifts": np.arange(8, dtype=np.uint8).reshape(1, 1, 8),
    "unpack_one": np.array(1, dtype=np.uint8),
    "unpack_start": np.array([0], dtype=np.int64),
    "unpack_axis": np.array([1], dtype=np.int64),
    "unpack_last_axis": np.array([2], dtype=np.int64),
    "unpack_two": np.array(2.0, dtype=np.float32),
    "unpack_unit": np.array(1.0, dtype=np.float32),
}


def _pack_initializer(graph, init, prefix: str) -> bool:
    """Replace a +-scale-per-channel float initializer by packed sign bits + scales + an unpacking subgraph."""
    from onnx import helper, numpy_helper, TensorProto

    w = numpy_helper.to_array(init)
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1)
    if not np.allclose(np.abs(flat), scale[:, None], rtol=1e-6, atol=0):
        return False  # not two values per output channel: leave it in float
    n = flat.shape[1]
    bits = np.packbits(flat >= 0, axis=1, bitorder="little")
    name = init.name
    nb = bits.shape[1]
    p = prefix
    consts = {
        f"{p}_bits": bits.astype(np.uint8),
        f"{p}_scale": scale.astype(np.float32).reshape(-1, *([1] * (w.ndim - 1))),
        f"{p}_flat": np.array([w.shape[0], nb * 8], dtype=np.int64),
        f"{p}_end": np.array([n], dtype=np.int64),
        f"{p}_shape": np.array(w.shape, dtype=np.int64),
    }
    graph.initializer.remove(init)
    have = {i.name for i in graph.initializer}
    for k, v in SHARED.items():
        if k not in have:
            graph.initializer.append(numpy_helper.from_array(v, k))
    for k, v in consts.items():
        graph.initializer.append(numpy_helper.from_array(v, k))
    nodes = [
        helper.make_node("Unsqueeze", [f"{p}_bits", "unpack_last_axis"], [f"{p}_u"]),
        helper.make_node("BitShift", [f"{p}_u", "unpack_shifts"], [f"{p}_shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{p}_shifted", "unpack_one"], [f"{p}_bit"]),
        helper.make_node("Reshape", [f"{p}_bit", f"{p}_flat"], [f"{p}_bitflat"]),
        helper.make_node("Slice", [f"{p}_bitflat", "unpack_start", f"{p}_end", "unpack_axis"], [f"{p}_bitn"]),
        helper.make_node("Cast", [f"{p}_bitn"], [f"{p}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_f", "unpack_two"], [f"{p}_f2"]),
        helper.make_node("Sub", [f"{p}_f2", "unpack_unit"], [f"{p}_sign"]),
        helper.make_node("Reshape", [f"{p}_sign", f"{p}_shape"], [f"{p}_signw"]),
        helper.make_node("Mul", [f"{p}_signw", f"{p}_scale"], [name]),
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    return True


def export_onnx(model: ResNet, meta: Sidecar) -> tuple[bytes, dict]:
    """The ONNX file's bytes for a model, and facts about it (opset, packed layers)."""
    import onnx

    plain, binary_names = _plain_copy(model)
    proto = _export_proto(plain, meta.data.input_shape)
    graph = proto.graph
    for node in graph.node:  # per-node debugging metadata: tens of KB, no use to an app
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.value_info[:]  # intermediate shapes: onnxruntime infers them at load time
    packed = 0
    binary_weights = {f"{n}.weight" for n in binary_names}
    for i, init in enumerate(list(graph.initializer)):
        if init.name in binary_weights and _pack_initializer(graph, init, f"bin{i}"):
            packed += 1
    if packed != len(binary_weights):
        raise RuntimeError(f"only {packed} of {len(binary_weights)} binarized layers could be stored as bits")
    dm = meta.data
    props = {
        "input_layout": "NCHW float32, RGB" if dm.input_shape[0] == 3 else "NCHW float32",
        "input_shape": json.dumps(dm.input_shape),
        "preprocessing": "pixel / 255, then (x - mean) / std per channel",
        "mean": json.dumps(dm.mean),
        "std": json.dumps(dm.std),
        "class_names": json.dumps(dm.classes),
        "output": "logits (apply softmax for probabilities)",
        "sdcompress_spec": json.dumps(model.spec.to_dict()),
    }
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "sdcompress"
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), {"opset": OPSET, "binary_layers_packed": packed, "metadata": sorted(props)}


def ort_session(data: bytes | str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def latency_ms(session, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10) -> float:
    """Median onnxruntime latency of one image (batch 1), after warm-up."""
    import time

    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def verify_onnx(session, model: ResNet, x: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-3) -> dict:
    """Compare onnxruntime with PyTorch on a batch of real (normalized) inputs."""
    with torch.no_grad():
        ref = model.cpu().eval()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else math.inf
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if got.shape == ref.shape else 0.0
    ok = got.shape == ref.shape and bool(np.allclose(got, ref, atol=atol, rtol=rtol))
    return {"max_abs_diff": diff, "top1_agreement": agree, "n": int(x.shape[0]), "atol": atol, "rtol": rtol, "ok": ok}
