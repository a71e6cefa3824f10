"""The accuracy / size / latency tradeoff: prune at several keep fractions, with and without 1-bit weights,
export and verify every point, and measure them all the same way.

Each point lives in `DIR/points/LABEL/` (its checkpoint, export and `point.json`); `point.json` is written last
and atomically, so a point that has one is complete and a rerun skips it. Latency is measured after all points
exist, for all of them in the same run (interleaved rounds, one thread count), so that resumed sweeps still
compare latencies measured side by side on a shared, noisy machine. Paths in `point.json` are relative to DIR, so a
sweep resumes from any working directory and survives being moved. `--force` first removes the index
(`sweep.json`) and every point's completion markers, so an interrupted forced sweep leaves finished new points and
unfinished ones, never an index or a point of the old settings; rerunning resumes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


from .binarization import BinarizeConfig
from .checkpoint import load_checkpoint, read_sidecar, resolve
from .compare import timing_run
from .files import atomic_write_bytes, atomic_write_json
from .errors import InputError
from .precision import check_precision
from .evaluate import evaluate_checkpoint
from .pipeline import VerificationFailed, check_formats, run_binarize, run_export, run_prune, compression_ratio
from .pruning import STRATEGIES, PruneConfig
from .report import format_bytes, save_figure

SWEEP_SCHEMA = "sdcompress.sweep/1"


@dataclass(frozen=True)
class SweepConfig:
    keeps: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    binarize: tuple[bool, ...] = (False, True)
    formats: tuple[str, ...] = ("onnx", "ort", "coreml")
    strategy: str = "stats"
    finetune: int = 0  # epochs after pruning and after binarizing (needs training data)
    distill: bool = True  # fine-tuning learns from the model before each stage as teacher
    precision: str = "auto"  # of the fine-tuning steps: auto | fp32 | bf16 (precision.resolve_precision)
    coreml_precision: str = "float16"  # Core ML compute precision and weights
    threads: int = 1  # onnxruntime threads for every latency figure
    latency_rounds: int = 5  # interleaved rounds over all points
    latency_runs: int = 20  # timed runs per point per round (after warm-up)
    depth_family: bool = False  # also export the float keeps as one depth family (`export --depths`) beside the points

    def __post_init__(self):
        if not self.keeps or any(not (0.0 < k <= 1.0) or math.isnan(k) for k in self.keeps):
            raise InputError(f"--keep: every fraction must be in (0, 1], got {list(self.keeps)}")
        if not self.binarize:
            raise InputError("--binarize: give off, on or off,on")
        if len(set(self.keeps)) != len(self.keeps) or len(set(self.binarize)) != len(self.binarize):
            raise InputError("--keep / --binarize: a value is repeated")
        labels = [label(k, False) for k in self.keeps]
        if len(set(labels)) != len(labels):
            raise InputError(f"--keep: fractions {list(self.keeps)} share a label at two decimals ({labels}); give fractions that "
                             f"differ in the first two decimals")
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        check_formats(self.formats)
        if not set(self.formats) & {"onnx", "ort"}:
            raise InputError("--formats: a sweep times every point with onnxruntime; include onnx or ort")
        check_precision("--precision", self.precision)
        if self.depth_family:
            from .depths import STRATEGIES as NESTED

            if self.strategy not in NESTED:
                raise InputError(f"--depth-family: strategy {self.strategy!r} does not rank blocks, so its depths would not nest; "
                                 f"use one of {', '.join(NESTED)}")
            if False not in self.binarize or len(self.keeps) < 2:
                raise InputError("--depth-family: needs float points (--binarize off or off,on) at two keeps or more")
            if not set(self.formats) & {"onnx", "coreml"}:
                raise InputError("--depth-family: a depth family is written as onnx and/or coreml; add one to --formats")

    def to_dict(self) -> dict:
        return asdict(self)


def label(keep: float, binary: bool) -> str:
    return f"keep{keep:.2f}" + ("-bin" if binary else "")


BINARY_SCALE_RULE = "chosen again after binarizing unless fine-tuned"


def _settings(cfg: SweepConfig, ckpt, data) -> dict:
    """What must match for finished points to be reused."""
    d = cfg.to_dict()
    for k in ("keeps", "binarize", "threads", "latency_rounds", "latency_runs", "depth_family"):
        d.pop(k)  # adding points, a depth family or re-timing does not invalidate finished points
    if not cfg.finetune:
        d.pop("distill")  # no fine-tuning: distillation changes nothing (and older sweeps did not record it)
        d.pop("precision")  # nor does the precision of fine-tuning steps
    from .pruning import SCALE_RULE, PruneConfig

    # points pruned before prune chose the kept blocks' scale as it does now (`SCALE_RULE`) are made again
    # and binarized points made before binarize chose it again for the 1-bit network (`BINARY_SCALE_RULE`)
    return {**d, "block_scale": f"{PruneConfig().block_scale}: {SCALE_RULE}", "binarized_block_scale": BINARY_SCALE_RULE,
            "checkpoint": str(Path(ckpt).resolve()), "data": data}


def _relative(path, out: Path) -> str:
    """A path as point.json stores it: relative to the sweep folder when inside it (the folder can be moved, and a
    sweep resumed from any working directory), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(out.resolve()))
    except ValueError:
        return str(p)


