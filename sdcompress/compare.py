"""Reports side by side: one row per metric, the first report as the baseline, `old -> new` with the ratio,
and the accuracy change in percentage points."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import InputError
from .report import REPORT_SCHEMA, format_bytes

COMPARE_SCHEMA = "sdcompress.compare/1"

# (key, label, unit); a key is a path into the model-shaped part of a report
METRICS = (
    ("params.total", "parameters", "count"),
    ("memory_bytes.total", "model size (declared precision)", "bytes"),
    ("float32_equivalent_bytes", "float32 equivalent", "bytes"),
    ("macs", "MACs", "count"),
    ("macs_split.binary_weight", "MACs on binary weights", "count"),
    ("bytes.checkpoint", "model.pt", "bytes"),
    ("bytes.onnx", "model.onnx", "bytes"),
    ("bytes.ort", "model.ort", "bytes"),
    ("bytes.coreml", "Core ML package", "bytes"),
    ("bytes.pte", "model.pte (ExecuTorch)", "bytes"),
    ("bytes.tflite", "model.tflite (LiteRT)", "bytes"),
    ("latency_ms.onnxruntime_cpu_b1", "latency, onnxruntime CPU batch 1 (ms)", "ms"),
    ("latency_ms.executorch_cpu_b1", "latency, ExecuTorch CPU batch 1 (ms)", "ms"),
    ("latency_ms.litert_cpu_b1", "latency, LiteRT CPU batch 1 (ms)", "ms"),
    ("accuracy.top1", "top-1", "accuracy"),
)


def timing_run() -> str:
    """A new id for latencies measured together (one machine, one session, interleaved): only latencies with the
    same id are divided by `compare`; on a shared machine two separate runs can differ by 2x or more."""
    import uuid

    return uuid.uuid4().hex[:12]


def load_report(path: str | Path) -> dict:
    """A report file sdcompress wrote, or an InputError saying why it is not one."""
    from .files import parse_untrusted_json

    path = Path(path)
    data = parse_untrusted_json(path, "report")  # a regular file, size and nesting bounded
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise InputError(f"{path}: not an sdcompress report (no \"schema\": \"{REPORT_SCHEMA}\")")
    if model_part(data) is None and not depth_entries(data, str(path)):
        raise InputError(f"{path}: an sdcompress report without model figures (params, MACs); nothing to compare")
    for part, where in ([(model_part(data), "")] if model_part(data) is not None else []) + [
            (e, f"depth {n.rpartition('#')[2]}: ") for e, n in depth_entries(data, str(path))]:
        check_figures(part, f"{path}: {where}")
    return data


MAX_FIGURE = 1e18  # more parameters, MACs or bytes than any model has: a corrupt report


def check_figures(part: dict, where: str) -> None:
    """Every figure compare reads is a finite number in its range (a report is untrusted input: NaN, Infinity and
    1e400 are valid JSON), or an InputError naming the field."""
    for key, _, unit in METRICS:
        d = part
        for k in key.split("."):
            d = d.get(k) if isinstance(d, dict) else None
        if d is None:
            continue
        hi = 1.0 if unit == "accuracy" else 1e7 if unit == "ms" else MAX_FIGURE
        ok = isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and 0 <= d <= hi
        if not ok:
            raise InputError(f"{where}{key} is {d!r}; a report's figures are finite numbers in [0, {hi:g}]")


def depth_entries(report: dict, name: str) -> list[tuple[dict, str]]:
    """A depth family's report (`export --depths`) as one model-shaped entry per depth, named NAME#FUNCTION; its
    depths were timed together, so their latencies share the family's timing run. [] for any other report."""
    if report.get("stage") != "export-depths" or not isinstance(report.get("depths"), list):
        return []
    out = []
    for d in report["depths"]:
        if not isinstance(d, dict) or not isinstance(d.get("function"), str):
            continue
        lat = (d.get("latency_ms") or {}).get("onnxruntime_cpu_b1") if isinstance(d.get("latency_ms"), dict) else None
        out.append(({"params": {"total": d.get("params")}, "macs": d.get("macs"),
                     "bytes": {"onnx": (d.get("onnx") or {}).get("bytes") if isinstance(d.get("onnx"), dict) else None},
                     "latency_ms": {"onnxruntime_cpu_b1": lat, "timing_run": report.get("timing_run")},
                     "accuracy": {"top1": d.get("top1")}}, f"{name}#{d['function']}"))
    return out


