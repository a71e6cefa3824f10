"""Exporters for phones: ONNX and ORT (onnxruntime), Core ML (coremltools), ExecuTorch (.pte) and LiteRT (.tflite),
each file verified by its own runtime on real inputs. What they share lives here."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys

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


def swap_binary_layers(model: nn.Module, replace) -> tuple[nn.Module, int]:
    """An evaluation-time copy of `model` whose binary layers are `replace(layer)`, and how many there were."""
    from ..binary import BinaryConv2d, BinaryLinear

    work = copy.deepcopy(model).cpu().eval()
    binary = [(n, m) for n, m in work.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    for name, layer in binary:
        parent = work.get_submodule(name.rpartition(".")[0]) if "." in name else work
        setattr(parent, name.rpartition(".")[2], replace(layer))
    return work.eval(), len(binary)