def _in_sweep(path: str, out: Path) -> Path:
    """A path read from point.json (see `_relative`)."""
    return Path(path) if Path(path).is_absolute() else out / path


def _older_settings(old: dict) -> dict:
    """Settings a sweep wrote before `precision` meant the fine-tuning steps' (it was Core ML's, now
    `coreml_precision`), as this version writes them: such a sweep is reused, not refused."""
    if "coreml_precision" not in old:
        old["coreml_precision"] = old.pop("precision", "float16")
        if "distill" in old:  # it fine-tuned, in float32 on a CPU: what auto picks on one without AMX
            old["precision"] = "auto"
    if "binarized_block_scale" not in old and old.get("finetune"):
        old["binarized_block_scale"] = BINARY_SCALE_RULE  # its binarized points were fine-tuned: nothing was chosen again
    return old


def _forget_points(out: Path) -> None:
    """What `--force` does before any work: the index goes first, then every point's completion markers (point.json,
    and the report.json a pruning reuse is decided by), so that a run interrupted at any moment leaves no index
    listing points of other settings and no old point (of any keep) or depth family that a resumed run would take for
    a new one."""
    for name in ("sweep.json", "sweep.md", "tradeoff.png"):
        (out / name).unlink(missing_ok=True)
    for marker in ("point.json", "report.json"):
        for f in sorted((out / "points").glob(f"*/{marker}")):
            f.unlink()
    (out / "family" / "report.json").unlink(missing_ok=True)  # a depth family is made again too


def _point(ckpt: Path, keep: float, binary: bool, cfg: SweepConfig, out: Path, data, data_dir, device) -> dict:
    """Prune (unless a finished pruning at this keep can be reused), binarize, export, measure; write point.json."""
    pdir = out / "points" / label(keep, binary)
    src, acc = ckpt, None
    if keep < 1.0:
        pruned = out / "points" / label(keep, False)
        if not (pruned / "report.json").exists():  # written after the checkpoint: the stage finished (--force removes it)
            acc = run_prune(ckpt, PruneConfig(keep=keep, strategy=cfg.strategy, finetune=cfg.finetune, distill=cfg.distill,
                                                  precision=cfg.precision), pruned, data, data_dir,
                            device, progress=False, measure_before=False)["after"]["accuracy"]
        src = pruned
    if binary:
        acc = run_binarize(src, BinarizeConfig(finetune=cfg.finetune, distill=cfg.distill, precision=cfg.precision), pdir, data, data_dir, device, progress=False,
                           measure_before=False)["after"]["accuracy"]
        src = pdir
    try:
        exp = run_export(src, cfg.formats, pdir / "export", data, data_dir, cfg.threads, precision=cfg.coreml_precision)
    except VerificationFailed as e:  # say which point, and what to change
        hint = ("; rerun without coreml in --formats, or with --coreml-precision float32, into another --out (a sweep's folder "
                "holds one set of settings)") if "Core ML" in str(e) and cfg.coreml_precision == "float16" else ""
        raise VerificationFailed(f"point {label(keep, binary)}: {e}{hint}") from None
    if acc is None:  # no stage ran here (or it found no evaluation data, which raises below with the reason)
        model, meta = load_checkpoint(src)
        r = evaluate_checkpoint(model, meta, src, data, data_dir)
        acc = {"top1": r["top1"], "dataset": r["dataset"], "n": r["n"]}
    point = {  # the export's report (the shape every sdcompress report has), its accuracy, and where it came from
        **{k: v for k, v in exp.items() if k != "formats"}, "accuracy": acc,
        "stage": "sweep-point", "label": label(keep, binary), "keep": keep, "binarized": binary,
        # fine-tuning recovers what a stage took; the unpruned float point is the starting model, not tuned
        "finetune_epochs": cfg.finetune if (keep < 1.0 or binary) else 0,
        "distill": cfg.distill if cfg.finetune and (keep < 1.0 or binary) else None,
        "checkpoint": _relative(resolve(src)[0], out), "files": {f: _relative(pdir / "export" / e["file"], out) for f, e in exp["formats"].items()},
        "verification": {f: {k: e["verification"][k] for k in ("max_abs_diff", "top1_agreement", "n", "ok")} for f, e in exp["formats"].items()},
    }
    atomic_write_json(pdir / "point.json", point)
    return point


