"""A user's own network through the Python API: blocks found by a forward pass in code written in several styles
(and in the peer's ResNet-56, written elsewhere), nothing proposed in a plain stack, and the chain of stages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdcompress
from sdcompress.errors import InputError

PEER = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar-resnet-peer"


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- style 1: a `shortcut` module (1x1 conv + BN where the shape changes), blocks in nn.Sequential -------------
class ShortcutBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SequentialNet(nn.Module):
    def __init__(self, n=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        layers, cin = [], 8
        for cout, stride in ((8, 1), (16, 2), (32, 2)):
            for i in range(n):
                layers.append(ShortcutBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


# --- style 2: `if self.downsample is not None`, blocks in an nn.ModuleList looped over in forward --------------
class DownsampleBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.body(x)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ModuleListNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.blocks = nn.ModuleList([DownsampleBlock(8, 8, 1), DownsampleBlock(8, 8, 1), DownsampleBlock(8, 16, 2),
                                     DownsampleBlock(16, 16, 1)])
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for blk in self.blocks:
            x = blk(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- style 3: pre-activation, `torch.add` in forward, no activation after the addition; a transition conv between
# stages (the shape changes outside any block)
class PreActBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return torch.add(x, h)


class PreActNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(PreActBlock(8), PreActBlock(8), PreActBlock(8))
        self.transition = nn.Conv2d(8, 16, 3, 2, 1)
        self.stage2 = nn.Sequential(PreActBlock(16), PreActBlock(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stage2(self.transition(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


# --- style 4: blocks with an attribute-held residual scale and an MLP branch, nested inside stage modules --------
class ScaledBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        return x + self.mlp(self.dw(x))


class Stage(nn.Module):
    def __init__(self, cin, cout, n):
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 2, 2) if cin != cout else nn.Identity()
        self.blocks = nn.Sequential(*[ScaledBlock(cout) for _ in range(n)])

    def forward(self, x):
        return self.blocks(self.down(x))


class NestedNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stages = nn.ModuleList([Stage(8, 8, 2), Stage(8, 16, 3)])
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return self.head(x.mean((2, 3)))


class PlainNet(nn.Module):
    """Conv / BN / ReLU units of the same shapes as a residual network's blocks, with no shortcut anywhere."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.units = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(4)])
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.units(F.relu(self.stem(x))).mean((2, 3)))


