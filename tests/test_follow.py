"""ActivationDataset(follow=True): training while capturing. A capture runs in a real subprocess and this
process reads its store while it is written; every row arrives exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import ActivationDataset, CaptureConfig, CaptureEngine, open_store
from engine.errors import CaptureFailedError, FollowTimeoutError

from helpers import ragged_batch, tiny_model

JOB = Path(__file__).resolve().parent / "follow_job.py"
KEYS = ["layer_1/residual", "layer_0/mlp_hidden", "tokens/sequence", "tokens/position"]


def pairs_of(batches) -> list[tuple[int, int]]:
    return [pair for batch in batches
            for pair in zip(batch["tokens/sequence"].tolist(), batch["tokens/position"].tolist())]


def assert_each_stored_row_once(path, batches, keys):
    store = open_store(path)
    pairs = pairs_of(batches)
    stored = list(zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist()))
    assert len(pairs) == len(set(pairs)) and sorted(pairs) == sorted(stored)
    index = {pair: row for row, pair in enumerate(stored)}
    rows = [index[pair] for pair in pairs]
    for key in keys:
        np.testing.assert_array_equal(torch.cat([b[key] for b in batches]).numpy(),
                                      store[key][:][rows].astype(np.float32), err_msg=key)


def test_follow_reads_every_row_of_a_capture_in_progress_once(tmp_path):
    path, gate = tmp_path / "s.zarr", tmp_path / "gate"
    job = subprocess.Popen([sys.executable, str(JOB), str(path), str(gate), "60"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        data = ActivationDataset(path, KEYS, batch_size=8, exclude=(), buffer_chunks=1, follow=True,
                                 follow_timeout=120)  # waits for the job to create the store and its arrays
        batches = iter(data)
        first = next(batches)
        assert job.poll() is None and open_store(path).status == "open"  # the job waits for the gate
        gate.touch()
        rest = list(batches)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
    finally:
        if job.poll() is None:
            job.kill()
    assert open_store(path).status == "complete"
    assert_each_stored_row_once(path, [first, *rest], KEYS[:2])


@pytest.fixture
def failed_store(tmp_path):
    path = tmp_path / "f.zarr"
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError, match="stop"):
        with CaptureEngine(model, CaptureConfig(path, layer_indices=[1], chunk_tokens=8)), torch.no_grad():
            for seed in range(4):
                model(**ragged_batch(3, 9, seed=seed))
            raise RuntimeError("stop")
    assert open_store(path).status == "failed"
    return path


def test_a_failed_capture_raises_after_its_committed_rows(failed_store):
    batches = []
    with pytest.raises(CaptureFailedError, match="failed"):
        for batch in ActivationDataset(failed_store, ["layer_1/residual", *KEYS[2:]], batch_size=5,
                                       exclude=(), follow=True):
            batches.append(batch)
    assert_each_stored_row_once(failed_store, batches, ["layer_1/residual"])


def test_an_idle_open_store_times_out_after_its_committed_rows(tmp_path):
    path = tmp_path / "o.zarr"
    model = tiny_model("gpt2")
    with CaptureEngine(model, CaptureConfig(path, layer_indices=[1], chunk_tokens=8)) as cap, torch.no_grad():
        for seed in range(3):
            model(**ragged_batch(3, 9, seed=seed))
        cap.flush()
        batches = []
        with pytest.raises(FollowTimeoutError, match="is the capture still running"):
            for batch in ActivationDataset(path, ["layer_1/residual", *KEYS[2:]], batch_size=4, exclude=(),
                                           follow=True, follow_timeout=0.3):
                batches.append(batch)
        assert len(pairs_of(batches)) == open_store(path).num_tokens  # every committed row, then the error


def test_followed_ranks_are_disjoint_and_cover_everything(failed_store):
    shares = []
    for rank in range(3):
        with pytest.raises(CaptureFailedError):
            for batch in ActivationDataset(failed_store, KEYS[2:], batch_size=4, rank=rank, world_size=3,
                                           exclude=(), follow=True):
                shares.append(batch)
    pairs = pairs_of(shares)
    assert len(pairs) == len(set(pairs)) == open_store(failed_store).num_tokens