def _latency(points: list[dict], input_shape: tuple[int, ...], cfg: SweepConfig, onnx_bytes: dict[str, bytes | str]) -> dict[str, float]:
    """Median batch-1 onnxruntime latency of every point (a file's bytes, or its path), measured in interleaved
    rounds in this one run."""
    from .exporters.onnx import interleaved_latency, ort_session

    sessions = {p["label"]: ort_session(onnx_bytes[p["label"]], cfg.threads) for p in points}
    return interleaved_latency(sessions, input_shape, cfg.latency_rounds, cfg.latency_runs)


def pareto(points: list[dict], x_key) -> set[str]:
    """Labels of points no other point beats: at most the cost and at least the top-1, one strictly."""
    front = set()
    for p in points:
        px, pa = x_key(p), p["accuracy"]["top1"]
        if px is None:
            continue
        dominated = any(
            (qx := x_key(q)) is not None and qx <= px and q["accuracy"]["top1"] >= pa
            and (qx < px or q["accuracy"]["top1"] > pa)
            for q in points if q is not p
        )
        if not dominated:
            front.add(p["label"])
    return front


def file_bytes(p: dict) -> int | None:
    """The size a point is plotted and ranked by: its ORT file (what ONNX Runtime Mobile ships), else its ONNX
    file, else its Core ML package, else model.pt. Its latency is that of the same ORT or ONNX file."""
    b = p["bytes"]
    return b.get("ort") or b.get("onnx") or b.get("coreml") or b.get("checkpoint")


def run_sweep(ckpt, cfg: SweepConfig, out: Path, data=None, data_dir=None, device="auto", progress=True, force=False) -> dict:
    from tqdm import tqdm

    from .exporters.onnx import export_onnx

    ckpt = Path(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(_settings(cfg, ckpt, data)))  # as it reads back from the file
    sfile = out / "sweep-settings.json"
    if sfile.exists() and not force:
        try:
            old = _older_settings(json.loads(sfile.read_text()))
        except (ValueError, AttributeError):
            old = None
        if old != settings:
            raise InputError(f"--out {out}: holds a sweep with other settings (checkpoint, strategy, formats, fine-tuning or data); "
                             "pass --force to redo its points, or another --out")
    if cfg.depth_family:  # depths that collapse are refused now, not after every point is made
        from .depths import check_distinct_depths
        from .pruning import removable

        check_distinct_depths(tuple(sorted(cfg.keeps, reverse=True)), len(removable(load_checkpoint(ckpt)[0])))
    if force and sfile.exists():  # a sweep folder (a new --out has nothing to forget)
        _forget_points(out)
    atomic_write_json(sfile, settings)
    todo = [(k, b) for k in cfg.keeps for b in cfg.binarize]
    points, reused = [], 0
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress)
    for keep, binary in bar:
        bar.set_postfix_str(label(keep, binary))
        pj = out / "points" / label(keep, binary) / "point.json"
        if pj.exists():  # finished with these settings (--force removed every point.json first)
            points.append(json.loads(pj.read_text()))
            reused += 1
            continue
        points.append(_point(ckpt, keep, binary, cfg, out, data, data_dir, device))
    bar.close()
    # every point timed in this run, same threads, interleaved
    onnx_bytes = {}
    for p in points:
        f = p["files"].get("ort") or p["files"].get("onnx")  # the file the size axis shows
        if f:
            onnx_bytes[p["label"]] = str(_in_sweep(f, out))
        else:
            m, meta = load_checkpoint(_in_sweep(p["checkpoint"], out))
            onnx_bytes[p["label"]] = export_onnx(m, meta)[0]
    input_shape = read_sidecar(resolve(ckpt)[1]).data.input_shape
    lat = _latency(points, input_shape, cfg, onnx_bytes)
    run_id = timing_run()  # every point timed together, interleaved: their latencies may be divided
    for p in points:
        p["latency_ms"] = {"onnxruntime_cpu_b1": lat[p["label"]], "threads": cfg.threads, "runs": cfg.latency_rounds * cfg.latency_runs,
                           "timing_run": run_id}
        atomic_write_json(out / "points" / p["label"] / "point.json", p)
    sweep = summarize(points, cfg, ckpt)
    sweep["reused_points"] = reused
    if cfg.depth_family:
        sweep["family"] = family_summary(_depth_family(ckpt, cfg, out, data, data_dir, force, progress), points)
    atomic_write_json(out / "sweep.json", sweep)
    atomic_write_bytes(out / "sweep.md", render_markdown(sweep).encode())
    plot_tradeoff(sweep, out / "tradeoff.png")
    return sweep


