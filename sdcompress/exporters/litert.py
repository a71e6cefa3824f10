"""LiteRT (`.tflite`, formerly TensorFlow Lite) export of the evaluation-time network, converted by Google's
`litert-torch` and run back by LiteRT's own interpreter (`ai_edge_litert`, XNNPACK on the CPU) to verify it.

Weight forms (`WEIGHTS`):
- `float`: float32 weights (the converter folds BatchNorm into the convolutions).
- `int8`: ai-edge-quantizer's weight-only recipe (`weight_only_wi8_afp32`: int8 weights, one scale per output
  channel, float activations), applied to layers with at least 1,000 weights, so a binarized model's stem and
  classifier stay float. A binarized convolution with BatchNorm folded in holds two values per output channel,
  +-c, which int8 per channel stores exactly; a float layer is rounded, and the report gives what that costs
  against the unrounded model.
- `auto`: float for a float model, int8 for a binarized one (its smallest exact form: LiteRT has no 1-bit
  weights, and the interpreter runs int8 weight-only files as fast as float ones).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from . import median_ms, quiet_imports, quiet_stderr, run_in_batches, swap_binary_layers

WEIGHTS = ("auto", "float", "int8")
MIN_QUANTIZED_WEIGHTS = 1000  # smaller layers (a CIFAR stem, a classifier) stay float


def check_installed() -> None:
    """One clear line when LiteRT's converter or interpreter is missing (an optional extra)."""
    try:
        with quiet_imports(), quiet_stderr():  # LiteRT's absl logging writes to file descriptor 2 on import
            import ai_edge_litert.interpreter  # noqa: F401
            import ai_edge_quantizer  # noqa: F401
            import litert_torch  # noqa: F401
    except ImportError as e:
        raise InputError(f"--format tflite needs LiteRT ({e}); install it with pip install 'sdcompress[litert]'") from None


def _recipe() -> list[dict]:
    from ai_edge_quantizer import recipe

    steps = recipe.weight_only_wi8_afp32()
    for step in steps:
        step["op_config"]["min_weight_elements"] = MIN_QUANTIZED_WEIGHTS
    return steps


def export_tflite(model: nn.Module, example: torch.Tensor, form: str = "auto", batch: int = 1) -> tuple[bytes, dict, nn.Module]:
    """The `.tflite` model of `model` in weight form `form` with `batch` fixed, its facts, and the PyTorch module it
    was converted from (binary layers as their float weights: the reference it is verified against)."""
    check_installed()
    import litert_torch
    from ai_edge_quantizer import quantizer

    if form not in WEIGHTS:
        raise InputError(f"unknown weight form {form!r} for --format tflite; choose one of {', '.join(WEIGHTS)}")
    work, names = swap_binary_layers(model)
    binary = len(names)
    form = ("int8" if binary else "float") if form == "auto" else form
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().cpu()
    chatter = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad(), quiet_stderr(), \
            contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.tflite"
        litert_torch.convert(work, (x,)).export(str(path))
        if form == "int8":
            result = quantizer.Quantizer(str(path), _recipe()).quantize(enable_progress_report=False)
            result.export_model(str(path), overwrite=True)
        data = path.read_bytes()
    return data, {"form": form, "binarized_layers": binary, "rounded": form == "int8" and binary == 0,
                  "min_quantized_weights": MIN_QUANTIZED_WEIGHTS if form == "int8" else None, "batch": batch}, work


class Interpreter:
    """A `.tflite` file loaded by LiteRT's interpreter, run at the batch it was converted with."""

    def __init__(self, path, batch: int = 1, threads: int | None = None):
        check_installed()
        from ai_edge_litert.interpreter import Interpreter as _Interpreter

        with quiet_stderr():
            self.it = _Interpreter(model_path=str(path), num_threads=threads)
            self.it.allocate_tensors()
        self.input = self.it.get_input_details()[0]["index"]
        self.output = self.it.get_output_details()[0]["index"]
        self.batch = batch

    def _invoke(self, x) -> np.ndarray:
        self.it.set_tensor(self.input, np.asarray(x))
        self.it.invoke()
        return self.it.get_tensor(self.output)

    def run(self, x: torch.Tensor) -> np.ndarray:
        """Outputs on `x`, in runs of the model's batch."""
        return run_in_batches(self._invoke, x, self.batch)

    def latency_ms(self, input_shape: tuple[int, ...], runs: int = 50) -> float:
        """Median wall time of one `invoke` at the model's batch, after warm-up."""
        x = np.random.default_rng(0).standard_normal((self.batch, *input_shape)).astype(np.float32)
        return median_ms(self._invoke, x, runs)
