import json
import os
from pathlib import Path

import pytest
import torch

from sdcompress.cli import main
from sdcompress.compare import compare, load_report, render
from sdcompress.errors import InputError
from sdcompress.footprints import footprint, render_markdown
from sdcompress.nets import NetSpec, build_model

GOLDEN = Path(__file__).parent / "golden"
KEPT = (0, 3, 4, 5, 7)
BINARY = ("blocks.0.conv1", "blocks.0.conv2", "blocks.3.conv1", "blocks.3.conv2", "blocks.7.conv1", "blocks.7.conv2")


def toy(kept=KEPT, binarized=BINARY):
    """A resnet20 on 1x8x8 inputs, pruned to 5 blocks, 6 layers binarized (figures depend on shapes only)."""
    spec = NetSpec(arch="resnet20", in_channels=1, num_classes=10, blocks_kept=kept, binarized=binarized)
    return build_model(spec), (1, 8, 8)  # the model and one input's shape


def test_footprint_figures_recomputed_another_way():
    model, meta = toy()
    fp = footprint(model, meta)
    t = fp["totals"]
    assert t["params"]["total"] == sum(p.numel() for p in model.parameters())
    binary_weights = sum(model.get_submodule(n).weight.numel() for n in BINARY)
    assert t["params"]["1"] == binary_weights
    assert t["memory_bytes"]["1"] == binary_weights / 8  # binary memory is bits / 8
    assert t["memory_bytes"]["scales"] == 4 * sum(model.get_submodule(n).weight.shape[0] for n in BINARY)
    assert t["memory_bytes"]["32"] == 4 * (t["params"]["total"] - binary_weights)
    assert "compression_ratio" not in t and fp["compression"] is None  # a ratio is a file's, measured by export
    # MACs by hand: resnet20 on 8x8; stages 16@8x8, 32@4x4, 64@2x2; 3x3 convs
    stem = 16 * 8 * 8 * 1 * 9
    b0 = 2 * 16 * 8 * 8 * 16 * 9
    b3 = 32 * 4 * 4 * 16 * 9 + 32 * 4 * 4 * 32 * 9  # the downsampling block: 16 -> 32 channels, stride 2
    b45 = 2 * 32 * 4 * 4 * 32 * 9
    b7 = 2 * 64 * 2 * 2 * 64 * 9
    fc = 64 * 10
    assert t["macs"]["total"] == stem + b0 + b3 + 2 * b45 + b7 + fc
    assert t["macs"]["binary_weight"] == b0 + b3 + b7
    assert t["binary_mac_share"] == pytest.approx((b0 + b3 + b7) / (stem + b0 + b3 + 2 * b45 + b7 + fc))
    blocks = {b["group"]: b for b in fp["blocks"]}
    assert list(blocks) == ["stem", "block 0", "block 3", "block 4", "block 5", "block 7", "head"]
    assert blocks["block 3"]["output_shape"] == [32, 4, 4] and blocks["block 7"]["output_shape"] == [64, 2, 2]
    assert blocks["block 4"]["macs"]["full_precision"] == b45 and blocks["block 4"]["macs"]["binary_weight"] == 0
    assert sum(b["params"]["32"] + b["params"]["1"] for b in fp["blocks"]) == t["params"]["total"]
    # the per-layer rows (counted per module) add up to the totals (from the precision profile every report uses)
    assert sum(r["params"]["32"] for r in fp["layers"]) == t["params"]["32"]
    for k in ("32", "1", "scales"):
        assert sum(r["memory_bytes"][k] for r in fp["layers"]) == t["memory_bytes"][k]
    for k in ("binary_weight", "full_precision"):
        assert sum(r["macs"][k] for r in fp["layers"]) == t["macs"][k]


