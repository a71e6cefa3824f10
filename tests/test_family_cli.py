"""Every command on a model of another family: a torchvision resnet18 trained with the project's stochastic depth
on small colour images, then stats, stats --measure, prune (each strategy), binarize, eval, report and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main

tvm = pytest.importorskip("torchvision.models")


def test_train_records_statistics_of_every_block(resnet18_ckpt):
    model, meta = load_checkpoint(resnet18_ckpt)
    assert meta.spec.arch == "torchvision:resnet18" and meta.spec.blocks_total == 8
    assert meta.spec.paths == ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1")
    assert meta.spec.stages == (0, 0, 1, 1, 2, 2, 3, 3)
    rows = meta.survival_stats.blocks
    # linear rule over 8 blocks, p_L = 0.5: block 7 ran about half the 16 steps, and fewer times than block 0
    assert rows[7].p_scheduled == pytest.approx(0.5) and rows[0].p_scheduled == pytest.approx(1 - 1 / 16)
    assert 0 < rows[7].runs < 16 and rows[0].runs >= rows[7].runs
    assert all(r.contribution is not None and r.contribution > 0 for r in rows)
    # the sidecar names the builder; loading builds it from torchvision, no code from the file
    side = json.loads((resnet18_ckpt / "model.json").read_text())
    assert side["spec"]["arch"] == "torchvision:resnet18" and side["spec"]["args"] == {}


def test_a_dropped_block_is_not_computed(resnet18_ckpt):
    model, _ = load_checkpoint(resnet18_ckpt)
    model.train()
    ran = []
    hooks = [model.net.get_submodule(p).conv1.register_forward_hook(lambda m, a, o, p=p: ran.append(p)) for p in model.spec.paths]
    model(torch.rand(4, 3, 32, 32), {b: b not in (3, 6) for b in range(8)})
    for h in hooks:
        h.remove()
    assert ran == [p for b, p in enumerate(model.spec.paths) if b not in (3, 6)]
    # and the model is whole again afterwards
    assert [type(model.net.get_submodule(p)).__name__ for p in model.spec.paths] == ["BasicBlock"] * 8


@pytest.mark.parametrize("strategy", ["stats", "every-other", "sensitivity", "top"])
def test_prune_each_strategy(resnet18_ckpt, colour_data, tmp_path, strategy):
    out = tmp_path / "p"
    rc = main(["prune", str(resnet18_ckpt), "--keep", "0.6", "--strategy", strategy, "--data", str(colour_data), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    full, _ = load_checkpoint(resnet18_ckpt)
    small, meta = load_checkpoint(out)
    assert len(small.block_ids) == 5 and meta.spec.blocks_kept == tuple(small.block_ids)
    state = torch.load(out / "model.pt", weights_only=True)
    removed = [b for b in range(8) if b not in small.block_ids]
    for b in removed:  # nothing of a removed block is saved but its projection shortcut
        keys = [k for k in state if k.startswith(f"net.{meta.spec.paths[b]}.")]
        assert all(".downsample." in k for k in keys), keys
    assert sum(v.numel() for v in small.parameters()) < sum(v.numel() for v in full.parameters())
    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["macs"] < rep["before"]["macs"] and rep["after"]["model"]["blocks_kept"] == small.block_ids


def test_measure_then_prune_by_measured_effects(resnet18_ckpt, colour_data, tmp_path):
    measured = tmp_path / "m"
    assert main(["stats", str(resnet18_ckpt), "--measure", "--data", str(colour_data), "--batches", "8", "--rounds", "12",
                 "--out", str(measured), "--no-plot"]) == 0
    _, meta = load_checkpoint(measured)
    assert meta.survival_stats.source == "measured"
    assert sum(r.drop_effect is not None for r in meta.survival_stats.blocks) >= 6
    assert main(["prune", str(measured), "--keep", "0.6", "--data", str(colour_data), "--out", str(tmp_path / "p"), "--no-progress"]) == 0


def test_binarize_eval_report_and_export(resnet18_ckpt, colour_data, tmp_path, capsys):
    binary = tmp_path / "b"
    assert main(["binarize", str(resnet18_ckpt), "--data", str(colour_data), "--out", str(binary), "--no-progress"]) == 0
    model, meta = load_checkpoint(binary)
    # regular convs inside the blocks, their projection shortcuts too; the stem and the classifier stay float
    assert "net.conv1" not in meta.spec.binarized and "net.fc" not in meta.spec.binarized
    assert "net.layer1.0.conv1" in meta.spec.binarized and "net.layer2.0.downsample.0" in meta.spec.binarized
    assert (binary / "model.pt").stat().st_size < (resnet18_ckpt / "model.pt").stat().st_size / 8
    capsys.readouterr()
    assert main(["eval", str(binary), "--data", str(colour_data)]) == 0
    assert "torchvision:resnet18" in capsys.readouterr().out
    assert main(["report", str(binary), "--json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["params"]["by_bits"]["1"] > 10 * rep["params"]["by_bits"]["32"]
    out = tmp_path / "e"
    assert main(["export", str(binary), "--format", "onnx,ort", "--data", str(colour_data), "--out", str(out)]) == 0
    exp = json.loads((out / "report.json").read_text())
    assert exp["formats"]["onnx"]["verification"]["ok"] and exp["formats"]["ort"]["verification"]["ok"]
    full = (resnet18_ckpt / "model.pt").stat().st_size
    assert exp["formats"]["onnx"]["weights"] == "int8" and exp["formats"]["onnx"]["bytes"] < full / 3.5  # 8 bits a weight
    assert exp["formats"]["ort"]["weights"] == "1bit" and exp["formats"]["ort"]["bytes"] < full / 8  # bits stored as bits


def test_train_from_weights_of_the_plain_model(colour_data, tmp_path, capsys):
    torch.manual_seed(1)
    plain = tvm.resnet18(num_classes=1000)
    torch.save(plain.state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "ft"
    assert main(["train", "--arch", "torchvision:resnet18", "--weights", str(tmp_path / "r18.pt"), "--data", str(colour_data),
                 "--epochs", "1", "--batch-size", "32", "--lr", "0.01", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr()
    assert "fc.bias, fc.weight left freshly initialized" in err.out + err.err
    model, _ = load_checkpoint(out)
    # one short epoch at a low rate: a block's convolution is still close to the weights it started from
    start = plain.layer1[0].conv1.weight
    assert (model.net.layer1[0].conv1.weight - start).norm() < 0.2 * start.norm()


def test_bad_weights_and_archs_are_one_line(colour_data, tmp_path, capsys):
    torch.save(tvm.mobilenet_v2().state_dict(), tmp_path / "mnv2.pt")
    for argv in (["--arch", "torchvision:resnet18", "--weights", str(tmp_path / "mnv2.pt")],
                 ["--arch", "torchvision:alexnet"], ["--arch", "torchvision:no_such_model"], ["--arch", "resnet20", "--weights", str(tmp_path / "mnv2.pt")],
                 ["--arch", "torchvision:vit_b_32"],  # built for 224x224: refused before training, not at its first step
                 ["--arch", "torchvision:resnet18", "--train-limit", "16"]):  # fewer images than a batch
        capsys.readouterr()
        rc = main(["train", *argv, "--data", str(colour_data), "--epochs", "1", "--out", str(tmp_path / "x"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (argv, err)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "convnext_tiny"])
def test_core_ml_export_of_a_pruned_torchvision_model(arch, colour_data, tmp_path):
    """Pruned at keep 0.6, converted to an ML program and checked op by op against PyTorch on the data's images
    (float32, so the logits themselves are compared, not only saturated probabilities)."""
    pytest.importorskip("coremltools")
    ckpt, small, out = tmp_path / "c", tmp_path / "s", tmp_path / "x"
    assert main(["train", "--arch", f"torchvision:{arch}", "--data", str(colour_data), "--epochs", "1", "--batch-size", "32",
                 "--train-limit", "64", "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["prune", str(ckpt), "--keep", "0.6", "--strategy", "every-other", "--recalibrate", "4", "--data", str(colour_data),
                 "--out", str(small), "--no-progress"]) == 0
    assert main(["export", str(small), "--format", "coreml", "--coreml-precision", "float32", "--data", str(colour_data), "--out", str(out)]) == 0
    v = json.loads((out / "report.json").read_text())["formats"]["coreml"]["verification"]
    model, meta = load_checkpoint(small)
    assert len(model.block_ids) < meta.spec.blocks_total
    assert v["ok"] and v["top1_agreement"] == 1.0 and v["max_abs_diff_logits"] < 1e-3, v
    assert (out / "S.mlpackage" / "Manifest.json").exists()  # named after the model (its folder, "s")


def test_prune_after_binarize_keeps_the_binary_shortcut(resnet18_ckpt, colour_data, tmp_path):
    """A removed block with a projection keeps it: binarized, it stays binarized in the pruned model."""
    binary, small = tmp_path / "b", tmp_path / "bp"
    assert main(["binarize", str(resnet18_ckpt), "--data", str(colour_data), "--out", str(binary), "--no-progress"]) == 0
    assert main(["prune", str(binary), "--blocks-to-keep", "0,1,3,4,5,6,7", "--data", str(colour_data), "--out", str(small),
                 "--no-progress"]) == 0
    model, meta = load_checkpoint(small)
    assert 2 not in model.block_ids and "net.layer2.0.downsample.0" in meta.spec.binarized
    assert not any(n.startswith("net.layer2.0.conv") for n in meta.spec.binarized)
    state = torch.load(small / "model.pt", weights_only=True)
    assert "net.layer2.0.downsample.0.weight_bits" in state and "net.layer2.0.conv1.weight_bits" not in state


def test_recording_contributions_runs_no_shortcut_twice_and_copies_cleanly(resnet18_ckpt):
    import copy

    model, _ = load_checkpoint(resnet18_ckpt)
    model.train()
    model.set_record_contribution(True)
    bn = model.net.layer2[0].downsample[1]
    before = int(bn.num_batches_tracked)
    model(torch.rand(4, 3, 32, 32))
    assert int(bn.num_batches_tracked) == before + 1  # once, by the block's own forward
    assert all(v is not None for v in model.contributions().values())
    twin = copy.deepcopy(model)  # the copy carries none of the original's recording hooks
    assert sum(len(m._forward_hooks) for m in twin.modules()) == 0
    model.set_record_contribution(False)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_a_timm_model_through_the_commands(colour_data, tmp_path):
    pytest.importorskip("timm", reason="timm is not installed (pip install 'sdcompress[timm]')")
    ckpt, measured, small = tmp_path / "t", tmp_path / "m", tmp_path / "p"
    assert main(["train", "--arch", "timm:resnet10t", "--data", str(colour_data), "--epochs", "1", "--batch-size", "32",
                 "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["stats", str(ckpt), "--measure", "--data", str(colour_data), "--batches", "8", "--rounds", "12",
                 "--out", str(measured), "--no-plot"]) == 0
    assert main(["prune", str(measured), "--keep", "0.5", "--data", str(colour_data), "--out", str(small), "--no-progress"]) == 0
    model, meta = load_checkpoint(small)
    assert meta.spec.arch == "timm:resnet10t" and meta.spec.blocks_total == 4 and len(model.block_ids) == 2
    assert meta.survival_stats.source == "measured"