def _depth_family(ckpt, cfg: SweepConfig, out: Path, data, data_dir, force: bool, progress: bool) -> dict:
    """The float keeps as one depth family in DIR/family, reused when it is of the same checkpoint (SHA-256),
    depths, ranking, formats and Core ML precision."""
    from .depths import run_depth_export
    from .files import file_sha256, parse_untrusted_json

    fdir, depths = out / "family", tuple(sorted(cfg.keeps, reverse=True))
    formats = tuple(f for f in cfg.formats if f in ("onnx", "coreml"))
    if (fdir / "report.json").exists() and not force:
        try:
            old = parse_untrusted_json(fdir / "report.json", "depth family report")
            same = ([d["depth"] for d in old["depths"]] == list(depths) and old["strategy"] == cfg.strategy
                    and old["checkpoint_sha256"] == file_sha256(resolve(ckpt)[0])
                    and sorted(k if k != "onnx_family" else "onnx" for k in old["formats"]) == sorted(formats)
                    and (old["formats"].get("coreml") or {}).get("precision", cfg.coreml_precision) == cfg.coreml_precision)
        except (InputError, ValueError, KeyError, TypeError):
            same = False  # unreadable or another family: made again
        if same:
            return old
    if progress:
        print(f"sweep: depth family of {len(depths)} depths -> {fdir}", flush=True)
    return run_depth_export(ckpt, depths, fdir, cfg.strategy, data=data, data_dir=data_dir, formats=formats, precision=cfg.coreml_precision,
                            threads=cfg.threads)


def family_summary(family: dict, points: list[dict]) -> dict:
    """The depth family beside the sweep's float points: the same keep pruned on its own (and fine-tuned, when the
    sweep fine-tunes) against the nested depth that shares its weights with the others; one package against the
    points' packages."""
    by = {p["keep"]: p for p in points if not p["binarized"]}
    rows = []
    for d in family["depths"]:
        sep = by.get(d["depth"])
        nested, alone = d["top1"], sep and sep["accuracy"]["top1"]
        rows.append({"keep": d["depth"], "function": d["function"], "blocks": d["blocks"], "top1_nested": nested, "top1_separate": alone,
                     "nesting_cost_points": None if nested is None or alone is None else 100 * (alone - nested),
                     "same_blocks": sep is not None and sorted(sep["model"]["blocks_kept"]) == sorted(d["kept"]),
                     "onnx_bytes": (d.get("onnx") or {}).get("bytes"), "latency_ms": (d.get("latency_ms") or {}).get("onnxruntime_cpu_b1")})
    c = family["formats"].get("coreml") or {}
    separate = [by[d["depth"]]["bytes"].get("coreml") for d in family["depths"] if d["depth"] in by]
    return {"folder": "family", "strategy": family["strategy"], "depths": rows, "coreml_bytes": c.get("bytes"),
            "deepest_alone_bytes": c.get("deepest_alone_bytes"), "against_deepest_default_export": c.get("against_deepest_default_export"),
            "points_coreml_bytes": sum(separate) if separate and all(separate) else None}


