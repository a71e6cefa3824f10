"""The footprint of one model, per layer and per block: computed into data first, rendered second.

Every figure is derived from the model itself: output shapes from one forward pass, parameters from the
tensors, memory from each layer's declared precision (bits / 8 per weight; a binary layer also stores one
float32 scale per output channel), MACs from the shapes (see `nets.count_macs`), file sizes from the files.
The rows are counted per module here; the totals come from `binarize.precision_profile`, as in every report,
and a test checks that the rows add up to them.
"""

from __future__ import annotations

from pathlib import Path

from .binary import bits_per_value
from .files import checkpoint_folder, path_bytes
from .nets import ResNet, count_macs, forward_with_hooks
from .report import model_report

EXPORTED = ("model.pt", "model.onnx", "model.ort", "model.mlpackage")


def _grouper(model, paths: dict[int, str]):
    """`group(layer name)`: "block N" for a layer inside kept block N (at `paths[N]`), "stem" before the first block
    in module order, "head" after it."""
    prefixes = {path + ".": b for b, path in paths.items()}
    order = [n for n, _ in model.named_modules()]
    first = next((i for i, n in enumerate(order) if n.startswith(tuple(prefixes))), len(order))
    position = {n: i for i, n in enumerate(order)}

    def group(name: str) -> str:
        b = next((b for pre, b in prefixes.items() if name.startswith(pre)), None)
        if b is not None:
            return f"block {b}"
        return "stem" if position.get(name, 0) < first else "head"

    return group


def _output_shapes(model: ResNet, input_shape: tuple[int, ...], names: list[str]) -> dict[str, list[int]]:
    """Per-image output shape of the named modules, from one forward pass."""
    shapes: dict[str, list[int]] = {}

    def hook(name):
        def fn(mod, inp, out):
            shapes[name] = list(out.shape[1:])

        return fn

    forward_with_hooks(model, input_shape, {n: hook(n) for n in names})
    return shapes


def layer_rows(model: ResNet, shapes: dict[str, list[int]], macs: dict[str, int], paths: dict[int, str]) -> list[dict]:
    """One row per module holding parameters (conv, BatchNorm, linear) that ran, in module order."""
    rows = []
    _group = _grouper(model, paths)
    for name, m in model.named_modules():
        if name not in shapes or not any(True for _ in m.parameters(recurse=False)):
            continue
        bits = bits_per_value(m)
        params_32 = params_1 = scales = 0
        for pname, p in m.named_parameters(recurse=False):
            if pname == "weight" and bits == 1:
                params_1 += p.numel()
                scales = p.shape[0]
            else:
                params_32 += p.numel()
        mac = macs.get(name, 0)
        rows.append({
            "name": name, "group": _group(name), "type": type(m).__name__, "output_shape": shapes[name],
            "params": {"32": params_32, "1": params_1},
            "memory_bytes": {"32": 4 * params_32, "1": params_1 / 8, "scales": 4 * scales},
            "macs": {"binary_weight": mac if bits == 1 else 0, "full_precision": 0 if bits == 1 else mac},
        })
    return rows


def block_rows(layers: list[dict], shapes: dict[str, list[int]], paths: dict[int, str]) -> list[dict]:
    """Layers summed per group (stem, each kept block, head); a block's output shape is the block's own."""
    groups: dict[str, dict] = {}
    for r in layers:
        g = groups.setdefault(r["group"], {"group": r["group"], "output_shape": r["output_shape"], "layers": 0,
                                           "params": {"32": 0, "1": 0}, "memory_bytes": {"32": 0, "1": 0.0, "scales": 0},
                                           "macs": {"binary_weight": 0, "full_precision": 0}})
        g["layers"] += 1
        if r["group"].startswith("block "):
            g["output_shape"] = shapes.get(paths[int(r["group"][len("block "):])], r["output_shape"])
        for k in ("params", "memory_bytes", "macs"):
            for kk, v in r[k].items():
                g[k][kk] += v
    return list(groups.values())