def _randomize_bn(model):
    """Trained-looking BatchNorm statistics, so a test does not pass on fresh ones by luck."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# (model, block paths, stages, removal, the branch's last affine layer) counted by hand
STYLES = {
    "shortcut module, Sequential": (SequentialNet, [f"layers.{i}" for i in range(6)], [0, 0, 1, 1, 2, 2],
                                    ["identity", "identity", "shortcut", "identity", "shortcut", "identity"], "bn2"),
    "if self.downsample, ModuleList": (ModuleListNet, [f"blocks.{i}" for i in range(4)], [0, 0, 1, 1],
                                       ["identity", "identity", "shortcut", "identity"], "body.4"),
    "torch.add, pre-activation": (PreActNet, ["stage1.0", "stage1.1", "stage1.2", "stage2.0", "stage2.1"], [0, 0, 0, 1, 1],
                                  ["identity"] * 5, "conv2"),
    "x + mlp(x), nested stages": (NestedNet, ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0",
                                              "stages.1.blocks.1", "stages.1.blocks.2"], [0, 0, 1, 1, 1], ["identity"] * 5, "mlp.2"),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_blocks_and_stages_found_without_paths(style):
    build, paths, stages, removals, scale = STYLES[style]
    model = _randomize_bn(build())
    blocks = sdcompress.find_blocks(model, X)
    assert [b.path for b in blocks] == paths
    assert [b.stage for b in blocks] == stages
    assert [b.removal for b in blocks] == removals
    assert all(b.scale == scale for b in blocks)
    # every block removed at once: the model runs, and the removed blocks' parameters are gone
    bare = sdcompress.remove_blocks(model, range(len(blocks)), blocks)
    assert bare(X).shape == (2, 10)
    kept_shortcuts = sum(_params(model.get_submodule(b.path).get_submodule(b.shortcut)) for b in blocks if b.shortcut)
    assert _params(bare) == _params(model) - sum(_params(model.get_submodule(b.path)) for b in blocks) + kept_shortcuts


def test_a_removed_block_is_its_shortcut_exactly():
    """Removing a downsampling block leaves relu(shortcut(x)): checked against the block with its branch's last
    BatchNorm silenced by hand."""
    model = _randomize_bn(SequentialNet())
    blocks = sdcompress.find_blocks(model, X)
    down = next(b for b in blocks if b.removal == "shortcut")
    assert down.after == "relu" and down.shortcut == "shortcut"
    small = sdcompress.remove_blocks(model, [down], blocks)
    silenced = _randomize_bn(SequentialNet())
    silenced.load_state_dict(model.state_dict())
    bn = silenced.get_submodule(down.path).bn2
    bn.weight.data.zero_()
    bn.bias.data.zero_()
    with torch.no_grad():
        assert torch.allclose(small(X), silenced(X), atol=1e-5)


def test_prune_by_stats_keeps_every_others_count_per_stage():
    """Drop effects that would pile every removal into the first stage: `prune` by stats takes every-other's count
    from each stage (stage 0 of 3 blocks, stage 1 of 2: keep 0.6 of 5 removes one from each) and, within a stage,
    the block whose removal raises the loss least; the same policy as `sdcompress prune` on a checkpoint."""
    from dataclasses import replace

    model = PreActNet()
    blocks = sdcompress.find_blocks(model, X)
    assert [b.stage for b in blocks] == [0, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])) for _ in range(8)]
    stats = sdcompress.measure_drop_effects(model, batches, blocks)
    stats = replace(stats, effect=(0.01, -0.02, 0.00, 0.30, 0.20))  # the three cheapest all in stage 0
    small = sdcompress.prune(model, keep=0.6, stats=stats)
    gone = [b.path for b in blocks if isinstance(small.get_submodule(b.path), nn.Identity)
            or not any(True for _ in small.get_submodule(b.path).parameters())]
    assert gone == ["stage1.1", "stage2.1"]


def test_prune_by_sensitivity_and_by_budget():
    """`strategy="sensitivity"` is the greedy search on the loss of the batches given (each step removes the
    block whose removal raises it least, checked here by trying every candidate); `max_params` / `max_bytes`
    keep the most blocks, in the strategy's order, that fit; bad combinations are refused in one line."""
    model = SequentialNet().eval()
    blocks = sdcompress.find_blocks(model, X)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]

    def loss(m):
        with torch.no_grad():
            return sum(F.cross_entropy(m.eval()(x), y, reduction="sum").item() for x, y in batches) / 16

    prune = lambda **kw: sdcompress.prune(model, blocks=blocks, **kw)  # noqa: E731 - a user's class: blocks found by a forward pass
    removed = []
    for _ in range(2):  # keep 0.6 of 6 removes 2
        rest = [b.index for b in blocks if b.index not in removed]
        removed.append(min(rest, key=lambda i: loss(sdcompress.remove_blocks(model, removed + [i], blocks))))
    small = prune(keep=0.6, strategy="sensitivity", batches=batches)
    assert _params(small) == _params(sdcompress.remove_blocks(model, removed, blocks))
    with torch.no_grad():
        assert torch.equal(small(X), sdcompress.remove_blocks(model, removed, blocks)(X))

    full = _params(model)
    for limit in (full, full - 1, full // 2):
        fit = prune(max_params=limit, strategy="every-other")
        n = next(n for n in range(7) if _params(prune(keep=(6 - n) / 6, strategy="every-other")) <= limit)
        assert _params(fit) <= limit and _params(fit) == _params(prune(keep=(6 - n) / 6, strategy="every-other"))
    assert _params(prune(max_params=full)) == full  # nothing removed when the model fits
    by_bytes = prune(max_bytes=60_000, strategy="top")
    from sdcompress.pruning import state_bytes

    assert state_bytes(by_bytes) <= 60_000 < state_bytes(model)
    for kwargs, match in (({"keep": 0.5, "max_params": 1000}, "keep or one budget"),
                          ({"max_params": 1000, "max_bytes": 1000}, "keep or one budget"),
                          ({"max_params": 10}, "no model meets the budget of 10 parameters"),
                          ({"max_params": 0}, "must be positive"),
                          ({"strategy": "sensitivity"}, "needs batches"),
                          ({"strategy": "sensitivity", "batches": [torch.zeros(1)]}, r"\(inputs, targets\)")):
        with pytest.raises(InputError, match=match):
            prune(**kwargs)
    with pytest.raises(TypeError, match="whole number"):
        prune(max_params=1e5)


def test_a_plain_stack_proposes_nothing_and_says_why():
    model = _randomize_bn(PlainNet())
    with pytest.raises(InputError, match="no residual blocks found in PlainNet"):
        sdcompress.find_blocks(model, X)
    verdicts = {c.path: c for c in sdcompress.survey_blocks(model, X)}
    assert not any(c.residual for c in verdicts.values())
    assert "not residual" in verdicts["units.0"].why
    assert "units" in verdicts


def test_a_stage_of_blocks_is_not_a_block():
    verdicts = {c.path: c for c in sdcompress.survey_blocks(_randomize_bn(PreActNet()), X)}
    assert not verdicts["stage1"].residual and "contains 3 residual block(s)" in verdicts["stage1"].why
    assert verdicts["stage1.0"].residual


def _peer_resnet(name: str):
    if not (PEER / "resnet.py").exists():
        pytest.skip(f"the peer's pretrained ResNets are not at {PEER} (../shared is absent)")
    spec = importlib.util.spec_from_file_location("peer_resnet", PEER / "resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, name)()
    files = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
    state = torch.load(PEER / files[name], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def test_peer_resnet56_all_27_blocks_and_3_stages():
    model = _peer_resnet("resnet56")
    blocks = sdcompress.find_blocks(model, X)
    assert [b.path for b in blocks] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(9)]
    assert [b.stage for b in blocks] == [0] * 9 + [1] * 9 + [2] * 9
    down = [b for b in blocks if b.removal == "shortcut"]
    assert [b.path for b in down] == ["layer2.0", "layer3.0"]
    assert all(b.shortcut == "shortcut" and b.scale == "bn2" for b in down)
    # the downsampling blocks are removable as their own parameter-free shortcut (stride-2 subsampling, zero channels)
    small = sdcompress.remove_blocks(model, down, blocks)
    assert _params(small) == _params(model) - sum(_params(model.get_submodule(b.path)) for b in down)
    with torch.no_grad():
        assert small(X).shape == (2, 10)


def _loader(n=96, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_stochastic_depth_from_pretrained_weights_starts_at_the_pretrained_function():
    """The 1/p_l fold into each block's last BatchNorm, and its undoing at the end: with nothing learned (lr ~ 0,
    BatchNorm statistics frozen), the model handed back computes what the pretrained one did."""
    model = _peer_resnet("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    trained = sdcompress.train_stochastic_depth(model, _loader(), epochs=1, lr=1e-12, weight_decay=0.0, recalibrate_batches=0)
    with torch.no_grad():
        ref = model(X)
        assert torch.allclose(trained.model(X), ref, atol=1e-4 * float(ref.abs().max()))
    assert type(trained.model) is type(model) and trained.history["unscaled"] == []
    assert trained.history["survival"][0] == pytest.approx(1 - 1 / 9 * 0.5) and trained.history["survival"][-1] == 0.5


def test_a_dropped_block_is_not_computed():
    """A forward hook on each block counts the steps it ran (the hooks travel with the model's copy); those counts
    must be the record's run counts, and fewer than the steps for the blocks that drop most."""
    model = _randomize_bn(SequentialNet())
    blocks = sdcompress.find_blocks(model, X)
    ran = {b.path: 0 for b in blocks}
    for b in blocks:
        model.get_submodule(b.path).register_forward_hook(lambda m, i, o, p=b.path: ran.__setitem__(p, ran[p] + 1))
    trained = sdcompress.train_stochastic_depth(model, _loader(n=320), epochs=1, blocks=blocks, recalibrate_batches=0)
    assert trained.stats.batches == 20 and trained.stats.source == "training"
    assert [ran[b.path] for b in blocks] == list(trained.stats.runs)
    assert trained.stats.runs[-1] < 20
    assert trained.stats.drop_rates[-1] == pytest.approx(0.5) and trained.stats.drop_rates[0] == pytest.approx(0.5 / 6)


def test_the_chain_on_a_users_model(tmp_path):
    """train_stochastic_depth -> prune by the recorded statistics -> recalibrate -> finetune with a teacher ->
    binarize -> finetune -> export to .onnx, .ort and .mlpackage, each verified -> footprint -> save / load: on a
    model class written here."""
    import onnx
    import onnxruntime as ort

    from sdcompress.binary import BinaryConv2d

    model = _randomize_bn(ModuleListNet())
    data = _loader(n=256, batch=16)
    trained = sdcompress.train_stochastic_depth(model, data, epochs=2, lr=0.05, recalibrate_batches=4)
    assert trained.history["steps"] == 32 and len(trained.history["epoch_loss"]) == 2
    effects = [e for e in trained.stats.effect if e is not None]
    assert effects and all(isinstance(e, float) for e in effects)
    small = sdcompress.prune(trained.model, keep=0.5, stats=trained.stats)
    assert len(sdcompress.find_blocks(small, X)) == 2
    assert _params(small) < _params(trained.model)
    small = sdcompress.recalibrate(small, data, num_batches=4)
    tuned, history = sdcompress.finetune(small, data, teacher=trained.model, epochs=1)
    assert history["distill"] == {"temperature": 4.0, "alpha": 0.9} and history["steps"] == 16
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), small.state_dict().values()))
    check = sdcompress.export_onnx(tuned, tmp_path / "small.onnx", X)
    assert check["max_abs_diff"] < 1e-3 and (tmp_path / "small.onnx").stat().st_size > 0

    binary = sdcompress.binarize(tuned, blocks=trained.stats.blocks)  # the removed blocks are skipped
    convs = [n for n, m in binary.named_modules() if isinstance(m, BinaryConv2d)]
    assert convs and all(n.startswith(("blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")) for n in convs)
    assert not isinstance(binary.stem, BinaryConv2d) and not isinstance(tuned.get_submodule(convs[0]), BinaryConv2d)
    binary, _ = sdcompress.finetune(binary, data, teacher=tuned, epochs=1)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    rep = sdcompress.export(binary, tmp_path / "phone", x, mean=mean, std=std, classes=[f"c{k}" for k in range(10)])
    f = rep["formats"]
    assert sorted(f) == ["coreml", "onnx", "ort"] and all(e["verification"]["ok"] for e in f.values())
    assert f["ort"]["weights"] == "1bit" and f["onnx"]["weights"] == "int8" and f["coreml"]["input"] == "image"
    assert (tmp_path / "phone" / "report.json").is_file() and (tmp_path / "phone" / f["coreml"]["file"]).is_dir()
    # each file again, by its own consumer: onnxruntime for .onnx and .ort, coremltools' loader for the package
    pix = ((x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1) * 255).round()
    xq = (pix / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = binary.eval()(xq).numpy()
    for fname in ("model.onnx", "model.ort"):
        sess = ort.InferenceSession(str(tmp_path / "phone" / fname), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {"input": xq[i:i + 1].numpy()})[0] for i in range(len(xq))])
        assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "phone" / "model.onnx")).metadata_props}
    assert meta["class_names"].startswith('["c0"') and meta["mean"] == "[0.5, 0.4, 0.3]"
    import coremltools as ct

    spec = ct.models.MLModel(str(tmp_path / "phone" / f["coreml"]["file"]), skip_model_load=True).get_spec()
    assert spec.description.input[0].name == "image" and spec.description.metadata.userDefined["mean"] == "[0.5, 0.4, 0.3]"
    one = sdcompress.export(binary, tmp_path / "one.ort", x)  # one file by its suffix
    assert (tmp_path / "one.ort").is_file() and (tmp_path / "one.required_operators.config").is_file()
    assert list(one["formats"]) == ["ort"] and one["formats"]["ort"]["file"] == "one.ort"

    fp = sdcompress.footprint(binary, x, blocks=trained.stats.blocks)
    assert fp["totals"]["params"]["1"] == sum(binary.get_submodule(n).weight.numel() for n in convs)
    assert fp["totals"]["params"]["total"] == _params(binary)
    assert {b["group"] for b in fp["blocks"]} >= {"stem", "head"} and len([b for b in fp["blocks"] if b["group"].startswith("block ")]) == 2
    sdcompress.save(binary, tmp_path / "binary", stats=trained.stats)
    again, side = sdcompress.load(tmp_path / "binary", model=ModuleListNet())
    with torch.no_grad():  # latent weights come back as sign * alpha: the same network, to float rounding of alpha
        assert torch.allclose(again(xq), binary(xq), rtol=1e-5, atol=1e-6)
    weights = torch.load(tmp_path / "binary" / "weights.pt", weights_only=True)
    assert f"{convs[0]}.weight_bits" in weights and f"{convs[0]}.weight" not in weights  # stored as bits


