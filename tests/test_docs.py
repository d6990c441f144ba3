"""The commands in README.md and docs/ run: every documented command line parses with today's options, the
cheap ones run, and the README's first capture and reading (real SmolLM2 weights) run as written (slow)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(python (?:-m engine|benchmarks/\w+\.py) [^`]*)`")
BENCHMARKS = ROOT / "benchmarks"


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _command_lines(text: str) -> list[str]:
    """Shell lines of ``text``, continuations joined, comments dropped."""
    lines = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every ``python -m engine``, ``torchrun -m engine`` and ``python benchmarks/``
    command in a bash block or inline code span."""
    found = []
    for path in DOCUMENTS:
        lines = [line for block in _blocks(path, "bash") for line in _command_lines(block)]
        lines += INLINE.findall(path.read_text().replace("\n", " "))
        for line in lines:
            if re.search(r"(python|torchrun .*) -m engine |python benchmarks/\w+\.py", line):
                found.append((path.name, line))
    return found


def _argv(command: str) -> tuple[str, list[str]]:
    """Which parser reads ``command`` (``engine`` or a benchmark's path) and its arguments; ``...`` (an
    elided part) is left out."""
    words = [word for word in shlex.split(command) if word != "..."]
    if "-m" in words and words[words.index("-m") + 1] == "engine":
        return "engine", words[words.index("-m") + 2:]
    script = next(word for word in words if word.startswith("benchmarks/"))
    return script, words[words.index(script) + 1:]


def _benchmark_parser(script: str):
    spec = importlib.util.spec_from_file_location(f"_doc_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_the_documents_hold_commands():
    commands = documented_commands()
    assert len(commands) >= 15, commands
    assert {document for document, _ in commands} >= {"README.md", "cli.md", "distributed.md"}


@pytest.mark.parametrize("document, command", documented_commands())
def test_every_documented_command_parses(document, command):
    program, argv = _argv(command)
    parse = build_parser().parse_args if program == "engine" else _benchmark_parser(program)
    try:
        parse(argv)
    except SystemExit as exit:
        pytest.fail(f"{document}: `{command}` does not parse (exit {exit.code})")


def test_the_cheap_documented_commands_run():
    """The registry commands of the bash blocks (written to run as they are) need no weights and no store."""
    lines = [line for path in DOCUMENTS for block in _blocks(path, "bash") for line in _command_lines(block)]
    cheap = sorted({line for line in lines if " -m engine models" in line})
    assert cheap, "README or docs/cli.md shows `python -m engine models`"
    for command in cheap:
        argv = [sys.executable if word == "python" else word for word in shlex.split(command)]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stderr}"
        assert "gpt2" in result.stdout


def test_the_set_up_block_is_what_ci_runs():
    set_up = re.search(r"^## Set up\n(.*?)^## ", (ROOT / "README.md").read_text(), re.M | re.S).group(1)
    commands = _command_lines(_blocks_of(set_up)[0])
    assert len(commands) == 2 and '"torch==2.13.0"' in commands[0] and commands[1] == "python -m pytest"
    assert (ROOT / "README.md").read_text().count("\n") <= 150, "README is the front door: keep it short"


def _blocks_of(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == "bash"]


@pytest.mark.slow
def test_the_readme_first_capture_and_reading_run_as_written(tmp_path):
    """The README's capture commands, then its Python blocks in order, in a fresh folder (real weights)."""
    readme = (ROOT / "README.md").read_text()
    first = readme[readme.index("## A first capture"):]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's engine, whatever is installed
    for command in _command_lines(_blocks_of(first)[0]):
        argv = [sys.executable if word == "python" else word for word in shlex.split(command)]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stderr[-3000:]}"
    assert (tmp_path / "acts.zarr").is_dir()
    for index, block in enumerate(_blocks(ROOT / "README.md", "python")):
        script = tmp_path / f"readme_{index}.py"
        script.write_text("if __name__ == '__main__':\n"
                          + "".join(f"    {line}\n" for line in block.splitlines()))
        result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"README python block {index} failed:\n{result.stderr[-3000:]}"