def _exports_of(weights: Path | None, folder: Path | None) -> tuple[dict[str, int], dict]:
    """Sizes of the exported files in `folder` when its report.json says they were exported from these very weights
    (the SHA-256 of model.pt), and that report's compression figures; nothing otherwise (a stale export of another
    model, or of an older version)."""
    from .files import exported_files, file_sha256, parse_untrusted_json

    if folder is None or weights is None or not (folder / "report.json").is_file():
        return {}, {}
    try:
        rep = parse_untrusted_json(folder / "report.json", "export report")
    except Exception:  # noqa: BLE001 - an unreadable report: its files are not known to be this model's
        return {}, {}
    if not isinstance(rep, dict) or rep.get("stage") != "export" or rep.get("checkpoint_sha256") != file_sha256(weights):
        return {}, {}
    listed = exported_files(folder, rep)
    sizes = {f: path_bytes(folder / f) for f in listed if (folder / f).exists()}
    ref = (rep.get("bytes") or {}).get("float32_onnx_reference")
    ratios = {f: e.get("compression_ratio") for f, e in listed.items() if f in sizes and isinstance(e.get("compression_ratio"), (int, float))}
    return sizes, ({"reference": "float32 ONNX export of the unpruned, float network", "reference_bytes": ref, "files": ratios}
                   if isinstance(ref, int) and ratios else {})


def footprint(model: ResNet, input_shape: tuple[int, int, int], ckpt: str | Path | None = None, accuracy: dict | None = None,
              exports: Path | None = None, blocks: list | None = None) -> dict:
    """The footprint report of a model as data (what `sdcompress report` renders); `input_shape` is one image's.
    Exported files are looked for beside the checkpoint and in `exports` (export's output folder, taken only when
    its report says it holds this network). `blocks`: the present blocks of a model without a spec (a user's own
    module, `families.Block`s); the project's networks name theirs in `model.spec`."""
    shape = tuple(input_shape)
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if blocks is None:
        paths = {b: model.spec.block_path(b) for b in model.block_ids}
        info = None
    else:
        from .usermodel import removed_blocks

        paths = {b.index: b.path for b in blocks}
        info = {"arch": f"python:{type(model).__module__}.{type(model).__qualname__}", "blocks_total": len(paths) + len(removed_blocks(model)),
                "blocks_kept": sorted(paths), "binarized": any(bits_per_value(m) == 1 for m in model.modules())}
    shapes = _output_shapes(model, shape, owners + list(paths.values()))
    macs = count_macs(model, shape)
    layers = layer_rows(model, shapes, macs["per_layer"], paths)
    per_block = block_rows(layers, shapes, paths)
    folder = checkpoint_folder(ckpt) if ckpt is not None else None
    files = {f: path_bytes(folder / f) for f in EXPORTED if folder is not None and (folder / f).exists()}
    weights = folder / "model.pt" if "model.pt" in files else None
    beside, ratio_here = _exports_of(weights, folder)
    found, ratio_there = _exports_of(weights, exports)
    files = {**found, **beside, **files}
    rep = model_report(model, shape, folder / "model.pt" if "model.pt" in files else None, accuracy, macs, info)
    rep["bytes"]["onnx"] = files.get("model.onnx")
    rep["bytes"]["ort"] = files.get("model.ort")
    rep["bytes"]["coreml"] = next((n for f, n in files.items() if f.endswith(".mlpackage")), None)
    # totals in the footprint's terms, from the same precision profile as every report's
    mem, split = rep["memory_bytes"], rep["macs_split"]
    macs_total = split["binary_weight"] + split["full_precision"]
    by_bits = rep["params"]["by_bits"]
    return {  # the shape every sdcompress report has (DESIGN.md), then the footprint's own detail
        **rep,
        "stage": "report",
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "input_shape": list(shape),
        "layers": layers,
        "blocks": per_block,
        "totals": {
            "params": {"32": by_bits.get("32", 0), "1": by_bits.get("1", 0), "total": rep["params"]["total"]},
            "memory_bytes": {"32": mem.get("32", 0), "1": mem.get("1", 0), "scales": mem["scales"], "total": mem["total"]},
            "float32_equivalent_bytes": rep["float32_equivalent_bytes"],
            "macs": {**split, "total": macs_total},
            "binary_mac_share": split["binary_weight"] / macs_total if macs_total else 0.0,
        },
        "files": files,
        "compression": ratio_here or ratio_there or None,  # pipeline.compression_ratio, as the export measured it
    }


