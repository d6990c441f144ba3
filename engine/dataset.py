"""ActivationDataset: shuffled torch batches straight from a store, for SAE training."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
import zarr

from . import layout
from .errors import ConfigError
from .reader import CaptureStore, open_store
from .store import read_chunk_rows

_EXCLUDABLE = {**layout.FLAG_BITS, "pad": 0}  # pad rows are never stored: excluding them is a no-op
# Host buffer dtype per storage dtype (bfloat16 bits are read as int16 and viewed as bfloat16 per batch).
_BUFFER_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.int16}


class ActivationDataset(torch.utils.data.IterableDataset):
    """Token-major rows of one array in random order, each committed row exactly once per epoch.

    Whole chunks are read in a random order, straight into one reused buffer of ``buffer_chunks`` chunks
    (uncompressed chunk files are read with one ``readinto``, others through zarr); batches are gathered
    from the buffer in random order, and the leftover rows stay for the next fill.
    Chunks are split disjointly across DDP ranks, then across DataLoader workers.

    Args:
        store: a path, URL or open CaptureStore (only its committed chunks are read, as of construction;
            a multi-process store's parts are read as one).
        key: array path, e.g. ``layer_6/residual``.
        batch_size: rows per batch.
        shuffle: random chunk order and row mixing; False reads rows in store order.
        seed: base seed; the order depends on (seed, epoch).
        drop_last: drop each iterator's final short batch.
        exclude: flags whose rows are skipped: any of ``bos``, ``special``, ``first``, ``last`` (``pad``
            rows are never stored). Default: attention sinks, i.e. BOS and each sequence's first token,
            the rows the manifest statistics leave out too.
        dtype: dtype of the yielded tensors (stored float16 / bfloat16 / float32 is converted).
        rank, world_size: DDP position; default from ``torch.distributed`` when initialized, else 0 and 1.
        buffer_chunks: chunks mixed together; memory is ``buffer_chunks + 1`` chunks of this array.
        return_tokens: also yield the rows' token ids: ``(activations, input_ids)``.
        storage_options: fsspec options when ``store`` is a URL.

    Returns (iterating): ``(batch_size, dim)`` tensors (the last may be shorter unless ``drop_last``).

    Thread safety: one iterator per dataset object at a time. Works with ``DataLoader(num_workers>0)``:
    zarr handles are opened lazily inside each worker and are not pickled. Call ``set_epoch(e)`` before
    each epoch when using workers or several ranks (as with DistributedSampler); single-process iteration
    advances the epoch by itself.
    """

    def __init__(self, store: str | os.PathLike | CaptureStore, key: str, batch_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 exclude: Sequence[str] = ("bos", "first"),
                 dtype: torch.dtype = torch.float32, rank: int | None = None, world_size: int | None = None,
                 buffer_chunks: int = 4, return_tokens: bool = False, storage_options: dict | None = None):
        opened = store if isinstance(store, CaptureStore) else open_store(store, storage_options)
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
        self.path = opened.path
        self.parts = [part.location for part in opened.parts]
        self.key = key
        self.dim = opened[key].shape[1]
        self.storage_dtype = opened.manifest.get("dtype", "float16")
        # (part, chunk index within the part, rows) of every committed chunk
        self.chunks = [(number, index, record["token_count"]) for number, part in enumerate(opened.parts)
                       for index, record in enumerate(part.chunks)]
        self.chunk_rows = max((rows for _, _, rows in self.chunks), default=1)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.exclude_mask = sum(_EXCLUDABLE[name] for name in exclude)
        self.dtype, self.rank, self.world_size = dtype, rank, world_size
        self.buffer_chunks, self.return_tokens = buffer_chunks, return_tokens
        self.epoch = 0
        self._epoch_set = False
        self._handles: dict[int, tuple[zarr.Array, zarr.Array, zarr.Array]] = {}
        self._handles_pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # reopened lazily in each worker process
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

    def _arrays(self, part: int) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
        if self._handles_pid != os.getpid():  # a forked worker (not pickled) must not use the parent's handles
            self._handles, self._handles_pid = {}, os.getpid()
        if part not in self._handles:  # each lookup reads metadata: once per part and process
            group = zarr.open_group(self.parts[part].zarr_store(read_only=True), mode="r")
            self._handles[part] = (group[self.key], group["tokens/input_ids"], group["tokens/flags"])
        return self._handles[part]

    def _load(self, index: int, rows: torch.Tensor, ids: torch.Tensor | None, at: int) -> int:
        """Read one chunk's rows into ``rows[at:]`` (and ids), drop excluded ones; returns rows kept."""
        part, chunk, count = self.chunks[index]
        values, token_ids, flags = self._arrays(part)
        root = self.parts[part].local  # None for object stores: read through zarr
        read_chunk_rows(root, self.key, values, chunk, rows[at:at + count].numpy())
        if ids is not None:
            read_chunk_rows(root, "tokens/input_ids", token_ids, chunk, ids[at:at + count].numpy())
        if not self.exclude_mask:
            return count
        chunk_flags = np.empty(count, dtype=np.uint8)
        read_chunk_rows(root, "tokens/flags", flags, chunk, chunk_flags)
        keep = torch.from_numpy(np.flatnonzero((chunk_flags & self.exclude_mask) == 0))
        rows[at:at + keep.numel()] = rows[at:at + count].index_select(0, keep)
        if ids is not None:
            ids[at:at + keep.numel()] = ids[at:at + count].index_select(0, keep)
        return keep.numel()

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        if not self._epoch_set:
            self.epoch += 1  # single process: each pass is a new epoch
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, self.rank, worker])
                                                      .integers(2**62)))
        # One buffer reused for the whole pass: chunks are read straight into it, batches gathered out of it.
        limit = max(self.buffer_chunks * self.chunk_rows, self.batch_size)  # a batch must fit the buffer
        rows = torch.empty(limit + self.chunk_rows, self.dim, dtype=_BUFFER_DTYPES[self.storage_dtype])
        ids = torch.empty(limit + self.chunk_rows, dtype=torch.int32) if self.return_tokens else None
        filled = 0
        for index in self.my_chunks(epoch, worker, num_workers):
            filled += self._load(index, rows, ids, filled)
            if filled >= limit:
                filled = yield from self._emit(rows, ids, filled, generator, final=False)
        yield from self._emit(rows, ids, filled, generator, final=True)

    def _emit(self, rows, ids, filled: int, generator, final: bool):
        """Yield whole batches of the buffer's rows in mixed order; keep the rest at its front."""
        order = torch.randperm(filled, generator=generator) if self.shuffle else torch.arange(filled)
        whole = filled // self.batch_size * self.batch_size
        cuts = list(range(0, whole, self.batch_size))
        if final and whole < filled and not self.drop_last:
            cuts.append(whole)
        for start in cuts:
            picked = order[start:start + self.batch_size]
            batch = self._convert(rows.index_select(0, picked))
            yield (batch, ids.index_select(0, picked)) if ids is not None else batch
        if final:
            return 0
        rest = order[whole:]
        rows[:rest.numel()] = rows.index_select(0, rest)
        if ids is not None:
            ids[:rest.numel()] = ids.index_select(0, rest)
        return rest.numel()

    def _convert(self, batch: torch.Tensor) -> torch.Tensor:
        if self.storage_dtype == "bfloat16":
            batch = batch.view(torch.bfloat16)
        return batch if batch.dtype == self.dtype else batch.to(self.dtype)
