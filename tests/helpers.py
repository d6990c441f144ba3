"""Test helpers: an independent reference capture to compare stored rows against."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engine.hookpoints import captured_tensor, resolve_hook_points


@contextlib.contextmanager
def reference_capture(model, layers, points, extra_modules=None):
    """Record every point's full (batch, seq, dim) tensor per forward, with plain hooks of our own."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = []
    for hp in resolve_hook_points(model, layers, points, extra_modules or {}):
        def keep(tensor, key=hp.key):
            records.setdefault(key, []).append(tensor.detach().float().cpu().clone())

        if hp.capture == "input":
            handles.append(hp.module.register_forward_pre_hook(
                lambda m, args, hp=hp, keep=keep: keep(captured_tensor(hp, args, None))))
        else:
            handles.append(hp.module.register_forward_hook(
                lambda m, args, out, hp=hp, keep=keep: keep(captured_tensor(hp, args, out))))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def expected_rows(tensors: list[torch.Tensor], masks: list[torch.Tensor], dtype=torch.float16) -> np.ndarray:
    """Non-pad rows of each batch, in order, cast like the engine casts them."""
    rows = [t[m.bool()] for t, m in zip(tensors, masks)]
    return torch.cat(rows).to(dtype).float().numpy()
