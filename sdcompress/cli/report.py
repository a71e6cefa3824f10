"""`sdcompress report`: footprint per block and layer: parameters, memory and MACs by precision."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .common import OUT_ROOT, _ckpt_arg, _model_name, _resolve_ckpt


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="footprint per block and layer: parameters, memory and MACs by precision",
                       description="The footprint of one model per block and per layer, totals, exported files beside the "
                                   "checkpoint, and accuracy when data is given (or for the bundled model).")
    _ckpt_arg(p)
    p.add_argument("--data", default=None, help="measure top-1 on this data (default: the bundled evaluation set for the bundled "
                                                "models and those pruned or binarized from them; else none)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the rendered tables (Markdown) here")
    p.add_argument("--force", action="store_true", help="overwrite --json / --md")
    p.add_argument("--arch", default=None, metavar="python:PACKAGE.MODULE:FUNCTION",
                   help="your own model class: the builder of the model in CKPT, a folder written by sdcompress.save; imported "
                        "because you name it here, never because a file does")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..checkpoint import load_checkpoint
    from ..files import check_output_file
    from ..evaluate import evaluate_checkpoint
    from ..footprints import footprint
    from ..zoo import same_data_as_bundled

    path = _resolve_ckpt(a.ckpt)
    if a.json is not None and a.md is not None and a.json.resolve() == a.md.resolve():
        raise InputError(f"--json and --md name the same file ({a.json})")
    for flag, f in (("--json", a.json), ("--md", a.md)):
        if f is not None and not f.parent.is_dir():
            raise InputError(f"{flag} {f}: folder {f.parent} does not exist")
        check_output_file(f, a.force, flag, (path,))
    if a.arch is not None:
        return _run_user(a)
    model, meta = load_checkpoint(path)
    acc = None
    if a.data is not None or a.ckpt is None or same_data_as_bundled(path, meta):
        acc = evaluate_checkpoint(model, meta, path, a.data, a.data_dir, "auto", 500)
    exports = OUT_ROOT / f"{_model_name(path)}-export"  # where `sdcompress export` writes by default
    return _write(a, footprint(model, meta.data.input_shape, path, acc, exports if exports.is_dir() else None))


def _write(a, fp: dict) -> int:
    """Print the rendered footprint; write it to --json / --md when asked."""
    from ..files import atomic_write_bytes, atomic_write_json
    from ..footprints import render_markdown

    md = render_markdown(fp)
    print(md, end="")
    if a.json:
        atomic_write_json(a.json, fp)
    if a.md:
        atomic_write_bytes(a.md, md.encode())
    return 0


def _run_user(a) -> int:
    """The footprint of a model of the user's own class (`sdcompress.footprint`), rendered as for any checkpoint."""
    import torch

    from .. import api
    from .user import _load, check_arch

    check_arch(a.arch, "report")
    if a.ckpt is None:
        raise InputError("--arch python:... needs the folder of the model (sdcompress report FOLDER --arch ...)")
    model, side, data = _load(a.ckpt, a.arch)
    shape = tuple(data.get("input_shape") or ())
    if len(shape) != 3:
        raise InputError(f"{a.ckpt}/blocks.json: no input shape in its data record")
    return _write(a, api.footprint(model, torch.zeros(1, *shape), blocks=side["blocks"] or None))
