"""ExecuTorch (`.pte`) export of the evaluation-time network, lowered to the XNNPACK backend (the CPU backend
Android and iOS apps ship), and run back by ExecuTorch's own runtime to verify it.

The program is `torch.export` of the evaluation-time model, then `to_edge_transform_and_lower` with the
`XnnpackPartitioner` and `to_executorch`: the path ExecuTorch's documentation gives for XNNPACK.

Weight forms (`WEIGHTS`):
- `float`: float32 weights, every convolution delegated to XNNPACK. A binarized layer is stored as its float
  weight sign(w) * alpha (exact, 32 bits per weight).
- `1bit`: a binarized layer as its sign bits packed 8 to a byte (uint8) plus one float32 scale per output channel,
  unpacked in the program on every run (bitwise and, compare, multiply). Exact and about 1/32 of the float weight,
  but XNNPACK takes only constant weights, so those convolutions run on ExecuTorch's portable kernels: much slower.
- `auto`: float. There is no fast small exact form: XNNPACK has no weight-only quantization (its int8 schemes
  quantize the activations too, which is lossy), and a weight rebuilt in the program leaves XNNPACK.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..binary import BinaryConv2d, pack_signs
from ..errors import InputError
from . import float_layer, median_ms, quiet_imports, quiet_stderr, run_in_batches, swap_binary_layers

WEIGHTS = ("auto", "float", "1bit")


def check_installed() -> None:
    """One clear line when ExecuTorch is not installed (it is an optional extra)."""
    try:
        with quiet_imports():
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise InputError(f"--format pte needs ExecuTorch ({e}); install it with pip install 'sdcompress[executorch]'") from None


class PackedConv2d(nn.Module):
    """A 1-bit convolution as the program stores it: packed sign bits and per-output-channel scales."""

    def __init__(self, conv: BinaryConv2d):
        super().__init__()
        w = conv.binary_weight().detach()
        self.shape = tuple(w.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("bits", pack_signs(w))
        self.register_buffer("alpha", w.abs().flatten(1).amax(1).float().view(-1, *([1] * (w.dim() - 1))))
        self.register_buffer("masks", 2 ** torch.arange(8, dtype=torch.uint8))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.n = int(np.prod(self.shape[1:]))

    def weight(self) -> torch.Tensor:
        on = torch.bitwise_and(self.bits.unsqueeze(-1), self.masks) != 0
        signs = on.flatten(1)[:, : self.n].to(torch.float32) * 2.0 - 1.0
        return signs.view(self.shape) * self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def program_model(model: nn.Module, form: str) -> tuple[nn.Module, dict]:
    """The evaluation-time copy of `model` that is exported in weight form `form`, and which layers took which form."""
    if form not in WEIGHTS:
        raise InputError(f"unknown weight form {form!r} for --format pte; choose one of {', '.join(WEIGHTS)}")
    form = "float" if form == "auto" else form
    by_form = {"float": 0, "1bit": 0}

    def replace(layer):
        packed = form == "1bit" and isinstance(layer, BinaryConv2d)
        by_form["1bit" if packed else "float"] += 1
        return PackedConv2d(layer) if packed else float_layer(layer)

    work, names = swap_binary_layers(model, replace)
    if form == "1bit" and not names:
        raise InputError("--weights 1bit needs a binarized model (sdcompress binarize first); this one has no 1-bit layers")
    return work, {"form": form, "binarized_layers_by_form": by_form}


def export_pte(model: nn.Module, example: torch.Tensor, form: str = "auto", batch: int = 1) -> tuple[bytes, dict, nn.Module]:
    """The `.pte` program of `model` in weight form `form` with `batch` fixed, its facts, and the PyTorch module it
    was exported from (the reference it is verified against).

    The batch is fixed: ExecuTorch 1.5.1 under torch 2.14.1 plans a dynamic batch dimension at 15 inputs whatever
    bound `torch.export.Dim` gives (measured with torchvision's resnet18 and bounds 64 and 1024), and refuses a larger
    batch at run time."""
    check_installed()
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"--format pte needs a fixed batch of 1 or more, got {batch!r}")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    work, facts = program_model(model, form)
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(work, (x,))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        data = lowered.to_executorch().buffer
    calls = [str(n.target) for n in lowered.exported_program().graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    delegated = sum("executorch_call_delegate" in c for c in calls)
    kept = len(calls) - delegated
    return bytes(data), {**facts, "backend": "XNNPACK", "delegate_calls": delegated, "portable_ops": kept, "batch": batch}, work


class Program:
    """A `.pte` file loaded by ExecuTorch's runtime (its Python bindings), with the batch it was exported at."""

    def __init__(self, path, batch: int = 1):
        check_installed()
        from executorch.runtime import Runtime

        with quiet_stderr():
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.batch = batch

    def _execute(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x])[0]

    def run(self, x: torch.Tensor) -> np.ndarray:
        """Outputs on `x`, in runs of the program's batch."""
        with quiet_stderr():
            return run_in_batches(self._execute, x, self.batch)

    def latency_ms(self, input_shape: tuple[int, ...], runs: int = 50) -> float:
        """Median wall time of one `execute` at the program's batch, after warm-up."""
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((self.batch, *input_shape)).astype(np.float32))
        return median_ms(self._execute, x, runs)
