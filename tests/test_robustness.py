"""Bad input everywhere gets one line and exit code 2, and changes no file; untrusted files run no code."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import refusal_failures
from sdcompress.cli import main


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.pt", "model.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def _npz(path: Path, **arrays) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def _setup_cases(ck: Path, w: Path) -> list[tuple[str, list[str]]]:
    """(name, argv); files the bad inputs need are made here, under w."""
    w.mkdir(exist_ok=True)
    out = str(w / "out")
    (w / "afile").write_text("x")
    (w / "notzip.npz").write_text("not a zip")
    bad2d = _npz(w / "bad2d.npz", x=np.zeros((20, 64), np.uint8), y=np.zeros(20, np.int64))
    badlab = _npz(w / "badlab.npz", x=np.zeros((20, 8, 8), np.uint8), y=np.full(20, -3, np.int64))
    badtype = _npz(w / "badtype.npz", x=np.zeros((20, 8, 8), np.float32), y=np.zeros(20, np.int64))
    wrongkeys = _npz(w / "wrongkeys.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.zeros(20, np.int64))
    rgb = _npz(w / "rgb.npz", images=np.zeros((20, 3, 8, 8), np.uint8), labels=np.zeros(20, np.int64))
    nolabels = _npz(w / "nolabels.npz", images=np.zeros((20, 1, 8, 8), np.uint8))
    no_side = w / "no_sidecar"
    no_side.mkdir()
    (no_side / "model.pt").write_bytes((ck / "model.pt").read_bytes())
    corrupt = _copy_ckpt(ck, w / "corrupt_sidecar")
    (corrupt / "model.json").write_text("{not json")
    newer = _copy_ckpt(ck, w / "newer_schema")
    meta = json.loads((ck / "model.json").read_text())
    (newer / "model.json").write_text(json.dumps({**meta, "schema": "sdcompress.checkpoint/9"}))
    wrong_arch = _copy_ckpt(ck, w / "wrong_arch")
    (wrong_arch / "model.json").write_text(json.dumps({**meta, "spec": {**meta["spec"], "arch": "resnet7"}}))
    mismatch = _copy_ckpt(ck, w / "mismatch")
    (mismatch / "model.json").write_text(json.dumps({**meta, "spec": {**meta["spec"], "arch": "resnet32"}}))
    garbage = _copy_ckpt(ck, w / "garbage_weights")
    (garbage / "model.pt").write_bytes(os.urandom(3000))
    truncated = _copy_ckpt(ck, w / "truncated")
    (truncated / "model.pt").write_bytes((ck / "model.pt").read_bytes()[:5000])
    (w / "full").mkdir()
    (w / "full" / "model.pt").write_text("old")  # an existing output, not to be overwritten without --force
    (w / "notreport.json").write_text(json.dumps({"hello": 1}))
    c = str(ck)
    T = ["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", "--out", out]
    sidecar = _sidecar_cases(ck, w)
    untrusted = _untrusted_cases(ck, w)
    data = _data_cases(ck, w, out)
    return [*sidecar, *untrusted, *data,
        ("train unknown arch", ["train", "--arch", "resnet7", "--out", out]),
        ("train missing npz", ["train", "--data", str(w / "missing.npz"), "--out", out]),
        ("train missing folder", ["train", "--data", str(w / "nofolder") + "/", "--out", out]),
        ("train epochs 0", [*T, "--epochs", "0"]),
        ("train batch 0", [*T, "--batch-size", "0"]),
        ("train negative lr", [*T, "--lr", "-1"]),
        ("train p_last > 1", [*T, "--p-last", "1.5"]),
        ("train unknown rule", [*T, "--survival-rule", "sometimes"]),
        ("train batch > images", [*T, "--batch-size", "100000"]),
        ("train 2-D images", [*T, "--data", bad2d]),
        ("train negative labels", [*T, "--data", badlab]),
        ("train float images", [*T, "--data", badtype]),
        ("train npz with other array names", [*T, "--data", wrongkeys]),
        ("train not a zip", [*T, "--data", str(w / "notzip.npz")]),
        ("train npz without labels", [*T, "--data", nolabels]),
        ("train out is a file", [*T[:-1], str(w / "afile")]),
        ("train existing output", [*T[:-1], str(w / "full")]),
        ("train resume nothing", [*T, "--resume"]),
        ("train unknown device", [*T, "--device", "tpu"]),
        ("train warmup too long", [*T, "--warmup-epochs", "5"]),
        ("train sync-bn on cpu", [*T, "--sync-bn"]),
        ("eval missing checkpoint", ["eval", str(w / "nothing")]),
        ("eval missing sidecar", ["eval", str(no_side)]),
        ("eval corrupt sidecar", ["eval", str(corrupt)]),
        ("eval newer schema", ["eval", str(newer)]),
        ("eval unknown arch in sidecar", ["eval", str(wrong_arch)]),
        ("eval weights disagree with sidecar", ["eval", str(mismatch)]),
        ("eval garbage weights", ["eval", str(garbage)]),
        ("eval truncated weights", ["eval", str(truncated)]),
        ("eval wrong channels", ["eval", c, "--data", rgb]),
        ("eval batch 0", ["eval", c, "--batch-size", "0"]),
        ("stats missing checkpoint", ["stats", str(w / "nothing")]),
        ("prune keep 0", ["prune", c, "--keep", "0", "--out", out]),
        ("prune keep > 1", ["prune", c, "--keep", "1.5", "--out", out]),
        ("prune keep text", ["prune", c, "--keep", "abc", "--out", out]),
        ("prune unknown strategy", ["prune", c, "--strategy", "random", "--out", out]),
        ("prune block out of range", ["prune", c, "--blocks-to-keep", "0,99", "--out", out]),
        ("prune two budgets", ["prune", c, "--max-size", "100KB", "--max-params", "1000", "--out", out]),
        ("prune size unit", ["prune", c, "--max-size", "12 parsecs", "--out", out]),
        ("prune existing output", ["prune", c, "--out", str(w / "full")]),
        ("binarize unknown layer", ["binarize", c, "--full-precision", "blocks.99.conv1", "--out", out]),
        ("binarize negative finetune", ["binarize", c, "--finetune", "-1", "--out", out]),
        ("export unknown format", ["export", c, "--format", "tensorrt", "--out", out]),
        ("export threads 0", ["export", c, "--threads", "0", "--out", out]),
        ("export out is a file", ["export", c, "--out", str(w / "afile")]),
        ("export unknown precision", ["export", c, "--coreml-precision", "float8", "--out", out]),
        ("export corrupt sidecar", ["export", str(corrupt), "--out", out]),
        ("report missing checkpoint", ["report", str(w / "nothing")]),
        ("report json folder missing", ["report", c, "--json", str(w / "nofolder" / "r.json")]),
        ("compare not a report", ["compare", str(w / "notreport.json"), str(w / "notreport.json")]),
        ("compare one file", ["compare", str(w / "notreport.json")]),
        ("compare missing file", ["compare", str(w / "nothing.json"), str(w / "nothing2.json")]),
        ("sweep keep 0", ["sweep", c, "--keep", "0,0.5", "--out", out]),
        ("sweep unknown format", ["sweep", c, "--formats", "tensorrt", "--out", out]),
        ("sweep threads 0", ["sweep", c, "--threads", "0", "--out", out]),
        ("sweep binarize maybe", ["sweep", c, "--binarize", "maybe", "--out", out]),
        ("unknown command", ["shrink", c]),
    ]


def _edit(meta: dict, path: str, value):
    """A copy of a sidecar with the field at `path` (dots; `-` deletes) set to `value`."""
    meta = json.loads(json.dumps(meta))
    *parents, last = path.split(".")
    d = meta
    for k in parents:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value == "-":
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return meta


def _sidecar_cases(ck: Path, w: Path) -> list[tuple[str, list[str]]]:
    """Sidecars that are wrong in one field each: every one is refused before a network is built."""
    meta = json.loads((ck / "model.json").read_text())
    edits = {
        "no survival rule": ("spec.survival_rule", "-"),
        "no p_last": ("spec.p_last", "-"),
        "p_last above 1": ("spec.p_last", 1.5),
        "unknown rule": ("spec.survival_rule", "sometimes"),
        "num_classes 3e7": ("spec.num_classes", 30_000_000),
        "num_classes not the weights'": ("spec.num_classes", 20),
        "in_channels as text": ("spec.in_channels", "1"),
        "blocks_kept with text": ("spec.blocks_kept", [0, "one"]),
        "std zero": ("data.std.0", 0),
        "std negative": ("data.std.0", -0.2),
        "mean of two channels": ("data.mean", [0.5, 0.5]),
        "input of 3 channels": ("data.input_shape", [3, 8, 8]),
        "image side 0": ("data.input_shape", [1, 0, 8]),
        "nine class names": ("data.classes", [str(i) for i in range(9)]),
        "class name a number": ("data.classes.3", 3),
        "no data section": ("data", "-"),
        "no source": ("data.source", "-"),
        "no stages": ("stages", "-"),
        "empty stages": ("stages", []),
        "stage without a name": ("stages.0", {"config": {}}),
        "stats for 5 blocks": ("survival_stats.blocks", meta["survival_stats"]["blocks"][:5]),
        "negative runs": ("survival_stats.blocks.2.runs", -1),
        "negative standard error": ("survival_stats.blocks.2.drop_effect_se", -0.1),
        "p_scheduled 0": ("survival_stats.blocks.2.p_scheduled", 0),
        "metrics a list": ("metrics", [1, 2]),
    }
    cases = []
    for i, (name, (path, value)) in enumerate(edits.items()):
        d = _copy_ckpt(ck, w / f"side{i}")
        (d / "model.json").write_text(json.dumps(_edit(meta, path, value)))
        cases.append((f"sidecar {name}", ["eval", str(d)]))
    other = _copy_ckpt(ck, w / "side_20")  # consistent in itself, not with the weights: caught before building
    (other / "model.json").write_text(json.dumps(_edit(_edit(meta, "spec.num_classes", 20), "data.classes", [str(i) for i in range(20)])))
    cases.append(("sidecar of 20 classes beside 10-class weights", ["eval", str(other)]))
    nan = _copy_ckpt(ck, w / "side_nan")  # NaN drop effects would reorder pruning
    (nan / "model.json").write_text(json.dumps(_edit(meta, "survival_stats.blocks.4.drop_effect", float("nan"))))
    cases.append(("sidecar NaN drop effect", ["prune", str(nan), "--out", str(w / "out")]))
    inf = _copy_ckpt(ck, w / "side_inf")
    (inf / "model.json").write_text(json.dumps(_edit(meta, "data.mean.0", float("inf"))))
    cases.append(("sidecar infinite mean", ["export", str(inf), "--out", str(w / "out")]))
    return cases


def _untrusted_cases(ck: Path, w: Path) -> list[tuple[str, list[str]]]:
    """Files that are not what they claim: devices, FIFOs, huge or deeply nested files. None may hang or fill memory."""
    cases = []
    zero = _copy_ckpt(ck, w / "side_devzero")
    (zero / "model.json").unlink()
    (zero / "model.json").symlink_to("/dev/zero")
    cases.append(("sidecar a link to /dev/zero", ["eval", str(zero)]))
    fifo = _copy_ckpt(ck, w / "side_fifo")
    (fifo / "model.json").unlink()
    os.mkfifo(fifo / "model.json")
    cases.append(("sidecar a FIFO", ["report", str(fifo)]))
    wfifo = _copy_ckpt(ck, w / "weights_fifo")
    (wfifo / "model.pt").unlink()
    os.mkfifo(wfifo / "model.pt")
    cases.append(("model.pt a FIFO", ["eval", str(wfifo)]))
    wzero = _copy_ckpt(ck, w / "weights_devzero")
    (wzero / "model.pt").unlink()
    (wzero / "model.pt").symlink_to("/dev/zero")
    cases.append(("model.pt a link to /dev/zero", ["prune", str(wzero), "--out", str(w / "out")]))
    huge = _copy_ckpt(ck, w / "side_huge")
    with open(huge / "model.json", "r+b") as f:
        f.truncate(40 * 1024**2)  # sparse: 40 MiB that take no disk
    cases.append(("sidecar of 40 MiB", ["eval", str(huge)]))
    deep = _copy_ckpt(ck, w / "side_deep")
    (deep / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    cases.append(("sidecar nested 100,000 deep", ["eval", str(deep)]))
    (w / "deep.json").write_text('{"schema": "sdcompress.report/1", "model": ' + "[" * 50_000 + "]" * 50_000 + "}")
    cases.append(("compare a report nested 50,000 deep", ["compare", str(w / "deep.json"), str(w / "deep.json")]))
    cases.append(("compare /dev/zero", ["compare", "/dev/zero", str(w / "deep.json")]))
    os.mkfifo(w / "report.fifo")
    cases.append(("compare a FIFO", ["compare", str(w / "report.fifo"), str(w / "report.fifo")]))
    return cases


def _data_cases(ck: Path, w: Path, out: str) -> list[tuple[str, list[str]]]:
    """Data the model cannot take, labels that would build a huge model, numbers out of range, output folders
    that cannot be written: all found before the first expensive step."""
    rng = np.random.default_rng(0)
    c = str(ck)
    rgb = _npz(w / "rgb_xy.npz", x=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), y=np.arange(40) % 10)
    big = _npz(w / "big_xy.npz", x=rng.integers(0, 255, (40, 64, 64), dtype=np.uint8), y=np.arange(40) % 10)
    lab12 = _npz(w / "lab12.npz", x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 13)
    stray = _npz(w / "stray.npz", x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8),
                 y=np.concatenate([np.arange(199) % 10, [1_000_000]]))
    huge_label = _npz(w / "label2p40.npz", x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8),
                      y=np.concatenate([np.arange(199) % 10, [2**40]]))
    gap = _npz(w / "gap.npz", x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8), y=np.where(np.arange(200) % 10 == 4, 5, np.arange(200) % 10))
    folder = w / "imgs"
    from PIL import Image

    for k in ("a", "b"):
        (folder / k).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / k / f"{i}.png")
    (folder / "empty").mkdir()
    prune_out = w / "a_prune"
    prune_out.mkdir()
    for f in ("model.pt", "model.json", "report.json"):
        (prune_out / f).write_text("from an earlier prune")
    mixed = w / "mixed"
    mixed.mkdir()
    (mixed / "model.pt").write_text("old")
    (mixed / "notes.txt").write_text("the user's own file")
    T = ["train", "--arch", "resnet20", "--epochs", "1", "--out", out]
    return [
        ("prune RGB data for a grey model", ["prune", c, "--data", rgb, "--out", out]),
        ("binarize RGB data for a grey model", ["binarize", c, "--data", rgb, "--out", out]),
        ("prune 64x64 images for an 8x8 model", ["prune", c, "--data", big, "--out", out]),
        ("eval 64x64 images for an 8x8 model", ["eval", c, "--data", big]),
        ("export verified on 64x64 images", ["export", c, "--data", big, "--out", out]),
        ("eval label out of the model's range", ["eval", c, "--data", lab12]),
        ("train one stray label of 1,000,000", [*T, "--data", stray]),
        ("train one label of 2**40", [*T, "--data", huge_label]),
        ("train a class with no images", [*T, "--data", gap]),
        ("train an empty class folder", [*T, "--data", str(folder)]),
        ("prune finetune-lr nan", ["prune", c, "--finetune", "1", "--finetune-lr", "nan", "--out", out]),
        ("prune finetune-lr 1e5", ["prune", c, "--finetune", "1", "--finetune-lr", "1e5", "--out", out]),
        ("binarize finetune-lr inf", ["binarize", c, "--finetune", "1", "--finetune-lr", "inf", "--out", out]),
        ("train lr nan", [*T, "--data", "digits", "--lr", "nan"]),
        ("train momentum 1.5", [*T, "--data", "digits", "--momentum", "1.5"]),
        ("train weight decay -1", [*T, "--data", "digits", "--weight-decay", "-1"]),
        ("export into the checkpoint's own folder", ["export", c, "--out", c, "--force"]),
        ("export into a prune folder without --force", ["export", c, "--out", str(prune_out)]),
        ("prune into a folder with the user's files", ["prune", c, "--out", str(mixed), "--force"]),
        ("prune out under a file", ["prune", c, "--out", str(w / "afile" / "sub")]),
        ("stats out under a file", ["stats", c, "--out", str(w / "afile" / "sub")]),
        ("sweep keeps that share a label", ["sweep", c, "--keep", "0.5001,0.4999", "--out", out]),
        ("sweep binarize empty", ["sweep", c, "--binarize", ",", "--out", out]),
        ("sweep device tpu", ["sweep", c, "--device", "tpu", "--out", out]),
        ("sweep depth family of every-other", ["sweep", c, "--depth-family", "on", "--strategy", "every-other", "--out", out]),
        ("sweep depth family without float points", ["sweep", c, "--depth-family", "on", "--binarize", "on", "--out", out]),
        ("sweep depth family of ort only", ["sweep", c, "--depth-family", "on", "--formats", "ort", "--out", out]),
        ("binarize teacher without fine-tuning", ["binarize", c, "--teacher", c, "--out", out]),
        ("prune teacher that is not a checkpoint", ["prune", c, "--teacher", str(w / "afile"), "--finetune", "1", "--data", "digits", "--out", out]),
        ("prune device tpu", ["prune", c, "--device", "tpu", "--out", out]),
    ]


def test_bad_inputs_one_line_exit_2_nothing_written(digits_run, tmp_path, capsys):
    cases = _setup_cases(digits_run, tmp_path / "w")
    assert len(cases) >= 110, len(cases)
    failures = refusal_failures(cases, tmp_path, capsys)
    assert not failures, "\n".join(failures)


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(digits_run, tmp_path, capsys):
    bad = _copy_ckpt(digits_run, tmp_path / "evil")
    marker = tmp_path / "pwned"
    import torch

    torch.save({"stem.weight": _Evil(str(marker))}, bad / "model.pt")  # unpickling would create `marker`
    for argv in (["eval", str(bad)], ["export", str(bad), "--format", "onnx", "--out", str(tmp_path / "o")],
                 ["prune", str(bad), "--out", str(tmp_path / "p")], ["report", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert not marker.exists()
    torch.load(bad / "model.pt", weights_only=False)  # the control: an unsafe load really does run the code
    assert marker.exists()


# ---- interruptions ------------------------------------------------------------------------------------------
def _cli(*args):
    import sys

    return [sys.executable, "-m", "sdcompress", *args]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    import signal
    import subprocess
    import time

    import torch

    args = ["train", "--arch", "resnet20", "--data", "digits", "--epochs", "3", "--no-progress"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "full")), check=True, env=_env(), capture_output=True, timeout=240)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(*args, "--out", str(cut)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / "train_state.pt"
    deadline = time.time() + 200
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epochs_done = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 3  # killed mid-run, with a complete checkpoint of the last finished epoch
    assert not [p for p in cut.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")] or True
    subprocess.run(_cli(*args, "--out", str(cut), "--resume"), check=True, env=_env(), capture_output=True, timeout=240)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "full" / "model.json").read_text())["survival_stats"]
    sb = json.loads((cut / "model.json").read_text())["survival_stats"]
    assert sa == sb


@pytest.mark.timeout(300)
def test_sigint_during_export_leaves_no_partial_file(digits_run, tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "exp"
    out.mkdir()
    proc = subprocess.Popen(_cli("export", str(digits_run), "--format", "onnx,coreml", "--out", str(out)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240

    def writing() -> bool:  # the output folder is staged beside `out` as .exp.*.tmp; wait for its first file
        return any(p.name.startswith(".exp.") and any(p.iterdir()) for p in tmp_path.iterdir() if p.is_dir())

    while time.time() < deadline and proc.poll() is None and not writing():
        time.sleep(0.005)
    assert proc.poll() is None, "export finished before it wrote a temporary file"
    proc.send_signal(signal.SIGINT)  # while a file is being written or verified
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary folder left beside it
    assert list(out.iterdir()) == []  # the folder as it was: no file, no package, no report


def test_ctrl_c_swallowed_by_a_library_still_stops_before_commit(digits_run, tmp_path, monkeypatch, capsys):
    """coremltools' converter has bare `except:` clauses that can eat Ctrl-C; the signal must still win."""
    import signal
    import time

    import sdcompress.exporters.coreml as cm

    real = cm.convert

    def swallowing(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except BaseException:  # what such a library does
            pass
        return real(*a, **k)

    monkeypatch.setattr(cm, "convert", swallowing)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "exp"
    assert main(["export", str(digits_run), "--format", "onnx,coreml", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the folder is one unit: nothing of it, no temporary folder
    assert signal.getsignal(signal.SIGINT) == before  # handlers put back after the command
    from sdcompress import errors

    errors.check_interrupt()  # and the signal is forgotten: it belonged to that command


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import sdcompress.train as tr
    from sdcompress.config import TrainConfig
    from sdcompress.errors import TrainingDiverged

    real = tr._Epochs.loss_of
    steps = []

    def poisoned(self, *a):
        loss = real(self, *a)
        steps.append(1)
        return loss * float("nan") if len(steps) > 30 else loss

    monkeypatch.setattr(tr._Epochs, "loss_of", poisoned)
    saved = {}
    cfg = TrainConfig(arch="resnet20", data="digits", epochs=3)
    with pytest.raises(TrainingDiverged, match="non-finite .*the last good checkpoint is kept in .*--lr"):
        tr.train(cfg, tmp_path / "run", progress=False, on_epoch=lambda r: saved.update(pt=(tmp_path / "run" / "model.pt").read_bytes()))
    assert (tmp_path / "run" / "model.pt").read_bytes() == saved["pt"]  # the epoch-1 checkpoint, untouched
    monkeypatch.setattr(tr._Epochs, "loss_of", poisoned)
    from sdcompress.cli import main

    steps.clear()
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "3", "--out", str(tmp_path / "cli"), "--no-progress"]) == 1


# ---- untrusted bytes ----------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Blobs(dict):
    def __repr__(self):  # keep hypothesis' failure reports short
        return f"<{len(self)} real files>"


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    from sdcompress.cli import main as cli

    d = tmp_path_factory.mktemp("real")
    assert cli(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", "--out", str(d / "run"), "--no-progress"]) == 0
    assert cli(["eval", str(d / "run"), "--json", str(d / "report.json")]) == 0
    return _Blobs(pt=(d / "run" / "model.pt").read_bytes(), json=(d / "run" / "model.json").read_bytes(),
                  report=(d / "report.json").read_bytes())


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checkpoint_loader_never_crashes(real_files, tmp_path, data):
    from sdcompress.checkpoint import load_checkpoint
    from sdcompress.errors import InputError

    which = data.draw(st.sampled_from(["pt", "json"]))
    blob = real_files[which]
    how = data.draw(st.sampled_from(["truncate", "random", "flip"]))
    if how == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "random":
        bad = data.draw(st.binary(max_size=4096))
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1 :]
    d = tmp_path / f"c{abs(hash(bad)) % 10**9}"
    d.mkdir(exist_ok=True)
    (d / "model.pt").write_bytes(bad if which == "pt" else real_files["pt"])
    (d / "model.json").write_bytes(bad if which == "json" else real_files["json"])
    try:
        load_checkpoint(d)
    except InputError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_report_loader_never_crashes(real_files, tmp_path, data):
    from sdcompress.compare import load_report
    from sdcompress.errors import InputError

    blob = real_files["report"]
    bad = data.draw(st.one_of(st.binary(max_size=2048), st.integers(0, len(blob) - 1).map(lambda n: blob[:n]),
                              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                           max_leaves=10).map(lambda o: json.dumps({"schema": "sdcompress.report/1", "model": o}).encode())))
    p = tmp_path / "r.json"
    p.write_bytes(bad)
    try:
        r = load_report(p)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    from sdcompress.compare import compare, render

    render(compare([r, r], [str(p), str(p)]))  # a report it accepts can be compared without error