def summarize(points: list[dict], cfg: SweepConfig, ckpt) -> dict:
    """Ratios against the full float model, the Pareto fronts and a three-number summary, as data."""
    by = {(p["keep"], p["binarized"]): p for p in points}
    full = by.get((1.0, False))
    rows = []
    for p in points:
        r = {"label": p["label"], "keep": p["keep"], "binarized": p["binarized"], "blocks": len(p["model"]["blocks_kept"]),
             "params": p["params"]["total"], "macs": p["macs"], "top1": p["accuracy"]["top1"],
             "bytes": p["bytes"], "latency_ms": p["latency_ms"]["onnxruntime_cpu_b1"], "verification": p["verification"],
             "compression_ratio": {f: compression_ratio(p["bytes"].get("float32_onnx_reference"), p["bytes"].get(f))
                                   for f in ("onnx", "ort", "coreml", "pte", "tflite") if p["bytes"].get(f)}}
        if full is not None:
            r["macs_ratio"] = p["macs"] / full["macs"]
            r["latency_ratio"] = r["latency_ms"] / full["latency_ms"]["onnxruntime_cpu_b1"]
        float_twin = by.get((p["keep"], False))
        if p["binarized"] and float_twin is not None:
            r["latency_vs_float"] = r["latency_ms"] / float_twin["latency_ms"]["onnxruntime_cpu_b1"]
        rows.append(r)
    front_size = pareto(points, file_bytes)
    front_lat = pareto(points, lambda p: p["latency_ms"]["onnxruntime_cpu_b1"])
    for r in rows:
        r["pareto_size"] = r["label"] in front_size
        r["pareto_latency"] = r["label"] in front_lat
    summary = {}  # what the table shows, in three numbers
    lr = [abs(r["latency_ratio"] - r["macs_ratio"]) for r in rows if "latency_ratio" in r and not r["binarized"]]
    if lr:
        summary["latency_vs_macs_ratio_max_gap"] = max(lr)
    lb = [r["latency_vs_float"] for r in rows if "latency_vs_float" in r]
    if lb:
        summary["binary_latency_vs_float_max"] = max(lb)
    k6 = next((r for r in rows if r["binarized"] and abs(r["keep"] - 0.6) < 1e-9), None)
    if k6 is not None and any(v for v in k6["compression_ratio"].values()):
        summary["keep0.6_binary_compression_ratio"] = {f: v for f, v in k6["compression_ratio"].items() if v}
    return {"schema": SWEEP_SCHEMA, "checkpoint": str(Path(ckpt).resolve()), "config": cfg.to_dict(), "points": rows, "summary": summary,
            "dataset": points[0]["accuracy"]["dataset"] if points else None}


