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
    assert main(["export", str(variants / name), "--out", str(out)]) == 0
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
    assert json.loads(props["class_names"]) == meta["data"]["classes"] and json.loads(props["mean"]) == meta["data"]["mean"]
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
        assert main(["export", str(variants / name), "--out", str(tmp_path / name)]) == 0
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
    assert not (tmp_path / "bad" / "model.onnx").exists()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "bad").iterdir())


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