# ---- fine-tuning, ranking, decoding ---------------------------------------------------------------------------
def test_non_finite_fine_tuning_writes_nothing(digits_run, tmp_path, monkeypatch, capsys):
    """Fine-tuning shares training's guard: a non-finite loss stops it before anything is saved (exit 1)."""
    import torch

    import sdcompress.loops as tr

    real = tr.distill_loss

    def poisoned(*args, **kw):  # the loss of every fine-tuning step (distilled, as by default): what a learning rate
        return real(*args, **kw) * torch.tensor(float("nan"))  # of 1e5 does within a few steps

    monkeypatch.setattr(tr, "distill_loss", poisoned)
    for argv in (["prune", str(digits_run), "--finetune", "1", "--data", "digits"],
                 ["binarize", str(digits_run), "--finetune", "1", "--data", "digits"]):
        out = tmp_path / argv[0]
        assert main([*argv, "--out", str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "non-finite" in err and "--finetune-lr" in err and len(err.strip().splitlines()) == 1, err
        assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_prune_says_what_it_ranks_by(tmp_path, capsys):
    """A constant-depth checkpoint has no drop effects: prune warns, names the fallback, and report.md says it."""
    ck = tmp_path / "const"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", "--survival-rule", "none",
                 "--out", str(ck), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "p"
    assert main(["prune", str(ck), "--keep", "0.6", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("sdcompress prune: warning: the checkpoint has no drop effects") and "contribution" in err, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["ranking"]["by"] == "contribution"
    md = (out / "report.md").read_text()
    assert "ranked by contribution" in md and "**warning**" in md


def test_drop_effects_within_noise_fall_back_to_contribution():
    from sdcompress.checkpoint import BlockStats, SurvivalTable
    from sdcompress.pruning import stats_basis

    def meta(effects, ses):
        return SurvivalTable(100, 12, 12, tuple(BlockStats(i, 0.9, 90, 0.9, 1.0 + i, e, se) for i, (e, se) in enumerate(zip(effects, ses))))

    clear = meta([0.5, 0.4, 0.3, 0.01, 0.02, 0.03], [0.01] * 6)  # 3 of 6 beyond 2 SE: used
    assert stats_basis(clear, list(range(6))) == ("drop effect", None)
    noise = meta([0.5, 0.04, 0.03, 0.01, 0.02, 0.03], [0.1] * 6)  # 1 of 6 beyond 2 SE: noise
    by, warning = stats_basis(noise, list(range(6)))
    assert by == "contribution" and "only 1 of 6" in warning and "12 steps" in warning


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from sdcompress.data import load_dataset

    rng = np.random.default_rng(0)
    for k in ("a", "b"):
        (tmp_path / "d" / k).mkdir(parents=True)
        for i in range(5):
            v = rng.integers(0, 65535, (8, 8), dtype=np.uint16)
            Image.fromarray(v).save(tmp_path / "d" / k / f"{i}.png")  # a 16-bit grey PNG
    ds = load_dataset(str(tmp_path / "d"), val_size=0)
    x = ds.train.images.float()
    assert x.max() > 250 and x.min() < 5 and 100 < x.mean() < 155  # the full range, not everything at 255


# ---- the typed sidecar, fuzzed ----------------------------------------------------------------------------------
def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:12]):
            yield from _paths(v, (*prefix, i))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
                     | st.text(max_size=6), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=8)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_typed_sidecar_fuzz_one_line_or_a_working_model(real_files, tmp_path, data):
    """Any field of a real sidecar replaced by any JSON value (or deleted): loading gives a working model or one
    InputError line, never another exception, and a model that loads evaluates to finite logits."""
    import torch

    from sdcompress.checkpoint import load_checkpoint
    from sdcompress.errors import InputError

    meta = json.loads(real_files["json"])
    paths = [p for p in _paths(meta) if p and p[0] not in ("history",)]
    path = data.draw(st.sampled_from(paths))
    d = meta
    for k in path[:-1]:
        d = d[k]
    if data.draw(st.booleans()) and isinstance(d, dict):
        del d[path[-1]]
    else:
        d[path[-1]] = data.draw(_JSON)
    folder = tmp_path / f"s{abs(hash(path)) % 10**9}"
    folder.mkdir(exist_ok=True)
    (folder / "model.pt").write_bytes(real_files["pt"])
    (folder / "model.json").write_text(json.dumps(meta))
    try:
        model, loaded = load_checkpoint(folder)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    shape = loaded.data.input_shape
    assert torch.isfinite(model(torch.zeros(1, *shape))).all()
