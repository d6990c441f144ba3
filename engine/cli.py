"""Command line: ``python -m engine models`` (later: capture, inspect, align)."""

from __future__ import annotations

import argparse
import sys

from .registry import list_models


def _models(args: argparse.Namespace) -> int:
    header = ("name", "arch", "layers", "hidden", "mlp", "probe", "hf_repo_id")
    rows = [(s.name, s.architecture, str(s.num_layers), str(s.hidden_dim), str(s.mlp_dim),
             str(s.default_probe_layer), s.hf_repo_id) for s in list_models()]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the model registry").set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
