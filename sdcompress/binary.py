"""1-bit weights: sign(w) * alpha with one alpha per output channel (XNOR-Net's binary-weight networks).

Binarized layers keep latent full-precision weights for fine-tuning and binarize them in every forward pass;
the gradient passes straight through sign() where |w| <= 1 and is zero outside (the straight-through estimator
with clipping). Saved, a binarized layer holds only its sign bits, packed 8 per byte (uint8), and its alphas:
its state_dict has `weight_bits` and `weight_alpha` instead of `weight`, so `model.pt` stores 1 bit per weight.
Loading restores latent weights equal to sign * alpha, the same network. Each layer declares its precision in
`weight_bits_per_value`; everything that counts bits or bytes reads it from there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


STE_CLIP = 1.0


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))  # never 0

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= STE_CLIP).to(grad.dtype)


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    """sign(w) in {-1, +1}, with the clipped straight-through gradient."""
    return _SignSTE.apply(w)


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """sign(w) * alpha, alpha = mean |w| of each output channel (dimension 0)."""
    alpha = w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
    return sign_ste(w) * alpha


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """Sign bits of each output channel (1 for w >= 0), packed 8 per byte, least significant bit first."""
    bits = (w.detach().flatten(1) >= 0).to(torch.uint8)
    pad = (-bits.shape[1]) % 8
    bits = F.pad(bits, (0, pad))
    weights = (2 ** torch.arange(8, dtype=torch.uint8, device=bits.device))
    return (bits.view(bits.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_signs`: a float tensor of +1 / -1 in `shape`."""
    n = math.prod(shape[1:])
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.flatten(1)[:, :n].float()
    return (bits * 2 - 1).view(shape)


class _Binary:
    """Mixin for a layer whose weight is binarized in forward and stored packed."""

    weight_bits_per_value = 1

    def binary_weight(self) -> torch.Tensor:
        return binarize_weight(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        w = destination.pop(prefix + "weight")
        destination[prefix + "weight_bits"] = pack_signs(w)
        destination[prefix + "weight_alpha"] = w.detach().abs().flatten(1).mean(1).float()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        bits, alpha = state_dict.get(prefix + "weight_bits"), state_dict.get(prefix + "weight_alpha")
        if bits is not None and alpha is not None:
            state_dict = dict(state_dict)
            shape = tuple(self.weight.shape)
            expected = (shape[0], math.ceil(math.prod(shape[1:]) / 8))
            if tuple(bits.shape) != expected or bits.dtype != torch.uint8 or tuple(alpha.shape) != (shape[0],):
                error_msgs.append(f"{prefix}weight_bits / weight_alpha do not fit a {shape} weight")
                return
            state_dict[prefix + "weight"] = unpack_signs(bits, shape) * alpha.view(-1, *([1] * (len(shape) - 1)))
            for k in (prefix + "weight_bits", prefix + "weight_alpha"):
                state_dict.pop(k)
            # nn.Module reads from the dict it is given: hand it the unpacked weight under the usual name
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            for k in list(unexpected_keys):
                if k in (prefix + "weight_bits", prefix + "weight_alpha"):
                    unexpected_keys.remove(k)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class BinaryConv2d(_Binary, nn.Conv2d):
    """A Conv2d with 1-bit weights (sign * per-output-channel alpha)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.binary_weight(), self.bias)


class BinaryLinear(_Binary, nn.Linear):
    """A Linear layer with 1-bit weights (sign * per-output alpha)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary_weight(), self.bias)


def to_binary(m: nn.Module) -> nn.Module:
    """A binary copy of a Conv2d or Linear layer, latent weights initialized from its weights."""
    if isinstance(m, nn.Conv2d):
        b = BinaryConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.bias is not None)
    elif isinstance(m, nn.Linear):
        b = BinaryLinear(m.in_features, m.out_features, m.bias is not None)
    else:
        raise TypeError(f"cannot binarize {type(m).__name__}")
    b.load_state_dict(m.state_dict())
    return b.to(m.weight.device)


