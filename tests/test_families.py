"""Any residual network: blocks found per family (counts from the architectures, by hand), removal that leaves
a smaller model that runs, ONNX parity, drop effects measured without training, and the README's API example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sdcompress
from sdcompress.errors import InputError
from sdcompress.nets import NetSpec, build_model, count_macs

tvm = pytest.importorskip("torchvision.models")


def _small_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], num_classes=10)


def _small_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10)


def _small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)


# name: (builder, blocks, removable, of which a projection shortcut). Counts by hand from each architecture:
# resnet18 [2,2,2,2] BasicBlocks, a downsample at the first block of stages 2-4; mobilenet_v2's 17 inverted
# residuals (1+2+3+4+3+3+1), a residual path where stride 1 and width unchanged: 0+1+2+3+2+2+0 = 10;
# mobilenet_v3_small's 11 bnecks, residual at 6 (24, 40, 40, 48, 96, 96); efficientnet_b0's 16 MBConvs
# (1+2+2+3+3+4+1), residual n-1 per stage = 9; regnet_y_400mf depths [1,3,6,6] with a projection at each
# stage's first block; a ConvNeXt of 3 stages x 2 CNBlocks; a Swin of 2 stages x 2 blocks; a ViT of 4 encoders;
# the project's resnet20 (3 stages x 3, option-A shortcuts at blocks 3 and 6).
FAMILIES = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 8, 8, 3),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 17, 10, 0),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), 11, 6, 0),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 16, 9, 0),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=10), 16, 16, 4),
    "convnext": (_small_convnext, 6, 6, 0),
    "swin": (_small_swin, 4, 4, 0),
    "vit": (_small_vit, 4, 4, 0),
    "cifar_resnet20": (lambda: build_model(NetSpec("resnet20")), 9, 9, 2),
}


# timm (the optional extra): blocks are the modules carrying drop_path. resnet18 as torchvision's; convnext_atto
# depths [2,2,6,2], all identity (downsampling sits between stages, outside the blocks); efficientnet_b0 as
# torchvision's (16 blocks, 9 with a skip); a 4-block ViT; regnety_002 depths [1,1,4,7], every block with a
# `downsample` (a projection at each stage's first block, an Identity module elsewhere).
try:
    import timm
except ImportError:  # the extra is not installed: its cases are skipped, with the reason
    timm = None
TIMM = {
    "timm_resnet18": ("resnet18", {}, 8, 8, 3),
    "timm_convnext_atto": ("convnext_atto", {}, 12, 12, 0),
    "timm_efficientnet_b0": ("efficientnet_b0", {}, 16, 9, 0),
    "timm_vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, 4, 4, 0),
    "timm_regnety_002": ("regnety_002", {}, 13, 13, 13),
}
for key, (arch, kw, n, r, s) in TIMM.items():
    FAMILIES[key] = ((lambda arch=arch, kw=kw: timm.create_model(arch, pretrained=False, num_classes=10, drop_path_rate=0.1, **kw)),
                     n, r, s)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_blocks_prune_and_onnx(name, tmp_path):
    if name.startswith("timm_") and timm is None:
        pytest.skip("timm is not installed (pip install 'sdcompress[timm]')")
    build, n_blocks, n_removable, n_shortcut = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    blocks = sdcompress.find_blocks(model)
    assert len(blocks) == n_blocks
    assert sum(b.removable for b in blocks) == n_removable
    assert sum(b.removal == "shortcut" for b in blocks) == n_shortcut
    assert [b.index for b in blocks] == list(range(n_blocks))
    small = sdcompress.prune(model, keep=0.6)
    after = sdcompress.find_blocks(small)
    expect_removed = n_removable - int(np.floor(0.6 * n_removable + 0.5))
    assert len(after) == n_blocks - expect_removed  # removed blocks are gone, not masked
    assert _params(small) < _params(model)
    x = torch.rand(2, 3, 32, 32)
    assert count_macs(small, (3, 32, 32))["total"] < count_macs(model, (3, 32, 32))["total"]
    with torch.no_grad():
        assert small(x).shape == (2, 10) and torch.isfinite(small(x)).all()
    removed = [b for b in blocks if b.path not in {a.path for a in after}]
    state = small.state_dict()
    for b in removed:  # nothing of a removed block is left but its own projection shortcut, where it has one
        left = sum(v.numel() for k, v in state.items() if k.startswith(b.path + "."))
        mod = model.get_submodule(b.path)
        shortcut = getattr(mod, "downsample", None) or getattr(mod, "proj", None) if b.removal == "shortcut" else None
        assert left == (sum(v.numel() for v in shortcut.state_dict().values()) if shortcut is not None else 0), b
    check = sdcompress.export_onnx(small, tmp_path / "m.onnx", x)
    assert check["max_abs_diff"] < 1e-3 and (tmp_path / "m.onnx").stat().st_size == check["bytes"]


@pytest.mark.parametrize("build, n_blocks, n_removable", [
    (lambda: tvm.resnet50(), 16, 16),  # [3,4,6,3] Bottlenecks
    (lambda: tvm.convnext_tiny(), 18, 18),  # [3,3,9,3]
    (lambda: tvm.efficientnet_v2_s(), 40, 35),  # 2+4+4+6+9+15; residual 2 (24->24 from the start) +3+3+5+8+14
    (lambda: tvm.swin_t(), 12, 12),  # [2,2,6,2]
])
def test_full_size_block_counts(build, n_blocks, n_removable):
    blocks = sdcompress.find_blocks(build())
    assert len(blocks) == n_blocks and sum(b.removable for b in blocks) == n_removable


def test_a_block_without_a_residual_path_cannot_be_removed():
    model = tvm.mobilenet_v2(num_classes=10)
    fixed = next(b for b in sdcompress.find_blocks(model) if not b.removable)
    with pytest.raises(InputError, match="cannot be removed"):
        sdcompress.remove_blocks(model, [fixed])


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.f(x)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(_Res(8), _Res(8), nn.Conv2d(8, 16, 3, stride=2, padding=1), _Res(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_named_blocks_of_any_module():
    model, x = _Custom().eval(), torch.rand(2, 3, 16, 16)
    with pytest.raises(InputError, match="no residual blocks"):
        sdcompress.find_blocks(model)
    blocks = sdcompress.find_blocks(model, x, paths=["body.3", "body.0", "body.1"])
    assert [b.path for b in blocks] == ["body.0", "body.1", "body.3"]  # in forward order
    small = sdcompress.remove_blocks(model, [0, 2], blocks)
    assert _params(small) == _params(model) - (8 * 8 * 9 + 8) - (16 * 16 * 9 + 16)  # body.0 and body.3 gone
    assert small(x).shape == (2, 4)
    with pytest.raises(InputError, match="keeps the shape"):
        sdcompress.find_blocks(model, x, paths=["body.2"])  # a strided conv: removing it breaks the network
    with pytest.raises(InputError, match="no module"):
        sdcompress.find_blocks(model, x, paths=["body.9"])


class _Planted(nn.Module):
    """Blocks that each add a constant: removing block l lowers the output's mean by exactly c_l."""

    def __init__(self, consts):
        super().__init__()
        self.blocks = nn.Sequential(*[_AddConst(c) for c in consts])

    def forward(self, x):
        return self.blocks(x)


