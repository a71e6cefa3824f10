"""`sdcompress export`: ONNX, ORT and Core ML files, verified against PyTorch on real inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import OUT_ROOT, _ckpt_arg, _fresh_out, _model_name, _names, _positive_int, _resolve_ckpt, _threads


MAX_BATCH = 1024  # a graph fixed at more images than this is no phone's; verification pads its 64 images up to it


def _batch(s: str) -> int | None:
    if s == "dynamic":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size (1 to {MAX_BATCH}) or dynamic, got {s!r}") from None
    if not 1 <= v <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BATCH} (or dynamic), got {v}")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="ONNX, ORT and Core ML files, verified against PyTorch on real inputs",
                       description="Export the evaluation-time network to ONNX, ONNX Runtime's ORT format and Core ML; reload each "
                                   "file and verify it against PyTorch on real images; report sizes (also after onnxruntime's own "
                                   "ORT conversion), mobile usability, verification figures and latency.")
    _ckpt_arg(p)
    p.add_argument("--format", type=_names, default=None, metavar="onnx,ort,coreml,pte,tflite",
                   help="formats to write (default onnx,ort,coreml; onnx,coreml with --depths); pte: ExecuTorch for XNNPACK "
                        "(pip install 'sdcompress[executorch]'); tflite: LiteRT (pip install 'sdcompress[litert]')")
    p.add_argument("--weights", choices=("auto", "float", "int8", "int4", "1bit"), default="auto",
                   help="ONNX / ORT weight storage: auto (float for a float model; a binarized one's 1-bit layers as int8 in .onnx, "
                        "as bits in .ort), float, int8 or int4 (DequantizeLinear, one scale per output channel), 1bit (default auto); .pte takes "
                        "auto (float), float or 1bit; .tflite auto (float; int8 for a binarized model), float or int8")
    p.add_argument("--batch", type=_batch, default=1, metavar="N|dynamic",
                   help="batch size fixed in the ONNX / ORT graphs and a Core ML tensor input; dynamic: any (default 1)")
    p.add_argument("--coreml-precision", choices=("float16", "float32"), default="float16", help="Core ML compute precision and weights (default float16)")
    p.add_argument("--coreml-input", choices=("image", "tensor"), default="image",
                   help="Core ML input: an image with the normalization built in (default), or the normalized float tensor")
    p.add_argument("--minimum-deployment-target", choices=("iOS16", "iOS17", "iOS18"), default=None,
                   help="Core ML deployment target; 1-bit tables need iOS18, iOS16/17 store binarized layers as int8 "
                        "(default iOS18 for a binarized model, else iOS16)")
    p.add_argument("--name", default=None, help="Core ML package and Swift class name (default from the model's name, e.g. ResNet56SD)")
    p.add_argument("--depths", default=None, metavar="1.0,0.8,...",
                   help="a depth family: one Core ML package with a function per depth (keep_1_0, keep_0_8, ...), one ONNX file "
                        "with every depth (input depth_index), one ONNX file per depth and depths.json; depths nest (default: off)")
    p.add_argument("--strategy", choices=("stats", "top", "sensitivity"), default="stats", help="ranking the depths are cut from (with --depths)")
    p.add_argument("--recalibrate", type=int, default=40, metavar="N", help="BatchNorm recalibration batches per depth (with --depths; 0: off)")
    p.add_argument("--data", default=None, help="images to verify on (default: the bundled evaluation set or the checkpoint's validation split)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=_threads, default=1, help="onnxruntime threads for the latency figure")
    p.add_argument("--arch", default=None, metavar="python:PACKAGE.MODULE:FUNCTION",
                   help="your own model class: the builder of the model in CKPT, a folder written by `sdcompress train --arch "
                        "python:...` or sdcompress.save; imported because you name it here, never because a file does")
    p.add_argument("--out", type=Path, default=None, help="output folder (default sdcompress-out/NAME-export)")
    p.add_argument("--force", action="store_true", help="overwrite exported files already in --out")
    p.add_argument("--verbose", action="store_true", help="let coremltools' own notices and progress bars through")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..errors import InputError
    from ..exporters.coreml import check_name, package_name
    from ..pipeline import check_formats, run_export
    from ..report import format_bytes

    from .user import check_arch, run_export as run_user_export

    if a.arch is not None:
        check_arch(a.arch, "export")
        return run_user_export(a)
    formats = a.format or (("onnx", "coreml") if a.depths else ("onnx", "ort", "coreml"))
    check_formats(formats)
    path = _resolve_ckpt(a.ckpt)
    name = _model_name(path)
    try:
        pkg = check_name(a.name) if a.name is not None else package_name(name)
    except ValueError as e:
        raise InputError(str(e)) from None
    if a.depths:
        return _run_depths(a, path, name, pkg, formats)
    a.format = formats
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-export", a.force, (path,))
    r = run_export(path, a.format, out, a.data, a.data_dir, a.threads, precision=a.coreml_precision, coreml_input=a.coreml_input, verbose=a.verbose,
                   weights=a.weights, batch=a.batch, name=pkg, deployment_target=a.minimum_deployment_target)
    print(f"checkpoint {format_bytes(r['bytes']['checkpoint'])}; float32 ONNX of the unpruned float network "
          f"{format_bytes(r['bytes']['float32_onnx_reference'])}" if r["bytes"].get("float32_onnx_reference") else
          f"checkpoint {format_bytes(r['bytes']['checkpoint'])}")
    for f in r["formats"].values():
        v = f["verification"]
        if f["format"] in ("onnx", "ort"):
            conv = f.get("consumer_conversion")
            after = ("" if conv is None else f", {format_bytes(conv['bytes'])} after onnxruntime's ORT conversion" if conv["bytes"] else
                     ", refused by onnxruntime's ORT conversion")
            u = f["mobile_usability"]
            print(f"{f['file']} {format_bytes(f['bytes'])} (compression ratio {f['compression_ratio']:.1f}x){after}; weights {f['weights']}, "
                  f"batch {f['batch']}, opset {f['opset']}; max |onnxruntime - torch| {v['max_abs_diff']:.2g} (logits), top-1 agreement "
                  f"{100 * v['top1_agreement']:.1f}% on {v['n']} images; latency {f['latency_ms']['ms']:.2f} ms "
                  f"(onnxruntime CPU, batch {f['latency_ms']['batch']}, {f['latency_ms']['threads']} thread); NNAPI {u['nnapi']['supported']}/{u['nnapi']['nodes']} nodes "
                  f"in {u['nnapi']['partitions']} partition(s), Core ML ML program {u['coreml_mlprogram']['supported']}/"
                  f"{u['coreml_mlprogram']['nodes']} in {u['coreml_mlprogram']['partitions']}")
            if "against_unrounded_model" in v:
                w = v["against_unrounded_model"]
                print(f"warning: {f['weights']} rounding of the float weights: top-1 agreement with the unrounded model "
                      f"{100 * w['top1_agreement']:.1f}%, max logit difference {w['max_abs_diff']:.2g}")
        elif f["format"] in ("pte", "tflite"):
            lat = f["latency_ms"]
            name = "ExecuTorch" if f["format"] == "pte" else "LiteRT"
            ops = f", {f['delegate_calls']} XNNPACK call(s), {f['portable_ops']} portable op(s)" if f["format"] == "pte" else ""
            rounded = " (int8-rounded float weights, against the unrounded model)" if v.get("rounded_weights") else ""
            threads = f", {lat['threads']} thread" if "threads" in lat else ""
            print(f"{f['file']} {format_bytes(f['bytes'])} (compression ratio {f['compression_ratio']:.1f}x); weights {f['weights']}, batch "
                  f"{f['batch']}{ops}; max |{name} - torch| {v['max_abs_diff']:.2g} (logits), top-1 agreement {100 * v['top1_agreement']:.1f}% "
                  f"on {v['n']} images{rounded}; latency {lat['ms']:.2f} ms ({name} CPU, batch {lat['batch']}{threads})")
        else:
            bl = f["binary_layers"]
            print(f"{f['file']} {format_bytes(f['bytes'])} (compression ratio {f['compression_ratio']:.1f}x), {f['precision']}, {f['input']} input, {f['deployment_target']}, "
                  f"{bl['count']} binarized layers{' as ' + bl['form'] if bl['form'] else ''}; max |Core ML - torch| "
                  f"{v['max_abs_diff']:.2g} (probabilities), top-1 agreement {100 * v['top1_agreement']:.1f}% on {v['n']} images ({v['method']})")
    files = ", ".join(f"{out}/{f['file']}" for f in r["formats"].values())
    print(f"wrote {files}, {out}/report.json, {out}/report.md")
    return 0


def _run_depths(a, path, name: str, pkg: str, formats) -> int:
    from ..depths import parse_depths, run_depth_export
    from ..errors import InputError
    from ..report import format_bytes

    depths = parse_depths(a.depths)
    single = [f for f in formats if f in ("ort", "pte", "tflite")]
    if single:
        raise InputError(f"--format {single[0]} is not available with --depths (a depth family is one ONNX "
                         "graph or one Core ML package with a function per depth); use onnx,coreml, or export each pruned checkpoint")
    if a.weights != "auto" or a.minimum_deployment_target not in (None, "iOS18"):
        raise InputError("--depths takes the default weight form and needs iOS18 (multifunction packages); drop --weights / --minimum-deployment-target")
    out = _fresh_out(a.out or OUT_ROOT / f"{name}-depths", a.force, (path,))
    r = run_depth_export(path, depths, out, a.strategy, a.recalibrate, a.data, a.data_dir, formats, a.coreml_precision, a.coreml_input, a.batch,
                         pkg, a.threads, a.verbose)
    for d in r["depths"]:
        o = d.get("onnx")
        top1 = "-" if d["top1"] is None else f"{100 * d['top1']:.1f}%"
        print(f"{d['function']}: {d['blocks']} blocks, {d['macs'] / 1e6:.1f} M MACs, top-1 {top1} on {r['dataset']}"
              + (f", {o['file']} {format_bytes(o['bytes'])}, {d['latency_ms']['ms']:.2f} ms at batch {d['latency_ms']['batch']}" if o else ""))
    f = r["formats"].get("onnx_family")
    if f:
        print(f"{f['file']} {format_bytes(f['bytes'])}: every depth in one file (input depth_index), {f['against_deepest_file_alone']:.3f}x "
              f"the deepest depth's file alone; the per-depth files take {format_bytes(f['sum_of_separate_files'])}")
    c = r["formats"].get("coreml")
    if c:
        print(f"{c['file']} {format_bytes(c['bytes'])}: {len(c['functions'])} functions (default {c['default_function']}), "
              f"{c['against_deepest_default_export']:.3f}x the deepest network's package alone ({c['deepest_alone_bytes']:,} bytes); "
              f"separate packages would take {format_bytes(c['sum_of_separate_packages'])}")
    print(f"wrote {out}/depths.json, {out}/report.json, {out}/report.md")
    return 0
