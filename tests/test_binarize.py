import io
import json
import os

import pytest
import torch

from sdcompress.binary import BinaryConv2d, binarize_weight, pack_signs, sign_ste, unpack_signs
from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main


def test_sign_never_zero_and_ste_gradient():
    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    s = sign_ste(w)
    assert s.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    s.backward(torch.arange(1.0, 8.0))
    # identity inside the clip range |w| <= 1, zero outside
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_two_values_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    b = binarize_weight(w)
    for c in range(8):
        vals = b[c].unique()
        alpha = w[c].abs().mean()
        assert len(vals) == 2 and torch.allclose(vals, torch.stack([-alpha, alpha]))


@pytest.mark.parametrize("shape", [(3, 5), (16, 16, 3, 3), (7, 3, 1, 1), (1, 9)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-torch.Size(shape[1:]).numel() // 8))
    assert torch.equal(unpack_signs(packed, shape), torch.where(w >= 0, 1.0, -1.0))


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "run"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def _tensor_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values())


def test_binarized_checkpoint_stores_bits(sd_run, tmp_path):
    out = tmp_path / "bin"
    assert main(["binarize", str(sd_run), "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert len(model.spec.binarized) == 18 and "stem" not in model.spec.binarized and "fc" not in model.spec.binarized
    for name in model.spec.binarized:
        m = model.get_submodule(name)
        assert isinstance(m, BinaryConv2d)
        w = m.binary_weight().detach()
        for c in range(w.shape[0]):
            assert len(w[c].unique()) <= 2 and torch.allclose(w[c].abs(), w[c].abs().max().expand_as(w[c]))
    state = torch.load(out / "model.pt", weights_only=True)
    bits = [k for k in state if k.endswith("weight_bits")]
    assert len(bits) == 18 and all(state[k].dtype == torch.uint8 for k in bits)
    n_binary = sum(model.get_submodule(n).weight.numel() for n in model.spec.binarized)
    payload = sum(state[k].numel() for k in bits)
    assert payload == sum(-(-model.get_submodule(k[:-12]).weight[0].numel() // 8) * model.get_submodule(k[:-12]).weight.shape[0] for k in bits)
    assert payload * 8 - n_binary < 8 * 18 * 64  # padding to whole bytes per channel only
    # file size = tensor payload + torch.save's container overhead (measured on the same keys with empty tensors)
    size = os.path.getsize(out / "model.pt")
    empty = io.BytesIO()
    torch.save({k: torch.empty(0, dtype=v.dtype) for k, v in state.items()}, empty)
    assert _tensor_bytes(state) <= size <= _tensor_bytes(state) + empty.tell() + 64 * len(state)
    full = os.path.getsize(sd_run / "model.pt")
    assert size < full / 8
    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["params"]["by_bits"]["1"] == n_binary
    assert rep["after"]["memory_bytes"]["1"] == n_binary / 8
    assert rep["after"]["bytes"]["checkpoint"] == size
    assert rep["after"]["macs_split"]["binary_weight"] + rep["after"]["macs_split"]["full_precision"] == rep["after"]["macs"]
    # loading restores the same network
    x = torch.randn(3, 1, 8, 8)
    again, _ = load_checkpoint(out)
    assert torch.equal(again(x), model(x))


def test_prune_then_binarize_and_binarize_then_prune(sd_run, tmp_path):
    assert main(["prune", str(sd_run), "--keep", "0.6", "--out", str(tmp_path / "p")]) == 0
    assert main(["binarize", str(tmp_path / "p"), "--out", str(tmp_path / "pb")]) == 0
    assert main(["binarize", str(sd_run), "--out", str(tmp_path / "b")]) == 0
    assert main(["prune", str(tmp_path / "b"), "--keep", "0.6", "--out", str(tmp_path / "bp")]) == 0
    a, _ = load_checkpoint(tmp_path / "pb")
    b, _ = load_checkpoint(tmp_path / "bp")
    assert a.block_ids == b.block_ids and len(a.block_ids) == 5
    assert set(a.spec.binarized) == set(b.spec.binarized) and all(n.split(".")[1] in map(str, a.block_ids) for n in b.spec.binarized)


def test_binarize_finetune_with_ste(sd_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["binarize", str(sd_run), "--data", "digits", "--out", str(tmp_path / "noft"), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()  # without fine-tuning: one warning line, with the accuracy lost
    assert len(err) == 1 and "warning: not fine-tuned" in err[0] and "top-1" in err[0], err
    out = tmp_path / "ft"
    assert main(["binarize", str(sd_run), "--finetune", "1", "--data", "digits", "--out", str(out), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["binarize"]["finetune"]["epochs"] == 1 and rep["binarize"]["finetune"]["survival"] is True
    model, _ = load_checkpoint(out)
    w = model.get_submodule(model.spec.binarized[0]).weight
    assert len(w[0].unique()) == 2  # reloaded latent weights are exactly +-alpha


@pytest.mark.parametrize("args", [["--full-precision", "blocks.0.conv9"], ["--full-precision", "nonsense"], ["--recalibrate", "-1"]])
def test_binarize_bad_input(sd_run, tmp_path, capsys, args):
    out = tmp_path / "bad"
    assert main(["binarize", str(sd_run), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_binarizing_twice_is_refused(sd_run, tmp_path, capsys):
    assert main(["binarize", str(sd_run), "--out", str(tmp_path / "b1")]) == 0
    capsys.readouterr()
    assert main(["binarize", str(tmp_path / "b1"), "--out", str(tmp_path / "b2")]) == 2
    assert "already binarized" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_binarize_chooses_the_blocks_scale_again_unless_fine_tuned(sd_run, tmp_path, capsys):
    """A pruned network whose kept blocks were amplified (t = -1 by hand): binarized without fine-tuning, t is chosen
    again as prune chooses it, on the 1-bit network (the lowest recorded training loss, folded into each block's last
    BatchNorm, kept by the checkpoint); `--block-scale survival` names t = 1; with --finetune it is refused."""
    assert main(["prune", str(sd_run), "--keep", "0.6", "--data", "digits", "--block-scale", "unit", "--out", str(tmp_path / "p")]) == 0
    pruned, _ = load_checkpoint(tmp_path / "p")
    from sdcompress.nets import rescale_blocks
    from sdcompress.usermodel import save

    rescale_blocks(pruned, -1.0)  # amplified, as auto chooses for the float network when many blocks are gone
    save(pruned, tmp_path / "amp", checkpoint=load_checkpoint(tmp_path / "p")[1])
    capsys.readouterr()
    assert main(["binarize", str(tmp_path / "amp"), "--data", "digits", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "blocks add" in capsys.readouterr().out
    model, meta = load_checkpoint(tmp_path / "b")
    rec = meta.stages[-1]["block_scale"]
    loss = {float(k): v for k, v in rec["loss"].items()}
    assert {1.0, 0.0} <= set(loss) and rec["exponent"] == min(loss, key=loss.get) == model.scale_exponent
    assert "blocks add" in (tmp_path / "b" / "report.md").read_text()
    assert main(["binarize", str(tmp_path / "amp"), "--data", "digits", "--block-scale", "survival", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    surv, _ = load_checkpoint(tmp_path / "s")
    p = surv.block_survival()
    assert surv.scale_exponent == 1.0
    t = model.scale_exponent
    for b in surv.block_ids:  # the last BatchNorm's affine: p_l^(t - 1) from t = 1, p_l^(t + 1) from the amplified input
        a, s, amp = model.blocks[str(b)].bn2, surv.blocks[str(b)].bn2, pruned.blocks[str(b)].bn2
        assert torch.allclose(a.weight, s.weight * p[b] ** (t - 1), rtol=1e-5)
        assert torch.allclose(a.weight, amp.weight * p[b] ** (t + 1), rtol=1e-5)
    capsys.readouterr()
    assert main(["binarize", str(tmp_path / "amp"), "--data", "digits", "--block-scale", "unit", "--finetune", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--block-scale is for a binarized network that is not fine-tuned" in capsys.readouterr().err
