"""Test helpers: an independent reference capture to compare stored rows against."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engine.hookpoints import captured_tensor, resolve_hook_points


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
