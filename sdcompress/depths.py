"""Depth families: one network at several depths, nested, exported as one Core ML package with a function per
depth and one ONNX file per depth.

The blocks are ranked once by the pruning strategy's importance (`pruning.Ranking`), and each depth keeps the
best-ranked blocks, so a shallower depth keeps a subset of every deeper one's blocks. Each depth is then its own
pruned network (`pruning.remove_blocks`) with BatchNorm re-estimated for it. In the Core ML package the functions
share every weight they have in common: convolutions and the classifier are the same tensors in every function,
and BatchNorm is kept apart from the convolutions (not folded into them), so only the BatchNorm statistics, which
recalibration changes per depth, are stored once per function. Multifunction packages need iOS 18 / macOS 15.

ONNX has no standard way to hold several graphs that an app picks from, so each depth is its own file
(`model_keep_0_8.onnx`) and `depths.json` lists them; onnxruntime loads the one the app chooses.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from .checkpoint import Sidecar
from .data import Normalize
from .errors import InputError
from .loops import evaluate, recalibrate_bn
from .nets import count_macs
from .pruning import Candidates, PruneConfig, Ranking, blocks_to_remove, remove_blocks, removable, _sensitivity_loss
from .data import train_augmentation

STRATEGIES = ("stats", "top", "sensitivity")  # rankings, so every depth's blocks nest in the deeper ones'


def function_name(depth: float) -> str:
    """keep_1_0, keep_0_8, ...: the name of a depth's function in the package (and its ONNX file's suffix)."""
    return "keep_" + f"{depth:.2f}".rstrip("0").rstrip(".").replace(".", "_") + ("_0" if float(depth).is_integer() else "")


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--depths {text!r}: expected comma-separated fractions such as 1.0,0.8,0.6") from None
    if not depths or any(not (0 < d <= 1) or math.isnan(d) for d in depths) or len(set(depths)) != len(depths):
        raise InputError(f"--depths {text!r}: each depth must be a distinct fraction in (0, 1]")
    return tuple(sorted(depths, reverse=True))


def family(model, meta: Sidecar, depths: tuple[float, ...], strategy: str, calib, recalibrate: int, seed: int = 0,
           batch_size: int = 128) -> list[dict]:
    """One entry per depth, deepest first: depth, function name, kept blocks and the pruned network (BatchNorm
    re-estimated on `calib` when blocks were removed). The blocks are those `prune --keep DEPTH --strategy STRATEGY`
    removes (`pruning.blocks_to_remove`), cut from one ranking computed once, so pruning each depth separately
    would give the same networks."""
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r} for --depths: choose one of {', '.join(STRATEGIES)} (a ranking, so depths nest)")
    normalize = Normalize(meta.data.mean, meta.data.std)
    loss_fn = _sensitivity_loss(calib, normalize, PruneConfig(strategy=strategy, seed=seed)) if strategy == "sensitivity" else None
    present = removable(model)
    ranking = Ranking(strategy, Candidates(model, meta, present, loss_fn))
    out = []
    for d in depths:
        removed = sorted(blocks_to_remove(model, meta, PruneConfig(keep=d, strategy=strategy, seed=seed), loss_fn, ranking))
        net = remove_blocks(model, removed).eval()
        images = 0
        if removed and recalibrate:
            if calib is None:
                raise InputError("BatchNorm recalibration of each depth needs training data (--data), or pass --recalibrate 0")
            images = recalibrate_bn(net, calib, normalize, recalibrate, batch_size, seed, *train_augmentation(meta))
        out.append({"depth": d, "function": function_name(d), "kept": net.block_ids, "removed": removed, "model": net,
                    "recalibrated_images": images, "same_blocks_as_separate_pruning": True})  # by construction, see above
    for deeper, shallower in zip(out, out[1:]):
        if not set(shallower["kept"]) <= set(deeper["kept"]):
            raise RuntimeError(f"depth {shallower['depth']} keeps blocks that depth {deeper['depth']} does not: not nested")
    return out


def multifunction_package(members: list[dict], meta: Sidecar, card: dict, path: Path, precision: str, input_kind: str, batch,
                          verbose: bool = False) -> dict:
    """Write one package with a function per depth (the deepest the default); return the sizes of the package and
    of the separate packages it replaces."""
    from .export import coreml
    from .files import path_bytes

    ct = coreml.import_coremltools(verbose)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, coreml.quiet(verbose):
        desc = ct.utils.MultiFunctionDescriptor()
        separate = {}
        for m in members:
            ml, facts = coreml.convert(m["model"], meta, precision, input_kind, card, verbose, batch=batch, target="iOS18", keep_batchnorm=True)
            one = Path(tmp) / f"{m['function']}.mlpackage"
            coreml.save(ml, one, verbose)
            separate[m["function"]] = path_bytes(one)
            desc.add_function(str(one), src_function_name="main", target_function_name=m["function"])
        desc.default_function_name = members[0]["function"]
        # the deepest network as `export --format coreml` writes it alone (BatchNorm folded): what an app ships today
        ml, _ = coreml.convert(members[0]["model"], meta, precision, input_kind, card, verbose, batch=batch, target="iOS18")
        alone = Path(tmp) / "alone.mlpackage"
        coreml.save(ml, alone, verbose)
        joined = Path(tmp) / "family.mlpackage"
        ct.utils.save_multifunction(desc, str(joined))
        # the package as every export writes it: short internal names, no debugging files, readable permissions
        coreml.save(ct.models.MLModel(str(joined), skip_model_load=True), path, verbose)
        alone_bytes = path_bytes(alone)
    return {"bytes": path_bytes(path), "separate_bytes": separate, "full_alone_bytes": alone_bytes, "deployment_target": "iOS18", "precision": precision,
            "input": input_kind, "binary_layers": facts["binary_layers"]}


def evaluate_members(members: list[dict], meta: Sidecar, images) -> None:
    normalize = Normalize(meta.data.mean, meta.data.std)
    for m in members:
        m["top1"] = evaluate(m["model"], images, normalize)["top1"] if images is not None else None
        m["macs"] = count_macs(m["model"], meta.data.input_shape)["total"]
        m["params"] = sum(p.numel() for p in m["model"].parameters())


def run_depth_export(ckpt, depths: tuple[float, ...], out: Path, strategy: str = "stats", recalibrate: int = 40, data=None,
                     data_dir=None, formats=("onnx", "coreml"), precision: str = "float16", input_kind: str = "image", batch=1,
                     name: str | None = None, threads: int = 1, verbose: bool = False) -> dict:
    """`sdcompress export --depths`: the depth family of a checkpoint, verified function by function."""
    from .checkpoint import load_checkpoint, resolve
    from .compare import timing_run
    from .evaluate import calibration_images, eval_data
    from .export import coreml
    from .export.onnx import interleaved_latency, ort_session
    from .files import atomic_write_bytes, atomic_write_json, check_output_folder, checkpoint_folder, file_sha256, output_folder, path_bytes
    from .pipeline import VerificationFailed, _export_onnx, compression_ratio, reference_onnx_bytes
    from .zoo import card_fields

    check_output_folder(out, force=True, inputs=(ckpt,))
    model, meta = load_checkpoint(ckpt)
    images, eval_name = eval_data(meta, ckpt, data, data_dir)
    calib = calibration_images(meta, ckpt, data, data_dir)[0] if recalibrate else None
    members = family(model, meta, depths, strategy, calib, recalibrate)
    evaluate_members(members, meta, images)
    x_img = images.images[torch.arange(min(64, len(images)))]
    reference = reference_onnx_bytes(model, meta, batch)
    rows, sessions, result_files = [], {}, {}
    with output_folder(out) as folder:
        for m in members:
            row = {k: m[k] for k in ("depth", "function", "kept", "removed", "recalibrated_images", "same_blocks_as_separate_pruning",
                                     "top1", "macs", "params")}
            row["blocks"] = len(m["kept"])
            if "onnx" in formats:  # verified as every export's file is; timed below, all depths together
                o = _export_onnx(m["model"], meta, folder, x_img, eval_name, threads, "auto", batch, "onnx",
                                 filename=f"model_{m['function']}.onnx", timed=False)
                sessions[m["function"]] = ort_session(str(folder / o["file"]), threads)
                row["onnx"] = {**o, "compression_ratio": compression_ratio(reference, o["bytes"])}
            rows.append(row)
        if sessions:
            lat = interleaved_latency(sessions, meta.data.input_shape)
            for row in rows:
                row["latency_ms"] = {"onnxruntime_cpu_b1": lat[row["function"]], "threads": threads}
        if "coreml" in formats:
            pkg = folder / f"{name or coreml.package_name(checkpoint_folder(ckpt).name)}.mlpackage"
            facts = multifunction_package(members, meta, card_fields(ckpt, meta), pkg, precision, input_kind, batch, verbose)
            for m, row in zip(members, rows):
                check = coreml.verify(pkg, m["model"], meta, x_img, input_kind, precision, verbose, function=m["function"])
                if not check["ok"]:
                    raise VerificationFailed(f"{pkg.name}, function {m['function']}, differs from PyTorch by {check['max_abs_diff']:.3g} "
                                             f"in class probabilities; nothing written")
                row["coreml"] = {"function": m["function"], "separate_package_bytes": facts["separate_bytes"][m["function"]],
                                 "verification": {k: check[k] for k in ("max_abs_diff", "top1_agreement", "n", "ok", "method")}}
            deepest = facts["separate_bytes"][members[0]["function"]]
            result_files["coreml"] = {"file": pkg.name, "bytes": facts["bytes"], "functions": [m["function"] for m in members],
                                      "default_function": members[0]["function"], "deployment_target": "iOS18",
                                      "sum_of_separate_packages": sum(facts["separate_bytes"].values()),
                                      "against_deepest_package_alone": facts["bytes"] / deepest,
                                      "deepest_alone_bytes": facts["full_alone_bytes"],
                                      "against_deepest_default_export": facts["bytes"] / facts["full_alone_bytes"],
                                      "compression_ratio": compression_ratio(reference, facts["bytes"]),
                                      "shared": "convolution and linear weights (stored once); per function: BatchNorm statistics and the graph"}
        manifest = {"schema": "sdcompress.depths/1", "default": members[0]["function"], "input_shape": [batch or "N", *meta.data.input_shape],
                    "depths": [{"depth": r["depth"], "function": r["function"], "blocks": r["blocks"], "file": r.get("onnx", {}).get("file"),
                                "top1": r["top1"], "macs": r["macs"]} for r in rows]}
        atomic_write_json(folder / "depths.json", manifest)
        result = {"schema": "sdcompress.report/1", "stage": "export-depths", "model": {"arch": meta.spec.arch, "blocks_total": meta.spec.blocks_total}, "strategy": strategy, "dataset": eval_name,
                  "depths": rows, "formats": result_files, "bytes": {"float32_onnx_reference": reference, "checkpoint": path_bytes(resolve(ckpt)[0])},
                  "timing_run": timing_run(), "checkpoint_sha256": file_sha256(resolve(ckpt)[0])}
        atomic_write_json(folder / "report.json", result)
        atomic_write_bytes(folder / "report.md", depths_markdown(result).encode())
    return result


def depths_markdown(r: dict) -> str:
    lines = [f"# Depth family: {r['model']['arch']}, {len(r['depths'])} depths ({r['strategy']} ranking, nested)", "",
             f"Top-1 on {r['dataset']}; latency: onnxruntime CPU, batch 1, every depth timed together in this run.", "",
             "| function | depth | blocks | MACs (M) | params | top-1 | ONNX file | ONNX bytes | latency (ms) | same blocks as pruning alone |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for d in r["depths"]:
        o = d.get("onnx") or {}
        lat = d.get("latency_ms", {}).get("onnxruntime_cpu_b1")
        top1 = "-" if d["top1"] is None else f"{100 * d['top1']:.2f}%"
        lines.append(f"| {d['function']} | {d['depth']:.2f} | {d['blocks']} | {d['macs'] / 1e6:.1f} | {d['params']:,} | "
                     f"{top1} | {o.get('file', '-')} | "
                     f"{o.get('bytes', 0):,} | {'-' if lat is None else f'{lat:.3f}'} | {'yes' if d['same_blocks_as_separate_pruning'] else 'no'} |")
    c = r["formats"].get("coreml")
    if c:
        lines += ["", f"Core ML: {c['file']}, {c['bytes']:,} bytes, functions {', '.join(c['functions'])} (default {c['default_function']}), "
                      f"{c['deployment_target']}; {c['against_deepest_default_export']:.3f}x the deepest network's package as `export` writes it "
                      f"alone ({c['deepest_alone_bytes']:,} bytes, BatchNorm folded), {c['against_deepest_package_alone']:.3f}x its "
                      f"package with BatchNorm kept apart; against "
                      f"{c['sum_of_separate_packages']:,} bytes for separate packages. Shared: {c['shared']}."]
    return "\n".join(lines) + "\n"
