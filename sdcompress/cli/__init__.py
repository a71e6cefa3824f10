"""The `sdcompress` command line: each subcommand parses flags, builds a config, calls the API and prints.

One module per subcommand (train, eval, stats, prune, binarize, export, report, sweep, compare), each with
`add_parser(sub)` and `run(a)`; the helpers they share are in `common`. Here: the parser, the signal handling
and the exit codes.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 anything else, 130 / 143 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback

from ..errors import InputError, Terminated, check_interrupt, clear_pending, signal_received
from . import binarize, compare, eval, export, prune, report, stats, sweep, train  # noqa: A004 - eval: the subcommand

COMMANDS = (train, eval, stats, prune, binarize, export, report, sweep, compare)


HELP = {  # options several subcommands share, or whose meaning the flag name alone carries
    "split_seed": "seed of the train/validation split",
    "epochs": "training epochs",
    "batch_size": "images per training batch (under torchrun: the global batch)",
    "lr": "peak learning rate of SGD",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "schedule": "learning-rate schedule: cosine (per step), or step (lr / 10 at 50%% and 75%% of the epochs, as the paper)",
    "survival_rule": "survival probabilities: linear (the paper's), uniform, or none (constant depth)",
    "augment": "training augmentation: auto (crop and flip for colour images, none otherwise), standard, crop, none",
    "seed": "seed of the weights, shuffling, drop draws and augmentation",  # train's; the stages give their own
    "device": "where to run: auto (CUDA when available), cpu or cuda",
    "stats_window": "recent steps the drop-effect regression uses",
    "contrib_every": "measure each block's contribution every this many steps (0: never)",
    "no_progress": "no progress bar",
    "data_dir": "folder of a torchvision dataset, or of the --data images (never downloaded)",
    "blocks_to_keep": "keep exactly these blocks (numbers, comma-separated) instead of --keep",
    "strategy": "which blocks go: stats (lowest drop effect within each stage, as many per stage as every-other), top (highest first), every-other (spread evenly), sensitivity "
                "(greedy on the measured loss)",
    "sensitivity_batches": "batches of training images per candidate removal of the sensitivity strategy",
    "finetune_lr": "fine-tuning learning rate (cosine schedule from it)",
}


class _Help(argparse.HelpFormatter):
    """Every option says its default (a tuple as the comma-separated list it is typed as)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if action.option_strings and "default" not in text and d is not None and d is not False \
                and d != argparse.SUPPRESS and action.nargs != 0:
            shown = ",".join(("on" if v else "off") if isinstance(v, bool) else str(v) for v in d) if isinstance(d, tuple) else (
                ("on" if d else "off") if isinstance(d, bool) else "%(default)s")
            text = f"{text} (default {shown})" if text else f"default {shown}"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="sdcompress", description="Compress stochastic-depth ResNets for mobile deployment.")
    parser.add_argument("--version", action="version", version=f"sdcompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():  # `--debug` works before or after the command
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.formatter_class = _Help
        for action in p._actions:
            if action.option_strings and not action.help:
                action.help = HELP.get(action.dest)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    restore = _handle_signals()  # first: building the parser imports torch, which takes a second or two
    try:
        try:
            a = build_parser().parse_args(argv)
        except (KeyboardInterrupt, Terminated) as e:
            command = next((f" {x}" for x in argv if not x.startswith("-")), "")
            how = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
            print(f"sdcompress{command}: {how} while starting; nothing was written", file=sys.stderr)
            return 130 if isinstance(e, KeyboardInterrupt) else 143
        return _run(a)
    finally:
        restore()


def _handle_signals():
    """Ctrl-C and SIGTERM raise (KeyboardInterrupt, Terminated) and are remembered, so that a library that swallows
    the exception cannot make the command carry on and commit its outputs. Returns what puts the old handlers back."""
    import threading

    clear_pending()
    if threading.current_thread() is not threading.main_thread():
        return clear_pending
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, lambda signum, frame: signal_received(Terminated))
    signal.signal(signal.SIGINT, lambda signum, frame: signal_received(KeyboardInterrupt))

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
        clear_pending()  # a signal belongs to the command it interrupted

    return restore


def _run(a) -> int:
    try:
        try:
            return a.func(a)
        except Exception:
            # a signal raised inside a library's C++ code can come out as that library's own error
            check_interrupt()
            raise
    except InputError as e:
        if a.debug:
            traceback.print_exc()
        print(f"sdcompress {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdcompress {a.command}: interrupted; outputs already written are complete, nothing was half-written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"sdcompress {a.command}: terminated; outputs already written are complete, nothing was half-written", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if a.debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sdcompress {a.command}: error: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
