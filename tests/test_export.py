import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main
from sdcompress.pipeline import VerificationFailed, run_export


def _cv2():
    try:
        import cv2
    except ImportError as e:  # the dev extra installs it
        pytest.skip(f"OpenCV is not importable: {e}")
    return cv2


def _opencv_top1(path, x: np.ndarray, batch: int | None) -> np.ndarray:
    net = _cv2().dnn.readNetFromONNX(str(path))
    outs = []
    for i in range(0, len(x), batch or len(x)):
        net.setInput(x[i:i + (batch or len(x))])
        outs.append(net.forward().copy())
    return np.concatenate(outs).argmax(1)


FORMS = [("full", "auto"), ("full", "int8"), ("full", "int4"), ("pruned", "auto"), ("binary", "auto"), ("binary", "1bit"),
         ("both", "auto"), ("both", "1bit"), ("both", "int8"), ("both", "int4"), ("both", "float")]


@pytest.mark.parametrize("name,weights", FORMS)
def test_onnx_weight_forms_parity_and_consumers(variants, name, weights, tmp_path):
    """Each weight form: verified against PyTorch, mobile-friendly graph, loads in OpenCV DNN (except int4, which
    OpenCV 5 cannot read) with the same top-1, onnxruntime's own ORT conversion measured."""
    from sdcompress.data import Normalize
    from sdcompress.evaluate import eval_data
    from sdcompress.exporters.onnx import ort_session, run_batches

    out = tmp_path / name
    assert main(["export", str(variants / name), "--format", "onnx", "--weights", weights, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    f = rep["formats"]["onnx"]
    v = f["verification"]
    assert v["ok"] and v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    model, meta = load_checkpoint(variants / name)
    expect = {"auto": "int8" if model.spec.binarized else "float"}.get(weights, weights)
    assert f["weights"] == expect
    proto = onnx.load(out / "model.onnx")
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert proto.opset_import[0].version == (21 if expect == "int4" else 18)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # batch fixed to 1 by default
    ops = [n.op_type for n in proto.graph.node]
    assert not any(op.startswith(("Random", "Bernoulli")) for op in ops)
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops and "Pad" not in ops  # mobile-friendly pooling and shortcuts
    assert "Mul" not in ops or expect == "1bit"  # p_l folded into the branches: no scaling at run time
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    n_binary = len(model.spec.binarized)
    n_weights = sum(op in ("Conv", "Gemm") for op in ops)
    assert len(dq) == {"int8": n_binary or n_weights, "int4": n_binary or n_weights}.get(expect, 0)
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in dq)  # one scale per output channel
    if expect == "1bit":
        assert sum(i.name.endswith("_bits") and i.data_type == onnx.TensorProto.UINT8 for i in proto.graph.initializer) == n_binary
    if expect in ("int8", "int4") and not model.spec.binarized:  # float weights rounded: the cost is reported apart
        assert "against_unrounded_model" in v and v["against_unrounded_model"]["n"] == v["n"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == list(meta.data.classes) and props["weights"] == expect
    names = {i.name for i in proto.graph.initializer}  # removed blocks have no weights in the graph
    for b in set(range(9)) - set(model.block_ids):
        assert not any(n.startswith(f"blocks.{b}.") for n in names)
    # what onnxruntime's own converter makes of the file: refused for int4, folded back to float for 1-bit
    conv = f["consumer_conversion"]["bytes"]
    assert (conv is None) == (expect == "int4")
    if expect == "1bit":
        assert conv > 4 * f["bytes"]
    u = f["mobile_usability"]
    if expect == "float":  # a fixed-batch float graph goes whole to NNAPI and to both Core ML EPs
        assert all(d["supported"] == d["nodes"] and d["partitions"] == 1 for d in u.values()), u
    # a consumer nobody here wrote: OpenCV DNN agrees with onnxruntime on top-1
    images, _ = eval_data(meta, variants / name, None, None)
    x = Normalize(meta.data.mean, meta.data.std)(images.images[:32]).numpy()
    ort_top1 = run_batches(ort_session(str(out / "model.onnx")), x).argmax(1)
    if expect == "int4":
        with pytest.raises(_cv2().error):
            _opencv_top1(out / "model.onnx", x, 1)
    else:
        assert (_opencv_top1(out / "model.onnx", x, 1) == ort_top1).all()
    assert f["compression_ratio"] == pytest.approx(rep["bytes"]["float32_onnx_reference"] / f["bytes"])
    assert f["latency_ms"]["onnxruntime_cpu_b1"] > 0


def test_dynamic_batch_and_float_reference(variants, tmp_path):
    from sdcompress.exporters.onnx import ort_session

    out = tmp_path / "dyn"
    assert main(["export", str(variants / "both"), "--format", "onnx", "--weights", "1bit", "--batch", "dynamic", "--out", str(out)]) == 0
    proto = onnx.load(out / "model.onnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    sess = ort_session(str(out / "model.onnx"))
    assert sess.run(None, {"input": np.zeros((5, 1, 8, 8), np.float32)})[0].shape == (5, 10)
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    cv = _cv2().dnn.readNetFromONNX(str(out / "model.onnx"))
    cv.setInput(x)
    assert (cv.forward().argmax(1) == sess.run(None, {"input": x})[0].argmax(1)).all()
    # the reference of every compression ratio: the float32 export of the unpruned float network
    assert main(["export", str(variants / "full"), "--format", "onnx", "--weights", "float", "--batch", "dynamic", "--out", str(tmp_path / "f")]) == 0
    full = json.loads((tmp_path / "f" / "report.json").read_text())
    ref = json.loads((out / "report.json").read_text())["bytes"]["float32_onnx_reference"]
    assert abs(ref - full["formats"]["onnx"]["bytes"]) <= 64  # the same graph; only the metadata differs


def test_ort_format_keeps_bits_and_writes_operator_config(variants, tmp_path):
    from sdcompress.exporters.onnx import ort_session, run_batches

    out = tmp_path / "ort"
    assert main(["export", str(variants / "both"), "--format", "onnx,ort", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())["formats"]
    o, r = rep["onnx"], rep["ort"]
    assert r["weights"] == "1bit" and o["weights"] == "int8"  # auto: the smallest form each target keeps small
    assert not r["constant_folding"] and r["verification"]["ok"] and r["verification"]["top1_agreement"] == 1.0
    assert (out / "model.ort").stat().st_size == r["bytes"] < o["consumer_conversion"]["bytes"]
    assert not (out / "model.ort.onnx").exists()
    config = (out / "model.required_operators.config").read_text()
    assert "Conv" in config and "Gather" in config  # the reduced build needs the ops that rebuild the weights
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    a = run_batches(ort_session(str(out / "model.ort")), x)
    b = run_batches(ort_session(str(out / "model.onnx")), x)
    assert np.allclose(a, b, atol=1e-5)
    # int4 cannot be written in ORT format: one line, exit 2, nothing written
    assert main(["export", str(variants / "both"), "--format", "ort", "--weights", "int4", "--out", str(tmp_path / "i4")]) == 2
    assert not (tmp_path / "i4").exists()
    assert main(["export", str(variants / "full"), "--format", "onnx", "--weights", "1bit", "--out", str(tmp_path / "nb")]) == 2


def test_corrupted_export_is_caught_and_nothing_written(variants, tmp_path, monkeypatch):
    import sdcompress.exporters.onnx as exp

    real = exp.export_onnx

    def corrupt(model, meta, weights, batch):
        data, facts, ref = real(model, meta, weights, batch)
        proto = onnx.load_from_string(data)
        init = next(i for i in proto.graph.initializer if i.name == "stem.weight" or i.name.startswith("stem"))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] += 0.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return proto.SerializeToString(), facts, ref

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
    assert main(["export", str(variants / "full"), "--format", "tensorrt", "--out", str(tmp_path / "o")]) == 2
    assert main(["export", str(variants / "full"), "--name", "3d-net", "--out", str(tmp_path / "o")]) == 2


# ---- Core ML ---------------------------------------------------------------------------------------------------
def _coremltools():
    try:
        from sdcompress.exporters.coreml import import_coremltools

        return import_coremltools()
    except ImportError as e:
        pytest.skip(f"coremltools is not importable: {e}")


def _pkg(out):
    """The package an export wrote (named after the model)."""
    (pkg,) = out.glob("*.mlpackage")
    return pkg


def _program(path):
    from sdcompress.exporters.coreml import _load_program

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
    assert rep["bytes"] == sum(f.stat().st_size for f in _pkg(out).rglob("*") if f.is_file())
    model, meta = load_checkpoint(variants / name)
    spec = ct.models.MLModel(str(_pkg(out)), skip_model_load=True).get_spec()
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.metadata.author and spec.description.metadata.shortDescription
    prog = _program(_pkg(out))
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
    assert _pkg(out).name == f"{name.capitalize()}.mlpackage" == rep["file"]  # Xcode's Swift class is named after the file
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
    from sdcompress.exporters.coreml import run_program

    out = tmp_path / "t"
    assert main(["export", str(variants / "both"), "--format", "coreml", "--coreml-input", "tensor", "--coreml-precision", "float32", "--batch", "dynamic", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())["formats"]["coreml"]
    assert rep["verification"]["max_abs_diff"] <= 1e-4 and rep["verification"]["max_abs_diff_logits"] <= 1e-3
    model, meta = load_checkpoint(variants / "both")
    prog = _program(_pkg(out))
    x = Normalize(meta.data.mean, meta.data.std)(torch_randint((5, 1, 8, 8)))
    env = run_program(prog, {"input": x.numpy()})
    assert env["__probabilities__"].shape == (5, 10)  # another batch size than the one converted with


def torch_randint(shape):
    import torch

    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_corrupted_coreml_package_is_caught(variants, tmp_path, monkeypatch):
    _coremltools()
    import sdcompress.exporters.coreml as cm

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
    assert "Both.mlpackage" in r.stdout
    r = subprocess.run(cmd + ["--force", "--verbose"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and ("coremltools" in r.stderr or "Torch version" in r.stderr or "Converting" in r.stderr)


def test_package_names_are_swift_identifiers():
    from sdcompress.exporters.coreml import check_name, package_name

    assert package_name("resnet56-sd") == "ResNet56SD"
    assert package_name("resnet56-sd-prune") == "ResNet56SDPrune"
    assert package_name("torchvision_mobilenet_v2") == "TorchvisionMobileNetV2"
    assert package_name("56-layers") == "Model56Layers"
    assert check_name("MyNet_2") == "MyNet_2"
    for bad in ("2net", "my-net", "", "a b"):
        with pytest.raises(ValueError, match="Swift identifier"):
            check_name(bad)


def test_coreml_ios16_stores_binarized_layers_as_int8_and_named(variants, tmp_path):
    _coremltools()
    out = tmp_path / "ios16"
    assert main(["export", str(variants / "both"), "--format", "coreml", "--minimum-deployment-target", "iOS16", "--name", "SlimNet",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())["formats"]["coreml"]
    assert rep["file"] == "SlimNet.mlpackage" and rep["deployment_target"] == "iOS16" and rep["verification"]["ok"]
    model, _ = load_checkpoint(variants / "both")
    ops = list(_program(out / "SlimNet.mlpackage").functions["main"].operations)
    dq = [op for op in ops if op.op_type == "constexpr_affine_dequantize"]
    assert len(dq) == sum(1 for n in model.spec.binarized if n != "fc") and not any(op.op_type == "constexpr_lut_to_dense" for op in ops)
    assert all(np.asarray(op.quantized_data.val).dtype == np.int8 for op in dq)


def test_model_card_is_carried_through_prune_and_binarize(variants, tmp_path):
    import shutil

    from sdcompress.zoo import card_fields

    src = tmp_path / "carded"
    shutil.copytree(variants / "full", src)
    (src / "MODEL_CARD.md").write_text("# Digits classifier\n\n| | |\n|---|---|\n| author | Jane Doe |\n| license | Apache-2.0 |\n| version | 1.2 |\n")
    assert main(["prune", str(src), "--keep", "0.6", "--out", str(tmp_path / "p")]) == 0
    assert main(["binarize", str(tmp_path / "p"), "--out", str(tmp_path / "pb")]) == 0
    _, meta = load_checkpoint(tmp_path / "pb")
    f = card_fields(tmp_path / "pb", meta)
    assert (f["author"], f["license"], f["version"]) == ("Jane Doe", "Apache-2.0", "1.2")
    assert f["description"].startswith("Digits classifier; pruned to") and "binarized" in f["description"]
