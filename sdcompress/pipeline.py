"""Stages run on checkpoints: load, measure before, transform, save, measure after, report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .binarization import BinarizeConfig, binarize_stage
from .checkpoint import Sidecar, load_checkpoint, resolve, save_checkpoint
from .compare import timing_run
from .files import atomic_write_bytes, atomic_write_json, check_output_folder, checkpoint_folder, file_sha256, output_folder, path_bytes
from .data import Normalize
from .evaluate import calibration_images, eval_data
from .errors import InputError, check_interrupt
from .pruning import PruneConfig, prune_model
from .loops import Distill, evaluate, finetune
from .report import binarize_markdown, export_markdown, format_stats_table, model_report, plot_stats, prune_markdown
from .data import train_augmentation
from .zoo import own_card


def _accuracy(model, meta: Sidecar, images, name) -> dict | None:
    if images is None:
        return None
    acc = evaluate(model, images, Normalize(meta.data.mean, meta.data.std))
    return {"top1": acc["top1"], "dataset": name, "n": acc["n"]}


def _teacher(path, meta: Sidecar):
    """The checkpoint given by --teacher, checked to answer the same question as the student from the same input:
    the same input shape and normalization (the teacher sees the student's normalized batches), the same classes in
    the same order."""
    try:
        teacher, tmeta = load_checkpoint(path)
    except InputError as e:
        raise InputError(f"--teacher: {e}") from None
    t, s = tmeta.data, meta.data
    for what, a, b in (("input shape", t.input_shape, s.input_shape), ("normalization mean", t.mean, s.mean),
                       ("normalization std", t.std, s.std), ("classes", t.classes, s.classes)):
        if tuple(a) != tuple(b):
            shown = (f"{len(a)} classes ({', '.join(a[:3])}, ...)", f"{len(b)} ({', '.join(b[:3])}, ...)") if what == "classes" else (a, b)
            raise InputError(f"--teacher {path}: its {what} is {shown[0]}, the model's {shown[1]}; a teacher must take the same "
                             f"input and predict the same classes in the same order")
    return teacher.eval()


def _run_stage(stage: str, ckpt, out: Path, cfg, need_train: bool, transform: Callable, data, data_dir, device, progress,
               measure_before: bool = True, more_files: Callable[[Path, dict, Sidecar], None] | None = None) -> dict:
    """Load, evaluate, transform, save and report; `transform(model, meta, calib, tune) -> (model, record)`.

    The output folder (checkpoint, report.json, and what `more_files(folder, report, meta)` adds) is written as one
    unit (`output_folder`): an interrupted or failed stage leaves the old folder as it was.
    """
    teacher_path = getattr(cfg, "teacher", None)
    check_output_folder(out, force=True, inputs=(ckpt, teacher_path))
    model, meta = load_checkpoint(ckpt)
    teacher_net = _teacher(teacher_path, meta) if teacher_path else model  # default: the network before the stage
    try:
        images, eval_name = eval_data(meta, ckpt, data, data_dir)
    except InputError:
        if data is not None:
            raise
        images, eval_name = None, None  # the checkpoint's data is not here: report no accuracy
    calib, ds, calib_name = calibration_images(meta, ckpt, data, data_dir) if need_train else (None, None, None)
    before = model_report(model, meta.data.input_shape, resolve(ckpt)[0], _accuracy(model, meta, images, eval_name) if measure_before else None)

    def tune(m, c):  # c: the stage's config (finetune, finetune_lr, finetune_survival, seed, distill...)
        if ds is None:
            raise InputError("--finetune needs the training data: pass --data (and --data-dir)")
        teacher = Distill(teacher_net, c.distill_temperature, c.distill_alpha) if c.distill else None
        return finetune(m, ds, c.finetune, c.finetune_lr, c.finetune_survival, seed=c.seed, device=device, progress=progress,
                        augment_with=train_augmentation(meta), distill=teacher, precision=c.precision)

    new, record = transform(model, meta, calib, tune)
    new = new.cpu().eval()
    record.update(config=cfg.to_dict(), calibration_data=calib_name, source_card=own_card(ckpt, meta))
    after_acc = _accuracy(new, meta, images, eval_name)
    new_meta = meta.derive(new.spec, {"stage": stage, **record}, {"top1": after_acc and after_acc["top1"], "dataset": eval_name})
    with output_folder(out) as folder:
        save_checkpoint(folder, new, new_meta)
        after = model_report(new, new_meta.data.input_shape, folder / "model.pt", after_acc)
        report = {"schema": "sdcompress.report/1", "stage": stage, "before": before, "after": after, stage: record}
        atomic_write_json(folder / "report.json", report)
        if more_files is not None:
            more_files(folder, report, new_meta)
    return report


def run_prune(ckpt, cfg: PruneConfig, out: Path, data=None, data_dir=None, device="auto", progress=True, measure_before=True) -> dict:
    """Prune a checkpoint into `out` (model.pt, model.json, report.json, report.md, blocks.png)."""

    def transform(model, meta, calib, tune):
        return prune_model(model, meta, cfg, calib, tune)

    def more_files(folder, report, meta):
        if meta.survival_stats is not None:
            plot_stats(meta, folder / "blocks.png")
            table = format_stats_table(meta)
        else:
            table = "(no survival statistics in this checkpoint)"
        atomic_write_bytes(folder / "report.md", prune_markdown(report, table).encode())

    need = bool(cfg.recalibrate) or cfg.finetune > 0 or cfg.strategy == "sensitivity"
    return _run_stage("prune", ckpt, out, cfg, need, transform, data, data_dir, device, progress, measure_before, more_files)


def run_binarize(ckpt, cfg: BinarizeConfig, out: Path, data=None, data_dir=None, device="auto", progress=True, measure_before=True) -> dict:
    """Binarize a checkpoint into `out` (model.pt with packed sign bits, model.json, report.json, report.md)."""

    def transform(model, meta, calib, tune):
        return binarize_stage(model, meta, cfg, calib, tune)

    need = bool(cfg.recalibrate) or cfg.finetune > 0
    return _run_stage("binarize", ckpt, out, cfg, need, transform, data, data_dir, device, progress, measure_before,
                      lambda folder, report, meta: atomic_write_bytes(folder / "report.md", binarize_markdown(report).encode()))


class VerificationFailed(RuntimeError):
    """An exported file does not reproduce the PyTorch model; nothing was written."""


FORMATS = ("onnx", "ort", "coreml", "pte", "tflite")  # pte (ExecuTorch) and tflite (LiteRT): optional extras


def check_finite(model, meta: Sidecar, images, eval_name: str) -> None:
    """A model whose own outputs are not finite (NaN weights, a diverged run) cannot be verified against anything:
    refused before any export, with that said, rather than as a file that "differs by nan"."""
    import torch

    with torch.no_grad():
        out = model.cpu().eval()(Normalize(meta.data.mean, meta.data.std)(images))
    bad = int((~torch.isfinite(out)).any(1).sum())
    if bad:
        nan_weights = sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values() if t.is_floating_point())
        raise InputError(f"the model's own outputs are not finite (NaN or infinite logits for {bad} of {len(images)} images of "
                         f"{eval_name}; {nan_weights:,} non-finite weights): nothing to export; retrain or use an earlier checkpoint")


def check_formats(formats) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InputError(f"unknown format {bad[0]!r}; formats are a comma-separated list of {', '.join(FORMATS)}")


def check_runtime_formats(formats, weights: str, batch) -> None:
    """What --format pte / tflite cannot take, refused before any work: the runtime not installed, a weight form it
    has no exact path for, a dynamic batch."""
    if "pte" in formats:
        from .exporters.executorch import WEIGHTS, check_installed

        check_installed()
        if weights not in WEIGHTS:
            raise InputError(f"--weights {weights}: ExecuTorch's XNNPACK backend has no weight-only {weights} (its int8 schemes quantize "
                             f"the activations too); --format pte takes --weights {', '.join(WEIGHTS)}")
    if "tflite" in formats:
        from .exporters.litert import WEIGHTS, check_installed

        check_installed()
        if weights not in WEIGHTS:
            raise InputError(f"--weights {weights}: LiteRT has no {weights} weights; --format tflite takes --weights {', '.join(WEIGHTS)}")
    if batch is None and ("pte" in formats or "tflite" in formats):
        raise InputError("--format pte and tflite need a fixed --batch (ExecuTorch 1.5.1 with this torch plans a dynamic batch at 15 "
                         "inputs whatever its bound); give --batch N, the batch the app runs")


def compression_ratio(reference_bytes: int | None, artifact_bytes: int | None) -> float | None:
    """The one compression ratio every report gives: bytes of the float32 ONNX export of the unpruned, float network
    (same architecture, same batch) over the bytes of the artifact as shipped (an ONNX or ORT file, a Core ML
    package: one reference for every format, so their ratios compare)."""
    return reference_bytes / artifact_bytes if reference_bytes and artifact_bytes else None


def reference_onnx_bytes(model, meta: Sidecar, batch) -> int:
    """Bytes of the float32 ONNX export of the network before pruning and binarization. Its weights are drawn at
    random: a file's size depends on their shapes, not their values, as long as no two are equal (the exporter stores
    equal constants once, and freshly initialized BatchNorm layers are all equal)."""
    from dataclasses import replace

    import torch

    from .exporters.onnx import export_onnx
    from .nets import build_model

    full = build_model(replace(model.spec, blocks_kept=None, binarized=())).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*full.named_parameters(), *full.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var") else torch.randn(t.shape, generator=g) * 0.1)
    return len(export_onnx(full, meta, "float", batch)[0])


def run_export(ckpt, formats: tuple[str, ...], out: Path, data=None, data_dir=None, threads: int = 1, batch_images: int = 64,
               precision: str = "float16", coreml_input: str = "image", verbose: bool = False, weights: str = "auto",
               batch: int | None = 1, name: str | None = None, deployment_target: str | None = None) -> dict:
    """Export a checkpoint, verify each file on real inputs, and report sizes, parity and latency.

    Each file is written under a temporary name, reloaded and checked against PyTorch, and only then renamed into
    place; a file that fails verification is deleted and the command fails. `weights` is the ONNX / ORT weight form
    (exporters.onnx.WEIGHTS); `batch` the fixed batch size of the ONNX / ORT graphs and a tensor Core ML input (None:
    dynamic); `name` the Core ML package's (and Swift class's) name.
    """
    import torch

    from .exporters.coreml import package_name
    from .exporters.onnx import WEIGHTS
    from .zoo import card_fields

    check_formats(formats)
    if weights not in WEIGHTS:
        raise InputError(f"unknown weight form {weights!r}; choose one of {', '.join(WEIGHTS)}")
    check_runtime_formats(formats, weights, batch)
    check_output_folder(out, force=True, inputs=(ckpt,))
    model, meta = load_checkpoint(ckpt)
    if weights == "1bit" and not meta.spec.binarized:
        raise InputError("--weights 1bit needs a binarized model (sdcompress binarize first); this one has no 1-bit layers")
    images, eval_name = eval_data(meta, ckpt, data, data_dir)
    idx = torch.arange(min(batch_images, len(images)))
    check_finite(model, meta, images.images[idx], eval_name)
    reference = reference_onnx_bytes(model, meta, batch)
    pixels = images.images[idx]
    x = Normalize(meta.data.mean, meta.data.std)(pixels)
    with output_folder(out) as folder:  # every file, or none: an interrupted export leaves the old folder as it was
        files = write_exports(model, meta, folder, x, pixels.float(), eval_name, formats, threads=threads, weights=weights, batch=batch,
                              precision=precision, coreml_input=coreml_input, name=name or package_name(checkpoint_folder(ckpt).name),
                              deployment_target=deployment_target, card=card_fields(ckpt, meta), verbose=verbose)
        for f in files.values():
            f["compression_ratio"] = compression_ratio(reference, f["bytes"])
        rep = model_report(model, meta.data.input_shape, resolve(ckpt)[0], None)
        for fmt in FORMATS:
            rep["bytes"][fmt] = files.get(fmt, {}).get("bytes")
        rep["bytes"]["float32_onnx_reference"] = reference
        timed = [f for f in files.values() if (f.get("latency_ms") or {}).get("onnxruntime_cpu_b1") is not None]
        rep["latency_ms"] = {"onnxruntime_cpu_b1": timed[0]["latency_ms"]["onnxruntime_cpu_b1"], "file": timed[0]["file"]} if timed else None
        for fmt, key in (("pte", "executorch_cpu_b1"), ("tflite", "litert_cpu_b1")):
            lat = (files.get(fmt) or {}).get("latency_ms") or {}
            if lat.get(key) is not None:
                rep["latency_ms"] = {**(rep["latency_ms"] or {}), key: lat[key], f"{fmt}_file": files[fmt]["file"]}
        if rep["latency_ms"]:
            rep["latency_ms"]["timing_run"] = timing_run()
        result = {**rep, "stage": "export", "formats": files, "checkpoint_sha256": file_sha256(resolve(ckpt)[0])}
        atomic_write_json(folder / "report.json", result)
        atomic_write_bytes(folder / "report.md", export_markdown(result).encode())
    return result


def write_exports(model, meta, folder: Path, x, pixels, eval_name: str, formats, *, threads: int = 1, weights: str = "auto",
                  batch: int | None = 1, precision: str = "float16", coreml_input: str = "image", name: str = "Model",
                  deployment_target: str | None = None, card: dict | None = None, verbose: bool = False) -> dict[str, dict]:
    """Each of `formats` written into `folder` (model.onnx, model.ort, NAME.mlpackage), reloaded and verified on the
    model inputs `x` (`pixels`: the same images as pixel values, for a Core ML image input): what `sdcompress
    export` and `sdcompress.export` both run. Returns each format's entry of the report."""
    files: dict[str, dict] = {}
    exported: dict[str, tuple] = {}  # weight form -> export_onnx's result: .onnx and .ort of one form share one export
    for fmt in formats:
        check_interrupt()
        if fmt in ("onnx", "ort"):
            files[fmt] = _export_onnx(model, meta, folder, x, eval_name, threads, weights, batch, fmt, exported)
        elif fmt in ("pte", "tflite"):
            files[fmt] = _export_runtime(model, folder, x, eval_name, weights, batch, threads, fmt)
        else:
            files["coreml"] = _export_coreml(model, meta, folder, x, pixels, eval_name, precision, coreml_input, verbose, batch, name,
                                             deployment_target, card)
    return files


