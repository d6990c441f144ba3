"""Test helpers: an independent reference capture to compare stored rows against, and float64 statistics."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import open_store
from engine.hookpoints import resolve_hook_points
from engine.layout import FLAG_BOS, FLAG_FIRST


def hook_all(hook_points, record) -> list:
    """Each point's own hook (``HookPoint.attach``), outside the engine: ``record(key, tensor)`` gets what
    each point captures. Returns the handles to remove."""
    return [hp.attach(functools.partial(record, hp.key)) for hp in hook_points]


@contextlib.contextmanager
def reference_capture(model, layers, points, extra_modules=None):
    """Record every point's full (batch, seq, dim) tensor per forward, with plain hooks of our own."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = hook_all(resolve_hook_points(model, layers, points, extra_modules or {}),
                       lambda key, t: records.setdefault(key, []).append(t.detach().float().cpu().clone()))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def expected_rows(tensors: list[torch.Tensor], masks: list[torch.Tensor], dtype=torch.float16) -> np.ndarray:
    """Non-pad rows of each batch, in order, cast like the engine casts them."""
    rows = [t[m.bool()] for t, m in zip(tensors, masks)]
    return torch.cat(rows).to(dtype).float().numpy()


def assert_statistics_match(path, key, dim):
    """The manifest's statistics equal float64 numpy over the stored rows, attention sinks left out."""
    store = open_store(path)
    stats = store.manifest["statistics"][key]
    sink = (store["tokens/flags"][:] & (FLAG_BOS | FLAG_FIRST)) != 0
    rows = store[key][:].astype(np.float64)[~sink]
    norms = np.linalg.norm(rows, axis=1)
    assert stats["count"] == len(rows) and stats["sink_rows"] == sink.sum() > 0 and stats["nonfinite"] == 0
    scale = np.abs(rows).max()  # float32 within small blocks, float64 across: ~1e-6 relative to the data
    np.testing.assert_allclose(stats["mean"], rows.mean(0), rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(stats["mean_squared_norm"], (norms ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["max_norm"], norms.max(), rtol=1e-6)
    np.testing.assert_allclose(stats["norm_scaling_factor"], np.sqrt(dim / (norms ** 2).mean()), rtol=1e-6)


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


JOB = Path(__file__).resolve().parent / "crash_job.py"
N_SEQUENCES = 90


def run_job(store, resume: bool, kill_after: float | None = None, ranks: int = 1, count: int = N_SEQUENCES) -> str:
    """Run crash_job.py (under torchrun, one process per rank, when ``ranks`` > 1). With ``kill_after``,
    SIGKILL every process of the job (launcher and workers) that many seconds after it starts capturing."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    args = [*launcher, str(JOB), str(store), str(count)] + (["--resume"] if resume else []) + (
        ["--distributed"] if ranks > 1 else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read()
    time.sleep(kill_after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return line


ARRAYS = ["layer_0/residual", "layer_0/mlp_hidden", "layer_1/residual", "layer_1/mlp_hidden"]
TOKENS = ["tokens/input_ids", "tokens/sequence", "tokens/position", "tokens/flags"]


def assert_same_store(store, reference):
    assert store.status == "complete"
    for key in TOKENS:
        np.testing.assert_array_equal(store[key][:], reference[key][:], err_msg=key)
    for key in ARRAYS:
        np.testing.assert_allclose(store[key][:].astype(np.float32), reference[key][:].astype(np.float32),
                                   rtol=1e-3, atol=1e-3, err_msg=key)
    pairs = set(zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist()))
    assert len(pairs) == store.num_tokens, "no duplicate (sequence, position)"


def crash_and_resume(store, rng, kills: int, ranks: int = 1, count: int = N_SEQUENCES):
    """Kill -9 the job ``kills`` times at random moments, resuming each time, then let it finish."""
    for attempt in range(kills):
        run_job(store, resume=attempt > 0, kill_after=rng.uniform(0.0, 0.9), ranks=ranks, count=count)
        assert open_store(store).status == "open", "the kill landed mid-run"
    run_job(store, resume=True, ranks=ranks, count=count)
    return open_store(store)