class _AddConst(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x):
        return x + self.c


def test_measured_drop_effects_recover_planted_ones():
    consts = [0.30, -0.05, 0.00, 0.12, 0.50, 0.02]
    model = _Planted(consts)
    blocks = sdcompress.find_blocks(model, torch.zeros(4, 8), paths=[f"blocks.{i}" for i in range(6)])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 8, generator=g), None) for _ in range(120)]  # noise in every batch's loss
    stats = sdcompress.measure_drop_effects(model, batches, blocks, rounds=2, loss_fn=lambda out, _: out.mean())
    assert stats.batches == 240
    for c, e, se in zip(consts, stats.effect, stats.stderr):
        assert se > 0 and abs(e - (-c)) <= 4 * se, (c, e, se)  # removing the block removes +c from the loss
    small = sdcompress.prune(model, keep=0.5, stats=stats, blocks=blocks)
    left = [m.c.item() for m in small.blocks if isinstance(m, _AddConst)]
    assert sorted(left) == pytest.approx([-0.05, 0.00, 0.02])  # the three whose removal lowers the loss most are gone


def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "model.onnx").stat().st_size > 1000


def test_stats_measure_writes_a_checkpoint_prune_reads(tmp_path, capsys):
    """`stats --measure` on a constant-depth checkpoint (no drop effects from training): measured effects in a new
    checkpoint, which `prune --strategy stats` then ranks by, without the no-effects warning."""
    from sdcompress.checkpoint import load_checkpoint
    from sdcompress.cli import main

    ck = tmp_path / "const"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "2", "--survival-rule", "none",
                 "--out", str(ck), "--no-progress"]) == 0
    out = tmp_path / "measured"
    assert main(["stats", str(ck), "--measure", "--batches", "12", "--rounds", "3", "--out", str(out)]) == 0
    assert "measured without training on 36 batches" in capsys.readouterr().out
    model, side = load_checkpoint(out)
    table = side.survival_stats
    assert table.source == "measured" and table.regression_steps == 36
    assert all(b.drop_effect is not None and b.drop_effect_se > 0 for b in table.blocks)
    assert side.stages[-1]["stage"] == "measure"
    assert (out / "model.pt").read_bytes() == (ck / "model.pt").read_bytes()  # the weights as they were
    assert main(["prune", str(out), "--keep", "0.6", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["prune"]["ranking"]["by"].startswith("drop effect (measured") or "distinguishable" in err