def test_footprint_golden_table():
    model, meta = toy()
    got = render_markdown(footprint(model, meta))
    path = GOLDEN / "footprint_resnet20_toy.md"
    if os.environ.get("SDCOMPRESS_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


def test_report_command_file_sizes_and_accuracy(digits_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(digits_run), "--format", "onnx", "--out", str(out)]) == 0
    # put the checkpoint beside its export, as a user's release folder would hold them
    for f in ("model.pt", "model.json"):
        (out / f).write_bytes((digits_run / f).read_bytes())
    capsys.readouterr()
    assert main(["report", str(out), "--data", "digits", "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")]) == 0
    printed = capsys.readouterr().out
    fp = json.loads((tmp_path / "r.json").read_text())
    assert fp["files"]["model.onnx"] == (out / "model.onnx").stat().st_size
    assert fp["files"]["model.pt"] == (out / "model.pt").stat().st_size
    assert fp["bytes"]["onnx"] == fp["files"]["model.onnx"]
    exp = json.loads((out / "report.json").read_text())  # the one compression ratio, as the export measured it
    assert fp["compression"]["files"]["model.onnx"] == pytest.approx(exp["bytes"]["float32_onnx_reference"] / fp["files"]["model.onnx"])
    assert fp["params"]["total"] == fp["totals"]["params"]["total"]  # the shape every report has
    assert 0.0 < fp["accuracy"]["top1"] <= 1.0 and fp["accuracy"]["n"] > 0
    assert (tmp_path / "r.md").read_text() == printed
    assert main(["report", str(out), "--json", str(tmp_path / "r.json")]) == 2  # exists, no --force


def _hand_report(params, macs, onnx, top1, latency, run="r1"):
    return {"schema": "sdcompress.report/1", "stage": "export",
            "model": {"params": {"total": params}, "macs": macs, "bytes": {"checkpoint": None, "onnx": onnx, "coreml": None},
                      "latency_ms": {"onnxruntime_cpu_b1": latency, "timing_run": run}, "accuracy": {"top1": top1}}}


def test_compare_ratios_and_deltas(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_hand_report(1000, 4_000_000, 8000, 0.90, 2.0)))
    b.write_text(json.dumps(_hand_report(600, 1_000_000, 320, 0.875, 1.5)))
    cmp = compare([load_report(a), load_report(b)], [str(a), str(b)])
    rows = {r["metric"]: r for r in cmp["rows"]}
    assert rows["params.total"]["ratio"][1] == pytest.approx(0.6)
    assert rows["macs"]["ratio"][1] == pytest.approx(0.25)
    assert rows["bytes.onnx"]["ratio"][1] == pytest.approx(0.04)
    assert rows["latency_ms.onnxruntime_cpu_b1"]["ratio"][1] == pytest.approx(0.75)
    assert rows["accuracy.top1"]["delta_points"][1] == pytest.approx(-2.5)
    assert "bytes.coreml" not in rows  # absent everywhere: no row
    text = render(cmp)
    assert "1,000 -> 600 (0.600x)" in text and "90.00% -> 87.50% (-2.50 pts)" in text
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == cmp["rows"]


def test_compare_divides_latencies_of_one_timing_run_only(tmp_path, capsys):
    a, b = _hand_report(1000, 4_000_000, 8000, 0.90, 2.0, run="r1"), _hand_report(600, 1_000_000, 320, 0.875, 1.5, run="r2")
    row = next(r for r in compare([a, b], ["a", "b"])["rows"] if r["unit"] == "ms")
    assert row["ratio"][1] is None and row["separate_runs"] == [False, True]
    assert "2.000 -> 1.500 (separate runs, not divided)" in render(compare([a, b], ["a", "b"]))
    forced = next(r for r in compare([a, b], ["a", "b"], divide_latencies=True)["rows"] if r["unit"] == "ms")
    assert forced["ratio"][1] == pytest.approx(0.75) and "(0.750x, separate runs)" in render(compare([a, b], ["a", "b"], True))
    del b["model"]["latency_ms"]["timing_run"]  # a report from before timing runs were recorded: never the same run
    assert next(r for r in compare([a, b], ["a", "b"])["rows"] if r["unit"] == "ms")["ratio"][1] is None


@pytest.mark.parametrize("content", ["not json", json.dumps({"schema": "other/1"}), json.dumps([1, 2]),
                                     json.dumps({"schema": "sdcompress.report/1", "stage": "x"})])
