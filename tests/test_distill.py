"""Fine-tuning from the model before the stage as teacher: the loss, the record, and that the student moves
towards the teacher more than plain fine-tuning moves it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main
from sdcompress.data import Normalize, load_dataset
from sdcompress.loops import distill_loss


def test_distill_loss_at_its_ends():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert distill_loss(s, t, y, 4.0, 0.0) == pytest.approx(F.cross_entropy(s, y).item())  # labels only
    assert distill_loss(s, s, y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher
    # alpha 1: T^2 * KL(teacher || student) of the softened outputs, computed here by hand
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    assert distill_loss(s, t, y, 2.0, 1.0).item() == pytest.approx(4 * (p * (p.log() - q.log())).sum(1).mean().item(), rel=1e-5)


def _kl_to(model, teacher, images, meta) -> float:
    x = Normalize(meta.data.mean, meta.data.std)(images)
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(teacher(x), 1), reduction="batchmean", log_target=True).item()


def test_distilled_fine_tuning_follows_the_teacher(digits_run, tmp_path):
    runs = {}
    for distill in ("on", "off"):
        out = tmp_path / distill
        assert main(["prune", str(digits_run), "--keep", "0.4", "--strategy", "top", "--finetune", "2", "--finetune-lr", "0.02",
                     "--distill", distill, "--data", "digits", "--out", str(out), "--no-progress"]) == 0
        runs[distill] = out
    rec = json.loads((runs["on"] / "report.json").read_text())["prune"]["finetune"]
    assert rec["distill"] == {"temperature": 4.0, "alpha": 0.9}
    assert json.loads((runs["off"] / "report.json").read_text())["prune"]["finetune"]["distill"] is None
    teacher, meta = load_checkpoint(digits_run)
    val = load_dataset("digits").val.images
    on, off = (_kl_to(load_checkpoint(runs[k])[0], teacher, val, meta) for k in ("on", "off"))
    assert on < off, (on, off)


@pytest.mark.parametrize("flags", [["--distill-alpha", "1.5"], ["--distill-temperature", "0"], ["--distill", "maybe"]])
def test_bad_distillation_flags_are_one_line(digits_run, tmp_path, capsys, flags):
    try:
        rc = main(["prune", str(digits_run), "--finetune", "1", *flags, "--data", "digits", "--out", str(tmp_path / "x"), "--no-progress"])
    except SystemExit as e:  # a flag argparse refuses itself
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not (tmp_path / "x").exists(), err


def test_a_given_teacher_is_the_one_followed(digits_run, tmp_path):
    """`--teacher CKPT` replaces the model before the stage: binarizing a pruned model while learning from the
    unpruned one leaves the student closer to the unpruned model than learning from the pruned one does."""
    pruned = tmp_path / "pruned"
    assert main(["prune", str(digits_run), "--keep", "0.4", "--strategy", "top", "--data", "digits", "--out", str(pruned), "--no-progress"]) == 0
    runs = {}
    for name, extra in (("own", []), ("given", ["--teacher", str(digits_run)])):
        runs[name] = tmp_path / name
        assert main(["binarize", str(pruned), "--finetune", "2", "--finetune-lr", "0.02", *extra, "--data", "digits",
                     "--out", str(runs[name]), "--no-progress"]) == 0
    assert json.loads((runs["given"] / "report.json").read_text())["binarize"]["config"]["teacher"] == str(digits_run)
    assert json.loads((runs["own"] / "report.json").read_text())["binarize"]["config"]["teacher"] is None
    unpruned, meta = load_checkpoint(digits_run)
    val = load_dataset("digits").val.images
    own, given = (_kl_to(load_checkpoint(runs[k])[0], unpruned, val, meta) for k in ("own", "given"))
    assert given < own, (given, own)


def test_a_teacher_that_answers_another_question_is_refused(digits_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pt").write_bytes((digits_run / "model.pt").read_bytes())
    side = json.loads((digits_run / "model.json").read_text())
    side["data"]["classes"] = side["data"]["classes"][::-1]  # same count, another order: not the same outputs
    (other / "model.json").write_text(json.dumps(side))
    for flags in (["--teacher", str(other), "--finetune", "1"], ["--teacher", str(digits_run)]):
        out = tmp_path / "x"
        rc = main(["prune", str(digits_run), "--keep", "0.6", *flags, "--data", "digits", "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "--teacher" in err[0] and not out.exists(), err