def expand(reports: list[dict], names: list[str]) -> tuple[list[dict], list[str]]:
    """Reports to compare, a depth family's depths in its place, one column each."""
    rs, ns = [], []
    for r, n in zip(reports, names):
        entries = depth_entries(r, n) or [(r, n)]
        rs += [e[0] for e in entries]
        ns += [e[1] for e in entries]
    return rs, ns


def model_part(report: dict) -> dict | None:
    """The model-shaped figures of any report: the model after a stage, an export's or footprint's model, a point."""
    for cand in (report.get("after"), report.get("model"), report):
        if isinstance(cand, dict) and isinstance(cand.get("params"), dict) and "macs" in cand:
            return cand
    return None


def _get(d: dict, key: str):
    for k in key.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def compare(reports: list[dict], names: list[str], divide_latencies: bool = False) -> dict:
    """One row per metric: the values, each one's ratio to the first (or change in points, for accuracy).

    Latencies are divided only when they were timed in the same run (the same `latency_ms.timing_run`), or when
    `divide_latencies` says to; otherwise the row says they come from separate runs.
    """
    parts = [model_part(r) for r in reports]
    runs = [((p.get("latency_ms") or {}).get("timing_run") if isinstance(p.get("latency_ms"), dict) else None) for p in parts]
    rows = []
    for key, label, unit in METRICS:
        values = [_get(p, key) for p in parts]
        if all(v is None for v in values):
            continue
        base = values[0]
        row = {"metric": key, "label": label, "unit": unit, "values": values}
        if unit == "accuracy":
            row["delta_points"] = [None if v is None or base is None else 100 * (v - base) for v in values]
        else:
            row["ratio"] = [None if v is None or not base else v / base for v in values]
            if unit == "ms":
                row["separate_runs"] = [runs[i] is None or runs[i] != runs[0] for i in range(len(values))]
                if not divide_latencies:
                    row["ratio"] = [None if sep else q for q, sep in zip(row["ratio"], row["separate_runs"])]
        rows.append(row)
    return {"schema": COMPARE_SCHEMA, "files": names, "baseline": names[0], "rows": rows}


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "bytes":
        return format_bytes(int(v))
    if unit == "accuracy":
        return f"{100 * v:.2f}%"
    if unit == "ms":
        return f"{v:.3f}"
    return f"{int(v):,}"


def render(cmp: dict) -> str:
    """A Markdown table: metric, baseline, then `old -> new (ratio)` per other file."""
    names = [Path(f).parent.name + "/" + Path(f).name if Path(f).parent.name else Path(f).name for f in cmp["files"]]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in cmp["rows"]:
        old = _fmt(r["values"][0], r["unit"])
        cells = [old]
        for i, v in enumerate(r["values"][1:], start=1):
            if r["unit"] == "accuracy":
                d = r["delta_points"][i]
                cells.append(f"{old} -> {_fmt(v, r['unit'])}" + ("" if d is None else f" ({d:+.2f} pts)"))
            else:
                q = r["ratio"][i]
                sep = r.get("separate_runs", [False] * len(r["values"]))[i] and v is not None
                note = f" ({q:.3f}x{', separate runs' if sep else ''})" if q is not None else (" (separate runs, not divided)" if sep else "")
                cells.append(f"{old} -> {_fmt(v, r['unit'])}" + note)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
