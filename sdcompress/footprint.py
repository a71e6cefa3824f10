"""The footprint of one model, per layer and per block: computed into data first, rendered second.

Every figure is derived from the model itself: output shapes from one forward pass, parameters from the
tensors, memory from each layer's declared precision (bits / 8 per weight; a binary layer also stores one
float32 scale per output channel), MACs from the shapes (see `nets.count_macs`), file sizes from the files.
"""

from __future__ import annotations

from pathlib import Path

from .binarize import bits_per_value
from .nets import ResNet, count_macs, forward_with_hooks
from .report import model_report

EXPORTED = ("model.pt", "model.onnx", "model.mlpackage")


def _group(name: str) -> str:
    if name.startswith("blocks."):
        return f"block {int(name.split('.')[1])}"
    return "stem" if name.startswith("stem") or name.startswith("bn") else "head"


def path_bytes(p: Path) -> int:
    """Size of a file, or of every file under a folder (a .mlpackage)."""
    p = Path(p)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def layer_rows(model: ResNet, input_shape: tuple[int, ...]) -> list[dict]:
    """One row per module holding parameters (conv, BatchNorm, linear), in forward order."""
    macs = count_macs(model, input_shape)["per_layer"]
    shapes: dict[str, list[int]] = {}
    order: list[str] = []

    def hook(name):
        def fn(mod, inp, out):
            if name not in shapes:
                order.append(name)
            shapes[name] = list(out.shape[1:])

        return fn

    owners = {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    forward_with_hooks(model, input_shape, {n: hook(n) for n in owners})
    rows = []
    for name in order:
        m = owners[name]
        bits = bits_per_value(m)
        params_32 = params_1 = 0
        scales = 0
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


def block_rows(layers: list[dict], model: ResNet, input_shape: tuple[int, ...]) -> list[dict]:
    """Layers summed per group (stem, each kept block, head); a block's output shape is its own output's."""
    out_shapes: dict[str, list[int]] = {}

    def hook(name):
        def fn(mod, inp, out):
            out_shapes[name] = list(out.shape[1:])

        return fn

    forward_with_hooks(model, input_shape, {f"blocks.{b}": hook(f"block {b}") for b in model.blocks})
    groups: dict[str, dict] = {}
    for r in layers:
        g = groups.setdefault(r["group"], {"group": r["group"], "output_shape": r["output_shape"], "layers": 0,
                                           "params": {"32": 0, "1": 0}, "memory_bytes": {"32": 0, "1": 0.0, "scales": 0},
                                           "macs": {"binary_weight": 0, "full_precision": 0}})
        g["layers"] += 1
        g["output_shape"] = out_shapes.get(r["group"], r["output_shape"])
        for k in ("params", "memory_bytes", "macs"):
            for kk, v in r[k].items():
                g[k][kk] += v
    return list(groups.values())


def footprint(model: ResNet, meta: dict, ckpt: str | Path | None = None, accuracy: dict | None = None) -> dict:
    """The footprint report of a model as data (what `sdcompress report` renders)."""
    shape = tuple(meta["data"]["input_shape"])
    layers = layer_rows(model, shape)
    blocks = block_rows(layers, model, shape)
    params_32 = sum(r["params"]["32"] for r in layers)
    params_1 = sum(r["params"]["1"] for r in layers)
    mem = {k: sum(r["memory_bytes"][k] for r in layers) for k in ("32", "1", "scales")}
    size = mem["32"] + mem["1"] + mem["scales"]
    macs_b = sum(r["macs"]["binary_weight"] for r in layers)
    macs_f = sum(r["macs"]["full_precision"] for r in layers)
    folder = None
    if ckpt is not None:
        folder = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
    files = {f: path_bytes(folder / f) for f in EXPORTED if folder is not None and (folder / f).exists()}
    ckpt_file = (folder / "model.pt") if folder is not None and (folder / "model.pt").exists() else None
    rep = model_report(model, meta, ckpt_file, accuracy)
    rep["bytes"]["onnx"] = files.get("model.onnx")
    rep["bytes"]["coreml"] = files.get("model.mlpackage")
    return {  # the shape every sdcompress report has (DESIGN.md), then the footprint's own detail
        **rep,
        "stage": "report",
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "input_shape": list(shape),
        "layers": layers,
        "blocks": blocks,
        "totals": {
            "params": {"32": params_32, "1": params_1, "total": params_32 + params_1},
            "memory_bytes": {**mem, "total": size},
            "float32_equivalent_bytes": 4 * (params_32 + params_1),
            "compression_ratio": 4 * (params_32 + params_1) / size if size else None,
            "macs": {"binary_weight": macs_b, "full_precision": macs_f, "total": macs_b + macs_f},
            "binary_mac_share": macs_b / (macs_b + macs_f) if macs_b + macs_f else 0.0,
        },
        "files": files,
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
        f"| compression ratio | {t['compression_ratio']:.2f}x |",
        f"| MACs | {_m(t['macs']['total'])} M ({_m(t['macs']['binary_weight'])} M on binary weights) |",
        f"| share of MACs on binary weights | {100 * t['binary_mac_share']:.1f}% |",
    ]
    if fp["files"]:
        lines += ["", "## Files", "", "| file | bytes | KiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {n:,} | {_kib(n)} |" for name, n in fp["files"].items()]
    if fp["accuracy"]:
        a = fp["accuracy"]
        lines += ["", f"Top-1 {100 * a['top1']:.2f}% on {a['n']:,} images of {a['dataset']}."]
    return "\n".join(lines) + "\n"
