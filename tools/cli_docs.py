"""Write `docs/cli.md`, the command-line reference, from the parsers themselves, so that it cannot drift from the
code (a test fails when the file is stale):

    python tools/cli_docs.py            # rewrite docs/cli.md
    python tools/cli_docs.py --check    # exit 1 if docs/cli.md differs from what the parsers say
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcompress.cli import build_parser  # noqa: E402

OUT = ROOT / "docs" / "cli.md"


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    meta = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper())
    return f"{names} `{meta}`"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def render() -> str:
    """The reference as Markdown: one section per command, its description and a table of its arguments."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = ["# Command-line reference", "",
             "Generated from the parsers by `python tools/cli_docs.py`; `sdcompress COMMAND --help` prints the same.", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#sdcompress-{name}) | {_cell(helps.get(name) or '')} |" for name in sub.choices]
    lines += ["", "Every command exits 0 on success, 2 on bad usage or bad input (one line on stderr, nothing written), "
              "1 on any other error and 130 / 143 when interrupted.", ""]
    for name, p in sub.choices.items():
        fmt = p.formatter_class(prog=p.prog)
        lines += [f"## sdcompress {name}", "", _cell(p.description or helps.get(name) or ""), "",
                  "```", " ".join(p.format_usage().split()).removeprefix("usage: "), "```", "",
                  "| argument | meaning |", "|---|---|"]
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = fmt._expand_help(action) if action.help else ""
            arg = _flag(action) if action.option_strings else f"`{action.metavar or action.dest}`"
            lines.append(f"| {arg} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/cli.md instead of writing it")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python tools/cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
