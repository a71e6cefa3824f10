"""Reports: computed into plain data first, rendered (text table, PNG chart) second."""

from __future__ import annotations

import os
from pathlib import Path

from dataclasses import asdict
from typing import TYPE_CHECKING

from .nets import ResNet, count_macs, count_params

if TYPE_CHECKING:
    from .checkpoint import Sidecar

REPORT_SCHEMA = "sdcompress.report/1"


def model_report(model: ResNet, input_shape: tuple[int, int, int], checkpoint: str | Path | None = None,
                 accuracy: dict | None = None, macs: dict | None = None, info: dict | None = None) -> dict:
    """The report of one model in the shape DESIGN.md fixes (params, MACs, bytes, accuracy); `input_shape` is one
    image's (C, H, W); `macs` is `count_macs`' result when the caller has it already; `info` the "model" entry
    of a model without a spec (arch, blocks_total, blocks_kept, binarized)."""
    from .binary import precision_profile

    params = count_params(model)
    macs = macs or count_macs(model, tuple(input_shape))
    prof = precision_profile(model, macs["per_layer"])
    if info is None:
        spec = model.spec
        info = {"arch": spec.arch, "blocks_total": spec.blocks_total, "blocks_kept": list(spec.kept), "binarized": bool(spec.binarized)}
    return {
        "schema": REPORT_SCHEMA,
        "model": info,
        "params": {"total": params, "by_bits": prof["params_by_bits"]},
        "memory_bytes": prof["memory_bytes"],
        "float32_equivalent_bytes": prof["float32_equivalent_bytes"],
        "macs": macs["total"],
        "macs_split": {"binary_weight": prof["macs_binary"], "full_precision": prof["macs_full_precision"]},
        "bytes": {"checkpoint": os.path.getsize(checkpoint) if checkpoint else None, "onnx": None, "coreml": None},
        "accuracy": accuracy,
        "latency_ms": None,
    }


def stats_rows(meta: Sidecar) -> list[dict]:
    """One row per block of the survival statistics saved in a sidecar, with the block's stage and width."""
    sp = meta.spec
    kept = set(sp.kept)
    return [{**asdict(b), "stage": sp.block_stage(b.block) + 1, "where": sp.block_where(b.block), "kept": b.block in kept}
            for b in meta.survival_stats.blocks]


def block_scale_text(scale: dict, subject: str = "kept blocks") -> str:
    """The blocks' evaluation-time scale (`pruning.choose_block_scale`: after pruning, the kept blocks'; after
    binarizing, every block's), as a report line."""
    names = {"unit": 0.0, "survival": 1.0}
    if scale.get("chosen") is None:
        return f"- {subject} add what they added: {scale['why']}"
    t = float(scale.get("exponent", names.get(scale["chosen"], 1.0)))
    what = {1.0: "p_l f(x), the stochastic depth rule", 0.0: "f(x), as in a training step where they ran"}.get(
        t, f"p_l^{t:g} f(x), amplified for the removed blocks" if t < 0 else f"p_l^{t:g} f(x)")
    loss = scale.get("loss")
    if loss:  # {"1": ..., "0": ...}, or the names of the first records ({"survival": ..., "unit": ...})
        tried = {names[k] if k in names else float(k): v for k, v in loss.items()}
        shown = " (loss " + ", ".join(f"{v:.4f} at t = {k:g}" for k, v in sorted(tried.items(), reverse=True)) + ")"
    else:
        shown = ""
    return f"- {subject} add {what}: {scale['why']}{shown}"


