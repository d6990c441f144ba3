"""Test helpers: an independent reference capture to compare stored rows against, and float64 statistics."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engine import open_store
from engine.hookpoints import captured_tensor, resolve_hook_points
from engine.layout import FLAG_BOS, FLAG_FIRST


def hook_all(hook_points, record) -> list:
    """Plain forward hooks / pre-hooks of our own: ``record(key, tensor)`` gets what each point captures."""
    handles = []
    for hp in hook_points:
        if hp.capture == "input":
            handles.append(hp.module.register_forward_pre_hook(
                lambda module, args, hp=hp: record(hp.key, captured_tensor(hp, args, None))))
        else:
            handles.append(hp.module.register_forward_hook(
                lambda module, args, output, hp=hp: record(hp.key, captured_tensor(hp, args, output))))
    return handles


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