def test_the_kept_blocks_scale_after_pruning_a_users_model():
    """`prune(block_scale=...)` on a model retrofitted by `train_stochastic_depth`: "unit" divides each kept block's
    scale layer by its p_l (1 - its recorded drop rate), "survival" leaves it; "auto" re-estimates BatchNorm for both
    on the calibration batches and keeps the lower loss there, and without them leaves p_l f(x); drop effects
    measured on a finished model say nothing of p_l, so "unit" is refused there."""
    import dataclasses as dc

    from sdcompress.api import _prune

    model = _randomize_bn(ModuleListNet())
    data = _loader(n=128, batch=16)
    trained = sdcompress.train_stochastic_depth(model, data, epochs=1, lr=0.05, recalibrate_batches=2)
    p = {b.path: 1.0 - r for b, r in zip(trained.stats.blocks, trained.stats.drop_rates) if r is not None}
    kw = dict(keep=0.5, stats=trained.stats, strategy="every-other")
    survival, rec = _prune(trained.model, block_scale="survival", **kw)
    unit, rec_unit = _prune(trained.model, block_scale="unit", **kw)
    assert rec["block_scale"]["chosen"] == "survival" and rec_unit["block_scale"]["chosen"] == "unit"
    kept = [b for b in sdcompress.find_blocks(unit, X) if b.path in p]
    assert len(kept) == 2 and all(p[b.path] < 1.0 for b in kept)
    for b in kept:  # body.4, the BatchNorm that ends the branch: weight and bias over p_l, the running statistics as they were
        s_bn, u_bn = survival.get_submodule(f"{b.path}.body.4"), unit.get_submodule(f"{b.path}.body.4")
        t_bn = trained.model.get_submodule(f"{b.path}.body.4")  # "survival" is the network as trained: p_l f(x)
        assert torch.equal(s_bn.weight, t_bn.weight) and torch.equal(s_bn.bias, t_bn.bias)
        assert torch.allclose(u_bn.weight * p[b.path], s_bn.weight) and torch.allclose(u_bn.bias * p[b.path], s_bn.bias)
        assert torch.equal(u_bn.running_var, s_bn.running_var)
    with torch.no_grad():
        assert not torch.allclose(unit(X), survival(X))
    named = [dc.replace(b, scale="") for b in trained.stats.blocks]  # blocks named by hand say nothing of their scale layer
    other, _ = _prune(trained.model, keep=0.5, stats=trained.stats, strategy="every-other", blocks=named, block_scale="unit")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), unit.state_dict().values()))  # the stats' layer
    assert _prune(trained.model, **kw)[1]["block_scale"]["why"].startswith("no calibration batches")  # auto, nothing to choose by
    chosen, rec_auto = _prune(trained.model, calibration=iter(data[:4]), **kw)  # any iterable, read once
    scale = rec_auto["block_scale"]
    loss = {float(k): v for k, v in scale["loss"].items()}
    t = scale["exponent"]
    assert {1.0, 0.0} <= set(loss) and t == min(loss, key=loss.get)
    for b in kept:  # p_l^t f(x): the scale layer's affine times p_l^(t - 1) against the network as trained
        s_bn, c_bn = survival.get_submodule(f"{b.path}.body.4"), chosen.get_submodule(f"{b.path}.body.4")
        assert torch.allclose(c_bn.weight, s_bn.weight * p[b.path] ** (t - 1), rtol=1e-5)
        assert torch.equal(c_bn.running_mean, s_bn.running_mean)  # chosen on recalibrated copies; handed back as it was
    measured = sdcompress.measure_drop_effects(trained.model, data * 2, list(trained.stats.blocks))
    with pytest.raises(sdcompress.errors.InputError, match="survival probability p_l"):
        sdcompress.prune(trained.model, keep=0.5, stats=measured, block_scale="unit")
    assert _prune(trained.model, keep=0.5, stats=measured)[1]["block_scale"]["chosen"] is None
    with pytest.raises(sdcompress.errors.InputError, match="block scale"):
        sdcompress.prune(trained.model, keep=0.5, stats=trained.stats, block_scale="half")