def recalibration_text(rec: dict) -> str:
    """`5,120 augmented images (2.0 passes over the 2,560 images of NAME)`, or `2,560 images of NAME`."""
    used, size, name = rec["recalibrated_images"], rec.get("calibration_set_size"), rec["calibration_data"]
    if size and used > size:
        return f"{used:,} augmented images ({used / size:.1f} passes over the {size:,} images of {name})"
    return f"{used:,} augmented images of {name}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_stats_table(meta: Sidecar) -> str:
    """The per-block survival statistics as a fixed-width text table."""
    st, sp = meta.survival_stats, meta.spec
    w = max(3, *(len(sp.block_where(b)) for b in range(sp.blocks_total)))
    lines = [
        f"{sp.arch}  rule={sp.survival_rule} p_last={sp.p_last}  "
        + (f"steps={st.steps}  drop effect fitted on the last {st.regression_steps} steps" if st.source == "training" else
         f"drop effect measured without training on {st.regression_steps} batches (random removals at evaluation time)"),
        f"{'block':>5} {'stage':>5} {'ch' if sp.family == 'cifar_resnet' else 'module':>{w}} {'p_l':>6} {'runs':>7} {'rate':>6} {'contrib':>8} {'drop effect':>12} {'± se':>7}",
    ]
    for r in stats_rows(meta):
        lines.append(
            f"{r['block']:>5} {r['stage']:>5} {r['where']:>{w}} {r['p_scheduled']:>6.3f} {r['runs']:>7} "
            f"{_fmt(r['survival_rate'], '6.3f'):>6} {_fmt(r['contribution'], '8.3f'):>8} "
            f"{_fmt(r['drop_effect'], '+12.4f'):>12} {_fmt(r['drop_effect_se'], '7.4f'):>7}"
            + ("" if r["kept"] else "  (removed)")
        )
    return "\n".join(lines)