def _export_onnx(model, meta, out: Path, x, eval_name: str, threads: int, weights: str, batch, fmt: str,
                 exported: dict | None = None, filename: str | None = None, timed: bool = True) -> dict:
    """model.onnx (or `filename`) or model.ort in `out` (the staging folder of `output_folder`: a failure here leaves
    nothing), verified on the model inputs `x`. `exported` caches export_onnx's result per weight form across calls;
    `timed=False` leaves the latency to the caller (who times several files together)."""
    import torch

    from .exporters.onnx import (auto_form, compare_outputs, consumer_ort_bytes, export_onnx, fixed_batch, latency_entry, latency_ms,
                              mobile_usability, ort_format, ort_session, run_batches, verify_onnx)

    form = auto_form(model, fmt) if weights == "auto" else weights
    exported = {} if exported is None else exported
    if form not in exported:
        try:
            exported[form] = export_onnx(model, meta, form, batch)
        except ValueError as e:
            raise InputError(str(e)) from None
    data_bytes, facts, reference = exported[form]
    onnx_path = out / ((filename or "model.onnx") if fmt == "onnx" else "model.ort.onnx")
    onnx_path.write_bytes(data_bytes)
    extra: dict = {}
    if fmt == "ort":
        try:
            extra = ort_format(onnx_path, out / "model.ort", out / "model.required_operators.config", keep_bits=form == "1bit")
        except ValueError as e:
            raise InputError(f"{e} (--weights {form}); choose another --weights for --format ort") from None
        usability = mobile_usability(onnx_path, optimize=extra["constant_folding"])
        onnx_path.unlink()
        path = out / "model.ort"
    else:
        path = onnx_path
        usability = mobile_usability(path)
        extra["consumer_conversion"] = {"tool": "onnxruntime.tools.convert_onnx_models_to_ort (defaults)", "bytes": consumer_ort_bytes(path)}
    session = ort_session(str(path), threads)  # the file as written, reloaded
    check = verify_onnx(session, reference, x)
    if not check["ok"]:
        path.unlink()
        raise VerificationFailed(f"{path.name} output differs from PyTorch by {check['max_abs_diff']:.3g} (top-1 agreement "
                                 f"{check['top1_agreement']:.3f}) on {check['n']} images of {eval_name}; nothing written")
    if facts["rounded"]:  # the float layers were rounded to the weight form: what that costs against the model
        with torch.no_grad():
            unrounded = model.cpu().eval()(x).numpy()
        rounding = compare_outputs(run_batches(session, x.numpy()), unrounded)  # its figures; "ok" does not apply
        check["against_unrounded_model"] = {k: rounding[k] for k in ("max_abs_diff", "top1_agreement", "n")}
    entry = {"file": path.name, "format": fmt, "bytes": path_bytes(path), **facts, **extra,
             "mobile_usability": usability, "verification": {**check, "dataset": eval_name}}
    if timed:
        entry["latency_ms"] = latency_entry(latency_ms(session, meta.data.input_shape), fixed_batch(session), threads=threads, runs=50)
    return entry


