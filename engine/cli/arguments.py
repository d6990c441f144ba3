"""What every command's parser shares: usage errors as one line, help that shows the defaults, and the
argparse types, each refusing a bad value in the command line's own words. Nothing heavy is imported here:
``--help`` and a mistyped option answer at once."""

from __future__ import annotations

import argparse


class CliParser(argparse.ArgumentParser):
    """Usage errors as one line ``error: ...`` (exit status 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their examples keep their lines), and every option's default
    after its help, unless the help already names it or there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == []):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def positive_int(text: str) -> int:
    """argparse type of sizes: 0 or less would capture nothing (or, packing, never end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def layer_index(text: str) -> int:
    """argparse type of --layers: indices count from 0 (whether the model has the layer: on its config)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a layer index: give indices 0..N-1 for a model of N "
                                         "layers, e.g. --layers 0 5 11") from None
    return value


def ratio_or_none(text: str) -> float | None:
    """argparse type of --outlier-norm-ratio: a number, or ``none``."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 1 or 'none', got {text!r}") from None


def module_entry(text: str) -> tuple[str, str]:
    """argparse type of --extra-modules: ``name=module.path``."""
    name, equals, path = text.partition("=")
    if not (equals and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: write name=module.path, e.g. "
                                         "q=model.layers.0.self_attn.q_proj")
    return name, path
