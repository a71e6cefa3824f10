"""Depth families: one Core ML package with a function per depth, weights shared, each function the separately
pruned network; one ONNX file per depth."""

import json

import numpy as np
import pytest
import torch

from sdcompress.checkpoint import load_checkpoint
from sdcompress.cli import main


@pytest.fixture(scope="module")
def family(digits_run, tmp_path_factory):
    pytest.importorskip("coremltools")
    out = tmp_path_factory.mktemp("depths") / "fam"
    assert main(["export", str(digits_run), "--depths", "1.0,0.6,0.4", "--coreml-precision", "float32", "--data", "digits", "--out", str(out)]) == 0
    return out


def _spec(pkg):
    from sdcompress.exporters.coreml import import_coremltools

    ct = import_coremltools()
    return ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()


def _conv_weight_blobs(spec) -> dict[str, list[int]]:
    """Per function, the weight-file offsets of its convolution weights."""
    out = {}
    for name, fn in spec.mlProgram.functions.items():
        block = next(iter(fn.block_specializations.values()))
        blob = {}
        for op in block.operations:
            if op.type == "const" and op.attributes["val"].HasField("blobFileValue"):
                blob[op.outputs[0].name] = op.attributes["val"].blobFileValue.offset
        out[name] = [blob[op.inputs["weight"].arguments[0].name] for op in block.operations if op.type == "conv"]
    return out


def test_functions_named_nested_and_weights_stored_once(family, digits_run):
    rep = json.loads((family / "report.json").read_text())
    (pkg,) = family.glob("*.mlpackage")
    c = rep["formats"]["coreml"]
    assert c["functions"] == ["keep_1_0", "keep_0_6", "keep_0_4"] and c["default_function"] == "keep_1_0"
    spec = _spec(pkg)
    assert sorted(spec.mlProgram.functions) == sorted(c["functions"]) and spec.description.defaultFunctionName == "keep_1_0"
    kept = {d["function"]: d["kept"] for d in rep["depths"]}
    assert [len(kept[f]) for f in c["functions"]] == [9, 5, 4]
    assert set(kept["keep_0_4"]) <= set(kept["keep_0_6"]) <= set(kept["keep_1_0"])  # nested
    blobs = _conv_weight_blobs(spec)
    assert len(blobs["keep_1_0"]) == 1 + 2 * 9 and len(set(blobs["keep_1_0"])) == len(blobs["keep_1_0"])
    all_offsets = {o for v in blobs.values() for o in v}
    assert all_offsets == set(blobs["keep_1_0"])  # every convolution weight is stored once, in the deepest function's set
    assert c["bytes"] < c["sum_of_separate_packages"] * 0.7 and c["against_deepest_package_alone"] < 1.3
    assert c["deepest_alone_bytes"] < c["bytes"] < c["sum_of_separate_packages"]
    for name, fn in spec.mlProgram.functions.items():  # each constant declared once per function
        consts = [op for op in next(iter(fn.block_specializations.values())).operations if op.type == "const"]
        keys = {op.outputs[0].type.SerializeToString(deterministic=True) + op.attributes["val"].SerializeToString(deterministic=True)
                for op in consts}
        assert len(keys) == len(consts), name
    for d in rep["depths"]:
        assert d["coreml"]["verification"]["ok"] and d["onnx"]["verification"]["ok"] and d["latency_ms"]["onnxruntime_cpu_b1"] > 0
        assert d["same_blocks_as_separate_pruning"] and d["macs"] > 0 and 0 <= d["top1"] <= 1
    manifest = json.loads((family / "depths.json").read_text())
    assert [m["file"] for m in manifest["depths"]] == [f"model_{f}.onnx" for f in c["functions"]] and manifest["default"] == "keep_1_0"
    assert all((family / m["file"]).is_file() for m in manifest["depths"])


