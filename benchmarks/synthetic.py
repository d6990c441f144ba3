"""A synthetic model for pipeline benchmarks: emits known (batch, seq, dim) float16 activations at a chosen
pace, so writer throughput and backpressure are measured through the real engine without model compute; and
stores captured from it, for the reader's benchmark and tests."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engine import CaptureConfig, CaptureEngine


def row_values(n_rows: int, batch_tokens: int) -> np.ndarray:
    """Value of every element of stored row r: its index within its batch (exact in float16)."""
    return (np.arange(n_rows) % batch_tokens % 2048).astype(np.float16)


class SyntheticModel(torch.nn.Module):
    """``forward(input_ids, attention_mask=None)`` emits, at each named ``nn.Identity`` point (hook it through
    ``extra_modules={name: "points." + name}``), a contiguous float16 block whose rows hold ``row_values``.
    ``seconds_per_batch`` sleeps in each forward, standing in for compute time.
    """

    def __init__(self, dims: dict[str, int], batch_size: int, seq_len: int, seconds_per_batch: float = 0.0):
        super().__init__()
        self.points = torch.nn.ModuleDict({name: torch.nn.Identity() for name in dims})
        values = torch.from_numpy(row_values(batch_size * seq_len, batch_size * seq_len))
        self.blocks = {name: values.view(batch_size, seq_len, 1).expand(-1, -1, dim).contiguous()
                       for name, dim in dims.items()}
        self.seconds_per_batch = seconds_per_batch

    def forward(self, input_ids, attention_mask=None):
        if self.seconds_per_batch:
            time.sleep(self.seconds_per_batch)
        for name, block in self.blocks.items():
            self.points[name](block)
        return None


def synthetic_store(path: Path, dim: int, batch: int, seq_len: int, forwards: int, chunk_tokens: int,
                    dtype: str = "float16") -> Path:
    """A capture store of one array, ``extra/x`` (``dim`` wide, stored in ``dtype``), of ``forwards`` batches
    of ``batch`` sequences of ``seq_len`` tokens, through the real engine."""
    model = SyntheticModel({"x": dim}, batch, seq_len)
    cfg = CaptureConfig(path, capture_residual=False, capture_mlp_hidden=False,
                        extra_modules={"x": "points.x"}, chunk_tokens=chunk_tokens, dtype=dtype)
    with CaptureEngine(model, cfg):
        for _ in range(forwards):
            model(input_ids=torch.zeros(batch, seq_len, dtype=torch.long))
    return Path(path)
