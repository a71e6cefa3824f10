"""Weight forms through real mobile toolchains: what each ONNX form weighs before and after onnxruntime's ORT
conversion, whether OpenCV DNN loads it, whether it agrees with PyTorch, how fast onnxruntime runs it, and how
onnxruntime's mobile usability check partitions it for NNAPI and the Core ML EPs.

Models: a checkpoint (default: the bundled stochastic-depth ResNet-56), its keep 0.6 pruning (`sdcompress prune`
defaults), and that pruned model binarized (`sdcompress binarize` defaults; not fine-tuned: the files' sizes and
parity do not depend on it). Forms: float, int8, int4 (lossy for float layers: agreement is with the unrounded
PyTorch model) and, for the binarized model, 1bit. Every file has batch 1 (export's default). The `.ort` columns are
onnxruntime's own converter (`convert_onnx_models_to_ort`, defaults) and `sdcompress export --format ort` (which
leaves constant folding out for 1-bit lookups). Latencies: onnxruntime CPU, batch 1, `--threads` threads, every
file timed in the same run, interleaved in rounds; medians.

With ExecuTorch installed (`pip install 'sdcompress[executorch]'`), each model is also written as `.pte` for XNNPACK
(`sdcompress export --format pte`: float, and 1bit for the binarized model), and with LiteRT (`'sdcompress[litert]'`)
as `.tflite` (float and int8), each run back by its own runtime and timed in the same rounds as the onnxruntime
files (ExecuTorch's default threads; LiteRT at --threads). Their agreement is on the first --pte-images images (a
1-bit program runs on ExecuTorch's portable kernels, about half a second per image).

    python tools/bench_export.py --out runs/bench-export
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.binarization import BinarizeConfig  # noqa: E402
from sdcompress.checkpoint import load_checkpoint  # noqa: E402
from sdcompress.data import Normalize  # noqa: E402
from sdcompress.evaluate import eval_data  # noqa: E402
from sdcompress.exporters import onnx as ex  # noqa: E402
from sdcompress.pipeline import run_binarize, run_prune  # noqa: E402
from sdcompress.pruning import PruneConfig  # noqa: E402
from sdcompress.zoo import bundled  # noqa: E402


def opencv_top1(path: Path, x: np.ndarray):
    """OpenCV DNN's top-1 on x (batch 1 at a time), or its error's last line."""
    import cv2

    try:
        net = cv2.dnn.readNetFromONNX(str(path))
        out = []
        for i in range(len(x)):
            net.setInput(x[i:i + 1])
            out.append(net.forward().copy())
        return np.concatenate(out).argmax(1)
    except cv2.error as e:
        return str(e).strip().splitlines()[-1][-90:]


class RuntimeSession:
    """An ExecuTorch program or a LiteRT interpreter seen as an onnxruntime session, so that `interleaved_latency`
    times every file in one run."""

    def __init__(self, runner, run_one):
        from types import SimpleNamespace

        self.run_one = run_one
        self.inputs = [SimpleNamespace(name="x", shape=[runner.batch])]

    def get_inputs(self):
        return self.inputs

    def run(self, _outputs, feed):
        return [self.run_one(feed["x"])]


def runtime_rows(label: str, model, x: torch.Tensor, torch_top1: np.ndarray, out: Path, full_onnx: int, sessions: dict) -> list[dict]:
    """The model as .pte (ExecuTorch) and .tflite (LiteRT) in each form the runtime keeps, verified by the runtime
    itself; none for a runtime that is not installed."""
    rows = []
    binary = any(hasattr(m, "binary_weight") for m in model.modules())
    try:
        from sdcompress.exporters.executorch import Program, export_pte

        for form in ["float"] + (["1bit"] if binary else []):
            data, facts, _ = export_pte(model, x, form, 1)
            program = Program(_write(out, label, form, ".pte", data), 1)
            rows.append(_row(label, form, ".pte", data, program.run(x), torch_top1, full_onnx, facts))
            sessions[rows[-1]["key"]] = RuntimeSession(program, lambda v, p=program: p.method.execute([torch.from_numpy(v)])[0])
    except ImportError:
        pass
    try:
        from sdcompress.exporters.litert import Interpreter, export_tflite

        for form in ["float", "int8"]:
            data, facts, _ = export_tflite(model, x, form, 1)
            interpreter = Interpreter(_write(out, label, form, ".tflite", data), 1, 1)
            rows.append(_row(label, form, ".tflite", data, interpreter.run(x), torch_top1, full_onnx, facts))
            sessions[rows[-1]["key"]] = RuntimeSession(interpreter, interpreter._invoke)
    except ImportError:
        pass
    return rows


def _write(out: Path, label: str, form: str, suffix: str, data: bytes) -> Path:
    f = out / "files" / f"{label.replace(' ', '').replace('+', '-')}-{form}{suffix}"
    f.write_bytes(data)
    return f


def _row(label, form, suffix, data, got, torch_top1, full_onnx, facts) -> dict:
    key = f"{label} / {form} {suffix}"
    print(f"{key}: {len(data):,} B", flush=True)
    return {"model": label, "file": suffix, "weights": form, "bytes": len(data), "fraction_of_full_float_onnx": len(data) / full_onnx,
            "agreement_with_torch": float((got.argmax(1) == torch_top1[:len(got)]).mean()), "n": int(len(got)),
            "delegate_calls": facts.get("delegate_calls"), "portable_ops": facts.get("portable_ops"), "key": key}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=500, help="evaluation images for the agreement columns")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pte-images", type=int, default=100, help="evaluation images for the .pte agreement column")
    a = ap.parse_args()
    ckpt = Path(a.ckpt) if a.ckpt else bundled()
    a.out.mkdir(parents=True, exist_ok=True)
    pruned, both = a.out / "keep0.6", a.out / "keep0.6-1bit"
    if not (pruned / "report.json").exists():
        run_prune(ckpt, PruneConfig(keep=0.6), pruned, progress=False)
    if not (both / "report.json").exists():
        run_binarize(pruned, BinarizeConfig(), both, progress=False)
    models = {"full": ckpt, "keep 0.6": pruned, "keep 0.6 + 1-bit": both}
    rows, sessions, ptes = [], {}, []
    full_onnx = None
    for label, path in models.items():
        model, meta = load_checkpoint(path)
        images, name = eval_data(meta, path, None, None)
        x = Normalize(meta.data.mean, meta.data.std)(images.images[:a.images])
        with torch.no_grad():
            torch_top1 = model.eval()(x).argmax(1).numpy()
        forms = ["float", "int8", "int4"] + (["1bit"] if meta.spec.binarized else [])
        for form in forms:
            data, facts, _ = ex.export_onnx(model, meta, form, 1)
            f = a.out / "files" / f"{label.replace(' ', '').replace('+', '-')}-{form}.onnx"
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(data)
            if label == "full" and form == "float":
                full_onnx = len(data)
            ort_file = f.with_suffix(".ort")
            try:
                ex.ort_format(f, ort_file, f.with_suffix(".config"), keep_bits=form == "1bit")
                ours = ort_file.stat().st_size
            except ValueError:
                ours = None
            sess = ex.ort_session(str(f), a.threads)
            ort_top1 = ex.run_batches(sess, x.numpy()).argmax(1)
            cv = opencv_top1(f, x.numpy())
            u = ex.mobile_usability(f)
            key = f"{label} / {form}"
            sessions[key + " .onnx"] = sess
            if ours:
                sessions[key + " .ort"] = ex.ort_session(str(ort_file), a.threads)
            rows.append({"model": label, "weights": form, "onnx_bytes": len(data), "consumer_ort_bytes": ex.consumer_ort_bytes(f),
                         "sdcompress_ort_bytes": ours, "opencv": isinstance(cv, np.ndarray),
                         "opencv_error": None if isinstance(cv, np.ndarray) else cv,
                         "opencv_agreement_with_torch": float((cv == torch_top1).mean()) if isinstance(cv, np.ndarray) else None,
                         "onnxruntime_agreement_with_torch": float((ort_top1 == torch_top1).mean()), "n": int(len(x)), "images": name,
                         "usability": {k: {kk: v[kk] for kk in ("supported", "nodes", "partitions", "unsupported_ops")} for k, v in u.items()},
                         "layers_by_form": facts["layers_by_form"],
                         # the .ort of a 1-bit graph keeps its lookups (no constant folding): check that graph as it is
                         "usability_ort": ({k: {kk: v[kk] for kk in ("supported", "nodes", "partitions", "unsupported_ops")}
                                            for k, v in ex.mobile_usability(f, optimize=False).items()} if form == "1bit" else None)})
            print(f"{key}: {len(data):,} B", flush=True)
        ptes += runtime_rows(label, model, x[:a.pte_images], torch_top1, a.out, full_onnx, sessions)
    lat = ex.interleaved_latency(sessions, meta.data.input_shape, a.rounds, a.runs)
    for r in ptes:
        r["latency_ms"] = lat.pop(r.pop("key"))
    for r in rows:
        key = f"{r['model']} / {r['weights']}"
        r["latency_ms_onnx"] = lat.get(key + " .onnx")
        r["latency_ms_ort"] = lat.get(key + " .ort")
        r["fraction_of_full_float_onnx"] = {k: (r[k] / full_onnx if r[k] else None) for k in ("onnx_bytes", "consumer_ort_bytes", "sdcompress_ort_bytes")}
    (a.out / "bench_export.json").write_text(json.dumps({"threads": a.threads, "full_float_onnx_bytes": full_onnx, "rows": rows, "pte": ptes},
                                                        indent=1))

    def b(n):
        return f"{n:,}" if n else "refused"

    def parts(u):
        return f"{u['supported']}/{u['nodes']}, {u['partitions']}"

    print("\n| model | weights | .onnx bytes | .ort (onnxruntime's converter) | .ort (`export --format ort`) | OpenCV DNN 5.0 loads | "
          "top-1 agreement with PyTorch (onnxruntime / OpenCV) | latency .onnx / .ort (ms) | NNAPI / Core ML NN / Core ML ML program "
          "(nodes supported, partitions) |")
    print("|---|---|---:|---:|---:|---|---|---|---|")
    for r in rows:
        u = r["usability"]
        cv = "yes" if r["opencv"] else "no"
        agree = f"{100 * r['onnxruntime_agreement_with_torch']:.1f}% / " + (f"{100 * r['opencv_agreement_with_torch']:.1f}%" if r["opencv"] else "-")
        lo = f"{r['latency_ms_onnx']:.2f} / " + (f"{r['latency_ms_ort']:.2f}" if r["latency_ms_ort"] else "-")
        print(f"| {r['model']} | {r['weights']} | {b(r['onnx_bytes'])} | {b(r['consumer_ort_bytes'])} | {b(r['sdcompress_ort_bytes'])} | {cv} | "
              f"{agree} | {lo} | {parts(u['nnapi'])} / {parts(u['coreml_neuralnetwork'])} / {parts(u['coreml_mlprogram'])} |")
    for r in rows:
        if r["usability_ort"]:
            u = r["usability_ort"]
            print(f"\n{r['model']} / {r['weights']} .ort as written (lookups kept): NNAPI {parts(u['nnapi'])}, Core ML NN "
                  f"{parts(u['coreml_neuralnetwork'])}, Core ML ML program {parts(u['coreml_mlprogram'])}; unsupported: "
                  f"{sorted(set(u['nnapi']['unsupported_ops'] + u['coreml_mlprogram']['unsupported_ops'] + u['coreml_neuralnetwork']['unsupported_ops']))}")
    if ptes:
        print("\n| model | file | weights | bytes | of the full float32 .onnx | top-1 agreement with PyTorch (its runtime) | "
              "XNNPACK calls / portable ops (.pte) | latency (ms) |")
        print("|---|---|---|---:|---:|---|---|---:|")
        for r in ptes:
            ops = f"{r['delegate_calls']} / {r['portable_ops']}" if r["file"] == ".pte" else "-"
            print(f"| {r['model']} | {r['file']} | {r['weights']} | {r['bytes']:,} | {r['fraction_of_full_float_onnx']:.3f} | "
                  f"{100 * r['agreement_with_torch']:.1f}% of {r['n']} | {ops} | {r['latency_ms']:.2f} |")
    print(f"\nfull float32 .onnx: {full_onnx:,} B; agreement on {rows[0]['n']} images of {rows[0]['images']}; "
          f"latency: {a.threads} thread(s), {a.rounds} interleaved rounds of {a.runs} runs")


if __name__ == "__main__":
    main()
