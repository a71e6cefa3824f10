"""`sdcompress export`: ONNX and Core ML files, verified against PyTorch on real inputs."""

from __future__ import annotations

from pathlib import Path

from .common import OUT_ROOT, _ckpt_arg, _fresh_out, _model_name, _names, _positive_int, _resolve_ckpt


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="ONNX and Core ML files, verified against PyTorch on real inputs",
                       description="Export the evaluation-time network to ONNX and Core ML; reload each file and verify it "
                                   "against PyTorch on real images; report sizes, verification figures and latency.")
    _ckpt_arg(p)
    p.add_argument("--format", type=_names, default=("onnx", "coreml"), metavar="onnx,coreml", help="formats to write (default both)")
    p.add_argument("--precision", choices=("float16", "float32"), default="float16", help="Core ML compute precision and weights (default float16)")
    p.add_argument("--coreml-input", choices=("image", "tensor"), default="image",
                   help="Core ML input: an image with the normalization built in (default), or the normalized float tensor")
    p.add_argument("--data", default=None, help="images to verify on (default: the bundled evaluation set or the checkpoint's validation split)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads for the latency figure")
    p.add_argument("--out", type=Path, default=None, help="output folder (default sdcompress-out/NAME-export)")
    p.add_argument("--force", action="store_true", help="overwrite exported files already in --out")
    p.add_argument("--verbose", action="store_true", help="let coremltools' own notices and progress bars through")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..pipeline import check_formats, run_export
    from ..report import format_bytes

    check_formats(a.format)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-export", a.force, (path,))
    r = run_export(path, a.format, out, a.data, a.data_dir, a.threads, precision=a.precision, coreml_input=a.coreml_input, verbose=a.verbose)
    print(f"checkpoint {format_bytes(r['bytes']['checkpoint'])}")
    if "onnx" in r["formats"]:
        o = r["formats"]["onnx"]
        v = o["verification"]
        print(f"model.onnx {format_bytes(o['bytes'])}, opset {o['opset']}, max |onnxruntime - torch| {v['max_abs_diff']:.2g} (logits), "
              f"top-1 agreement {100 * v['top1_agreement']:.1f}% on {v['n']} images, "
              f"latency {o['latency_ms']['onnxruntime_cpu_b1']:.2f} ms (onnxruntime CPU, batch 1, {o['latency_ms']['threads']} thread)")
    if "coreml" in r["formats"]:
        c = r["formats"]["coreml"]
        v = c["verification"]
        print(f"model.mlpackage {format_bytes(c['bytes'])}, {c['precision']}, {c['input']} input, {c['deployment_target']}, "
              f"{c['binary_layers_palettized']} layers as 1-bit tables, max |Core ML - torch| {v['max_abs_diff']:.2g} (probabilities), "
              f"top-1 agreement {100 * v['top1_agreement']:.1f}% on {v['n']} images ({v['method']})")
    files = ", ".join(f"{out}/{f['file']}" for f in r["formats"].values())
    print(f"wrote {files}, {out}/report.json, {out}/report.md")
    return 0
