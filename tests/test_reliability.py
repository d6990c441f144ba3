"""Crash-consistent resume (real kill -9 of a real capture process), faults, and bad input."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine import CaptureConfig, CaptureEngine, open_store

from conftest import ragged_batch, tiny_model

JOB = Path(__file__).resolve().parent / "crash_job.py"
N_SEQUENCES = 90
ARRAYS = ["layer_0/residual", "layer_0/mlp_hidden", "layer_1/residual", "layer_1/mlp_hidden"]
TOKENS = ["tokens/input_ids", "tokens/sequence", "tokens/position", "tokens/flags"]


def run_job(store: Path, resume: bool, kill_after: float | None = None) -> str:
    """Run the job; with kill_after, SIGKILL it that many seconds after it starts capturing."""
    args = [sys.executable, str(JOB), str(store), str(N_SEQUENCES)] + (["--resume"] if resume else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read()
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return line


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_job(store, resume=False)
    return open_store(store)


def assert_same_store(store, reference):
    assert store.status == "complete"
    for key in TOKENS:
        np.testing.assert_array_equal(store[key][:], reference[key][:], err_msg=key)
    for key in ARRAYS:
        np.testing.assert_allclose(store[key][:].astype(np.float32), reference[key][:].astype(np.float32),
                                   rtol=1e-3, atol=1e-3, err_msg=key)
    pairs = set(zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist()))
    assert len(pairs) == store.num_tokens, "no duplicate (sequence, position)"


def crash_and_resume(tmp_path, rng, kills: int):
    store = tmp_path / "s.zarr"
    for attempt in range(kills):
        run_job(store, resume=attempt > 0, kill_after=rng.uniform(0.0, 0.9))
        assert open_store(store).status == "open", "the kill landed mid-run"
    run_job(store, resume=store.exists())
    return open_store(store)


@pytest.mark.parametrize("trial", range(5))
def test_kill_9_then_resume_equals_uninterrupted_run(trial, tmp_path, reference):
    store = crash_and_resume(tmp_path, random.Random(trial), kills=1 + trial % 2)
    assert_same_store(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5, 45))
def test_kill_9_many_trials(trial, tmp_path, reference):
    store = crash_and_resume(tmp_path, random.Random(trial), kills=1 + trial % 3)
    assert_same_store(store, reference)