def _export_runtime(model, out: Path, x, eval_name: str, weights: str, batch: int, threads: int, fmt: str) -> dict:
    """model.pte (ExecuTorch) or model.tflite (LiteRT) in `out` (the staging folder; `check_runtime_formats` has
    passed), run back by that runtime on the
    model inputs `x` and compared with the PyTorch module it was made from. A float model's int8 `.tflite` weights
    are rounded: that file is compared with the unrounded model and passes at 95% top-1 agreement, the cost
    reported (exporters.litert)."""
    import torch

    from .exporters.onnx import compare_outputs

    if fmt == "pte":
        from .exporters.executorch import Program, export_pte

        data, facts, reference = export_pte(model, x, weights, batch)
        runner = lambda path: Program(path, batch)  # noqa: E731
        runtime = {"verified_by": "executorch.runtime (Python bindings)", "key": "executorch_cpu_b1",
                   "timed": {"runtime": "ExecuTorch XNNPACK, its default threads"}}
    else:
        from .exporters.litert import Interpreter, export_tflite

        data, facts, reference = export_tflite(model, x, weights, batch)
        runner = lambda path: Interpreter(path, batch, threads)  # noqa: E731
        runtime = {"verified_by": "ai_edge_litert.interpreter (XNNPACK)", "key": "litert_cpu_b1",
                   "timed": {"threads": threads, "runtime": "LiteRT interpreter, XNNPACK"}}
    path = out / f"model.{fmt}"
    path.write_bytes(data)
    loaded = runner(path)
    with torch.no_grad():
        ref = reference(x).numpy()
    check = compare_outputs(loaded.run(x), ref)
    if facts.get("rounded"):
        check["ok"] = check["top1_agreement"] >= 0.95
        check["rounded_weights"] = "int8 per output channel; compared with the unrounded model"
    if not check["ok"]:
        path.unlink()
        raise VerificationFailed(f"{path.name} output differs from PyTorch by {check['max_abs_diff']:.3g} (top-1 agreement "
                                 f"{check['top1_agreement']:.3f}) on {check['n']} images of {eval_name}; nothing written")
    ms = loaded.latency_ms(tuple(x.shape[1:]))
    return {"file": path.name, "format": fmt, "bytes": path_bytes(path), "weights": facts.pop("form"), **facts,
            "verification": {**check, "dataset": eval_name, "runtime": runtime["verified_by"]},
            "latency_ms": {runtime["key"]: ms if batch == 1 else None, "batch": batch, "ms": ms, **runtime["timed"]}}


