"""Running statistics of captured arrays, computed while capturing.

On CPU the writers compute each chunk's moments (``chunk_moments``). On CUDA every hook computes its
batch's moments on the device (``batch_moments``, a few reduction kernels, no synchronization) and they
travel with the rows: CPU writers next to a GPU must stay nearly idle, because their GIL and memory traffic
slow the thread that launches the model's kernels (H100 run 4: 2x slower 4x512 forwards with writer-side
statistics, 21% with none).

Per array: count of finite rows, mean vector, mean squared L2 norm (SAELens-style norm scaling:
``norm_scaling_factor = sqrt(dim) / sqrt(mean_squared_norm)``), max norm, and the non-finite and float16
overflow counts. Each chunk's moments (float32 within small blocks, float64 across them) are merged with
Chan et al.'s pairwise update in float64, so the result does not depend on which writer thread commits
which chunk first.
Rows holding any non-finite value are counted but left out of the moments, and so are attention-sink rows:
the first token of each sequence and any BOS (flags ``first`` / ``bos``). Their norms are orders of magnitude
above the rest (SmolLM2-135M's layer-15 residual: ~22,000 at position 0, median 173), SAE trainers exclude
them, and norm scaling must match. ``sink_rows`` counts them.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .layout import FLAG_BOS, FLAG_FIRST

SINK_FLAGS = FLAG_BOS | FLAG_FIRST


def point_stats(rows: torch.Tensor, float16_storage: bool) -> dict:
    """min/max of finite values, non-finite and float16-overflow (inf) counts of one chunk's rows."""
    if rows.numel() == 0:
        return {"min": None, "max": None, "nonfinite": 0, "fp16_overflow": 0}
    low, high = torch.aminmax(rows)
    if torch.isfinite(low) and torch.isfinite(high):  # one pass in the common case
        return {"min": float(low), "max": float(high), "nonfinite": 0, "fp16_overflow": 0}
    finite = torch.isfinite(rows)
    values = rows[finite]
    return {"min": float(values.min()) if values.numel() else None,
            "max": float(values.max()) if values.numel() else None,
            "nonfinite": int(rows.numel() - finite.sum()),
            "fp16_overflow": int(torch.isinf(rows).sum()) if float16_storage else 0}