def test_compare_refuses_other_files(tmp_path, capsys, content):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_hand_report(1, 1, 1, 0.5, 1.0)))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.json" in err
    with pytest.raises(InputError):
        load_report(bad)


def test_sweep_tiny_completes_and_resumes(digits_run, tmp_path, monkeypatch):
    import sdcompress.sweep as sw

    out = tmp_path / "sweep"
    args = ["sweep", str(digits_run), "--keep", "1.0,0.5", "--binarize", "off,on", "--formats", "onnx,ort", "--out", str(out), "--no-progress",
            "--finetune", "1", "--data", "digits"]
    real = sw._point
    calls = []

    def interrupted(ckpt, keep, binary, *rest):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third point
        calls.append((keep, binary))
        return real(ckpt, keep, binary, *rest)

    monkeypatch.setattr(sw, "_point", interrupted)
    assert main(args) == 130
    assert not (out / "sweep.json").exists()
    done = sorted(p.parent.name for p in out.glob("points/*/point.json"))
    assert done == ["keep1.00", "keep1.00-bin"]
    calls.clear()

    def counted(ckpt, keep, binary, *rest):
        calls.append((keep, binary))
        return real(ckpt, keep, binary, *rest)

    monkeypatch.setattr(sw, "_point", counted)
    assert main(args) == 0
    assert calls == [(0.5, False), (0.5, True)]  # finished points were not redone
    s = json.loads((out / "sweep.json").read_text())
    assert [p["label"] for p in s["points"]] == ["keep1.00", "keep1.00-bin", "keep0.50", "keep0.50-bin"]
    assert s["reused_points"] == 2
    for p in s["points"]:
        assert p["latency_ms"] > 0 and 0 <= p["top1"] <= 1 and p["bytes"]["onnx"] > 0 and p["verification"]["onnx"]["ok"]
    assert s["points"][2]["macs"] < s["points"][0]["macs"] and s["points"][2]["macs_ratio"] < 1
    assert (out / "tradeoff.png").stat().st_size > 1000 and "keep0.50-bin" in (out / "sweep.md").read_text()
    bin_point = s["points"][3]  # ranked by the .ort file, whose 1-bit weights stay bits; one compression ratio per file
    assert bin_point["bytes"]["ort"] < s["points"][2]["bytes"]["ort"] / 4
    assert bin_point["compression_ratio"]["ort"] == pytest.approx(bin_point["bytes"]["float32_onnx_reference"] / bin_point["bytes"]["ort"])
    assert sw.file_bytes(bin_point) == bin_point["bytes"]["ort"]
    # fine-tuning is recorded where it was applied: after a stage, not on the unpruned float starting point
    tuned = {p.parent.name: json.loads(p.read_text())["finetune_epochs"] for p in out.glob("points/*/point.json")}
    assert tuned == {"keep1.00": 0, "keep1.00-bin": 1, "keep0.50": 1, "keep0.50-bin": 1}, tuned
    # a point's json is a report compare reads
    assert main(["compare", str(out / "points/keep1.00/point.json"), str(out / "points/keep0.50-bin/point.json")]) == 0
    # the same sweep from another working directory: its paths are relative to the sweep folder, so all is reused
    point = json.loads((out / "points" / "keep0.50" / "point.json").read_text())
    assert not Path(point["files"]["onnx"]).is_absolute() and not Path(point["checkpoint"]).is_absolute()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = [*args[:args.index("--out") + 1], "../sweep", *args[args.index("--out") + 2:]]
    assert main(moved) == 0 and json.loads((out / "sweep.json").read_text())["reused_points"] == 4
    # --force interrupted in its first point: no index of the old sweep left, no old point to be taken for a new one
    def interrupted_at_once(*a):
        raise KeyboardInterrupt  # Ctrl-C during the first point

    monkeypatch.setattr(sw, "_point", interrupted_at_once)
    assert main([*moved, "--force"]) == 130
    assert not (out / "sweep.json").exists()
    assert not list(out.glob("points/*/point.json"))
    assert not (out / "points" / "keep0.50" / "report.json").exists()  # the old pruning is not reused either