def test_binarize_chooses_the_kept_blocks_scale_of_a_users_model_again(tmp_path):
    """`binarize(block_scale=...)` after `prune` of a user's module: prune records the t it folded in
    (`scale_exponent`, kept by save and load), and binarize reaches another t from it with p_l from the recorded
    drop effects, never applying one twice; None leaves the scale; stats of another model are refused."""
    from sdcompress.binary import BinaryConv2d

    model = _randomize_bn(ModuleListNet())
    data = _loader(n=128, batch=16)
    trained = sdcompress.train_stochastic_depth(model, data, epochs=1, lr=0.05, recalibrate_batches=2)
    p = {b.path: 1.0 - r for b, r in zip(trained.stats.blocks, trained.stats.drop_rates) if r is not None}
    unit = sdcompress.prune(trained.model, keep=0.5, stats=trained.stats, strategy="every-other", block_scale="unit")
    assert unit.scale_exponent == 0.0
    sdcompress.save(unit, tmp_path / "small", blocks=sdcompress.find_blocks(unit, X))
    unit, _ = sdcompress.load(tmp_path / "small", model=ModuleListNet())
    assert unit.scale_exponent == 0.0  # kept by the sidecar
    kept = [b for b in sdcompress.find_blocks(unit, X) if b.path in p and p[b.path] < 1.0]
    assert kept
    as_is = sdcompress.binarize(unit, X)
    back = sdcompress.binarize(unit, X, block_scale="survival", stats=trained.stats)
    assert back.scale_exponent == 1.0 and any(isinstance(m, BinaryConv2d) for m in back.modules())
    for b in kept:  # from t = 0 to t = 1: the BatchNorm ending the branch times p_l, once
        a_bn, b_bn = as_is.get_submodule(f"{b.path}.body.4"), back.get_submodule(f"{b.path}.body.4")
        assert torch.allclose(b_bn.weight, a_bn.weight * p[b.path]) and torch.allclose(b_bn.bias, a_bn.bias * p[b.path])
    again = sdcompress.binarize(unit, X, block_scale="unit", stats=trained.stats)  # the t it has: nothing folded
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), as_is.state_dict().values()))
    auto = sdcompress.binarize(unit, X, block_scale="auto", stats=trained.stats, calibration=data[:4])
    assert auto.scale_exponent in (1.0, 0.0, 0.5) or auto.scale_exponent < 0
    other = sdcompress.train_stochastic_depth(_randomize_bn(SequentialNet()), data, epochs=1, lr=0.05, recalibrate_batches=0)
    with pytest.raises(sdcompress.errors.InputError, match="another model"):
        sdcompress.binarize(unit, X, block_scale="survival", stats=other.stats)
    with pytest.raises(sdcompress.errors.InputError, match="block scale"):
        sdcompress.binarize(unit, X, block_scale="half")
    with pytest.raises(sdcompress.errors.InputError, match="survival probability p_l"):
        sdcompress.binarize(unit, X, block_scale="unit")  # a user's module without stats: p_l not known
    with pytest.raises(sdcompress.errors.InputError, match="block_scale='auto'"):
        sdcompress.binarize(unit, X, calibration=data[:4])  # nothing would be chosen on them
    with pytest.raises(sdcompress.errors.InputError, match="give block_scale too"):
        sdcompress.binarize(unit, X, stats=trained.stats)
    retrained = sdcompress.train_stochastic_depth(back, data, epochs=1, lr=0.01, recalibrate_batches=0)
    assert retrained.model.scale_exponent == 1.0  # trained with the draws again: the t the module had is spent


