"""Exporters for phones: ONNX and ORT (onnxruntime), Core ML (coremltools), ExecuTorch (.pte) and LiteRT (.tflite),
each file verified by its own runtime on real inputs. What they share lives here."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn


@contextlib.contextmanager
def quiet_stderr():
    """Runtimes and converters written in C++ (ExecuTorch's CPU probe, LiteRT's absl logging) write straight to file
    descriptor 2: keep those lines off the user's screen (Python errors still surface as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet_imports():
    """torchao (imported by ExecuTorch) registers an Enum with torch's pytree, which logs a deprecation warning to the
    user's screen on every command: keep that logger to errors while the runtimes are imported."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def float_layer(layer: nn.Module) -> nn.Module:
    """A float Conv2d / Linear holding a binary layer's effective weight sign(w) * alpha."""
    from ..binary import BinaryConv2d

    w = layer.binary_weight().detach()
    if isinstance(layer, BinaryConv2d):
        out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        layer.groups, layer.bias is not None)
    else:
        out = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.detach())
    return out


def swap_binary_layers(model: nn.Module, replace=None) -> tuple[nn.Module, list[str]]:
    """An evaluation-time copy of `model` whose binary layers are `replace(layer)` (default `float_layer`), and
    their names."""
    from ..binary import BinaryConv2d, BinaryLinear

    work = copy.deepcopy(model).cpu().eval()
    names = [n for n, m in work.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    for name in names:
        work.set_submodule(name, (replace or float_layer)(work.get_submodule(name)))
    return work.eval(), names


def run_in_batches(run_one, x: torch.Tensor, batch: int) -> np.ndarray:
    """`run_one` (a runtime's call on one fixed-size batch) over `x`, in runs of `batch`; a last partial run is padded
    with copies of its first image and cut back."""
    outs = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        full = torch.cat([part, part[:1].expand(batch - len(part), *part.shape[1:])]) if len(part) < batch else part
        outs.append(np.asarray(run_one(full.contiguous()))[:len(part)].copy())
    return np.concatenate(outs)


def median_ms(run_one, x: torch.Tensor, runs: int = 50, warmup: int = 10) -> float:
    """Median wall time of `run_one(x)` in milliseconds after warm-up; a slow file (over 50 ms a run) gets 10 runs."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run_one(x)
    if (time.perf_counter() - t0) / warmup > 0.05:
        runs = min(runs, 10)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run_one(x)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
