"""LiteRT (.tflite) export: each file run back by LiteRT's own interpreter on real images and compared with PyTorch."""

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch", reason="LiteRT is an optional extra (pip install 'sdcompress[litert]')")

from sdcompress.checkpoint import load_checkpoint  # noqa: E402
from sdcompress.cli import main  # noqa: E402
from sdcompress.data import Normalize  # noqa: E402
from sdcompress.evaluate import eval_data  # noqa: E402
from sdcompress.exporters.litert import Interpreter  # noqa: E402
from sdcompress.pipeline import VerificationFailed, run_export  # noqa: E402

from conftest import refusal_failures  # noqa: E402


def _images(ckpt, n):
    model, meta = load_checkpoint(ckpt)
    images, _ = eval_data(meta, ckpt, None, None)
    return model.eval(), Normalize(meta.data.mean, meta.data.std)(images.images[:n])


def _interpreter_against_torch(ckpt, path, batch=1, n=96):
    """LiteRT's outputs on n evaluation images (not only the 64 export verified on) against the PyTorch model's."""
    model, x = _images(ckpt, n)
    with torch.no_grad():
        ref = model(x).numpy()
    got = Interpreter(path, batch).run(x)
    return float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean())


@pytest.fixture(scope="module")
def exported(variants, tmp_path_factory):
    """The pruned model and the pruned + binarized one as ONNX and .tflite, each in its default weight form."""
    root = tmp_path_factory.mktemp("tflite")
    return {name: run_export(variants / name, ("onnx", "tflite"), root / name) for name in ("pruned", "both")}, root


@pytest.mark.parametrize("name", ["pruned", "both"])
def test_tflite_runs_in_litert_and_matches_pytorch(variants, exported, name):
    reports, root = exported
    rep = reports[name]
    f = rep["formats"]["tflite"]
    path = root / name / "model.tflite"
    assert f["bytes"] == path.stat().st_size and f["verification"]["ok"] and not f["rounded"]
    diff, agree = _interpreter_against_torch(variants / name, path)
    assert diff < 1e-4 and agree == 1.0
    assert rep["bytes"]["tflite"] == f["bytes"] and rep["latency_ms"]["litert_cpu_b1"] > 0
    model, _ = load_checkpoint(variants / name)
    params = sum(p.numel() for p in model.parameters())
    if name == "both":  # 1-bit layers as int8 per output channel: exact, a quarter of the float file's weights
        assert f["weights"] == "int8" and f["binarized_layers"] == len(model.spec.binarized) > 0
        assert f["bytes"] < reports["pruned"]["formats"]["tflite"]["bytes"] / 3
    else:  # float32: every weight once, BatchNorm folded in
        assert f["weights"] == "float"
        assert params * 4 * 0.9 < f["bytes"] < params * 4 + 200_000
    assert "model.tflite" in (root / name / "report.md").read_text()


def test_int8_of_a_float_model_reports_the_rounding(variants, tmp_path):
    rep = run_export(variants / "pruned", ("tflite",), tmp_path / "e", weights="int8")
    v = rep["formats"]["tflite"]["verification"]
    assert rep["formats"]["tflite"]["rounded"] and v["rounded_weights"] and v["top1_agreement"] >= 0.95
    assert "rounded to int8" in (tmp_path / "e" / "report.md").read_text()


def test_tflite_of_a_torchvision_model(resnet18_ckpt, tmp_path):
    rep = run_export(resnet18_ckpt, ("tflite",), tmp_path / "e", batch=8)
    assert rep["formats"]["tflite"]["batch"] == 8
    diff, agree = _interpreter_against_torch(resnet18_ckpt, tmp_path / "e" / "model.tflite", batch=8, n=43)  # the last run partial
    assert diff < 1e-3 and agree == 1.0


def test_wrong_tflite_is_caught_and_nothing_written(variants, exported, tmp_path, monkeypatch):
    import sdcompress.exporters.litert as lt

    _, root = exported
    wrong = (root / "pruned" / "model.tflite").read_bytes()  # another network's model, handed over as this one's
    monkeypatch.setattr(lt, "export_tflite", lambda model, example, form, batch: (wrong, {"form": "float", "rounded": False}, model.eval()))
    with pytest.raises(VerificationFailed, match="model.tflite output differs from PyTorch"):
        run_export(variants / "full", ("tflite",), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_tflite_refusals_are_one_line(variants, tmp_path, capsys):
    cases = [("no 1-bit weights in LiteRT", ["export", str(variants / "both"), "--format", "tflite", "--weights", "1bit",
                                             "--out", str(tmp_path / "a")]),
             ("no dynamic batch", ["export", str(variants / "full"), "--format", "tflite", "--batch", "dynamic", "--out", str(tmp_path / "b")]),
             ("depth families", ["export", str(variants / "full"), "--format", "tflite", "--depths", "1.0,0.6", "--out", str(tmp_path / "c")])]
    assert refusal_failures(cases, tmp_path, capsys) == []


def test_compare_reads_tflite_bytes_and_latency(exported, tmp_path, capsys):
    _, root = exported
    assert main(["compare", str(root / "pruned" / "report.json"), str(root / "both" / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "model.tflite (LiteRT)" in out and "latency, LiteRT CPU batch 1 (ms)" in out


def test_api_export_of_the_bundled_model_to_a_tflite_file(tmp_path):
    """The bundled ResNet-56 through the Python API: the file its runtime runs matches PyTorch on real images."""
    import sdcompress
    from sdcompress.zoo import bundled

    model, x = _images(bundled(), 32)
    rep = sdcompress.export(model, tmp_path / "small.tflite", x)
    assert (tmp_path / "small.tflite").stat().st_size == rep["formats"]["tflite"]["bytes"]
    assert np.abs(Interpreter(tmp_path / "small.tflite").run(x) - model(x).detach().numpy()).max() < 1e-4