def test_stochastic_depth_can_learn_from_a_teacher(tmp_path):
    """`train_stochastic_depth(teacher=...)`: the drawn networks learn the teacher's outputs as well as the labels.
    With alpha 0 the teacher's term weighs nothing and the weights are those of a run without one; with the default
    alpha they differ, the teacher is left as it was, and a checkpoint written with a teacher is not resumed
    without one."""
    model = _randomize_bn(ModuleListNet())
    data = _loader(n=64, batch=16)
    teacher = _randomize_bn(ModuleListNet())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = sdcompress.train_stochastic_depth(model, data, epochs=1, lr=0.05, recalibrate_batches=0)
    zero = sdcompress.train_stochastic_depth(model, data, epochs=1, lr=0.05, recalibrate_batches=0, teacher=teacher, alpha=0.0)
    taught = sdcompress.train_stochastic_depth(model, data, epochs=2, lr=0.05, recalibrate_batches=0, teacher=teacher,
                                               checkpoint=tmp_path / "state.pt")
    assert zero.history["distill"] == {"temperature": 4.0, "alpha": 0.0} and plain.history["distill"] is None
    assert all(torch.equal(a, b) for a, b in zip(zero.model.state_dict().values(), plain.model.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(taught.model.state_dict().values(), plain.model.state_dict().values()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    with pytest.raises(sdcompress.errors.InputError, match="other settings .*distill"):
        sdcompress.train_stochastic_depth(model, data, epochs=2, lr=0.05, checkpoint=tmp_path / "state.pt", resume=True)
    with pytest.raises(sdcompress.errors.InputError, match="alpha"):
        sdcompress.train_stochastic_depth(model, data, teacher=teacher, alpha=1.5)


def test_a_pruned_checkpoint_is_never_divided_twice(tmp_path):
    """The project's ResNet pruned through the API with kept blocks adding f(x), saved as a command-line checkpoint
    and loaded again, knows its blocks are unit-scaled: pruned again with p_l f(x), it is the network pruned once
    with p_l f(x) (1/p_l multiplied back, not divided twice); `sdcompress prune` of it keeps f(x) as it is."""
    import dataclasses as dc

    from sdcompress.checkpoint import load_checkpoint
    from sdcompress.cli import main
    from sdcompress.nets import build_model
    from sdcompress.zoo import bundled

    model, side = sdcompress.load(bundled("resnet56-sd"))
    assert model.scale_exponent == 1.0
    once = sdcompress.prune(model, keep=0.8, strategy="top", block_scale="unit")
    assert once.scale_exponent == 0.0 and len(once.spec.kept) == 22
    sdcompress.save(once, tmp_path / "once", checkpoint=side["checkpoint"])
    again, again_side = sdcompress.load(tmp_path / "once")
    assert again.scale_exponent == 0.0 and load_checkpoint(tmp_path / "once")[1].block_exponent == 0.0
    sdcompress.save(once, tmp_path / "plain")  # weights + blocks.json: rebuilt from the spec, t with it
    assert sdcompress.load(tmp_path / "plain", model=build_model(once.spec))[0].scale_exponent == 0.0
    twice = sdcompress.prune(again, keep=17 / 22, strategy="top", block_scale="survival")
    direct = sdcompress.prune(model, keep=17 / 27, strategy="top", block_scale="survival")
    assert twice.spec.kept == direct.spec.kept and twice.scale_exponent == 1.0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(twice.eval()(x), direct.eval()(x), rtol=1e-4, atol=1e-4)
    assert main(["prune", str(tmp_path / "once"), "--keep", "0.9", "--strategy", "top", "--recalibrate", "0",
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    meta = load_checkpoint(tmp_path / "cli")[1]
    assert meta.stages[-1]["block_scale"]["chosen"] == "unit" and "earlier stage" in meta.stages[-1]["block_scale"]["why"]
    tuned = dc.replace(meta, stages=meta.stages + ({"stage": "binarize", "config": {"finetune": 1, "finetune_survival": True}},))
    assert meta.block_exponent == 0.0 and tuned.block_exponent == 1.0  # trained with the draws again: as trained
    side_file = tmp_path / "once" / "model.json"
    for bad in ("x", float("nan"), 1e308, True):  # an edited sidecar: one clear error, never a rescaled network
        d = json.loads(side_file.read_text())
        d["stages"][-1]["block_scale"]["exponent"] = bad
        side_file.write_text(json.dumps(d))
        with pytest.raises(sdcompress.errors.InputError, match="exponent"):
            load_checkpoint(tmp_path / "once")


class _Stops:
    """ImageBatches that raise KeyboardInterrupt at the start of pass `at` (a run killed mid-training)."""

    def __init__(self, batches, at):
        self.batches, self.at, self.passes = batches, at, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        if self.passes == self.at:
            raise KeyboardInterrupt
        return iter(self.batches)

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)


def test_a_stopped_retrofit_goes_on_from_its_last_epoch(tmp_path):
    """Stopped in its third epoch, then resumed from the checkpoint of the second: the same weights, drop effects and
    history as three epochs never stopped (the same draws, schedule and shuffles: ImageBatches' state is kept)."""
    from sdcompress.data import ImageBatches, ImageSet

    g = torch.Generator().manual_seed(3)
    images = ImageSet((torch.rand(96, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (96,), generator=g))

    def batches():
        return ImageBatches(images, (0.5,) * 3, (0.25,) * 3, 16, train=True, pad=4, flip=True, seed=1)

    model = _randomize_bn(SequentialNet())
    blocks = sdcompress.find_blocks(model, X)
    kw = dict(blocks=blocks, lr=0.05, recalibrate_batches=2, seed=5)
    whole = sdcompress.train_stochastic_depth(model, batches(), 3, **kw)
    ck = tmp_path / "retrofit.pt"
    with pytest.raises(KeyboardInterrupt):
        sdcompress.train_stochastic_depth(model, _Stops(batches(), at=3), 3, checkpoint=ck, **kw)
    assert torch.load(ck, weights_only=True)["loop"]["epoch"] == 2
    with pytest.raises(InputError, match="resume=True"):  # never overwritten unasked
        sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=ck, **kw)
    with pytest.raises(InputError, match="other settings.*lr"):
        sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=ck, resume=True, **{**kw, "lr": 0.1})
    other = ImageBatches(images, (0.5,) * 3, (0.25,) * 3, 32, train=True, pad=4, flip=True, seed=1)
    with pytest.raises(InputError, match="other settings.*steps_per_epoch"):  # another batch size: another schedule
        sdcompress.train_stochastic_depth(model, other, 3, checkpoint=ck, resume=True, **kw)
    damaged = torch.load(ck, weights_only=True)
    del damaged["draws"]
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(InputError, match="incomplete or damaged"):
        sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=tmp_path / "damaged.pt", resume=True, **kw)
    again = sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=ck, resume=True, **kw)
    assert again.history["resumed_after_epoch"] == 2 and again.history["steps"] == whole.history["steps"] == 18
    assert again.history["epoch_loss"] == whole.history["epoch_loss"]
    for (name, a), b in zip(whole.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.stats.effect == whole.stats.effect and again.stats.runs == whole.stats.runs
    with pytest.raises(InputError, match="no checkpoint"):
        sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=tmp_path / "none.pt", resume=True, **kw)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be loaded"):
        sdcompress.train_stochastic_depth(model, batches(), 3, checkpoint=tmp_path / "junk.pt", resume=True, **kw)


def test_bad_arguments_are_refused():
    model = _randomize_bn(SequentialNet())
    with pytest.raises(InputError, match="epochs"):
        sdcompress.train_stochastic_depth(model, _loader(), epochs=0)
    with pytest.raises(InputError, match="p_last"):
        sdcompress.train_stochastic_depth(model, _loader(), p_last=1.5)
    with pytest.raises(InputError, match="one-shot iterator"):
        sdcompress.train_stochastic_depth(model, iter(_loader()), epochs=2)
    with pytest.raises(InputError, match="empty"):
        sdcompress.recalibrate(model, [])
    with pytest.raises(InputError, match=r"\(inputs, targets\)"):
        sdcompress.finetune(model, [torch.zeros(2, 3, 32, 32)], teacher=None)


def test_readme_opening_example_runs(tmp_path, monkeypatch):
    """The README's first example, as printed there."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own trained model, from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert sorted(scope["report"]["formats"]) == ["coreml", "onnx", "ort"]
    assert all(e["verification"]["ok"] for e in scope["report"]["formats"].values())
    assert (tmp_path / "phone" / "model.ort").stat().st_size > 1000 and (tmp_path / "phone" / "Net.mlpackage").is_dir()
    assert (tmp_path / "tiny" / "blocks.json").is_file()
    assert [b.path for b in scope["blocks"]] == [f"layers.{i}" for i in range(5)]
    assert [b.stage for b in scope["blocks"]] == [0, 0, 1, 1, 1]
    assert len(sdcompress.find_blocks(scope["small"], scope["example"])) == 3


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = _randomize_bn(SequentialNet())
    blocks = sdcompress.find_blocks(model, X)
    small = sdcompress.remove_blocks(model, [2, 5], blocks)  # a downsampling block (its shortcut stays) and a plain one
    stats = sdcompress.measure_drop_effects(small, _loader(n=160), rounds=1, blocks=sdcompress.find_blocks(small, X))
    sdcompress.save(small, tmp_path / "small", stats=stats)
    again, side = sdcompress.load(tmp_path / "small", model=SequentialNet())
    assert [b.path for b in side["removed"]] == ["layers.2", "layers.5"]
    assert _params(again) == _params(small)
    with torch.no_grad():
        assert torch.equal(again(X), small.eval()(X))
    assert side["stats"].effect == stats.effect
    assert sdcompress.prune(again, keep=0.5, stats=side["stats"])(X).shape == (2, 10)  # the statistics still apply
    with pytest.raises(InputError, match="exists"):
        sdcompress.save(small, tmp_path / "small")
    with pytest.raises(InputError, match="not a ModuleListNet"):
        sdcompress.load(tmp_path / "small", model=ModuleListNet())


def test_a_sidecar_never_imports_what_it_names(tmp_path, monkeypatch):
    """A sidecar that names a module of its own: loading without a model refuses, and the module is not imported
    (it would leave a marker file behind); only a builder the caller names is imported."""
    import json
    import sys

    model = _randomize_bn(SequentialNet())
    sdcompress.save(model, tmp_path / "m")
    side = json.loads((tmp_path / "m" / "blocks.json").read_text())
    side["class"] = "planted_module.Net"
    (tmp_path / "m" / "blocks.json").write_text(json.dumps(side))
    (tmp_path / "planted_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="never used to import"):
        sdcompress.load(tmp_path / "m")
    assert "planted_module" not in sys.modules and not (tmp_path / "imported").exists()
    (tmp_path / "mine.py").write_text("import test_user_model as t\ndef build():\n    return t.SequentialNet()\n")
    side["class"] = "mine.SequentialNet"
    (tmp_path / "m" / "blocks.json").write_text(json.dumps(side))
    again, _ = sdcompress.load(tmp_path / "m", builder="mine:build")
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


USER_PACKAGE = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(16) for _ in range(4)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def build():
    return DigitNet()
'''


def test_the_command_line_on_a_users_class(tmp_path, monkeypatch, capsys):
    """train --arch python:..., from the user's own weights -> prune --arch python:... -> export --arch python:...:
    the builder imported from where the command runs, because the command line names it; the folders are
    sdcompress.save's, loadable from Python."""
    import json

    from sdcompress.cli import main

    (tmp_path / "mynets.py").write_text(USER_PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynets

    torch.manual_seed(0)
    torch.save({"state_dict": mynets.build().state_dict(), "epoch": 3}, tmp_path / "mine.pt")  # "trained elsewhere"
    arch = "python:mynets:build"
    assert main(["train", "--arch", arch, "--weights", "mine.pt", "--data", "digits", "--epochs", "2", "--lr", "0.05",
                 "--out", "sd", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 blocks found; 2 epochs of stochastic depth from mine.pt" in out and "validation split top-1" in out
    side = json.loads((tmp_path / "sd" / "blocks.json").read_text())
    assert side["arch"] == arch and side["data"]["source"] == "digits" and side["stats"]["source"] == "training"
    assert main(["prune", "sd", "--arch", arch, "--keep", "0.5", "--recalibrate", "4", "--out", "small", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "blocks 4 -> 2 (stats)" in out and "kept blocks add" in out  # p_l known from the recorded statistics: chosen
    limit = _params(sdcompress.load("small", model=mynets.DigitNet())[0])  # the same budget, greedy on the loss
    assert main(["prune", "sd", "--arch", arch, "--max-params", str(limit), "--strategy", "sensitivity", "--recalibrate", "4",
                 "--out", "fit", "--no-progress"]) == 0
    assert "(sensitivity)" in capsys.readouterr().out
    assert _params(sdcompress.load("fit", model=mynets.DigitNet())[0]) <= limit
    small, small_side = sdcompress.load("small", model=mynets.DigitNet())
    assert len(small_side["removed"]) == 2 and _params(small) < _params(mynets.DigitNet())
    full, full_side = sdcompress.load("sd", model=mynets.DigitNet())
    sdcompress.save(small, "small-stats", stats=full_side["stats"], data=full_side["data"], arch=arch)  # the full network's effects kept
    assert main(["prune", "small-stats", "--arch", arch, "--keep", "0.5", "--strategy", "every-other", "--recalibrate", "2",
                 "--out", "smaller", "--no-progress"]) == 0
    assert "blocks 4 -> 1 (every-other)" in capsys.readouterr().out
    assert main(["export", "small", "--arch", arch, "--format", "onnx,ort", "--out", "phone"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "model.ort" in out and (tmp_path / "phone" / "model.ort").is_file()
    assert main(["report", "small", "--arch", arch]) == 0
    assert "2 of 4 blocks" in capsys.readouterr().out
    # the folder alone never imports: without --arch it is not a checkpoint of the project's, and says so
    assert main(["prune", "small", "--keep", "0.5", "--out", "again"]) == 2
    assert "name its builder with --arch python:" in capsys.readouterr().err
    assert main(["prune", "small", "--arch", "torchvision:resnet18"]) == 2
    assert not (tmp_path / "again").exists()


def test_a_stopped_train_of_a_users_class_goes_on_with_resume(tmp_path, monkeypatch, capsys):
    """`train --arch python:...` stopped in its second epoch leaves the first epoch's state and no model; `--resume`
    finishes it, with the weights of a run never stopped."""
    from sdcompress.cli import main
    from sdcompress.data import ImageBatches

    (tmp_path / "mynets.py").write_text(USER_PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "--arch", "python:mynets:build", "--data", "digits", "--epochs", "2", "--lr", "0.05", "--no-progress"]
    assert main([*args, "--out", "whole"]) == 0
    capsys.readouterr()
    assert main([*args, "--out", "sd", "--resume"]) == 2
    assert "no train_state.pt" in capsys.readouterr().err
    passes, real_iter = [], ImageBatches.__iter__

    def stop_in_epoch_two(self):
        passes.append(self.train)
        if self.train and passes.count(True) == 2:
            raise KeyboardInterrupt
        return real_iter(self)

    monkeypatch.setattr(ImageBatches, "__iter__", stop_in_epoch_two)
    assert main([*args, "--out", "sd"]) == 130
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == ["train_state.pt"]
    monkeypatch.setattr(ImageBatches, "__iter__", real_iter)
    assert main([*args, "--out", "sd", "--lr", "0.1", "--resume"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert main([*args, "--out", "sd", "--resume"]) == 0
    assert "(resumed after epoch 1)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == ["blocks.json", "weights.pt"]
    whole, resumed = torch.load(tmp_path / "whole" / "weights.pt"), torch.load(tmp_path / "sd" / "weights.pt")
    assert whole.keys() == resumed.keys() and [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


def test_the_api_on_a_command_line_checkpoint_is_the_prune_command(tmp_path, capsys):
    """`load` of a command-line checkpoint (the bundled default) gives its network and the drop effects of its
    training; `prune` by them removes the very blocks `sdcompress prune --keep 0.6` removes, rebuilt from the spec;
    `save(checkpoint=...)` writes a checkpoint the commands read, outputs identical, 1-bit layers kept as bits."""
    from sdcompress.checkpoint import load_checkpoint
    from sdcompress.cli import main
    from sdcompress.pruning import PruneConfig, blocks_to_remove
    from sdcompress.zoo import bundled

    folder = bundled("resnet56-sd")
    model, side = sdcompress.load(folder)
    net, meta = load_checkpoint(folder)
    rows = meta.survival_stats.blocks
    assert len(side["blocks"]) == 27 and [b.stage for b in side["blocks"]] == [0] * 9 + [1] * 9 + [2] * 9
    assert list(side["stats"].effect) == [r.drop_effect for r in rows] and side["stats"].source == "training"
    assert side["data"]["mean"] == list(meta.data.mean)
    with pytest.raises(sdcompress.errors.InputError, match="command-line checkpoint"):
        sdcompress.load(folder, model=PreActNet())

    small = sdcompress.prune(model, keep=0.6, stats=side["stats"])
    removed = blocks_to_remove(net, meta, PruneConfig(keep=0.6))
    assert small.spec.kept == tuple(b for b in range(27) if b not in removed) and len(small.spec.kept) == 16
    assert sum(p.numel() for p in small.parameters()) == 468_826  # no parameter of a removed block
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    small = sdcompress.recalibrate(small, [(torch.randn(16, 3, 32, 32, generator=g), None) for _ in range(2)])
    tiny = sdcompress.binarize(small, x[:2])
    for name, m in (("small", small), ("tiny", tiny)):
        sdcompress.save(m, tmp_path / name, checkpoint=side["checkpoint"])
        again, again_meta = load_checkpoint(tmp_path / name)
        assert again_meta.spec.kept == small.spec.kept and again_meta.stages[-1]["stage"] == "python"
        with torch.no_grad():
            assert torch.allclose(again(x), m.eval()(x), rtol=0, atol=1e-5), (name, (again(x) - m(x)).abs().max())
    assert load_checkpoint(tmp_path / "tiny")[1].spec.binarized  # the 1-bit layers are in the spec, stored as bits
    assert (tmp_path / "tiny" / "model.pt").stat().st_size < (tmp_path / "small" / "model.pt").stat().st_size / 5
    from sdcompress.zoo import EVAL_SET, models_dir

    effects = sdcompress.measure_drop_effects(small, [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
                                                      for _ in range(20)])
    sdcompress.save(small, tmp_path / "measured", checkpoint=side["checkpoint"], stats=effects)
    table = load_checkpoint(tmp_path / "measured")[1].survival_stats
    assert table.source == "measured" and [r.runs > 0 for r in table.blocks] == [b in small.spec.kept for b in range(27)]
    assert all(r.drop_effect is None and r.runs == 0 for r in table.blocks if r.block not in small.spec.kept)
    assert [r.contribution for r in table.blocks] == [r.contribution for r in rows]  # recorded in training, kept
    assert main(["eval", str(tmp_path / "small"), "--data", str(models_dir() / EVAL_SET), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"]["n"] == 2000
    with pytest.raises(sdcompress.errors.InputError, match="checkpoint="):
        sdcompress.save(PreActNet(), tmp_path / "other", checkpoint=side["checkpoint"])


def test_stochastic_depth_on_a_command_line_checkpoint_uses_its_own_draw(monkeypatch):
    """A network loaded from a command-line checkpoint scales its blocks by p_l itself: `train_stochastic_depth`
    trains it with the paper's draw (`run_mask`: running blocks unscaled, dropped ones not computed, its own rule),
    the evaluation-time network is unchanged by steps at lr ~0, and a constant-depth one is refused in one line."""
    from sdcompress.nets import ResNet
    from sdcompress.zoo import bundled

    model, side = sdcompress.load(bundled("resnet56-sd"))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # running statistics kept: only the weights could change the evaluation-time network
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    masks = []
    real = ResNet.forward

    def spy(self, x, run_mask=None):
        if self.training:
            masks.append(run_mask)
        return real(self, x, run_mask)

    monkeypatch.setattr(ResNet, "forward", spy)
    trained = sdcompress.train_stochastic_depth(model, batches, lr=1e-9, recalibrate_batches=0, p_last=0.9)
    assert len(masks) == 3 and all(isinstance(r, dict) and len(r) == 27 for r in masks)
    assert any(not run for r in masks for run in r.values())  # blocks were dropped by the draw
    assert trained.history["survival"] == [pytest.approx(p) for p in model.block_survival().values()]  # its own rule, not 0.9
    assert trained.history["unscaled"] == [] and len(trained.stats.effect) == 27
    with torch.no_grad():
        assert torch.allclose(trained.model(batches[0][0]), model(batches[0][0]), atol=1e-4)
    constant, _ = sdcompress.load(bundled("resnet56-constant"))
    with pytest.raises(InputError, match="sdcompress train --arch resnet56 --weights"):
        sdcompress.train_stochastic_depth(constant, batches)


def test_a_network_built_from_a_spec_keeps_its_stages_and_round_trips(tmp_path):
    """A project ResNet with downsampling blocks removed: its blocks keep the spec's stages (a forward pass would put
    every block after the first removed one in stage 0), so `prune` by stats takes every-other's count per stage;
    `save` / `load(model=...)` rebuild it from its spec; stochastic depth on a subset of its blocks runs the rest."""
    from sdcompress.nets import NetSpec, build_model
    from sdcompress.pruning import every_other, remove_blocks as rebuild

    torch.manual_seed(0)
    full = build_model(NetSpec("resnet20", 3, 10, "linear", 0.5)).eval()  # 9 blocks, 3 stages; 3 and 6 downsample
    net = rebuild(full, [3, 6])
    blocks = sdcompress.find_blocks(net)
    assert [b.stage for b in blocks] == [0, 0, 0, 1, 1, 2, 2]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(12)]
    stats = sdcompress.measure_drop_effects(net, batches, blocks)
    small = sdcompress.prune(net, keep=0.6, stats=stats)
    gone = sorted(set(net.block_ids) - set(small.block_ids))
    quota = {s: sum(1 for i in every_other(list(range(7)), 3) if blocks[i].stage == s) for s in range(3)}
    assert {s: sum(1 for n in gone if full.spec.block_stage(n) == s) for s in range(3)} == quota
    sdcompress.save(small, tmp_path / "s", blocks=sdcompress.find_blocks(small))
    again, _ = sdcompress.load(tmp_path / "s", model=build_model(NetSpec("resnet20", 3, 10, "linear", 0.5)))
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert again.block_ids == small.block_ids and torch.equal(again(x), small(x))
    trained = sdcompress.train_stochastic_depth(small, batches[:2], blocks=sdcompress.find_blocks(small)[:2], recalibrate_batches=0)
    assert len(trained.stats.effect) == 2 and trained.history["unscaled"] == []