def test_each_function_is_the_separately_pruned_model(family, digits_run, tmp_path):
    from sdcompress.data import Normalize
    from sdcompress.evaluate import eval_data
    from sdcompress.exporters.coreml import _load_program, run_program
    from sdcompress.exporters.onnx import ort_session, run_batches

    assert main(["prune", str(digits_run), "--keep", "0.6", "--data", "digits", "--out", str(tmp_path / "p")]) == 0
    pruned, meta = load_checkpoint(tmp_path / "p")
    rep = json.loads((family / "report.json").read_text())
    assert pruned.block_ids == next(d["kept"] for d in rep["depths"] if d["function"] == "keep_0_6")
    images, _ = eval_data(meta, tmp_path / "p", "digits", None)
    x_img = images.images[:16]
    x = Normalize(meta.data.mean, meta.data.std)(x_img)
    with torch.no_grad():
        ref = pruned.eval()(x)
    got = run_batches(ort_session(str(family / "model_keep_0_6.onnx")), x.numpy())
    assert np.allclose(got, ref.numpy(), atol=1e-4)
    index = next(d["onnx_family"]["depth_index"] for d in rep["depths"] if d["function"] == "keep_0_6")
    got = run_batches(ort_session(str(family / "model_family.onnx")), x.numpy(), {"depth_index": np.array(index, dtype=np.int64)})
    assert np.allclose(got, ref.numpy(), atol=1e-4)  # the one-file family's branch is the same network
    (pkg,) = family.glob("*.mlpackage")
    prog = _load_program(pkg)
    probs = np.concatenate([run_program(prog, {"image": x_img[i:i + 1].float().numpy()}, "keep_0_6")["__probabilities__"].numpy()
                            for i in range(len(x_img))])
    assert np.abs(probs - torch.softmax(ref, 1).numpy()).max() < 1e-4


def test_one_onnx_file_holds_every_depth_over_one_set_of_weights(family):
    import onnx
    from onnx import numpy_helper

    rep = json.loads((family / "report.json").read_text())
    f = rep["formats"]["onnx_family"]
    fam = onnx.load(str(family / f["file"]))
    assert [i.name for i in fam.graph.input] == ["input", "depth_index"] and [o.name for o in fam.graph.output] == ["logits"]
    stored = [numpy_helper.to_array(i) for i in fam.graph.initializer]
    keys = {(a.dtype.str, a.shape, a.tobytes()) for a in stored}
    assert len(keys) == len(stored)  # no tensor stored twice
    deepest = onnx.load(str(family / "model_keep_1_0.onnx"))
    conv_shapes = sorted(tuple(i.dims) for i in deepest.graph.initializer if len(i.dims) == 4)
    assert sorted(a.shape for a in stored if a.ndim == 4 and a.shape[2:] != (1, 1)) == conv_shapes  # each conv weight once, for all depths
    assert f["bytes"] == (family / f["file"]).stat().st_size and f["bytes"] < 0.7 * f["sum_of_separate_files"]
    assert f["against_deepest_file_alone"] < 1.2
    for d in rep["depths"]:
        assert d["onnx_family"]["verification"]["ok"] and d["onnx_family"]["latency_ms"] > 0


def test_a_binarized_family_with_a_dynamic_batch_in_one_onnx_file(digits_run, tmp_path):
    import onnx

    from sdcompress.data import Normalize
    from sdcompress.evaluate import eval_data
    from sdcompress.exporters.onnx import ort_session

    assert main(["binarize", str(digits_run), "--data", "digits", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    out = tmp_path / "fam"
    assert main(["export", str(tmp_path / "b"), "--depths", "1.0,0.5", "--format", "onnx", "--batch", "dynamic", "--data", "digits",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    f = rep["formats"]["onnx_family"]
    assert f["weights"] == "int8" and all(d["onnx_family"]["verification"]["ok"] for d in rep["depths"])
    fam = onnx.load(str(out / f["file"]))
    assert fam.graph.output[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays a named dimension
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in fam.graph.initializer) >= 2 * 4  # the binarized convs, as int8
    model, meta = load_checkpoint(tmp_path / "b")
    images, _ = eval_data(meta, tmp_path / "b", "digits", None)
    x = Normalize(meta.data.mean, meta.data.std)(images.images[:3]).numpy()
    (got,) = ort_session(str(out / f["file"])).run(None, {"input": x, "depth_index": np.array(0, dtype=np.int64)})
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert got.shape == (3, len(meta.data.classes)) and np.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("args", [["--depths", "1.0,0"], ["--depths", "a,b"], ["--depths", "0.6,0.6"], ["--depths", "1,0.5", "--format", "ort"]])
def test_bad_depth_requests_get_one_line(digits_run, tmp_path, capsys, args):
    assert main(["export", str(digits_run), *args, "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) <= 3  # argparse prints usage + one line; ours one line
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:  # not a ranking: depths cut from it would not nest
        main(["export", str(digits_run), "--depths", "1,0.5", "--strategy", "every-other", "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def test_compare_shows_a_depth_family_one_column_a_depth(family, capsys):
    capsys.readouterr()
    assert main(["compare", str(family / "report.json")]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert all(f"report.json#{f}" in head for f in ("keep_1_0", "keep_0_6", "keep_0_4"))
    lat = next(line for line in out.splitlines() if line.startswith("| latency"))
    assert "separate runs" not in lat and lat.count("x)") == 2  # timed together: divided