class RunningMoments:
    """Mergeable moments of one array. Thread safety: ``merge`` under the caller's lock (see Statistics)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.mean_squared_norm = 0.0
        self.max_norm = 0.0
        self.nonfinite = 0
        self.fp16_overflow = 0
        self.sink_rows = 0

    def merge(self, count: int, mean: np.ndarray, mean_squared_norm: float, max_norm: float) -> None:
        total = self.count + count
        if count == 0:
            return
        weight = count / total
        self.mean += (mean - self.mean) * weight
        self.mean_squared_norm += (mean_squared_norm - self.mean_squared_norm) * weight
        self.max_norm = max(self.max_norm, max_norm)
        self.count = total

    @classmethod
    def from_json(cls, entry: dict) -> RunningMoments:
        moments = cls(len(entry["mean"]))
        moments.count, moments.mean = entry["count"], np.asarray(entry["mean"], dtype=np.float64)
        moments.mean_squared_norm, moments.max_norm = entry["mean_squared_norm"], entry["max_norm"]
        moments.nonfinite, moments.fp16_overflow = entry["nonfinite"], entry["fp16_overflow"]
        moments.sink_rows = entry["sink_rows"]
        return moments

    def to_json(self) -> dict:
        dim = self.mean.shape[0]
        return {"count": self.count, "mean": self.mean.tolist(), "mean_squared_norm": self.mean_squared_norm,
                "max_norm": self.max_norm, "nonfinite": self.nonfinite, "fp16_overflow": self.fp16_overflow,
                "sink_rows": self.sink_rows,
                "norm_scaling_factor": (math.sqrt(dim / self.mean_squared_norm)
                                        if self.mean_squared_norm > 0 else None)}


BLOCK_BYTES = 1 << 20  # float32 temporaries are made block by block: bounded memory, L2-sized blocks


def chunk_moments(rows: torch.Tensor, excluded: torch.Tensor,
                  has_nonfinite: bool) -> tuple[int, np.ndarray, float, float]:
    """(count, mean, mean squared norm, max norm) of one chunk's rows, leaving out ``excluded`` rows and
    rows holding non-finite values.

    Sums run in float32 within blocks of at most BLOCK_BYTES (tens of rows; torch sums pairwise) and in
    float64 across blocks and chunks: within ~1e-6 relative of float64 throughout, at a fifth of the cost of
    float64 blocks (which made statistics the writers' bottleneck: 0.3 GB/s per thread). Left-out rows are
    zeroed in the block copy, never gathered out of the chunk.
    """
    count, dim = rows.shape
    total = torch.zeros(dim, dtype=torch.float64)
    squared_norm_sum, max_norm, kept = 0.0, 0.0, 0
    step = max(1, BLOCK_BYTES // (4 * dim))
    for start in range(0, count, step):
        block = rows[start:start + step].to(torch.float32, copy=True)  # never a view of the stored rows
        drop = excluded[start:start + step]
        if has_nonfinite:
            drop = drop | ~torch.isfinite(block).all(dim=1)
        if drop.any():
            block[drop] = 0.0
        kept += int(drop.numel() - drop.sum())
        total += block.sum(dim=0)
        norms = torch.linalg.vector_norm(block, dim=1)
        squared_norm_sum += float(norms.square_().sum(dtype=torch.float64))
        max_norm = max(max_norm, float(norms.max()) ** 0.5)
    if kept == 0:
        return 0, np.zeros(dim), 0.0, 0.0
    return kept, (total / kept).numpy(), squared_norm_sum / kept, max_norm


def attention_sinks(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, bos_id: int | None,
                    shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows left out of the moments: pad rows and attention sinks, flat bool; count of sink rows), on the
    inputs' device. Sinks are the rows the writers flag ``first`` or ``bos``."""
    real = (attention_mask != 0 if attention_mask is not None
            else torch.ones(shape, dtype=torch.bool, device=device))
    sink = real & (real.cumsum(1) == 1)
    if bos_id is not None and input_ids is not None:
        sink |= real & (input_ids == bos_id)
    return (~real | sink).reshape(-1), sink.sum()


MOMENTS_HEAD = 4  # batch_moments' layout: count, squared-norm sum, max norm, sink rows, then the sum vector


def batch_moments(rows: torch.Tensor, excluded: torch.Tensor, sink_rows: torch.Tensor) -> torch.Tensor:
    """One batch's moments as a float64 vector (layout: MOMENTS_HEAD), computed on the rows' device without
    synchronizing it. Rows whose float32 norm is not finite are left out, as ``chunk_moments`` leaves out
    rows holding non-finite values (the two differ only for finite rows with norms above ~1e38)."""
    if rows.shape[0] == 0:
        return torch.zeros(MOMENTS_HEAD + rows.shape[1], dtype=torch.float64, device=rows.device)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    keep = ~excluded & torch.isfinite(norms)
    kept_norms = torch.where(keep, norms, 0.0)
    total = torch.where(keep[:, None], rows, 0).sum(0, dtype=torch.float32)
    head = [keep.sum(), kept_norms.double().square().sum(), kept_norms.max(), sink_rows]
    return torch.cat([torch.stack([value.double() for value in head]), total.double()])


class Statistics:
    """Moments of every activation array of a run. Thread safety: ``add`` from any writer thread."""

    def __init__(self, dims: dict[str, int]):
        self._lock = threading.Lock()
        self.arrays = {key: RunningMoments(dim) for key, dim in dims.items()}

    def add_rows(self, key: str, rows: torch.Tensor, flags: torch.Tensor, has_nonfinite: bool) -> None:
        """Merge the moments of stored rows (``flags``: their tokens/flags, for leaving attention sinks out)."""
        sink = (flags & SINK_FLAGS) != 0
        sink_rows = int(sink.sum())
        moments = chunk_moments(rows, sink, has_nonfinite)
        with self._lock:
            self.arrays[key].merge(*moments)
            self.arrays[key].sink_rows += sink_rows

    def add_batch(self, key: str, moments: torch.Tensor) -> None:
        """Merge a batch's moments computed by ``batch_moments`` (a host tensor)."""
        values = moments.numpy()
        count = int(values[0])
        mean = values[MOMENTS_HEAD:] / max(count, 1)
        with self._lock:
            self.arrays[key].merge(count, mean, float(values[1]) / max(count, 1), float(values[2]))
            self.arrays[key].sink_rows += int(values[3])

    def add_counts(self, key: str, nonfinite: int, fp16_overflow: int) -> None:
        """Count one chunk's non-finite values and float16 overflows."""
        with self._lock:
            self.arrays[key].nonfinite += nonfinite
            self.arrays[key].fp16_overflow += fp16_overflow

    def to_json(self) -> dict:
        with self._lock:
            return {key: moments.to_json() for key, moments in self.arrays.items()}


def merge_statistics(entries: list[dict]) -> dict:
    """Manifest statistics of several parts (``Statistics.to_json`` dicts) merged into one."""
    merged: dict[str, RunningMoments] = {}
    for stats in entries:
        for key, entry in stats.items():
            part = RunningMoments.from_json(entry)
            total = merged.setdefault(key, RunningMoments(len(part.mean)))
            total.merge(part.count, part.mean, part.mean_squared_norm, part.max_norm)
            total.nonfinite += part.nonfinite
            total.fp16_overflow += part.fp16_overflow
            total.sink_rows += part.sink_rows
    return {key: moments.to_json() for key, moments in merged.items()}


def decode(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows as a torch tensor of the capture dtype (bfloat16 is stored as uint16 bits)."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows))
    return tensor.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else tensor


def rebuild(arrays: dict, flags, rows: int, chunk_tokens: int, dtype: str) -> Statistics:
    """Statistics of rows [0, rows) of stored arrays (resume: one read of the kept whole chunks)."""
    stats = Statistics({key: array.shape[1] for key, array in arrays.items()})
    for start in range(0, rows, chunk_tokens):
        stop = min(start + chunk_tokens, rows)
        chunk_flags = torch.from_numpy(flags[start:stop])
        for key, array in arrays.items():
            chunk = decode(array[start:stop], dtype)
            entry = point_stats(chunk, dtype == "float16")
            stats.add_rows(key, chunk, chunk_flags, entry["nonfinite"] > 0)
            stats.add_counts(key, entry["nonfinite"], entry["fp16_overflow"])
    return stats
