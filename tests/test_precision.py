"""Training precision: bf16 autocast with channels_last trains float32 weights, `auto` follows the hardware, and
everything after training is float32 in the contiguous layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sdcompress import precision
from sdcompress.cli import main
from sdcompress.config import TrainConfig
from sdcompress.precision import resolve_precision
from sdcompress.train import train

CPU = torch.device("cpu")


def _units(amx: bool, avx512: bool):
    return lambda: {"amx_bf16": amx, "avx512_bf16": avx512}


@pytest.mark.parametrize("amx,avx512,expected", [(False, False, "fp32"), (False, True, "fp32"), (True, True, "bf16")])
def test_auto_follows_the_cpus_bf16_units(monkeypatch, amx, avx512, expected):
    monkeypatch.setattr(precision, "cpu_bf16_units", _units(amx, avx512))
    p = resolve_precision("auto", CPU)
    assert p.name == expected and p.channels_last == (expected == "bf16") and p.requested == "auto"
    assert ("with AMX" in p.reason) == amx
    # asked for by name, each is what was asked, whatever the CPU has
    assert resolve_precision("fp32", CPU).name == "fp32" and not resolve_precision("fp32", CPU).channels_last
    assert resolve_precision("bf16", CPU).name == "bf16" and resolve_precision("bf16", CPU).channels_last


def test_auto_trains_in_float32_where_the_cpu_has_no_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_units", _units(False, False))
    train(TrainConfig(arch="resnet20", data="digits", epochs=1, device="cpu"), tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "model.json").read_text())["metrics"]
    assert (m["precision"], m["memory_format"], m["precision_requested"]) == ("fp32", "contiguous (NCHW)", "auto")


def test_bf16_trains_float32_weights(tmp_path):
    model, meta = train(TrainConfig(arch="resnet20", data="digits", epochs=3, precision="bf16", device="cpu"), tmp_path / "run",
                        progress=False)
    losses = [h["train_loss"] for h in json.loads((tmp_path / "run" / "model.json").read_text())["history"]]
    assert losses[-1] < 0.7 * losses[0], losses  # it learns
    assert meta.metrics["val_top1"] > 0.5
    assert (meta.metrics["precision"], meta.metrics["memory_format"]) == ("bf16", "channels_last")
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    floats = [v for v in saved.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and v.is_contiguous() for v in floats)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and all(m.dtype == torch.float32 for m in momenta)  # the optimizer state too
    # the model handed back is the evaluation-time network in float32 and the contiguous layout
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())


def test_a_block_dropped_in_a_bf16_step_is_not_computed():
    from sdcompress.loops import train_step
    from sdcompress.nets import NetSpec, build_model

    model = precision.to_layout(build_model(NetSpec("resnet20", 3, 10)), True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    model.blocks["4"].branch = lambda x: calls.append(1)  # would fail if it ran
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    run_mask = {b: b != 4 for b in model.block_ids}
    bf16 = precision.Precision("bf16", True, "bf16")
    train_step(opt, lambda x, y, step: F.cross_entropy(model(x, run_mask).float(), y), x, torch.randint(0, 10, (8,)), 0, bf16,
               torch.device("cpu"))
    assert not calls
    assert all(p.grad is None for p in model.blocks["4"].parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.blocks["3"].parameters())


def test_bf16_fine_tuning_records_its_precision(tmp_path, digits_run, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(digits_run), "--keep", "0.6", "--finetune", "1", "--precision", "bf16", "--data", "digits",
                 "--out", str(out), "--no-progress"]) == 0
    assert "fine-tuned 1 epochs at lr 0.01 (distilled), bf16 (channels_last)" in capsys.readouterr().out
    ft = json.loads((out / "model.json").read_text())["stages"][-1]["finetune"]
    assert (ft["precision"], ft["memory_format"], ft["precision_requested"]) == ("bf16", "channels_last", "bf16")
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in saved.values() if v.is_floating_point())


def test_a_run_saved_before_the_precision_setting_resumes(tmp_path, capsys):
    cfg = TrainConfig(arch="resnet20", data="digits", epochs=2, precision="fp32", device="cpu")

    def stop_after_first(rec):
        if rec.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False, on_epoch=stop_after_first)
    state_path = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    old = {k: v for k, v in state["config"].items() if k != "precision"}
    state["config"] = {**old, "amp": True, "channels_last": True}  # the settings it replaced, as such a run saved them
    del state["precision_ran"]
    torch.save(state, state_path)
    capsys.readouterr()
    _, meta = train(TrainConfig(arch="resnet20", data="digits", epochs=2, precision="bf16", device="cpu"), tmp_path / "run",
                    resume=True, progress=False)
    assert meta.metrics["epochs"] == 2 and meta.metrics["precision"] == "bf16"  # the second epoch ran, in bf16
    assert "trained in fp32; it continues in bf16 autocast" in capsys.readouterr().out  # and the switch is said


@pytest.mark.parametrize("cmd", [["train", "--precision", "fp16"], ["prune", "--precision", "half"],
                                 ["sweep", "--precision", "bfloat16"]])
def test_an_unknown_precision_is_refused(tmp_path, cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision" in err[0] and "auto, fp32, bf16" in err[0].replace("'", "")
    assert not (tmp_path / "out").exists()
