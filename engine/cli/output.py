"""How the commands print: sizes, tables, and a quiet end when a reader closes the output pipe."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable


def size_text(nbytes: int) -> str:
    """``1.23 GB``, ``12.3 MB`` or ``45.6 kB``."""
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:,.2f} GB"
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:,.1f} kB"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def closed_pipe_is_fine(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """For commands that only print: a reader that stops early (``inspect STORE | head``) ends the command
    quietly with status 0, as Unix tools do, instead of a BrokenPipeError traceback."""

    @functools.wraps(run)
    def quiet(args: argparse.Namespace) -> int:
        try:
            code = run(args)
            sys.stdout.flush()  # inside the try: a closed pipe shows on this flush
            return code
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail as well.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return quiet
