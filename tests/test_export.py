import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main
from sdcompress.pipeline import VerificationFailed, run_export


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """A digits model trained briefly with stochastic depth, pruned, binarized, and both."""
    root = tmp_path_factory.mktemp("variants")
    run = root / "full"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["prune", str(run), "--keep", "0.6", "--out", str(root / "pruned")]) == 0
    assert main(["binarize", str(run), "--out", str(root / "binary")]) == 0
    assert main(["binarize", str(root / "pruned"), "--out", str(root / "both")]) == 0
    return root


@pytest.mark.parametrize("name", ["full", "pruned", "binary", "both"])
def test_onnx_parity_and_metadata(variants, name, tmp_path):
    out = tmp_path / name
    assert main(["export", str(variants / name), "--format", "onnx", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    v = rep["formats"]["onnx"]["verification"]
    assert v["ok"] and v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    proto = onnx.load(out / "model.onnx")
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert proto.opset_import[0].version >= 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(n.op_type.startswith(("Random", "Bernoulli")) for n in proto.graph.node)
    props = {p.key: p.value for p in proto.metadata_props}
    model, meta = load_checkpoint(variants / name)
    assert json.loads(props["class_names"]) == list(meta.data.classes) and json.loads(props["mean"]) == list(meta.data.mean)
    # removed blocks have no weights in the graph
    names = {i.name for i in proto.graph.initializer}
    for b in set(range(9)) - set(model.block_ids):
        assert not any(n.startswith(f"blocks.{b}.") for n in names)
    # the file runs at another batch size
    from sdcompress.export.onnx import ort_session

    sess = ort_session(str(out / "model.onnx"))
    assert sess.run(None, {"input": np.zeros((5, 1, 8, 8), np.float32)})[0].shape == (5, 10)
    assert rep["formats"]["onnx"]["latency_ms"]["onnxruntime_cpu_b1"] > 0


def test_binarized_onnx_stores_bits(variants, tmp_path):
    for name in ("full", "binary"):
        assert main(["export", str(variants / name), "--format", "onnx", "--out", str(tmp_path / name)]) == 0
    full = (tmp_path / "full" / "model.onnx").stat().st_size
    binary = (tmp_path / "binary" / "model.onnx").stat().st_size
    model, _ = load_checkpoint(variants / "binary")
    n_binary = sum(model.get_submodule(n).weight.numel() for n in model.spec.binarized)
    saved = n_binary * 4 - n_binary / 8  # float32 -> 1 bit per weight
    assert full - binary >= saved * 0.98
    proto = onnx.load(tmp_path / "binary" / "model.onnx")
    packed = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and i.name.endswith("_bits")]
    assert len(packed) == len(model.spec.binarized)


def test_corrupted_export_is_caught_and_nothing_written(variants, tmp_path, monkeypatch):
    import sdcompress.export.onnx as exp

    real = exp.export_onnx

    def corrupt(model, meta):
        data, facts = real(model, meta)
        proto = onnx.load_from_string(data)
        init = next(i for i in proto.graph.initializer if i.name == "stem.weight" or i.name.startswith("stem"))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] += 0.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return proto.SerializeToString(), facts

    monkeypatch.setattr(exp, "export_onnx", corrupt)
    with pytest.raises(VerificationFailed, match="differs from PyTorch"):
        run_export(variants / "full", ("onnx",), tmp_path / "bad")
    assert [p.name for p in tmp_path.iterdir()] == []  # no output folder, no temporary folder beside it


