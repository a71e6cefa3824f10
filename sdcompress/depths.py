"""Depth families: one network at several depths, nested, exported as one Core ML package with a function per
depth and one ONNX file holding every depth (and, for NNAPI and Core ML's execution providers, a file per depth).

The blocks are ranked once by the pruning strategy's importance (`pruning.Ranking`), and each depth keeps the
best-ranked blocks, so a shallower depth keeps a subset of every deeper one's blocks. Each depth is then its own
pruned network (`pruning.remove_blocks`) with BatchNorm re-estimated for it and its kept blocks' scale chosen as
`prune` chooses it (`pruning.choose_block_scale`, folded into BatchNorm, which is per depth anyway). In the Core ML package the functions
share every weight they have in common: convolutions and the classifier are the same tensors in every function,
and BatchNorm is kept apart from the convolutions (not folded into them), so only BatchNorm, whose statistics
recalibration changes per depth (and whose scale the block-scale choice may), is stored once per function. Multifunction packages need iOS 18 / macOS 15.

ONNX comes two ways. `model_family.onnx` holds every depth in one file: an `If` branch per depth, chosen by the
`depth_index` input, over one set of initializers (BatchNorm kept as a per-channel scale and shift, so that the
convolution weights stay shared); for the bundled ResNet-56 at 1.0/0.8/0.6/0.4 it is 1.02x the deepest depth's file
alone, against 2.9x for the four files. It is the file to ship for onnxruntime's CPU provider. NNAPI and Core ML's
execution providers take no `If`, so for them each depth is also its own file (`model_keep_0_8.onnx`, BatchNorm
folded), which they take whole. `depths.json` lists both.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Sidecar
from .data import Normalize
from .errors import InputError
from .loops import evaluate, recalibrate_bn
from .nets import count_macs
from .pruning import Candidates, PruneConfig, Ranking, blocks_to_remove, choose_block_scale, remove_blocks, removable, _sensitivity_loss
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
    names = [function_name(d) for d in depths]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        same = [f"{d:g}" for d, n in zip(depths, names) if n == clash]
        raise InputError(f"--depths: {' and '.join(same)} share the function name {clash} (two decimals); give depths that differ "
                         f"in the first two decimals")
    if len(depths) > MAX_DEPTHS:
        raise InputError(f"--depths: {len(depths)} depths; a family holds at most {MAX_DEPTHS} (each is a Core ML function and an ONNX branch)")
    return tuple(sorted(depths, reverse=True))


MAX_DEPTHS = 12


def check_distinct_depths(depths: tuple[float, ...], removable_blocks: int) -> None:
    """Depths that keep the same number of blocks would be the same network twice: refused, naming them."""
    seen: dict[int, float] = {}
    for d in depths:
        n = math.floor(d * removable_blocks + 0.5)  # as prune rounds --keep
        if n in seen:
            raise InputError(f"--depths: {seen[n]:g} and {d:g} both keep {n} of the {removable_blocks} removable blocks, the same "
                             f"network twice; give depths that keep different numbers of blocks")
        seen[n] = d


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
    check_distinct_depths(depths, len(present))
    ranking = Ranking(strategy, Candidates(model, meta, present, loss_fn))
    out = []
    for d in depths:
        removed = sorted(blocks_to_remove(model, meta, PruneConfig(keep=d, strategy=strategy, seed=seed), loss_fn, ranking))
        net = remove_blocks(model, removed).eval()
        images, scale = 0, None
        recal = lambda m: recalibrate_bn(m, calib, normalize, recalibrate, batch_size, seed, *train_augmentation(meta))  # noqa: E731
        if removed and recalibrate:
            if calib is None:
                raise InputError("BatchNorm recalibration of each depth needs training data (--data), or pass --recalibrate 0")
            images = recal(net)
        if removed:  # as `prune` chooses it; the choice lives in each depth's own BatchNorm, so the weights stay shared
            net, scale = choose_block_scale(net, PruneConfig().block_scale, calib, normalize, recal, recalibrate=recalibrate, seed=seed,
                                            batch_size=batch_size)
        out.append({"depth": d, "function": function_name(d), "kept": net.block_ids, "removed": removed, "model": net,
                    "recalibrated_images": images, "block_scale": scale,
                    "same_blocks_as_separate_pruning": True})  # by construction, see above
    for deeper, shallower in zip(out, out[1:]):
        if not set(shallower["kept"]) <= set(deeper["kept"]):
            raise RuntimeError(f"depth {shallower['depth']} keeps blocks that depth {deeper['depth']} does not: not nested")
    return out


def multifunction_package(members: list[dict], meta: Sidecar, card: dict, path: Path, precision: str, input_kind: str, batch,
                          verbose: bool = False) -> dict:
    """Write one package with a function per depth (the deepest the default); return the sizes of the package and
    of the separate packages it replaces."""
    from .exporters import coreml
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
        # the deepest network as `export --format coreml` writes it alone (BatchNorm folded, export's default target)
        ml, _ = coreml.convert(members[0]["model"], meta, precision, input_kind, card, verbose, batch=batch)
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
    from .exporters import coreml
    from .exporters.onnx import compare_outputs, interleaved_latency, latency_entry, mobile_usability, ort_session, run_batches
    from .files import atomic_write_bytes, atomic_write_json, check_output_folder, checkpoint_folder, file_sha256, output_folder, path_bytes
    from .pipeline import VerificationFailed, _export_onnx, check_finite, compression_ratio, reference_onnx_bytes
    from .zoo import card_fields

    check_output_folder(out, force=True, inputs=(ckpt,))
    model, meta = load_checkpoint(ckpt)
    check_distinct_depths(depths, len(removable(model)))  # before the data is read
    images, eval_name = eval_data(meta, ckpt, data, data_dir)
    check_finite(model, meta, images.images[: min(64, len(images))], eval_name)
    calib = calibration_images(meta, ckpt, data, data_dir)[0] if recalibrate else None
    members = family(model, meta, depths, strategy, calib, recalibrate)
    evaluate_members(members, meta, images)
    x_img = images.images[torch.arange(min(64, len(images)))]
    reference = reference_onnx_bytes(model, meta, batch)
    rows, sessions, result_files = [], {}, {}
    with output_folder(out) as folder:
        for m in members:
            row = {k: m[k] for k in ("depth", "function", "kept", "removed", "recalibrated_images", "block_scale", "same_blocks_as_separate_pruning",
                                     "top1", "macs", "params")}
            row["blocks"] = len(m["kept"])
            if "onnx" in formats:  # verified as every export's file is; timed below, all depths together
                o = _export_onnx(m["model"], meta, folder, Normalize(meta.data.mean, meta.data.std)(x_img), eval_name, threads, "auto", batch, "onnx",
                                 filename=f"model_{m['function']}.onnx", timed=False)
                sessions[m["function"]] = ort_session(str(folder / o["file"]), threads)
                row["onnx"] = {**o, "compression_ratio": compression_ratio(reference, o["bytes"])}
            rows.append(row)
        if "onnx" in formats:  # the same depths as branches of one file over one set of weights
            fam_bytes, fam_facts = family_onnx(members, meta, batch)
            fam_path = folder / "model_family.onnx"
            fam_path.write_bytes(fam_bytes)
            fam = ort_session(str(fam_path), threads)
            x = Normalize(meta.data.mean, meta.data.std)(x_img)
            for i, (m, row) in enumerate(zip(members, rows)):
                with torch.no_grad():
                    ref = m["model"](x).numpy()
                check = compare_outputs(run_batches(fam, x.numpy(), {"depth_index": np.array(i, dtype=np.int64)}), ref)
                if not check["ok"]:
                    raise VerificationFailed(f"{fam_path.name}, depth_index {i} ({m['function']}), differs from PyTorch by "
                                             f"{check['max_abs_diff']:.3g}; nothing written")
                row["onnx_family"] = {"depth_index": i, "verification": {**check, "dataset": eval_name}}
                sessions[f"family/{m['function']}"] = (fam, {"depth_index": np.array(i, dtype=np.int64)})
            separate = sum(r["onnx"]["bytes"] for r in rows)
            result_files["onnx_family"] = {
                "file": fam_path.name, "bytes": path_bytes(fam_path), "inputs": {"input": [batch or "N", *meta.data.input_shape],
                "depth_index": "int64 scalar, 0 the deepest"}, "functions": [m["function"] for m in members], **fam_facts,
                "sum_of_separate_files": separate, "against_deepest_file_alone": path_bytes(fam_path) / rows[0]["onnx"]["bytes"],
                "compression_ratio": compression_ratio(reference, path_bytes(fam_path)), "mobile_usability": mobile_usability(fam_path),
                "shared": "every initializer (convolution and linear weights; BatchNorm as a per-channel scale and shift after each "
                          "convolution, so that recalibration does not change the weights) stored once; one If branch per depth"}
        if sessions:
            lat = interleaved_latency(sessions, meta.data.input_shape)
            for row in rows:
                row["latency_ms"] = latency_entry(lat[row["function"]], batch, threads=threads)
                if f"family/{row['function']}" in lat:
                    row["onnx_family"]["latency_ms"] = lat[f"family/{row['function']}"]
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
                    "family_file": result_files.get("onnx_family", {}).get("file"),
                    "depths": [{"depth": r["depth"], "function": r["function"], "blocks": r["blocks"], "file": r.get("onnx", {}).get("file"),
                                "depth_index": r.get("onnx_family", {}).get("depth_index"), "top1": r["top1"], "macs": r["macs"]} for r in rows]}
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
    f = r["formats"].get("onnx_family")
    if f:
        lat = ", ".join(f"{d['function']} {d['onnx_family']['latency_ms']:.3f} ms" for d in r["depths"] if "latency_ms" in d.get("onnx_family", {}))
        lines += ["", f"ONNX, one file: {f['file']}, {f['bytes']:,} bytes, {f['against_deepest_file_alone']:.3f}x the deepest depth's file "
                      f"alone, against {f['sum_of_separate_files']:,} bytes for the files above; input `depth_index` picks the depth "
                      f"(0 = {f['functions'][0]}); latency through it, timed with the files above: {lat}. NNAPI / Core ML execution "
                      f"providers: {f['mobile_usability']['nnapi']['verdict']} / {f['mobile_usability']['coreml_mlprogram']['verdict']} "
                      f"(no If); the per-depth files are for them."]
    c = r["formats"].get("coreml")
    if c:
        lines += ["", f"Core ML: {c['file']}, {c['bytes']:,} bytes, functions {', '.join(c['functions'])} (default {c['default_function']}), "
                      f"{c['deployment_target']}; {c['against_deepest_default_export']:.3f}x the deepest network's package as `export` writes it "
                      f"alone ({c['deepest_alone_bytes']:,} bytes, BatchNorm folded), {c['against_deepest_package_alone']:.3f}x its "
                      f"package with BatchNorm kept apart; against "
                      f"{c['sum_of_separate_packages']:,} bytes for separate packages. Shared: {c['shared']}."]
    return "\n".join(lines) + "\n"


# ---- one ONNX file for the family: the depths as branches of If nodes over one set of initializers ----------------
class ChannelAffine(torch.nn.Module):
    """Inference-time BatchNorm as a per-channel scale and shift after the convolution, so that the convolution's
    weight stays the tensor every depth shares (an exporter folds a BatchNorm into the convolution before it,
    giving each depth its own copy of every weight whose BatchNorm recalibration changed)."""

    def __init__(self, bn: torch.nn.BatchNorm2d):
        super().__init__()
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            shift = beta - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("shift", shift.detach().clone().view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


def _unfolded(net):
    """A copy of the network with p_l folded into BatchNorm and every BatchNorm as a ChannelAffine (binarized layers
    left as they are: export turns them into the file's weight form)."""
    import copy

    from .exporters.onnx import fold_survival

    m = copy.deepcopy(net).cpu().eval()
    fold_survival(m)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, torch.nn.BatchNorm2d) and mod.running_mean is not None:  # batch statistics: left as they are
            m.set_submodule(name, ChannelAffine(mod))
    return m