def render_markdown(sweep: dict) -> str:
    fmts = sweep["config"]["formats"]
    head = ["point", "blocks", "params", "MACs (M)", "top-1", "model.pt"] + [{"onnx": "model.onnx", "ort": "model.ort", "pte": "model.pte", "tflite": "model.tflite"}.get(f, "Core ML package") for f in fmts]
    head += ["latency (ms)", "MACs ratio", "latency ratio", "Pareto (size / latency)"]
    lines = [f"# Sweep: {Path(sweep['checkpoint']).name}", "",
             f"Top-1 on {sweep['dataset']}; latency: onnxruntime CPU, batch 1, {sweep['config']['threads']} thread(s), median of "
             f"{sweep['config']['latency_rounds'] * sweep['config']['latency_runs']} runs per point, all points timed in one run. "
             "Ratios are against keep 1.00 in float.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sweep["points"]:
        cells = [r["label"], str(r["blocks"]), f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", f"{100 * r['top1']:.2f}%",
                 format_bytes(r["bytes"]["checkpoint"])]
        cells += [format_bytes(r["bytes"].get(f)) for f in fmts]
        cells += [f"{r['latency_ms']:.3f}", f"{r.get('macs_ratio', float('nan')):.3f}", f"{r.get('latency_ratio', float('nan')):.3f}",
                  ("yes" if r["pareto_size"] else "-") + " / " + ("yes" if r["pareto_latency"] else "-")]
        lines.append("| " + " | ".join(cells) + " |")
    g = sweep.get("summary", {})
    lines.append("")
    if "latency_vs_macs_ratio_max_gap" in g:
        lines.append(f"- latency ratio against MACs ratio (float points): largest gap {g['latency_vs_macs_ratio_max_gap']:.3f}")
    if "binary_latency_vs_float_max" in g:
        lines.append(f"- binarized latency against the float file at the same keep: at most {g['binary_latency_vs_float_max']:.3f}x")
    if "keep0.6_binary_compression_ratio" in g:
        fr = ", ".join(f"{f} {v:.1f}x" for f, v in g["keep0.6_binary_compression_ratio"].items())
        lines.append(f"- compression ratio of keep 0.6 binarized (the float32 ONNX export of the unpruned, float network over the file): {fr}")
    f = sweep.get("family")
    if f:
        lines += ["", f"## Depth family ({f['folder']}/, as `export --depths` writes it)", "",
                  "The blocks of each keep are cut from one ranking, so every shallower depth's blocks are among the deeper ones'; "
                  "each depth has its own recalibrated BatchNorm and no fine-tuning (its weights are shared).", "",
                  "| keep | function | blocks | top-1 nested | top-1 pruned alone (the point) | cost of nesting | same blocks |",
                  "|---|---|---:|---:|---:|---:|---|"]

        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}%"

        for r in f["depths"]:
            cost = "-" if r["nesting_cost_points"] is None else f"{r['nesting_cost_points']:+.2f} points"
            lines.append(f"| {r['keep']:.2f} | {r['function']} | {r['blocks']} | {pct(r['top1_nested'])} | {pct(r['top1_separate'])} | "
                         f"{cost} | {'yes' if r['same_blocks'] else 'no'} |")
        if f.get("coreml_bytes"):
            lines += ["", f"- the package: {f['coreml_bytes']:,} bytes, {f['against_deepest_default_export']:.3f}x the deepest network's "
                          f"package alone ({f['deepest_alone_bytes']:,} bytes)"
                      + (f"; the points' separate packages at these keeps: {f['points_coreml_bytes']:,} bytes" if f.get("points_coreml_bytes") else "")]
    lines += ["", "![tradeoff](tradeoff.png)", ""]
    return "\n".join(lines)


def plot_tradeoff(sweep: dict, path: Path) -> None:
    """Top-1 against file size (log axis) and against latency, Pareto fronts drawn, every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    b0 = pts[0]["bytes"] if pts else {}
    which = next((n for k, n in (("ort", "model.ort"), ("onnx", "model.onnx"), ("coreml", "Core ML package")) if b0.get(k)), "model.pt")
    for ax, xf, xl, fk in ((axes[0], lambda r: file_bytes(r) / 1024, f"{which} size (KiB, log scale)", "pareto_size"),
                           (axes[1], lambda r: r["latency_ms"], "onnxruntime CPU latency, batch 1 (ms)", "pareto_latency")):
        for binary, marker, color, name in ((False, "o", "#4c72b0", "float"), (True, "s", "#c44e52", "1-bit weights")):
            sel = [r for r in pts if r["binarized"] == binary]
            ax.scatter([xf(r) for r in sel], [100 * r["top1"] for r in sel], marker=marker, color=color, label=name, zorder=3)
        front = sorted((r for r in pts if r[fk]), key=xf)
        ax.step([xf(r) for r in front], [100 * r["top1"] for r in front], where="post", color="k", lw=1, ls="--", label="Pareto front", zorder=2)
        for r in pts:
            ax.annotate(f"{r['keep']:.1f}{' b' if r['binarized'] else ''}", (xf(r), 100 * r["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel(f"top-1 (%) on {sweep['dataset']}")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    # labels at 1, 2 and 5 of each decade, none on the minor ticks: a narrow range no longer crowds them together
    axes[0].xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{Path(sweep['checkpoint']).name}: accuracy against size and latency (labels: keep, b = binarized)")
    save_figure(fig, path)
