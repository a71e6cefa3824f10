import json
import subprocess
import sys

import pytest
import torch

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main


def test_train_then_eval_through_the_cli(digits_run, tmp_path, capsys):
    model, meta = load_checkpoint(digits_run)
    assert meta.metrics["epochs"] == 3 and meta.metrics["val_top1"] > 0.5
    stats = meta.raw["survival_stats"]
    assert stats["steps"] == 3 * (1617 // 128) and len(stats["blocks"]) == 9
    assert stats["blocks"][-1]["p_scheduled"] == 0.5
    report = tmp_path / "r.json"
    assert main(["eval", str(digits_run), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "digits-val" in out
    rep = json.loads(report.read_text())
    assert rep["schema"] == "sdcompress.report/1" and rep["accuracy"]["n"] == 180
    assert rep["accuracy"]["top1"] == pytest.approx(meta.metrics["val_top1"])
    assert rep["params"]["total"] == sum(v.numel() for v in model.parameters())
    assert rep["bytes"]["checkpoint"] == (digits_run / "model.pt").stat().st_size


def test_stats_prints_the_table_and_writes_a_png(digits_run, tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["stats", str(digits_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "drop effect" in text and len([l for l in text.splitlines() if l.strip()[:1].isdigit()]) == 9
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing output is not overwritten without --force
    before = (out / "stats.png").stat().st_mtime_ns
    assert main(["stats", str(digits_run), "--out", str(out)]) == 2
    assert (out / "stats.png").stat().st_mtime_ns == before


def _train(out, *extra):
    return main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "2", "--out", str(out), "--no-progress", *extra])


def test_same_seed_same_weights_on_cpu(tmp_path):
    assert _train(tmp_path / "a") == 0 and _train(tmp_path / "b") == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "model.json").read_text())["survival_stats"] == json.loads((tmp_path / "b" / "model.json").read_text())["survival_stats"]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from sdcompress.config import TrainConfig
    from sdcompress.train import train

    cfg = TrainConfig(arch="resnet20", data="digits", epochs=3)
    train(cfg, tmp_path / "full", progress=False)

    def stop_after_first(rec):
        if rec.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_epoch=stop_after_first)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "full" / "model.json").read_text())["survival_stats"]
    sb = json.loads((tmp_path / "cut" / "model.json").read_text())["survival_stats"]
    assert sa == sb


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def _bad_inputs(tmp_path, digits_run):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes((digits_run / "model.pt").read_bytes()[:500])
    (corrupt / "model.json").write_text((digits_run / "model.json").read_text())
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "model.pt").write_bytes((digits_run / "model.pt").read_bytes())
    side = json.loads((digits_run / "model.json").read_text())
    side["spec"]["arch"] = "resnet32"
    (mismatched / "model.json").write_text(json.dumps(side))
    out = str(tmp_path / "out")
    return [
        ["train", "--arch", "resnet57", "--out", out],
        ["train", "--data", str(tmp_path / "missing.npz"), "--out", out],
        ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", out],
        ["train", "--p-last", "0", "--out", out],
        ["train", "--p-last", "1.5", "--out", out],
        ["train", "--survival-rule", "cubic", "--out", out],
        ["train", "--epochs", "0", "--out", out],
        ["train", "--batch-size", "5000", "--epochs", "1", "--out", out],
        ["train", "--resume", "--epochs", "1", "--out", out],
        ["eval", str(corrupt)],
        ["eval", str(mismatched)],
        ["eval", str(tmp_path / "no-such-checkpoint")],
        ["stats", str(corrupt / "nothing.pt")],
    ]


def test_bad_input_gets_one_line_and_exit_2(tmp_path, digits_run, capsys):
    for argv in _bad_inputs(tmp_path, digits_run):
        before = _snapshot(tmp_path)
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]
        assert len(lines) == 1, (argv, err)
        assert "Traceback" not in err and "error" in lines[0]
        assert _snapshot(tmp_path) == before, argv


def test_bad_input_as_a_user_sees_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdcompress", "eval", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no such file" in proc.stderr


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys):
    for argv in (["--debug", "eval", str(tmp_path / "none")], ["eval", str(tmp_path / "none"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("sdcompress eval: error:")
    assert main(["eval", str(tmp_path / "none")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_eval_on_a_folder_of_other_images_scores_every_image(digits_run, tmp_path, capsys):
    """Data other than the checkpoint's training data is evaluated whole; its own data keeps the recorded split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    folder = tmp_path / "test"  # a folder of images named like a test split, no train/ inside
    n = 0
    for i in range(0, 1797, 6):
        cls = folder / str(d.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).round().astype("uint8")).save(cls / f"{i}.png")
        n += 1
    assert main(["eval", str(digits_run), "--data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"n={n})" in out and "every image" in out, out
    assert main(["eval", str(digits_run), "--data", "digits"]) == 0  # the training data: its validation split
    out = capsys.readouterr().out
    assert "n=180)" in out and "validation split" in out, out
    assert main(["eval", str(digits_run), "--data", str(folder), "--split", "val"]) == 0  # asked for: a 10% split
    assert f"n={round(0.1 * n)})" in capsys.readouterr().out


def test_fast_recipe_flags(tmp_path, capsys):
    """Label smoothing is recorded and trains; --compile is refused, in one line, for a model it cannot compile."""
    import json

    out = tmp_path / "ls"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", "--label-smoothing", "0.1",
                 "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "model.json").read_text())["stages"][0]["config"]
    assert cfg["label_smoothing"] == 0.1 and cfg["compile"] is False
    capsys.readouterr()
    for argv in (["--label-smoothing", "1.0"], ["--arch", "torchvision:resnet18", "--compile", "on"]):
        rc = main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", *argv, "--out", str(tmp_path / "x"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and not (tmp_path / "x").exists(), err
        assert ("--compile" if "--compile" in argv else "--label-smoothing") in err[0]


def test_every_option_has_help_and_says_its_default():
    import argparse

    from sdcompress.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            text = fmt._get_help_string(a) if a.help else ""
            needs_default = a.default is not None and a.default is not False and a.default != argparse.SUPPRESS and a.nargs != 0
            if not text or (needs_default and "default" not in text):
                missing.append(f"{name} {a.option_strings[0]}")
    assert not missing, missing
    assert "(default 0)" in sub.choices["train"].format_help().replace("\n", " ").replace("  ", " ")  # --seed 0 is a default too
