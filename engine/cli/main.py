"""Command line: ``python -m engine models | capture | inspect | report | align | export``.

A user error (a bad option, a missing or unreadable corpus, a bad record, options the model cannot take, a
store in the way) prints one line ``error: ...`` to stderr and exits with status 2; ``--debug`` shows the
traceback instead. Ctrl-C prints one line and exits with status 130. Arguments are parsed, and every check
that needs only them and the filesystem is made, before torch or transformers is imported: each command
imports what it runs with when it runs.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import capture, model_commands, store_commands
from engine.cli.arguments import CliParser, HelpFormatter
from engine.errors import CaptureClosedError, CaptureError, EngineError

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``python -m engine``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = CliParser(prog="python -m engine", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{models,capture,inspect,report,align,export}")
    model_commands.add_parser(commands, common)
    capture.add_parser(commands, common)
    store_commands.add_parsers(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user error, printed as one ``error:`` line; 130 when
    interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:  # while importing or loading, before a command has anything to say
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except (CaptureError, CaptureClosedError):  # failures of a run, not of its options: the traceback helps
        raise
    except EngineError as error:
        if args.debug:
            raise
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
