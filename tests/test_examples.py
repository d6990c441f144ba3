"""The examples run against real stores."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import CaptureConfig, CaptureEngine, open_store

from helpers import ragged_batch, tiny_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ex") / "s.zarr"
    model = tiny_model("gpt2")
    with CaptureEngine(model, CaptureConfig(path, layer_indices=[1], chunk_tokens=64)), torch.no_grad():
        for seed in range(40):
            model(**ragged_batch(8, 32, seed=seed))
    return path


def test_sae_example_trains_stably_and_sparse(store, tmp_path):
    sae, run, evaluation = load_example("train_sae").train(str(store), "layer_1/residual", steps=150,
                                                           batch_size=128, out=str(tmp_path / "sae"))
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert max(run.losses[-50:]) < run.losses[0]  # no bounce back up
    assert evaluation.l0 <= sae.config.k < sae.config.d_sae and evaluation.fvu < 0.5
    assert {path.name for path in (tmp_path / "sae").iterdir()} == {"cfg.json", "sae_weights.safetensors"}


def test_dask_example_reads_the_store(store):
    pytest.importorskip("dask")
    out = subprocess.run([sys.executable, str(EXAMPLES / "read_with_dask.py"), str(store),
                          "layer_1/residual"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "status complete" in out.stdout and "mean norm" in out.stdout


def test_dictionary_learning_stream_follows_trainsae_contract(store):
    """trainSAE (dictionary_learning 0.1.0) runs ``for step, act in enumerate(data)``, casts ``act`` and uses
    it where it is, until ``steps``: more steps than one epoch holds must keep coming, on the device."""
    example = load_example("train_dictionary_learning")
    dim, data = example.activations(str(store), "layer_1/residual", "cpu", 512)
    steps = 3 * (open_store(store).num_tokens // 512)
    for step, act in enumerate(data):
        act = act.to(dtype=torch.float32)
        if step >= steps:
            break
        assert act.shape == (512, dim) and act.device.type == "cpu"
    assert step == steps
