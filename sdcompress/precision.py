"""The numeric precision and memory layout of training steps: float32, or bf16 autocast with channels_last.

bf16 here is autocast, not a bf16 model: the weights, the optimizer state and the BatchNorm running statistics
stay float32; convolutions and linear layers run in bf16 on the device's matrix units (AMX tiles through oneDNN
on an x86 CPU, tensor cores on CUDA), and the loss is computed in float32. Evaluation, BatchNorm re-estimation,
drop-effect measurement and export stay float32.

`auto` picks bf16 with channels_last only where it is measured to be faster:

- CUDA with bf16 support (`torch.cuda.is_bf16_supported()`);
- a CPU with AMX-BF16. Measured 2026-12-02 on such a CPU (ResNet-56, batch 128, 2 threads, forward + backward +
  SGD step): float32 3,887 ms/step, bf16 autocast + channels_last 1,873 (0.48x).
- not a CPU with AVX-512 BF16 but no AMX: there oneDNN's bf16 convolutions run forward faster but backward no
  faster than float32, and a whole step is slower (`python tools/bench_train.py --device cpu` on such a CPU:
  README, "Training speed"), so `auto` stays float32 there; `bf16` still asks for it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bf16_units() -> dict[str, bool]:
    """Which bf16 units this CPU has, as torch's cpuinfo sees them (`amx_bf16`, `avx512_bf16`)."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    try:
        found = caps() if caps is not None else {}
    except Exception:  # noqa: BLE001 - an unknown processor: no bf16 units known
        found = {}
    return {"amx_bf16": bool(found.get("amx_bf16", False)), "avx512_bf16": bool(found.get("avx512_bf16", False))}


def bf16_fast(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast makes a training step faster on `device`, and why (for the log line)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 (a T4, a V100) is slower
        return ok, f"CUDA {'with' if ok else 'without'} native bf16"
    if device.type != "cpu":
        return False, f"{device.type}: no measured bf16 speed-up"
    units = cpu_bf16_units()
    if units["amx_bf16"]:
        return True, "CPU with AMX-BF16"
    if units["avx512_bf16"]:
        return False, "CPU with AVX-512 BF16 but no AMX (bf16 measured slower there)"
    return False, "CPU without bf16 units"


@dataclass(frozen=True)
class Precision:
    """What a training step runs in: `name` "bf16" (autocast) or "fp32", and the activations' memory layout."""

    name: str  # "bf16" | "fp32": what runs (never "auto")
    channels_last: bool
    requested: str = "auto"  # what was asked for: auto | fp32 | bf16
    reason: str = ""  # why auto chose as it did

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous (NCHW)"

    def describe(self) -> str:
        """One phrase for a log line: "bf16 autocast, channels_last (auto: CPU with AMX-BF16)"."""
        what = f"{'bf16 autocast' if self.bf16 else 'fp32'}, {'channels_last' if self.channels_last else 'NCHW'}"
        return f"{what} (auto: {self.reason})" if self.requested == "auto" else what

    def to_dict(self) -> dict:
        """What a sidecar records of the run."""
        return {"precision": self.name, "memory_format": self.memory_format, "precision_requested": self.requested}

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The context a forward pass of training runs in."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D input batch in this layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


FP32 = Precision("fp32", False, "fp32")


def check_precision(flag: str, name: str) -> str:
    if name not in PRECISIONS:
        raise InputError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision a training or fine-tuning run uses on `device` (`name`: auto | fp32 | bf16)."""
    check_precision("--precision", name)
    if name == "fp32":
        return FP32
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("--precision bf16: this CUDA device has no bf16 support; use --precision fp32")
        return Precision("bf16", True, "bf16")
    fast, reason = bf16_fast(device)
    return Precision("bf16", True, "auto", reason) if fast else Precision("fp32", False, "auto", reason)


def to_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model's 4-D weights in channels_last (for training) or back in the contiguous layout (for saving, export
    and everything after training). Values are unchanged."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
