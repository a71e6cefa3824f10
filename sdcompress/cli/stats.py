"""`sdcompress stats`: per-block survival statistics (table + PNG)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .common import OUT_ROOT, _ckpt_arg, _fresh_out, _positive_int, _resolve_ckpt


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="per-block survival statistics (table + PNG)", description="Show survival statistics.")
    _ckpt_arg(p)
    p.add_argument("--out", type=Path, default=None, help="folder for stats.png and stats.json, and with --measure the "
                   "checkpoint with measured statistics (default sdcompress-out/NAME-stats, NAME-measured)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--measure", action="store_true", help="measure drop effects without training: random removals on "
                   "training images at evaluation time, loss regressed on them; writes a checkpoint with them")
    p.add_argument("--data", default=None, help="with --measure: training images (default: the bundled calibration set or the checkpoint's data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=_positive_int, default=40, help="with --measure: batches of 128 images (default 40)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="with --measure: passes over the batches, new draws each (default 3)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..checkpoint import read_sidecar, resolve
    from ..files import atomic_write_json, output_folder
    from ..report import format_stats_table, plot_stats

    path = _resolve_ckpt(a.ckpt)
    meta = read_sidecar(resolve(path)[1])
    if a.measure:
        from ..measure import run_measure

        out = _fresh_out(a.out or OUT_ROOT / f"{resolve(path)[0].parent.name}-measured", a.force, (path,))
        meta = run_measure(path, out, a.data, a.data_dir, a.batches, a.rounds)
        print(format_stats_table(meta))
        print(f"wrote {out}/model.pt, {out}/model.json (measured drop effects), {out}/stats.png")
        return 0
    if meta.survival_stats is None:
        raise InputError(f"{path}: the checkpoint holds no survival statistics (was it trained by sdcompress?)")
    name = resolve(path)[0].parent.name
    out = a.out or OUT_ROOT / f"{name}-stats"
    if not a.no_plot:
        _fresh_out(out, a.force, (path,))
    print(format_stats_table(meta))
    if not a.no_plot:
        with output_folder(out) as folder:
            atomic_write_json(folder / "stats.json", meta.raw["survival_stats"])
            plot_stats(meta, folder / "stats.png")
        print(f"wrote {out}/stats.png, {out}/stats.json")
    return 0
