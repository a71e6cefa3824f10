"""ExecuTorch (.pte) export: each file run back by ExecuTorch's own runtime on real images and compared with PyTorch."""

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="ExecuTorch is an optional extra (pip install 'sdcompress[executorch]')")

from sdcompress.checkpoint import load_checkpoint  # noqa: E402
from sdcompress.cli import main  # noqa: E402
from sdcompress.data import Normalize  # noqa: E402
from sdcompress.evaluate import eval_data  # noqa: E402
from sdcompress.exporters.executorch import Program  # noqa: E402
from sdcompress.pipeline import VerificationFailed, run_export  # noqa: E402

from conftest import refusal_failures  # noqa: E402


def _runtime_against_torch(ckpt, pte, batch=1, n=96):
    """ExecuTorch's outputs on n evaluation images (not the 64 export verified on) against the PyTorch model's."""
    model, meta = load_checkpoint(ckpt)
    images, _ = eval_data(meta, ckpt, None, None)
    x = Normalize(meta.data.mean, meta.data.std)(images.images[:n])
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = Program(pte, batch).run(x)
    return float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean())


@pytest.fixture(scope="module")
def exported(variants, tmp_path_factory):
    """The pruned model as ONNX and .pte (float), and the pruned + binarized one as ONNX and .pte with its bits kept."""
    root = tmp_path_factory.mktemp("pte")
    return {"pruned": run_export(variants / "pruned", ("onnx", "pte"), root / "pruned"),
            "both": run_export(variants / "both", ("onnx", "pte"), root / "both", weights="1bit")}, root


@pytest.mark.parametrize("name", ["pruned", "both"])
def test_pte_runs_in_executorch_and_matches_pytorch(variants, exported, name):
    reports, root = exported
    rep = reports[name]
    f = rep["formats"]["pte"]
    path = root / name / "model.pte"
    assert f["bytes"] == path.stat().st_size and f["verification"]["ok"]
    diff, agree = _runtime_against_torch(variants / name, path)
    assert diff < 1e-4 and agree == 1.0
    assert rep["bytes"]["pte"] == f["bytes"] and rep["latency_ms"]["executorch_cpu_b1"] > 0
    model, _ = load_checkpoint(variants / name)
    if name == "both":  # the bits are stored as bits: far under the float program of the same network
        assert f["weights"] == "1bit"
        assert f["binarized_layers_by_form"]["1bit"] == len(model.spec.binarized) - f["binarized_layers_by_form"]["float"] > 0
        assert f["compression_ratio"] >= 8.0 and f["bytes"] < reports["pruned"]["formats"]["pte"]["bytes"] / 2
    else:  # every weight in XNNPACK's delegate; a removed block has no weights in the program
        assert f["weights"] == "float" and f["delegate_calls"] >= 1
        params = sum(p.numel() for p in model.parameters())
        assert params * 4 < f["bytes"] < params * 4 + 300_000
    md = (root / name / "report.md").read_text()
    assert "model.pte" in md and "ExecuTorch" in md


def test_pte_of_a_torchvision_model(resnet18_ckpt, tmp_path):
    rep = run_export(resnet18_ckpt, ("pte",), tmp_path / "e", batch=8)
    assert rep["formats"]["pte"]["batch"] == 8
    diff, agree = _runtime_against_torch(resnet18_ckpt, tmp_path / "e" / "model.pte", batch=8, n=43)  # 5 runs, the last one partial
    assert diff < 1e-3 and agree == 1.0


def test_wrong_pte_is_caught_and_nothing_written(variants, exported, tmp_path, monkeypatch):
    import sdcompress.exporters.executorch as et

    _, root = exported
    wrong = (root / "pruned" / "model.pte").read_bytes()  # another network's program, handed over as this one's
    monkeypatch.setattr(et, "export_pte", lambda model, example, form, batch: (wrong, {"form": "float"}, et.program_model(model, form)[0]))
    with pytest.raises(VerificationFailed, match="model.pte output differs from PyTorch"):
        run_export(variants / "full", ("pte",), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_pte_refusals_are_one_line(variants, tmp_path, capsys):
    cases = [("int8 has no XNNPACK weight-only form", ["export", str(variants / "full"), "--format", "pte", "--weights", "int8",
                                                       "--out", str(tmp_path / "a")]),
             ("1bit of a float model", ["export", str(variants / "full"), "--format", "pte", "--weights", "1bit", "--out", str(tmp_path / "b")]),
             ("no dynamic batch", ["export", str(variants / "full"), "--format", "pte", "--batch", "dynamic", "--out", str(tmp_path / "e")]),
             ("depth families", ["export", str(variants / "full"), "--format", "pte", "--depths", "1.0,0.6", "--out", str(tmp_path / "c")]),
             ("a sweep times with onnxruntime", ["sweep", str(variants / "full"), "--formats", "pte", "--out", str(tmp_path / "d")])]
    assert refusal_failures(cases, tmp_path, capsys) == []


def test_compare_reads_pte_bytes_and_latency(exported, tmp_path, capsys):
    _, root = exported
    assert main(["compare", str(root / "pruned" / "report.json"), str(root / "both" / "report.json"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "model.pte (ExecuTorch)" in out and "latency, ExecuTorch CPU batch 1 (ms)" in out
    assert "bytes.pte" in (tmp_path / "c.json").read_text()


def test_api_export_of_the_bundled_model_to_a_pte_file(tmp_path):
    """The bundled ResNet-56 through the Python API: the file its runtime runs matches PyTorch on real images."""
    import sdcompress
    from sdcompress.zoo import bundled

    model, meta = load_checkpoint(bundled())
    images, _ = eval_data(meta, bundled(), None, None)
    x = Normalize(meta.data.mean, meta.data.std)(images.images[:32])
    rep = sdcompress.export(model, tmp_path / "small.pte", x)
    assert (tmp_path / "small.pte").stat().st_size == rep["formats"]["pte"]["bytes"]
    got = Program(tmp_path / "small.pte", 1).run(x)
    with torch.no_grad():
        assert np.abs(got - model.eval()(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("fmt,weights", [("pte", "int8"), ("tflite", "1bit")])
def test_a_fresh_process_prints_one_line(variants, tmp_path, fmt, weights):
    """Importing the runtimes logs nothing to the user's screen (torchao's pytree warning, LiteRT's absl lines)."""
    import subprocess
    import sys

    pytest.importorskip("litert_torch") if fmt == "tflite" else None
    r = subprocess.run([sys.executable, "-m", "sdcompress", "export", str(variants / "full"), "--format", fmt, "--weights", weights,
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