def _shape(s: list[int]) -> str:
    return "x".join(str(v) for v in s)


def _kib(b: float) -> str:
    return f"{b / 1024:,.2f}"


def _m(v: int) -> str:
    return f"{v / 1e6:,.3f}"


def render_markdown(fp: dict) -> str:
    """The footprint as Markdown: blocks, layers, totals, files, accuracy."""
    m = fp["model"]
    t = fp["totals"]
    head = "| {} | output | params 32-bit | params 1-bit | KiB 32-bit | KiB 1-bit | KiB scales | MACs binary (M) | MACs full (M) |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"

    def row(label, r):
        return (f"| {label} | {_shape(r['output_shape'])} | {r['params']['32']:,} | {r['params']['1']:,} | {_kib(r['memory_bytes']['32'])} | "
                f"{_kib(r['memory_bytes']['1'])} | {_kib(r['memory_bytes']['scales'])} | {_m(r['macs']['binary_weight'])} | {_m(r['macs']['full_precision'])} |")

    lines = [
        f"# Footprint: {m['arch']}, {len(m['blocks_kept'])} of {m['blocks_total']} blocks{', binarized' if m['binarized'] else ''}",
        "",
        f"Input {_shape(fp['input_shape'])}; output shapes per image; KiB = 1024 bytes; a 1-bit weight takes 1/8 byte, "
        "and each binary layer stores one float32 scale per output channel.",
        "",
        "## Per block",
        "",
        head.format("block"),
        rule,
        *[row(b["group"], b) for b in fp["blocks"]],
        "",
        "## Per layer",
        "",
        head.format("layer"),
        rule,
        *[row(f"{r['name']} ({r['type']})", r) for r in fp["layers"]],
        "",
        "## Totals",
        "",
        "| | |",
        "|---|---:|",
        f"| parameters | {t['params']['total']:,} ({t['params']['32']:,} 32-bit, {t['params']['1']:,} 1-bit) |",
        f"| model size | {_kib(t['memory_bytes']['total'])} KiB |",
        f"| float32 equivalent | {_kib(t['float32_equivalent_bytes'])} KiB |",
        f"| MACs | {_m(t['macs']['total'])} M ({_m(t['macs']['binary_weight'])} M on binary weights) |",
        f"| share of MACs on binary weights | {100 * t['binary_mac_share']:.1f}% |",
    ]
    if fp["files"]:
        lines += ["", "## Files", "", "| file | bytes | KiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {n:,} | {_kib(n)} |" for name, n in fp["files"].items()]
    c = fp["compression"]
    if c:
        lines += ["", f"Compression ratio (the {c['reference']}, {c['reference_bytes']:,} bytes, over the file): " +
                  ", ".join(f"{name} {r:.1f}x" for name, r in c["files"].items()) + "."]
    else:
        lines += ["", "Compression ratio: no export of this model found (`sdcompress export` measures it against the float32 "
                  "ONNX export of the unpruned, float network)."]
    if fp["accuracy"]:
        a = fp["accuracy"]
        lines += ["", f"Top-1 {100 * a['top1']:.2f}% on {a['n']:,} images of {a['dataset']}."]
    return "\n".join(lines) + "\n"
