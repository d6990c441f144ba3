"""The torch boundary: the store format, the store, the writer process, the readers' core and the report
import and run without torch or transformers, in child processes where both are hidden."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

import engine
from engine import CaptureConfig, CaptureEngine, open_store

from helpers import assert_store_rows, ragged_batch, reference_capture, tiny_model

HIDDEN = ("torch", "transformers")
TORCH_FREE_PACKAGES = ("engine.format", "engine.store", "engine.writer", "engine.report")
TORCH_FREE_MODULES = ("engine.errors", "engine.read.reader", "engine.read.sources", "engine.read.window")

# Imports each module named on its command line; prints the failures and the hidden packages loaded.
IMPORT_ALL = """
import importlib, json, sys
failures = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures[name] = f"{type(exc).__name__}: {exc}"
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in HIDDEN)
print(json.dumps({"failures": failures, "loaded": loaded}))
"""


def _hide(folder: Path) -> Path:
    """Packages named torch and transformers in ``folder``, to put first on a child process's path: their
    import fails, and is logged with the engine's frames that asked for it (so an import whose ImportError
    the engine catches is seen too). Returns the log's path."""
    log = folder / "imports.log"
    engine_dir = str(Path(engine.__file__).parent)
    for name in HIDDEN:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            "import traceback\n"
            f"frames = [f'{{f.filename}}:{{f.lineno}}' for f in traceback.extract_stack()"
            f" if f.filename.startswith({engine_dir!r})]\n"
            f"with open({str(log)!r}, 'a') as log:\n"
            "    log.write(f'{__name__} imported from {frames}\\n')\n"
            "raise ImportError(f'{__name__} is hidden: this process must not import it')\n")
    return log


def _imports_logged(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def torch_free_modules() -> list[str]:
    """Every module of the torch-free packages (found on disk, so a new one is checked too) and the
    torch-free modules of the mixed packages."""
    found = [info.name for package in TORCH_FREE_PACKAGES
             for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}.")]
    return [*TORCH_FREE_PACKAGES, *found, *TORCH_FREE_MODULES]


def test_the_torch_free_modules_are_found():
    modules = torch_free_modules()
    assert {"engine.format.layout", "engine.store.sink", "engine.writer.server", "engine.writer.__main__",
            "engine.report.plots"} <= set(modules), modules


def test_the_type_checker_covers_the_torch_free_modules():
    root = Path(engine.__file__).parent.parent
    mypy = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mypy"]
    checked = [root / entry for entry in mypy["files"]]
    sources = {name: Path(importlib.util.find_spec(name).origin) for name in torch_free_modules()}
    unchecked = [name for name, source in sources.items() if not any(map(source.is_relative_to, checked))]
    assert unchecked == [], f"add {unchecked} to [tool.mypy] files in pyproject.toml"


def test_the_torch_free_modules_import_without_torch(tmp_path):
    log = _hide(tmp_path / "hidden")
    path = os.pathsep.join(filter(None, [str(tmp_path / "hidden"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", f"HIDDEN = {HIDDEN!r}\n{IMPORT_ALL}", *torch_free_modules()],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failures"] == {}, json.dumps(result["failures"], indent=1)
    assert result["loaded"] == []
    assert _imports_logged(log) == ""


def test_the_writer_process_runs_a_capture_without_torch(tmp_path, monkeypatch):
    """The real writer process (``python -m engine.writer``, started with this process's path) writes a
    whole store with torch and transformers hidden: its imports, the sink it loads and the messages it
    unpickles need neither."""
    sinks = {path.partition(":")[0] for path in CaptureEngine.sink_factory.values()}
    assert sinks <= set(torch_free_modules()), "the sinks the writer process loads are checked above"
    model = tiny_model("gpt2")  # this process imports torch and transformers before they are hidden
    batches = [ragged_batch(4, 8, seed=seed) for seed in range(3)]
    log = _hide(tmp_path / "hidden")
    monkeypatch.syspath_prepend(str(tmp_path / "hidden"))  # this process has both already, its children not
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    with reference_capture(model, [0], list(cfg.points)) as ref, CaptureEngine(model, cfg), torch.no_grad():
        for batch in batches:
            model(**batch)
    assert _imports_logged(log) == ""
    assert open_store(cfg.output_dir).status == "complete"
    assert_store_rows(cfg.output_dir, ref, batches)


# The public names before the package was split into subpackages: every one keeps working as engine.<name>.
PUBLIC_NAMES = [
    "ADAPTERS", "ActivationCapture", "ActivationDataset", "BatchError", "CANONICAL_POINTS",
    "CaptureClosedError", "CaptureConfig", "CaptureEngine", "CaptureError", "CaptureFailedError",
    "CaptureStats", "CaptureStore", "CommittedArray", "ConfigError", "CorpusError", "DecodedArray",
    "EngineError", "FollowTimeoutError", "HookPoint", "HookPointError", "ModelSpec", "Report",
    "ResumeMismatchError", "StoreCorruptError", "StoreExistsError", "StoreFormatError", "StoreLockedError",
    "StorePathError", "UnknownModelError", "WeightsNotFoundError", "create_gpt2_capture", "get_model",
    "list_models", "load_model", "load_tokenizer", "open_store", "random_model", "resolve_hook_points",
    "write_report",
]


def test_every_public_name_of_the_flat_package_still_resolves():
    import engine
    from engine import compat

    assert sorted(PUBLIC_NAMES) == sorted(engine.__all__)
    for name in PUBLIC_NAMES:
        value = getattr(engine, name)
        assert getattr(value, "__module__", "engine").startswith("engine"), name
    assert compat.ActivationCapture is engine.CaptureEngine
    assert compat.create_gpt2_capture is engine.create_gpt2_capture