def _export_coreml(model, meta, out: Path, x, pixels, eval_name: str, precision: str, input_kind: str, verbose: bool,
                   batch, name: str, deployment_target: str | None, card: dict | None) -> dict:
    """NAME.mlpackage in `out` (the staging folder of `output_folder`: a failure here leaves nothing), verified on the
    model inputs `x` (and, for an image input, their `pixels`)."""
    from .exporters import coreml
    from .zoo import CARD_FIELDS

    try:
        coreml.import_coremltools(verbose)
    except ImportError as e:
        raise InputError(f"--format coreml needs coremltools ({e}); install it with `pip install coremltools==9.0`") from None
    try:
        ml, facts = coreml.convert(model, meta, precision, input_kind, card or dict.fromkeys(CARD_FIELDS, ""), verbose, batch=batch,
                                   target=deployment_target)
    except ValueError as e:
        raise InputError(str(e)) from None
    pkg = out / f"{name}.mlpackage"
    coreml.save(ml, pkg, verbose)
    check = coreml.verify_inputs(pkg, model, meta.data.classes, x, pixels, input_kind, precision, verbose)
    if not check["ok"]:
        raise VerificationFailed(f"Core ML output differs from PyTorch by {check['max_abs_diff']:.3g} in class probabilities "
                                 f"(top-1 agreement {check['top1_agreement']:.3f}) on {check['n']} images of {eval_name}; nothing written")
    return {"file": pkg.name, "format": "coreml", "bytes": path_bytes(pkg), **facts,
            "verification": {**check, "dataset": eval_name}}