def test_export_of_mismatched_weights_fails_with_one_line(variants, tmp_path, capsys):
    bad = tmp_path / "mismatch"
    bad.mkdir()
    (bad / "model.pt").write_bytes((variants / "pruned" / "model.pt").read_bytes())
    (bad / "model.json").write_text((variants / "full" / "model.json").read_text())
    assert main(["export", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "do not match" in err
    assert not (tmp_path / "o").exists()
    assert main(["export", str(variants / "full"), "--format", "tflite", "--out", str(tmp_path / "o")]) == 2


# ---- Core ML ---------------------------------------------------------------------------------------------------
def _coremltools():
    try:
        from sdcompress.export.coreml import import_coremltools

        return import_coremltools()
    except ImportError as e:
        pytest.skip(f"coremltools is not importable: {e}")


def _program(path):
    from sdcompress.export.coreml import _load_program

    return _load_program(path)


@pytest.fixture(scope="module")
def coreml_out(variants, tmp_path_factory):
    """Each variant exported to Core ML once, for the tests below."""
    _coremltools()
    root = tmp_path_factory.mktemp("coreml")
    for name in ("full", "pruned", "binary", "both"):
        assert main(["export", str(variants / name), "--format", "coreml", "--out", str(root / name)]) == 0
    return root


@pytest.mark.parametrize("name", ["full", "pruned", "binary", "both"])
def test_coreml_conversion_and_verification(variants, coreml_out, name):
    ct = _coremltools()
    out = coreml_out / name
    rep = json.loads((out / "report.json").read_text())["formats"]["coreml"]
    v = rep["verification"]
    assert v["ok"] and v["top1_agreement"] >= 0.98 and v["max_abs_diff"] <= 1e-2 and v["n"] == 64
    assert rep["bytes"] == sum(f.stat().st_size for f in (out / "model.mlpackage").rglob("*") if f.is_file())
    model, meta = load_checkpoint(variants / name)
    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.metadata.author and spec.description.metadata.shortDescription
    prog = _program(out / "model.mlpackage")
    ops = list(prog.functions["main"].operations)
    classify = next(op for op in ops if op.op_type == "classify")
    assert [str(c) for c in classify.classes.val] == list(meta.data.classes)
    assert not any("random" in op.op_type for op in ops)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    n_conv_binary = sum(1 for n in model.spec.binarized if n != "fc")
    assert len(luts) == n_conv_binary
    for op in luts:  # a 2-entry table per output channel: 1 bit per weight
        assert op.lut.val.shape[0] == op.outputs[0].shape[0] and op.lut.val.shape[-2] == 2
    assert rep["deployment_target"] == ("iOS18" if model.spec.binarized else "iOS16")
    linear = next(op for op in ops if op.op_type == "linear")
    assert linear.weight.op.op_type == "const"  # the classifier is not palettized
    # removed blocks have no weights in the package
    if name in ("pruned", "both"):
        n_conv = sum(op.op_type == "conv" for op in ops)
        assert n_conv == 1 + 2 * len(model.block_ids)


def test_coreml_binarized_package_is_smaller_by_the_bits(variants, coreml_out):
    size = {n: json.loads((coreml_out / n / "report.json").read_text())["formats"]["coreml"]["bytes"] for n in ("full", "binary")}
    model, _ = load_checkpoint(variants / "binary")
    n_binary = sum(model.get_submodule(n).weight.numel() for n in model.spec.binarized)
    assert size["full"] - size["binary"] >= (n_binary * 2 - n_binary / 8) * 0.9  # float16 -> 1 bit per weight (plus tables)


def test_coreml_tensor_input_float32_dynamic_batch(variants, tmp_path):
    _coremltools()
    from sdcompress.data import Normalize
    from sdcompress.export.coreml import run_program

    out = tmp_path / "t"
    assert main(["export", str(variants / "both"), "--format", "coreml", "--coreml-input", "tensor", "--precision", "float32", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())["formats"]["coreml"]
    assert rep["verification"]["max_abs_diff"] <= 1e-4 and rep["verification"]["max_abs_diff_logits"] <= 1e-3
    model, meta = load_checkpoint(variants / "both")
    prog = _program(out / "model.mlpackage")
    x = Normalize(meta.data.mean, meta.data.std)(torch_randint((5, 1, 8, 8)))
    env = run_program(prog, {"input": x.numpy()})
    assert env["__probabilities__"].shape == (5, 10)  # another batch size than the one converted with


def torch_randint(shape):
    import torch

    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_corrupted_coreml_package_is_caught(variants, tmp_path, monkeypatch):
    _coremltools()
    import sdcompress.export.coreml as cm

    real = cm.save

    def corrupt(ml, path, verbose=False):
        real(ml, path, verbose)
        w = next(path.rglob("weight.bin"))
        data = bytearray(w.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(4096)  # zero a run of weights
        w.write_bytes(bytes(data))

    monkeypatch.setattr(cm, "save", corrupt)
    with pytest.raises(VerificationFailed, match="differs from PyTorch"):
        run_export(variants / "full", ("coreml",), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # no output folder, no package, no temporary folder


def test_coremltools_notices_stay_quiet(variants, tmp_path):
    _coremltools()
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdcompress", "export", str(variants / "both"), "--format", "coreml", "--out", str(tmp_path / "q")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert "model.mlpackage" in r.stdout
    r = subprocess.run(cmd + ["--force", "--verbose"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and ("coremltools" in r.stderr or "Torch version" in r.stderr or "Converting" in r.stderr)