def apply_binary(model: nn.Module, names) -> None:
    """Replace the named Conv2d / Linear layers of `model` by binary copies, in place."""
    layers = dict(model.named_modules())
    unknown = [n for n in names if not isinstance(layers.get(n), (nn.Conv2d, nn.Linear))]
    if unknown:
        raise ValueError(f"binarized layers {unknown[:3]} are not conv or linear layers of this network")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, to_binary(layers[name]))


def bits_per_value(m: nn.Module) -> int:
    """The precision a layer declares for its weight (32 unless it says otherwise)."""
    return getattr(m, "weight_bits_per_value", 32)


# ---- which layers to binarize, and what that leaves ----------------------------------------------------------
def _in_attention(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether a layer belongs to an attention module (its query/key/value and output projections)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        m = modules.get(".".join(parts[:i]))
        if isinstance(m, nn.MultiheadAttention) or (m is not None and "Attention" in type(m).__name__):
            return True
    return False


def default_targets(model: nn.Module, stem: bool = False, head: bool = False, full_precision: tuple[str, ...] = (),
                    paths: list[str] | None = None) -> list[str]:
    """Layers to binarize: the regular convolutions and linear layers inside the residual blocks, plus the stem
    (the first convolution outside the blocks) and the classifier (the last linear layer) when asked.

    The stem and classifier stay full precision by default (standard practice: they are small and sensitive), and
    so do depthwise and grouped convolutions (a 3x3 depthwise filter has 9 weights per channel: one bit each
    leaves too little) and attention projections: binarizing those is where accuracy collapses. `paths`: the
    module paths of the present blocks (default: those `model.spec` names).
    """
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = [n for n in full_precision if n not in layers]
    if unknown:
        raise ValueError(f"--full-precision names {unknown} that are not conv or linear layers of this model "
                         f"(e.g. {', '.join(list(layers)[:3])})")
    paths = [model.spec.block_path(b) for b in model.block_ids] if paths is None else paths
    inside = tuple(p + "." for p in paths)
    names = [n for n, m in layers.items() if n.startswith(inside) and getattr(m, "groups", 1) == 1 and not _in_attention(n, modules)]
    outside = [n for n in layers if not n.startswith(inside)]
    if stem:
        first_conv = next((n for n in outside if isinstance(layers[n], nn.Conv2d)), None)
        names += [first_conv] if first_conv else []
    if head:
        last_linear = next((n for n in reversed(outside) if isinstance(layers[n], nn.Linear)), None)
        names += [last_linear] if last_linear else []
    return [n for n in names if n not in set(full_precision)]


def precision_profile(model: nn.Module, macs_per_layer: dict[str, int]) -> dict:
    """Parameters, memory and MACs by the precision each layer declares."""
    by_bits: dict[int, int] = {}
    weight_names = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            b = bits_per_value(m)
            by_bits[b] = by_bits.get(b, 0) + m.weight.numel()
            weight_names.add(f"{name}.weight" if name else "weight")
    for name, p in model.named_parameters():
        if name not in weight_names:
            by_bits[32] = by_bits.get(32, 0) + p.numel()
    modules = dict(model.named_modules())
    binary_macs = sum(v for n, v in macs_per_layer.items() if bits_per_value(modules[n]) == 1)
    memory = {str(b): n * b / 8 for b, n in sorted(by_bits.items(), reverse=True)}
    # a binary layer also stores one float32 scale (alpha) per output channel
    memory["scales"] = 4 * sum(m.weight.shape[0] for m in modules.values() if bits_per_value(m) == 1)
    return {
        "params_by_bits": {str(b): n for b, n in sorted(by_bits.items(), reverse=True)},
        "memory_bytes": {**memory, "total": sum(memory.values())},
        "float32_equivalent_bytes": 4 * sum(by_bits.values()),
        "macs_binary": binary_macs,
        "macs_full_precision": sum(macs_per_layer.values()) - binary_macs,
    }


def binary_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's layers with 1-bit weights, in module order."""
    return [n for n, m in model.named_modules() if bits_per_value(m) == 1]