def family_onnx(members: list[dict], meta: Sidecar, batch=1) -> tuple[bytes, dict]:
    """One ONNX model for every depth: inputs `input` and `depth_index` (an int64 scalar, 0 the deepest, in the order
    of `members`; a larger index takes the shallowest), output `logits`. Each depth is the graph of its own export,
    placed as a branch of nested If nodes; every initializer is stored once in the outer graph, whichever branches
    read it (identical tensors are found by their bytes)."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .exporters.onnx import auto_form, export_onnx

    form = auto_form(members[0]["model"], "onnx")  # as each depth's own file: float, or int8 for a binarized model
    shared: dict[bytes, onnx.TensorProto] = {}
    branches, props, opset, ir_version = [], None, None, None
    for i, m in enumerate(members):
        proto = onnx.load_from_string(export_onnx(_unfolded(m["model"]), meta, form, batch)[0])
        props = props or {p.key: p.value for p in proto.metadata_props}
        g = proto.graph
        names = {}
        for init in g.initializer:
            key = hashlib.sha256(f"{init.data_type}:{list(init.dims)}:".encode() + numpy_helper.to_array(init).tobytes()).digest()
            if key not in shared:
                t = onnx.TensorProto()
                t.CopyFrom(init)
                t.name = f"w{len(shared)}"
                shared[key] = t
            names[init.name] = shared[key].name
        outer = {"input"}
        for node in g.node:  # every value of branch i gets a name of its own; the input and shared weights keep theirs
            node.input[:] = [names.get(v, v if v in outer or not v else f"d{i}/{v}") for v in node.input]
            node.output[:] = [f"d{i}/{v}" for v in node.output]
            node.name = f"d{i}/{node.name}" if node.name else ""
        out = onnx.ValueInfoProto()
        out.CopyFrom(g.output[0])  # its type and shape as exported (a dynamic batch stays a named dimension)
        out.name = f"d{i}/{g.output[0].name}"
        del out.metadata_props[:]
        branches.append(helper.make_graph(list(g.node), m["function"], [], [out]))
        opset, ir_version = proto.opset_import, proto.ir_version

    def chain(i: int):
        if i == len(branches) - 1:
            return branches[i]
        out = helper.make_tensor_value_info(f"sel{i}", TensorProto.FLOAT, None)
        nodes = [helper.make_node("Constant", [], [f"k{i}"], value=helper.make_tensor(f"k{i}", TensorProto.INT64, [], [i])),
                 helper.make_node("Equal", ["depth_index", f"k{i}"], [f"is{i}"]),
                 helper.make_node("If", [f"is{i}"], [f"sel{i}"], then_branch=branches[i], else_branch=chain(i + 1))]
        return helper.make_graph(nodes, f"from_{members[i]['function']}", [], [out])

    top = chain(0)
    c, h, w = meta.data.input_shape
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "N", c, h, w]),
              helper.make_tensor_value_info("depth_index", TensorProto.INT64, [])]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", len(meta.data.classes)])
    nodes = [*top.node, helper.make_node("Identity", [top.output[0].name], ["logits"])]
    graph = helper.make_graph(nodes, "depth_family", inputs, [logits], initializer=list(shared.values()))
    model = helper.make_model(graph, opset_imports=list(opset), producer_name="sdcompress", ir_version=ir_version)
    helper.set_model_props(model, {**props, "depth_functions": str([m["function"] for m in members]),
                                   "depth_index": "int64 scalar: 0 is the deepest; each index one function, in that order"})
    onnx.checker.check_model(model)
    return model.SerializeToString(), {"initializers": len(shared), "branches": len(branches), "weights": form}