def test_sweep_sets_a_depth_family_beside_its_points(digits_run, tmp_path):
    out = tmp_path / "sweep"

    def sweep(keeps):
        assert main(["sweep", str(digits_run), "--keep", keeps, "--binarize", "off", "--formats", "onnx", "--depth-family", "on",
                     "--data", "digits", "--out", str(out), "--no-progress"]) == 0
        return json.loads((out / "sweep.json").read_text())

    sweep("1.0,0.6")
    s = sweep("1.0,0.6,0.4")  # one more keep: its point added, the family made again in the folder of the first
    f = s["family"]
    assert [r["function"] for r in f["depths"]] == ["keep_1_0", "keep_0_6", "keep_0_4"] and s["reused_points"] == 2
    fam = json.loads((out / "family" / "report.json").read_text())
    assert fam["stage"] == "export-depths" and all((out / "family" / d["onnx"]["file"]).is_file() for d in fam["depths"])
    # the stats ranking cuts the same blocks at each keep as pruning alone, recalibrated the same way: nesting costs nothing here
    for r, p in zip(f["depths"], s["points"]):
        assert r["same_blocks"] and r["top1_nested"] == p["top1"] and r["nesting_cost_points"] == pytest.approx(0.0, abs=1e-9), r
    assert "Depth family" in (out / "sweep.md").read_text()
    import sdcompress.sweep as sw

    before = (out / "family" / "report.json").stat().st_mtime_ns
    cfg = sw.SweepConfig(keeps=(1.0, 0.6, 0.4), binarize=(False,), formats=("onnx",), depth_family=True)
    assert sw._depth_family(digits_run, cfg, out, "digits", None, False, False) == fam  # a finished family is reused like a point
    assert (out / "family" / "report.json").stat().st_mtime_ns == before


def test_recalibration_counts_images_and_passes():
    from sdcompress.report import recalibration_text

    rec = {"recalibrated_images": 5120, "calibration_set_size": 2560, "calibration_data": "bundled calibration set"}
    assert recalibration_text(rec) == "5,120 augmented images (2.0 passes over the 2,560 images of bundled calibration set)"
    assert recalibration_text({**rec, "recalibrated_images": 1280}) == "1,280 augmented images of bundled calibration set"


def test_report_finds_the_default_export_of_these_weights_only(digits_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "mine"
    shutil.copytree(digits_run, ck)
    assert main(["export", str(ck), "--format", "onnx", "--data", "digits"]) == 0  # to sdcompress-out/mine-export
    onnx = tmp_path / "sdcompress-out" / "mine-export" / "model.onnx"
    assert main(["report", str(ck), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["bytes"]["onnx"] == onnx.stat().st_size
    state = torch.load(ck / "model.pt", weights_only=True)  # new weights in the same folder: that export is stale
    state["fc.bias"] += 1
    torch.save(state, ck / "model.pt")
    assert main(["report", str(ck), "--json", str(tmp_path / "r2.json")]) == 0
    assert json.loads((tmp_path / "r2.json").read_text())["bytes"]["onnx"] is None


def test_a_sweep_point_that_fails_verification_is_named_with_what_to_change(digits_run, tmp_path, monkeypatch, capsys):
    """A Core ML package outside the float16 tolerance stops the sweep in one line that names the point and the
    settings that avoid it, with nothing of the failed export left."""
    from sdcompress.exporters import coreml

    def off(*args, **kwargs):
        return {"ok": False, "max_abs_diff": 0.013, "top1_agreement": 1.0, "n": 64}

    monkeypatch.setattr(coreml, "verify_inputs", off)
    out = tmp_path / "sw"
    assert main(["sweep", str(digits_run), "--keep", "1.0", "--binarize", "off", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "point keep1.00" in err and "0.013" in err and "--coreml-precision float32" in err, err
    assert not list(out.glob("points/keep1.00/export/*.mlpackage"))
