"""Stochastic depth retrofitted onto a pretrained network: `train --weights` for the project's own ResNets, with
weights written and trained elsewhere (../shared/models/cifar-resnet-peer), starts from the pretrained function."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sdcompress.cli import main
from sdcompress.nets import NetSpec, build_model
from sdcompress.train import load_start_weights

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "models" / "cifar-resnet-peer"
TEST_IMAGES = ROOT.parent / "shared" / "data" / "cifar10-test"
IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]

needs_peer = pytest.mark.skipif(not (PEER / "resnet.py").is_file(), reason=f"{PEER} is absent (only on development and CI machines)")


def _peer(name: str):
    sys.path.insert(0, str(PEER))
    try:
        import resnet
    finally:
        sys.path.remove(str(PEER))
    model = getattr(resnet, name)()
    file = next(PEER.glob(f"{name}-*.th"))
    state = torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval(), file


@needs_peer
@pytest.mark.parametrize("rule", ["linear", "none"])
def test_the_retrofit_starts_as_the_pretrained_network(rule):
    peer, file = _peer("resnet20")
    model = build_model(NetSpec("resnet20", 3, 10, rule, 0.5))
    start = load_start_weights(model, str(file))
    assert "layerS.i" in start["names"] and (start["survival_folded"] is not None) == (rule == "linear")
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), peer(x), atol=1e-4)
    # in training a block that runs adds f / p_l: what the draw adds on average is the pretrained branch
    blk = model.blocks["8"]
    assert blk.survival_prob < 1 or rule == "none"
    bn_peer = peer.layer3[2].bn2
    assert torch.allclose(blk.bn2.weight * blk.survival_prob, bn_peer.weight, atol=1e-6)


@needs_peer
@pytest.mark.skipif(not TEST_IMAGES.is_dir(), reason=f"{TEST_IMAGES} is absent")
def test_train_weights_records_the_pretrained_accuracy_before_training(tmp_path, capsys):
    from sdcompress.data import Normalize, load_dataset
    from sdcompress.loops import evaluate

    peer, file = _peer("resnet20")
    out = tmp_path / "r20"
    argv = ["train", "--arch", "resnet20", "--weights", str(file), *IMAGENET, "--data", str(TEST_IMAGES), "--val-size", "500",
            "--train-limit", "256", "--epochs", "1", "--lr", "0.01", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    meta = json.loads((out / "model.json").read_text())
    start = meta["stages"][0]["start"]
    ds = load_dataset(str(TEST_IMAGES), None, 500, 0)
    direct = evaluate(peer, ds.val, Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    assert start["val_top1"] == pytest.approx(direct["top1"], abs=1.5 / 500)  # the same function: the same answers
    assert direct["top1"] > 0.6  # a trained network on real images, not a fresh one
    assert meta["data"]["mean"] == [0.485, 0.456, 0.406] and start["sha256"] and "bn2" in start["survival_folded"]
    shown = capsys.readouterr()
    assert "start: val top-1" in shown.out + shown.err


def test_weights_under_other_names_with_a_map(tmp_path):
    torch.manual_seed(0)
    src = build_model(NetSpec("resnet20", 3, 10, "none"))
    renamed = {k.replace("blocks.", "body.").replace("stem_bn.", "norm0."): v for k, v in src.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in renamed.items()}, "epoch": 3}, tmp_path / "w.pt")
    model = build_model(NetSpec("resnet20", 3, 10, "none"))
    start = load_start_weights(model, str(tmp_path / "w.pt"), "body.=blocks.,norm0.=stem_bn.")
    assert start["names"] == "--weights-map body.=blocks.,norm0.=stem_bn."
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("extra,word", [(["--weights-map", "a.=b."], "--weights-map"), (["--mean", "0.5,0.5,0.5"], "--mean"),
                                        (["--weights", "MAPPED", "--weights-map", "nonsense"], "--weights-map"),
                                        (["--weights", "MAPPED", "--weights-map", "body.=stages."], "--weights"),
                                        (["--weights", "MAPPED"], "--weights")])
def test_retrofit_bad_input_is_one_line(colour_data, tmp_path, capsys, extra, word):
    torch.save({k.replace("blocks.", "body."): v for k, v in build_model(NetSpec("resnet20", 3, 2)).state_dict().items()},
               tmp_path / "w.pt")
    extra = [str(tmp_path / "w.pt") if e == "MAPPED" else e for e in extra]
    rc = main(["train", "--arch", "resnet20", "--data", str(colour_data), "--epochs", "1", "--out", str(tmp_path / "x"),
               "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and word in err[0], err
    assert not (tmp_path / "x").exists()
