"""manidp: train, evaluate, time and tabulate pruned networks (the benchmark's command line).

The top layer: each module of this package holds one group of commands and
imports the library below it; nothing below imports this package. Mistakes a
user can fix (unknown names, missing paths, malformed config, a flag or config
value of the wrong type or out of range, corrupt or unsafe files) print one
line and exit with status 2, before any work starts and before anything is
written.
"""
from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import warnings
from pathlib import Path

from manidp.cli import info, latency, report, train, tracking
from manidp.cli._command import Command, check_output_file
from manidp.errors import UserError

__all__ = ["main", "run", "build_parser", "COMMANDS", "INTERNAL_COMMANDS"]

#: Every subcommand, in the order ``manidp --help`` lists them.
COMMANDS: tuple[Command, ...] = (*train.COMMANDS, *info.COMMANDS, *tracking.COMMANDS, *latency.COMMANDS,
                                 *report.COMMANDS)
#: Steps the workflow runs for itself; a user never needs them.
INTERNAL_COMMANDS = tuple(c.name for c in COMMANDS if c.internal)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from manidp._version import __version__

    parser = _Parser(prog="manidp", description=__doc__.splitlines()[0],
                     epilog="Each command has its own --help. README.md has the full guide.")
    parser.add_argument("--version", action="version", version=f"manidp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        # argparse lists only subcommands given a help text: internal ones stay callable but unlisted.
        listed = {} if command.internal else {"help": command.help}
        p = sub.add_parser(command.name, description=command.help, **listed)
        p.set_defaults(func=command.run)
        command.add_arguments(p)
    return parser


# ----------------------------------------------------------------- flags, checked before any work
#: Lowest valid value of each numeric flag, by its argparse name, whichever subcommand defines it.
_FLAG_MINIMUM = {"threads": 1, "batch_size": 1, "instances": 1, "repeats": 1, "warmup": 0, "epochs": 0, "seed": 0,
                 "input_size": 1, "in_chans": 1, "num_classes": 1}
#: Flags naming a file a subcommand writes (train's --out is a folder, checked with the run's config).
_OUTPUT_FILES = ("out", "pareto", "difficulty")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_flags(args) -> None:
    """Type and range of every flag, whichever subcommand defines it."""
    for dest, value in vars(args).items():
        if dest in _FLAG_MINIMUM and value is not None and value < _FLAG_MINIMUM[dest]:
            raise UserError(f"{_flag(dest)} must be >= {_FLAG_MINIMUM[dest]}, got {value}")
        if dest == "budget" and value is not None and not 0 <= value < 1:
            raise UserError(f"--budget is a requested MACs reduction in [0, 1), got {value:g}")
        if dest in _OUTPUT_FILES and value and args.command != "train":
            check_output_file(_flag(dest), Path(value))


class _Terminated(SystemExit):
    """SIGTERM (Slurm's time limit, ``kill``): unwinds like an error does, so the run is closed as KILLED."""


def _raise_on_sigterm(signum, frame):
    raise _Terminated(128 + signum)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"manidp: warning: {message}", file=sys.stderr)


def _abort_open_runs(error: BaseException) -> None:
    tracking = sys.modules.get("manidp.tracking")
    if tracking is not None:
        tracking.abort_open_runs(error)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a usage error (one line already printed), --help or --version
        return stop.code if isinstance(stop.code, int) else 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.showwarning = _show_warning
            _check_flags(args)
            return args.func(args)
    except UserError as err:
        _abort_open_runs(err)
        print(f"manidp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as err:
        _abort_open_runs(err)
        print("manidp: interrupted; re-run the same command to resume", file=sys.stderr)
        return err.code if isinstance(err, _Terminated) else 130
    except BaseException as err:
        _abort_open_runs(err)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The ``manidp`` console script: :func:`main`, then exit without the interpreter's last garbage collections.

    Python's shutdown runs several full collections over every object still alive, and torch, timm and
    MLflow leave so many that this is a visible share of a short training job, which the default run
    starts dozens of (results/README, "Where the time goes"). Everything a command writes is closed and
    flushed before :func:`main` returns (``atexit`` handlers, logging's among them, still run), and Python
    never promised finalizers for objects alive at exit, so freezing them changes no output. :func:`main`
    alone, as tests and other in-process callers use it, leaves the collector untouched.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
