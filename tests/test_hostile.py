"""Hostile input on the newer surfaces: other families' tampered sidecars, depth lists, weight forms and batches,
reports with odd numbers, output files that cannot be written, the Python API's arguments and interruptions at
start-up. Each bad input: exit 2 (or 130 for a signal), one line on stderr, no traceback, no file changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import refusal_failures
from sdcompress.cli import main
from sdcompress.cli.common import cores

ROOT = Path(__file__).resolve().parents[1]


def _tampered(src: Path, dst: Path, change) -> str:
    """A copy of checkpoint `src` whose sidecar `change(meta)` altered."""
    dst.mkdir(parents=True)
    shutil.copy(src / "model.pt", dst / "model.pt")
    meta = json.loads((src / "model.json").read_text())
    change(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return str(dst)


def _report(src: dict, path: Path, text_change=None, **fields) -> str:
    d = json.loads(json.dumps(src))
    d.update(fields)
    text = json.dumps(d)
    path.write_text(text_change(text) if text_change else text)
    return str(path)


@pytest.fixture(scope="module")
def batch2_export(digits_run, tmp_path_factory):
    """`export --batch 2` of the digits model (its report is also the good report the bad ones are made from)."""
    out = tmp_path_factory.mktemp("exp") / "e"
    assert main(["export", str(digits_run), "--format", "onnx,ort", "--batch", "2", "--out", str(out)]) == 0
    return out


def _cases(ck: Path, r18: Path, colour: Path, rep: dict, w: Path) -> list[tuple[str, list[str]]]:
    w.mkdir()
    out, c, t = str(w / "out"), str(ck), str(r18)
    (w / "folder").mkdir()
    good = _report(rep, w / "good.json")
    nan_w = w / "nan"
    nan_w.mkdir()
    shutil.copy(ck / "model.json", nan_w / "model.json")
    state = torch.load(ck / "model.pt", weights_only=True)
    state["blocks.3.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan_w / "model.pt")
    spec = lambda **kv: lambda m: m["spec"].update(kv)  # noqa: E731
    lie = {
        "another builder": spec(arch="torchvision:regnet_y_128gf"),
        "another builder of 100000 classes": lambda m: (m["spec"].update(arch="torchvision:regnet_y_128gf", num_classes=100_000),
                                                        m["data"].update(classes=[str(i) for i in range(100_000)])),
        "another model of the same library": spec(arch="torchvision:resnet34"),
        "more classes than the classifier has": lambda m: (m["spec"].update(num_classes=7),
                                                           m["data"].update(classes=[str(i) for i in range(7)])),
        "one input channel": lambda m: (m["spec"].update(in_channels=1),
                                        m["data"].update(input_shape=[1, 32, 32], mean=[0.5], std=[0.25])),
        "a builder argument it does not take": spec(args={"width_mult": 4.0}),
        "a builder argument out of range": spec(args={"dropout": 7.0}),
        "block paths of another model": spec(paths=["features.0", "features.1"], stages=[0, 0]),
        "a timm model of other tensors": spec(arch="timm:convnext_atto"),
        "a hub name": spec(arch="timm:hf-hub:someone/model"),
    }
    tampered = [(f"eval resnet18 sidecar with {name}", ["eval", _tampered(r18, w / f"t{i}", f), "--data", str(colour)])
                for i, (name, f) in enumerate(lie.items())]
    figures = [
        ("compare macs NaN", _report(rep, w / "nan.json", macs=float("nan"))),
        ("compare macs Infinity", _report(rep, w / "inf.json", macs=float("inf"))),
        ("compare params 1e400", _report(rep, w / "big.json", text_change=lambda s: s.replace(
            f'"total": {rep["params"]["total"]}', '"total": 1e400', 1))),
        ("compare negative bytes", _report(rep, w / "neg.json", bytes={**rep["bytes"], "onnx": -5})),
        ("compare accuracy above 1", _report(rep, w / "acc.json", accuracy={"top1": 1.5, "dataset": "x", "n": 3})),
        ("compare latency as text", _report(rep, w / "lat.json", latency_ms={"onnxruntime_cpu_b1": "fast"})),
        ("compare macs as true", _report(rep, w / "bool.json", macs=True)),
    ]
    return [
        *tampered,
        *[(name, ["compare", good, f]) for name, f in figures],
        ("train timm model without drop path", ["train", "--arch", "timm:vgg11", "--data", str(colour), "--out", out]),
        ("train timm model that does not exist", ["train", "--arch", "timm:no_such_net", "--data", str(colour), "--out", out]),
        ("export batch 0", ["export", c, "--batch", "0", "--out", out]),
        ("export batch 100000", ["export", c, "--batch", "100000", "--out", out]),
        ("export batch text", ["export", c, "--batch", "many", "--out", out]),
        ("export threads 100000", ["export", c, "--threads", "100000", "--out", out]),
        ("export threads above the cores", ["export", c, "--threads", str(cores() + 1), "--out", out]),
        ("sweep threads 100000", ["sweep", c, "--threads", "100000", "--out", out]),
        ("export NaN model", ["export", str(nan_w), "--format", "onnx", "--out", out]),
        ("export NaN model as a depth family", ["export", str(nan_w), "--depths", "1.0,0.6", "--out", out]),
        ("export depths that share a name", ["export", c, "--depths", "0.611,0.612", "--out", out]),
        ("export depths that keep the same blocks", ["export", c, "--depths", "0.5,0.55", "--out", out]),
        ("export 13 depths", ["export", c, "--depths", ",".join(f"{0.07 * i:.2f}" for i in range(2, 15)), "--out", out]),
        ("export depths with ort", ["export", c, "--depths", "1.0,0.6", "--format", "ort", "--out", out]),
        ("export 1bit weights of a float model", ["export", c, "--weights", "1bit", "--out", out]),
        ("export unknown weight form", ["export", c, "--weights", "int2", "--out", out]),
        ("eval --json a folder", ["eval", c, "--json", str(w / "folder")]),
        ("eval --json in /proc", ["eval", c, "--json", "/proc/sdcompress-test.json"]),
        ("eval --json over its own sidecar", ["eval", c, "--json", str(ck / "model.json"), "--force"]),
        ("report --json a folder", ["report", c, "--json", str(w / "folder"), "--force"]),
        ("report --md a folder", ["report", c, "--md", str(w / "folder"), "--force"]),
        ("report --json and --md one file", ["report", c, "--json", str(w / "r.txt"), "--md", str(w / "r.txt")]),
        ("compare --json a folder", ["compare", good, good, "--json", str(w / "folder"), "--force"]),
        ("compare --json in /proc", ["compare", good, good, "--json", "/proc/sdcompress-test.json"]),
        ("compare --json over an input", ["compare", good, good, "--json", good, "--force"]),
        ("train unknown precision", ["train", "--precision", "fp16", "--out", out]),
        ("prune unknown precision", ["prune", c, "--precision", "half", "--out", out]),
        ("binarize unknown precision", ["binarize", c, "--precision", "int8", "--out", out]),
        ("sweep unknown precision", ["sweep", c, "--precision", "fp64", "--out", out]),
        ("sweep Core ML precision as training precision", ["sweep", c, "--precision", "float16", "--out", out]),
    ]


def test_hostile_inputs_one_line_exit_2_nothing_written(digits_run, resnet18_ckpt, colour_data, batch2_export, tmp_path, capsys):
    rep = json.loads((batch2_export / "report.json").read_text())
    rep["latency_ms"] = {"onnxruntime_cpu_b1": 0.5}
    cases = _cases(digits_run, resnet18_ckpt, colour_data, rep, tmp_path / "w")
    assert len(cases) >= 45, len(cases)
    failures = refusal_failures(cases, tmp_path, capsys)
    assert not failures, "\n".join(failures)


def test_a_tampered_family_sidecar_is_refused_before_the_network_is_built(resnet18_ckpt, colour_data, tmp_path):
    """torchvision's largest RegNet named in the sidecar: refused from a skeleton on the meta device, so the process
    never holds a network of that size (its float32 weights alone would be 2.5 GB)."""
    t = _tampered(resnet18_ckpt, tmp_path / "t", lambda m: m["spec"].update(arch="torchvision:regnet_y_128gf"))
    # the peak of this process's own memory (VmHWM; ru_maxrss would carry the forking test process's over exec)
    code = ("import sys\nfrom sdcompress.cli import main\nrc = main(sys.argv[1:])\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\nsys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code, "eval", t, "--data", str(colour_data)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert int(p.stdout.strip()) < 2_000_000, (p.stdout, p.stderr)  # KiB: far below the 2.5 GB the real network needs


@pytest.mark.parametrize("batch", [2, 8, 5])  # 5: the 64 verification images do not fill the last batch
def test_export_at_a_fixed_batch_is_verified_and_timed_at_that_batch(digits_run, batch2_export, tmp_path, batch):
    import onnxruntime as ort

    out = batch2_export if batch == 2 else tmp_path / "e"
    if batch != 2:
        assert main(["export", str(digits_run), "--format", "onnx,ort", "--batch", str(batch), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    for fmt in ("onnx", "ort"):
        f = rep["formats"][fmt]
        assert f["verification"]["ok"] and f["verification"]["n"] == 64
        assert f["latency_ms"]["batch"] == batch and f["latency_ms"]["onnxruntime_cpu_b1"] is None and f["latency_ms"]["ms"] > 0
        sess = ort.InferenceSession(str(out / f["file"]), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[0] == batch
    assert rep["latency_ms"] is None  # no batch-1 file: no batch-1 latency claimed


COMMANDS = [["train", "--data", "digits", "--epochs", "1"], ["eval"], ["stats"], ["prune"], ["binarize"], ["export"], ["report"],
            ["sweep"], ["compare", "a.json", "b.json"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_ctrl_c_while_starting_is_one_line_and_130(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = [] if argv[0] == "compare" else ["--out", str(tmp_path / "out")] if argv[0] not in ("eval", "report") else []
    proc = subprocess.Popen([sys.executable, "-m", "sdcompress", *argv, *out], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60  # until the command imports torch (building its parser): its handlers are installed
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- the Python API: bad arguments raise ValueError / TypeError with a message, never deep inside torch ----------
@pytest.fixture(scope="module")
def net():
    from sdcompress.nets import NetSpec, build_model

    torch.manual_seed(0)
    return build_model(NetSpec("resnet20", 3, 10)).eval()


def _batches(n=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("keep,error", [(0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (-0.1, ValueError),
                                        ("0.6", TypeError), (True, TypeError)])
def test_api_prune_keep(net, keep, error):
    import sdcompress

    with pytest.raises(error, match="keep"):
        sdcompress.prune(net, keep=keep)


def test_api_prune_refuses_drop_effects_of_another_model(net):
    import sdcompress
    from sdcompress.nets import NetSpec, build_model

    other = build_model(NetSpec("resnet32", 3, 10)).eval()
    stats = sdcompress.measure_drop_effects(other, _batches(20))
    with pytest.raises(ValueError, match="another model"):
        sdcompress.prune(net, keep=0.6, stats=stats)
    with pytest.raises(TypeError, match="DropEffects"):
        sdcompress.prune(net, keep=0.6, stats={"effect": []})


@pytest.mark.parametrize("remove,error,match", [([-1], ValueError, "index -1"), ([99], ValueError, "index 99"),
                                                (["blocks.0"], TypeError, "str"), ([1, 1], ValueError, "twice")])
def test_api_remove_blocks_arguments(net, remove, error, match):
    import sdcompress

    with pytest.raises(error, match=match):
        sdcompress.remove_blocks(net, remove)


@pytest.mark.parametrize("paths,error,match", [(["blocks.1", "blocks.1"], ValueError, "twice"),
                                               (["blocks.1", "blocks.1.conv1"], ValueError, "inside"),
                                               (["blocks.77"], ValueError, "no module"), ("blocks.1", TypeError, "list"),
                                               ([], ValueError, "empty")])
def test_api_find_blocks_paths(net, paths, error, match):
    import sdcompress

    with pytest.raises(error, match=match):
        sdcompress.find_blocks(net, paths=paths, example_input=torch.randn(2, 3, 32, 32))


def test_api_measure_drop_effects_arguments(net):
    import sdcompress

    with pytest.raises(ValueError, match="empty"):
        sdcompress.measure_drop_effects(net, [])
    with pytest.raises(ValueError, match="one-shot"):
        sdcompress.measure_drop_effects(net, (b for b in _batches()), rounds=3)
    with pytest.raises(ValueError, match="rounds"):
        sdcompress.measure_drop_effects(net, _batches(), rounds=0)
    with pytest.raises(ValueError, match="max_drop"):
        sdcompress.measure_drop_effects(net, _batches(), max_drop=1.5)


def test_api_export_onnx_leaves_the_model_in_its_mode(net, tmp_path):
    import sdcompress

    net.train()
    try:
        sdcompress.export_onnx(net, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
        assert net.training
    finally:
        net.eval()
    with pytest.raises(TypeError, match="tensor"):
        sdcompress.export_onnx(net, tmp_path / "n.onnx", [1, 2])
    assert not (tmp_path / "n.onnx").exists()


def test_dir_lists_the_api():
    import sdcompress

    assert {"find_blocks", "remove_blocks", "measure_drop_effects", "prune", "export_onnx", "DropEffects"} <= set(dir(sdcompress))
