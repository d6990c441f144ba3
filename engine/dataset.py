"""ActivationDataset: shuffled torch batches straight from a store, for SAE training."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import zarr

from . import layout
from .errors import ConfigError
from .reader import CaptureStore, open_store
from .statistics import decode

_EXCLUDABLE = {**layout.FLAG_BITS, "pad": 0}  # pad rows are never stored: excluding them is a no-op
_PREFETCH_CHUNKS = 2


class ActivationDataset(torch.utils.data.IterableDataset):
    """Token-major rows of one array in random order, each committed row exactly once per epoch.

    Whole chunks are read in a random order (one read per chunk, prefetched in a background thread) and
    their rows mixed in an in-memory buffer of ``buffer_chunks`` chunks before batches are cut from it.
    Chunks are split disjointly across DDP ranks, then across DataLoader workers.

    Args:
        store: a path or an open CaptureStore (only its committed chunks are read, as of construction).
        key: array path, e.g. ``layer_6/residual``.
        batch_size: rows per batch.
        shuffle: random chunk order and row mixing; False reads rows in store order.
        seed: base seed; the order depends on (seed, epoch).
        drop_last: drop each iterator's final short batch.
        exclude: flags whose rows are skipped: any of ``bos``, ``special``, ``first``, ``last`` (``pad``
            rows are never stored).
        dtype: dtype of the yielded tensors (stored float16 / bfloat16 / float32 is converted).
        rank, world_size: DDP position; default from ``torch.distributed`` when initialized, else 0 and 1.
        buffer_chunks: chunks mixed together; memory is ``buffer_chunks + 2`` chunks of this array.
        return_tokens: also yield the rows' token ids: ``(activations, input_ids)``.

    Returns (iterating): ``(batch_size, dim)`` tensors (the last may be shorter unless ``drop_last``).

    Thread safety: one iterator per dataset object at a time. Works with ``DataLoader(num_workers>0)``:
    zarr handles are opened lazily inside each worker and are not pickled. Call ``set_epoch(e)`` before
    each epoch when using workers or several ranks (as with DistributedSampler); single-process iteration
    advances the epoch by itself.
    """

    def __init__(self, store: str | os.PathLike | CaptureStore, key: str, batch_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, exclude: Sequence[str] = ("bos",),
                 dtype: torch.dtype = torch.float32, rank: int | None = None, world_size: int | None = None,
                 buffer_chunks: int = 4, return_tokens: bool = False):
        opened = store if isinstance(store, CaptureStore) else open_store(store)
        if key not in opened.keys() or key.startswith("tokens/"):
            raise ConfigError(f"{key!r} is not an activation array of {opened.path}: choose one of "
                              f"{', '.join(k for k in opened.keys() if not k.startswith('tokens/'))}")
        unknown = set(exclude) - set(_EXCLUDABLE)
        if unknown:
            raise ConfigError(f"exclude={sorted(unknown)}: choose from {', '.join(_EXCLUDABLE)}")
        if batch_size <= 0 or buffer_chunks <= 0:
            raise ConfigError("batch_size and buffer_chunks must be positive")
        if rank is None or world_size is None:
            initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if initialized else 0
            world_size = torch.distributed.get_world_size() if initialized else 1
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.path = Path(opened.path)
        self.key = key
        self.dim = opened[key].shape[1]
        self.storage_dtype = opened.manifest.get("dtype", "float16")
        self.chunks = [(c["row_start"], c["row_stop"]) for c in opened.chunks]
        self.chunk_rows = max((stop - start for start, stop in self.chunks), default=1)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.exclude_mask = sum(_EXCLUDABLE[name] for name in exclude)
        self.dtype, self.rank, self.world_size = dtype, rank, world_size
        self.buffer_chunks, self.return_tokens = buffer_chunks, return_tokens
        self.epoch = 0
        self._epoch_set = False
        self._group: zarr.Group | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_group"] = None  # reopened lazily in each worker process
        return state

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration uses (call it on every rank before each epoch)."""
        self.epoch, self._epoch_set = epoch, True

    def my_chunks(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Indices of the chunks this rank / worker reads in an epoch, in reading order."""
        order = np.arange(len(self.chunks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return order[self.rank::self.world_size][worker::num_workers].tolist()

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        start, stop = self.chunks[index]
        rows = decode(self._group[self.key][start:stop], self.storage_dtype)
        ids = torch.from_numpy(self._group["tokens/input_ids"][start:stop]) if self.return_tokens else None
        if self.exclude_mask:
            keep = torch.from_numpy((self._group["tokens/flags"][start:stop] & self.exclude_mask) == 0)
            rows = rows[keep]
            ids = ids[keep] if ids is not None else None
        return rows.to(self.dtype), ids

    def _parts(self, chunks: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Read chunks in order, keeping at most _PREFETCH_CHUNKS reads in flight on a background thread."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(self._read, i) for i in chunks[:_PREFETCH_CHUNKS]]
            for following in chunks[_PREFETCH_CHUNKS:] + [None] * len(pending):
                part = pending.pop(0).result()
                if following is not None:
                    pending.append(pool.submit(self._read, following))
                yield part

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        if not self._epoch_set:
            self.epoch += 1  # single process: each pass is a new epoch
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, self.rank, worker])
                                                      .integers(2**62)))
        limit = self.buffer_chunks * self.chunk_rows
        buffer, buffered = [], 0
        for part in self._parts(self.my_chunks(epoch, worker, num_workers)):
            buffer.append(part)
            buffered += part[0].shape[0]
            if buffered >= limit:
                remainder = yield from self._emit(buffer, generator)
                buffer, buffered = [remainder], remainder[0].shape[0]
        if not buffer:
            return
        rows, ids = yield from self._emit(buffer, generator)
        if rows.shape[0] and not self.drop_last:
            yield (rows, ids) if self.return_tokens else rows

    def _emit(self, buffer, generator):
        """Mix the buffered rows and yield whole batches; returns the rows left over."""
        rows = torch.cat([part[0] for part in buffer])
        ids = torch.cat([part[1] for part in buffer]) if self.return_tokens else None
        if self.shuffle:
            order = torch.randperm(rows.shape[0], generator=generator)
            rows = rows[order]
            ids = ids[order] if ids is not None else None
        whole = rows.shape[0] // self.batch_size * self.batch_size
        for start in range(0, whole, self.batch_size):
            batch = rows[start:start + self.batch_size]
            yield (batch, ids[start:start + self.batch_size]) if self.return_tokens else batch
        return rows[whole:], ids[whole:] if ids is not None else None