def plot_stats(meta: Sidecar, path: str | Path) -> None:
    """Bar chart of the survival statistics: survival rate vs schedule, contribution, drop effect with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats_rows(meta)
    blocks = [r["block"] for r in rows]
    nan = float("nan")
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.28 * len(rows) + 2), 7.5), sharex=True)
    kept = [r["kept"] for r in rows]

    def colors(c: str) -> list[str]:
        return [c if k else "#d0d0d0" for k in kept]

    ax = axes[0]
    ax.bar(blocks, [r["survival_rate"] if r["survival_rate"] is not None else nan for r in rows], color=colors("#4c72b0"), label="measured")
    ax.plot(blocks, [r["p_scheduled"] for r in rows], "k.-", lw=1, label="scheduled $p_l$")
    ax.set_ylabel("survival rate")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    ax.bar(blocks, [r["contribution"] if r["contribution"] is not None else nan for r in rows], color=colors("#55a868"))
    ax.set_ylabel("‖f(x)‖ / ‖x‖")
    ax = axes[2]
    eff = [r["drop_effect"] if r["drop_effect"] is not None else nan for r in rows]
    se = [r["drop_effect_se"] if r["drop_effect_se"] is not None else 0.0 for r in rows]
    ax.bar(blocks, eff, yerr=se, color=colors("#c44e52"), capsize=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("drop effect\n(Δ train loss)")
    ax.set_xlabel("block (input → output)")
    starts = [r["block"] for i, r in enumerate(rows) if i and r["stage"] != rows[i - 1]["stage"]]
    for a in axes:
        for s in starts:
            a.axvline(s - 0.5, color="grey", lw=0.6, ls=":")
    sp = meta.spec
    removed = len(rows) - sum(kept)
    extra = f"; grey: {removed} removed blocks" if removed else ""
    fig.suptitle(f"{sp.arch} survival statistics (rule {sp.survival_rule}, p_L {sp.p_last}){extra}")
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as PNG, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def format_bytes(n: int | None) -> str:
    """Bytes in binary units: B, KiB, MiB."""
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def summary_line(before: dict, after: dict) -> str:
    """`blocks 27 -> 16, params 0.85 M -> 0.31 M, MACs 125.5 M -> 74.1 M, size 3.36 MiB -> 1.23 MiB, top-1 ...`"""
    b, a = before, after
    parts = [
        f"blocks {len(b['model']['blocks_kept'])} -> {len(a['model']['blocks_kept'])}",
        f"params {b['params']['total'] / 1e6:.2f} M -> {a['params']['total'] / 1e6:.2f} M",
        f"MACs {b['macs'] / 1e6:.1f} M -> {a['macs'] / 1e6:.1f} M",
        f"size {format_bytes(b['bytes']['checkpoint'])} -> {format_bytes(a['bytes']['checkpoint'])}",
    ]
    if b.get("accuracy") and a.get("accuracy"):
        parts.append(f"top-1 {100 * b['accuracy']['top1']:.1f}% -> {100 * a['accuracy']['top1']:.1f}%")
    return ", ".join(parts)


def prune_markdown(report: dict, stats_table: str) -> str:
    """report.md of the prune stage: the one-line summary, what was done, and the per-block table."""
    rec = report["prune"]
    acc = report["after"].get("accuracy") or {}
    lines = [
        f"# Prune: {report['after']['model']['arch']}",
        "",
        summary_line(report["before"], report["after"]),
        "",
        f"- strategy `{rec['config']['strategy']}`, ranked by {rec.get('ranking', {}).get('by', 'drop effect')}; removed blocks "
        f"{rec['removed']}; kept {len(rec['kept'])} of {report['before']['model']['blocks_total']}",
        *([f"- **warning**: {rec['ranking']['warning']}"] if (rec.get("ranking") or {}).get("warning") else []),
        f"- BatchNorm recalibrated on {recalibration_text(rec)}" if rec["recalibrated_images"] else "- no BatchNorm recalibration",
        *([block_scale_text(rec["block_scale"])] if rec.get("block_scale") else []),
        f"- accuracy on {acc.get('dataset')} (n={acc.get('n')})" if acc else "- no evaluation data given",
        "",
        "```",
        stats_table,
        "```",
        "",
        "![blocks](blocks.png)",
        "",
    ]
    return "\n".join(lines)


def _kib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:,.2f} KiB"


def precision_table(before: dict, after: dict) -> str:
    """Before/after footprint by precision, in KiB throughout (a Larq-style summary)."""

    def row(label, f):
        return f"| {label} | {f(before)} | {f(after)} |"

    def acc(r):
        return f"{100 * r['accuracy']['top1']:.2f}%" if r.get("accuracy") else "-"

    lines = [
        "| | before | after |",
        "|---|---|---|",
        row("parameters, 32-bit", lambda r: f"{r['params']['by_bits'].get('32', 0):,}"),
        row("parameters, 1-bit", lambda r: f"{r['params']['by_bits'].get('1', 0):,}"),
        row("memory, 32-bit", lambda r: _kib(r["memory_bytes"].get("32", 0))),
        row("memory, 1-bit", lambda r: _kib(r["memory_bytes"].get("1", 0))),
        row("memory, per-channel scales (32-bit)", lambda r: _kib(r["memory_bytes"].get("scales", 0))),
        row("memory, total", lambda r: _kib(r["memory_bytes"]["total"])),
        row("float32 equivalent", lambda r: _kib(r["float32_equivalent_bytes"])),
        row("model.pt", lambda r: _kib(r["bytes"]["checkpoint"])),
        row("MACs on binary weights", lambda r: f"{r['macs_split']['binary_weight'] / 1e6:.2f} M"),
        row("MACs on full-precision weights", lambda r: f"{r['macs_split']['full_precision'] / 1e6:.2f} M"),
        row("top-1", acc),
        "",
        "The compression ratio of a shipped file is measured by `sdcompress export` (against the float32 ONNX export of the "
        "unpruned, float network).",
    ]
    return "\n".join(lines)


def binarize_markdown(report: dict) -> str:
    rec = report["binarize"]
    acc = report["after"].get("accuracy") or {}
    ft = rec.get("finetune")
    return "\n".join([
        f"# Binarize: {report['after']['model']['arch']}",
        "",
        f"{len(rec['layers'])} layers with 1-bit weights (sign(w) * alpha, one alpha per output channel); "
        "the stem and classifier stay full precision unless asked.",
        f"BatchNorm recalibrated on {recalibration_text(rec)}." if rec["recalibrated_images"] else "No BatchNorm recalibration.",
        f"Fine-tuned {ft['epochs']} epochs (straight-through estimator, stochastic depth {'on' if ft['survival'] else 'off'})." if ft else "Not fine-tuned.",
        *([block_scale_text(rec["block_scale"], "blocks").removeprefix("- ") + "."] if rec.get("block_scale") else []),
        f"Accuracy on {acc.get('dataset')} (n={acc.get('n')})." if acc else "No evaluation data given.",
        "",
        precision_table(report["before"], report["after"]),
        "",
    ])


def _partitions(u: dict | None) -> str:
    if not u:
        return "-"
    def one(d):
        return f"{d['supported']}/{d['nodes']} nodes, {d['partitions']} partition{'s' if d['partitions'] != 1 else ''}"
    return f"NNAPI {one(u['nnapi'])}; Core ML ML program {one(u['coreml_mlprogram'])}; Core ML NeuralNetwork {one(u['coreml_neuralnetwork'])}"


def export_markdown(report: dict) -> str:
    """report.md of the export stage: one row per file with its size, verification and latency."""
    m = report["model"]
    ref = report["bytes"].get("float32_onnx_reference")
    lines = [f"# Export: {m['arch']}, {len(m['blocks_kept'])} of {m['blocks_total']} blocks{', binarized' if m['binarized'] else ''}", "",
             f"model.pt: {format_bytes(report['bytes']['checkpoint'])}" + (f"; float32 ONNX of the unpruned, float network (the reference of "
                                                                              f"every compression ratio): {format_bytes(ref)}" if ref else ""), "",
             "| file | size | compression ratio | after onnxruntime's ORT conversion | form | verified on | max abs diff | top-1 agreement | "
             "latency (batch 1) |", "|---|---:|---:|---:|---|---|---:|---:|---|"]
    notes = []
    for f in report["formats"].values():
        v = f["verification"]
        if f["format"] == "coreml":
            kind = f"{f['precision']}, {f['input']} input, {f['deployment_target']}"
        elif f["format"] in ("pte", "tflite"):
            kind = f"weights {f['weights']}, batch {f['batch']}" + (f", {f['backend']}" if f.get("backend") else "")
        else:
            kind = f"weights {f['weights']}, batch {f['batch']}, opset {f['opset']}"
        lat = f.get("latency_ms")
        ms = (lat or {}).get("ms", (lat or {}).get("onnxruntime_cpu_b1"))  # reports before fixed batches were timed at N
        if ms is None:
            lat_s = "-"
        elif f["format"] == "pte":
            lat_s = f"{ms:.3f} ms (ExecuTorch CPU, batch {lat['batch']})"
        elif f["format"] == "tflite":
            lat_s = f"{ms:.3f} ms (LiteRT CPU, batch {lat['batch']}, {lat['threads']} thread)"
        else:
            lat_s = f"{ms:.3f} ms (onnxruntime CPU, batch {lat.get('batch', 1)}, {lat['threads']} thread)"
        conv = f.get("consumer_conversion")
        conv_s = "-" if conv is None else (format_bytes(conv["bytes"]) if conv["bytes"] else "refused")
        ratio = f"{f['compression_ratio']:.1f}x" if f.get("compression_ratio") else "-"
        lines.append(f"| {f['file']} | {format_bytes(f['bytes'])} | {ratio} | {conv_s} | {kind} | {v['n']} images of {v['dataset']} | "
                     f"{v['max_abs_diff']:.2g} | {100 * v['top1_agreement']:.1f}% | {lat_s} |")
        if f.get("mobile_usability"):
            notes.append(f"- {f['file']}, onnxruntime's mobile usability check: {_partitions(f['mobile_usability'])}.")
        if v.get("rounded_weights"):
            notes.append(f"- {f['file']}: the float weights are rounded to int8 per output channel; against the unrounded model top-1 "
                         f"agreement is {100 * v['top1_agreement']:.1f}% (max logit difference {v['max_abs_diff']:.2g}).")
        if "against_unrounded_model" in v:
            w = v["against_unrounded_model"]
            notes.append(f"- {f['file']}: the float weights are rounded to {f['weights']}; against the unrounded model top-1 agreement is "
                         f"{100 * w['top1_agreement']:.1f}% (max logit difference {w['max_abs_diff']:.2g}).")
        if f["format"] == "pte":
            notes.append(f"- {f['file']}: {f['delegate_calls']} XNNPACK delegate call(s), {f['portable_ops']} op(s) on ExecuTorch's portable "
                         f"kernels" + (" (the 1-bit convolutions, rebuilt from their bits on every run)" if f["weights"] == "1bit" else "") + ".")
        if f["format"] == "ort":
            notes.append(f"- {f['file']}: reduced-build operator configuration in {f['operator_config']}" +
                         ("" if f["constant_folding"] else "; converted without constant folding, so the 1-bit weights stay bits in "
                                                           "the file and are rebuilt on every run") + ".")
    return "\n".join(lines + [""] + notes) + "\n"
