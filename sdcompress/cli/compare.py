"""`sdcompress compare`: reports side by side: old -> new with ratios."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="reports side by side: old -> new with ratios",
                       description="Any reports sdcompress writes (report, eval, prune, binarize, export, sweep points), "
                                   "side by side: one row per metric, the first file as the baseline.")
    p.add_argument("reports", nargs="+", type=Path, help="two or more report JSON files")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.add_argument("--divide-latencies", action="store_true",
                   help="divide latencies timed in separate runs too (by default only those timed together, as in one sweep)")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..files import atomic_write_json, check_output_file
    from ..compare import compare, expand, load_report, render

    check_output_file(a.json, a.force, "--json", tuple(a.reports))
    reports, names = expand([load_report(p) for p in a.reports], [str(p) for p in a.reports])
    if len(reports) < 2:
        raise InputError("compare needs at least two reports (or one depth family)")
    cmp = compare(reports, names, a.divide_latencies)
    print(render(cmp), end="")
    if a.json:
        atomic_write_json(a.json, cmp)
    return 0
