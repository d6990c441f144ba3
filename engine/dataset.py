"""ActivationDataset: shuffled torch batches straight from a store, for SAE training."""

from __future__ import annotations

import itertools
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr

from . import layout
from .chunks import read_chunk
from .errors import CaptureFailedError, ConfigError, FollowTimeoutError
from .reader import open_store
from .sources import (
    ALIGNMENT_ARRAYS,
    Backoff,
    ChunkRef,
    Column,
    StoreLike,
    check_keys,
    check_same_corpus,
    check_same_tokens,
    columns_of,
    combined_status,
    open_stores,
    opener_waiting_for,
    shared_chunks,
)
from .store import open_array, open_group

_EXCLUDABLE = {**layout.FLAG_BITS, "pad": 0}  # pad rows are never stored: excluding them is a no-op
# Host buffer dtype per storage dtype (bfloat16 bits are read as int16 and viewed as bfloat16 per batch).
_BUFFER_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.int16}
# The token ids yielded with return_tokens travel through the buffer as one more column.
_TOKEN_IDS = Column("<return_tokens>", 0, "tokens/input_ids")


class ActivationDataset(torch.utils.data.IterableDataset):
    """Token-major rows of one or more arrays in random order, each committed row exactly once per epoch.

    Whole chunks are read in a random order, straight into one reused buffer of ``buffer_chunks`` chunks
    (uncompressed chunk files are read with one ``readinto``, others through zarr), each first checked
    against its commit record's size (and with ``verify`` its checksum); batches are gathered
    from the buffer in random order, and the leftover rows stay for the next fill. With several arrays, every
    array's chunk goes into its own buffer and one permutation gathers all of them: a batch holds the same
    tokens in every array. Chunks are split disjointly across DDP ranks, then across DataLoader workers.

    Args:
        store: a path, URL or open CaptureStore (only its committed chunks are read, as of construction;
            a multi-process store's parts are read as one). A mapping ``{name: store}`` zips captures of the
            same corpus row by row (two models, or base and fine-tuned: crosscoders): their chunking and their
            ``tokens/input_ids``, ``sequence`` and ``position`` must match (ConfigError naming the difference,
            checked per chunk as it is read); yielded keys are then ``{name}/{key}``.
        key: array path, e.g. ``layer_6/residual``; or a list of paths read together (a list may include
            per-token arrays such as ``tokens/sequence``, yielded as 1-D integer tensors).
        batch_size: rows per batch.
        shuffle: random chunk order and row mixing; False reads rows in store order.
        seed: base seed; the order depends on (seed, epoch).
        drop_last: drop each iterator's final short batch.
        exclude: flags whose rows are skipped: any of ``engine.layout.FLAG_BITS`` (``bos``, ``special``,
            ``first``, ``last``, ``doc_start``, ``outlier``; ``pad`` rows are never stored). Default
            (``layout.EXCLUDED_BY_DEFAULT``): attention sinks, i.e. BOS and each sequence's first token, and
            norm outliers, the rows the manifest statistics leave out too. Zipped stores use the first store's
            flags.
        dtype: dtype of the yielded activations (stored float16 / bfloat16 / float32 is converted).
        rank, world_size: DDP position; default from ``torch.distributed`` when initialized, else 0 and 1.
        buffer_chunks: chunks mixed together; memory is ``buffer_chunks + 1`` chunks of each array read.
        return_tokens: also yield the rows' token ids: ``(batch, input_ids)``.
        storage_options: fsspec options when a store is a URL.
        stack: yield one ``(batch, n_arrays, dim)`` tensor, arrays in ``key`` order (zipped stores: store
            after store), not a dict; the arrays must have one width (dictionary_learning's crosscoders).
        follow: read a store a capture is still writing: the constructor waits for the store and its arrays,
            iteration yields chunks as their commit records appear, sleeps with backoff while none is new,
            ends when the manifest says ``complete``; when it says ``failed`` (CaptureFailedError) or after
            ``follow_timeout`` (FollowTimeoutError) it raises, after yielding every committed row it read.
            Chunk (part p, index k) goes to rank ``s % world_size``, worker ``s // world_size`` where
            ``s = (k + p) % (world_size * num_workers)``; newly found chunks are read in random order, so the
            mix is that of the buffer (recent chunks): use a larger ``buffer_chunks``.
        follow_timeout: seconds without a new commit before FollowTimeoutError (a killed capture leaves its
            store ``open`` for ever); None waits for ever.
        verify: check each chunk's CRC32C against its commit record as it is read (one pass over the bytes
            read; sizes are checked always). A bad chunk raises StoreCorruptError and none of its rows is
            yielded.

    Returns (iterating): for one key, ``(batch_size, dim)`` tensors (the last may be shorter unless
    ``drop_last``); for a list of keys or zipped stores, a dict ``{key: (batch_size, dim)}``, or with
    ``stack`` a ``(batch_size, n_arrays, dim)`` tensor; with ``return_tokens``, ``(that, input_ids)``.

    Thread safety: one iterator per dataset object at a time. Works with ``DataLoader(num_workers>0)``:
    zarr handles are opened lazily inside each worker and are not pickled. Call ``set_epoch(e)`` before
    each epoch when using workers or several ranks (as with DistributedSampler); single-process iteration
    advances the epoch by itself.
    """

    def __init__(self, store: StoreLike | Mapping[str, StoreLike], key: str | Sequence[str],
                 batch_size: int = 4096, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 exclude: Sequence[str] = layout.EXCLUDED_BY_DEFAULT,
                 dtype: torch.dtype = torch.float32, rank: int | None = None, world_size: int | None = None,
                 buffer_chunks: int = 4, return_tokens: bool = False, storage_options: dict | None = None,
                 stack: bool = False, follow: bool = False, follow_timeout: float | None = 900.0,
                 verify: bool = False):
        keys = [key] if isinstance(key, str) else list(key)
        _check_arguments(keys, exclude, batch_size, buffer_chunks)
        rank, world_size = _ddp_position(rank, world_size)
        opener = {"opener": opener_waiting_for(keys, Backoff(follow_timeout))} if follow else {}
        names, opened = open_stores(store, storage_options, **opener)
        self.single = names == [None] and isinstance(key, str)  # today's form: tensors, not dicts
        for name, one in zip(names, opened):
            check_keys(name, one, keys, tokens_allowed=not self.single)
        check_same_corpus(names, opened)
        self.columns = columns_of(names, keys)
        self.path = opened[0].path
        self.parts = [part.location for part in opened[0].parts]
        self.key = key
        self.store_names = names
        self.dims = {c.name: opened[c.store][c.key].shape[1] for c in self.columns if not c.is_token_array}
        widths = set(self.dims.values())
        self.dim = widths.pop() if len(widths) == 1 else None  # the activations' width when they share one
        if stack and (self.dim is None or len(self.dims) < len(self.columns)):
            raise ConfigError(f"stack=True needs activation arrays of one width, got {self.dims} for "
                              f"{[c.name for c in self.columns]}: drop stack to get a dict by key")
        self.storage_dtypes = [one.manifest.dtype for one in opened]
        self.storage_dtype = self.storage_dtypes[0]
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.exclude_mask = sum(_EXCLUDABLE[name] for name in exclude)
        self.dtype, self.rank, self.world_size = dtype, rank, world_size
        self.buffer_chunks, self.return_tokens, self.stack = buffer_chunks, return_tokens, stack
        self.follow, self.follow_timeout, self.verify = follow, follow_timeout, verify
        self._reads = self._read_order(len(opened))
        # (part, chunk index within the part, rows, files) of every committed chunk every store has
        self.chunks = shared_chunks(names, opened, self._reads)
        self.chunk_rows = (opened[0].manifest.chunk_tokens if follow
                           else max((chunk.rows for chunk in self.chunks), default=1))
        self.epoch = 0
        self._epoch_set = False
        self._locations = [one.location for one in opened]
        self._part_locations = [[part.location for part in one.parts] for one in opened]
        self._token_dtypes = {c.name: _torch_dtype(opened[c.store][c.key].dtype) for c in self._buffered()
                              if c.is_token_array}
        self._handles: dict[tuple[int, int], dict[str, zarr.Array]] = {}
        self._handles_pid = os.getpid()
        if len(self._locations) > 1 and self.chunks:
            self._check_alignment(self.chunks[0])  # fail early; every chunk is checked again as it is read

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

    def endless_batches(self, device: str | torch.device = "cpu", num_workers: int = 0) -> Iterator:
        """Batches for ever, already on ``device``: epochs 0, 1, 2, ... follow each other, each in its own
        order. On a CUDA device, batches are copied from pinned host memory with ``non_blocking`` (PyTorch's
        pinned allocator keeps each host buffer until its copy is done). What SAELens' ``SAETrainer``
        (``data_provider``) and dictionary_learning's ``trainSAE(data=...)`` iterate.

        Args:
            device: where batches go (the trainer's device).
            num_workers: DataLoader worker processes gathering batches beside the training loop (0: in it).

        Returns: an endless iterator of what iterating the dataset yields, on ``device``.

        Raises:
            ConfigError: an epoch yielded nothing (no committed rows left after ``exclude``, ``drop_last``).
        """
        device = torch.device(device)
        pinned = device.type == "cuda"
        loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers,
                                             pin_memory=pinned)
        for epoch in itertools.count(self.epoch):
            self.set_epoch(epoch)
            empty = True
            for batch in loader:
                empty = False
                yield _to_device(batch, device, non_blocking=pinned)
            if empty:
                raise ConfigError(f"epoch {epoch} of {self.path} yielded no batch: the store has no "
                                  "committed rows left after exclude / drop_last (or none for this rank)")

    def _read_order(self, stores: int) -> list[tuple[int, str]]:
        """Every (store, array) read, in the order of each chunk's ``files``: the columns, the flags, and for
        zipped stores the arrays that must match."""
        reads = [(c.store, c.key) for c in self._buffered()] + [(0, "tokens/flags")]
        if stores > 1:
            reads += list(itertools.product(range(stores), ALIGNMENT_ARRAYS))
        return list(dict.fromkeys(reads))

    def _buffered(self) -> list[Column]:
        """The columns the mixing buffer holds: the yielded arrays, and the token ids of ``return_tokens``."""
        return self.columns + ([_TOKEN_IDS] if self.return_tokens else [])

    def _arrays(self, store: int, part: int) -> dict[str, zarr.Array]:
        # a forked worker (not pickled) must not use the parent's handles
        if self._handles_pid != os.getpid():
            self._handles, self._handles_pid = {}, os.getpid()
        if (store, part) not in self._handles:  # each lookup reads metadata: once per part and process
            group = open_group(self._part_locations[store][part])
            self._handles[(store, part)] = {key: open_array(group, key) for number, key in self._reads
                                            if number == store}
        return self._handles[(store, part)]

    def _read(self, store: int, key: str, chunk: ChunkRef, out: np.ndarray) -> None:
        """One chunk of one array into ``out``, checked (StoreCorruptError: none of its rows is kept)."""
        file = chunk.files[self._reads.index((store, key))]
        read_chunk(self._arrays(store, chunk.part)[key], chunk.index, file, out, self.verify)

    def _load(self, chunk: ChunkRef, buffer: _MixingBuffer) -> None:
        """Read one chunk of every column into the buffer's free rows, keeping the rows not excluded."""
        for column in self._buffered():
            self._read(column.store, column.key, chunk, buffer.free_rows(column.name, chunk.rows))
        if len(self._locations) > 1:
            self._check_alignment(chunk)
        if not self.exclude_mask:
            buffer.add(chunk.rows)
            return
        flags = np.empty(chunk.rows, dtype=np.uint8)
        self._read(0, "tokens/flags", chunk, flags)
        buffer.add(chunk.rows, torch.from_numpy(np.flatnonzero((flags & self.exclude_mask) == 0)))

    def _check_alignment(self, chunk: ChunkRef) -> None:
        """Zipped stores: the chunk's token arrays are equal in every store (ConfigError otherwise)."""
        tokens = [{} for _ in self._locations]
        for store, key in itertools.product(range(len(self._locations)), ALIGNMENT_ARRAYS):
            tokens[store][key] = np.empty(chunk.rows, dtype=layout.TOKEN_ARRAYS[key])
            self._read(store, key, chunk, tokens[store][key])
        check_same_tokens(self.store_names, chunk, tokens)

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        if not self._epoch_set:
            self.epoch += 1  # single process: each pass is a new epoch
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, epoch, self.rank, worker]).integers(2**62)))
        # One buffer reused for the whole pass: chunks are read straight into it, batches gathered out of it.
        limit = max(self.buffer_chunks * self.chunk_rows, self.batch_size)  # a batch must fit the buffer
        buffer = _MixingBuffer({c.name: self._row_type(c) for c in self._buffered()}, limit + self.chunk_rows,
                               generator if self.shuffle else None)
        chunks = (self._followed_chunks(epoch, worker, num_workers) if self.follow
                  else (self.chunks[index] for index in self.my_chunks(epoch, worker, num_workers)))
        stopped = None
        try:
            for chunk in chunks:
                self._load(chunk, buffer)
                if buffer.filled >= limit:
                    yield from map(self._output, buffer.batches(self.batch_size, False, self.drop_last))
        except (CaptureFailedError, FollowTimeoutError) as error:  # following: the rows read are valid
            stopped = error
        yield from map(self._output, buffer.batches(self.batch_size, True, self.drop_last))
        if stopped is not None:
            raise stopped

    def _followed_chunks(self, epoch: int, worker: int, num_workers: int) -> Iterator[ChunkRef]:
        """This rank's / worker's chunks of a store being written, as they are committed, until it completes.

        Each poll opens the stores afresh: the manifest first, then the commit records, so a store that says
        ``complete`` already shows every chunk it committed."""
        slots, slot = self.world_size * num_workers, self.rank + self.world_size * worker
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        backoff = Backoff(self.follow_timeout)
        seen: set[tuple[int, int]] = set()
        while True:
            stores = [open_store(location) for location in self._locations]
            fresh = [chunk for chunk in shared_chunks(self.store_names, stores, self._reads)
                     if (chunk.index + chunk.part) % slots == slot and (chunk.part, chunk.index) not in seen]
            if fresh:
                self._handles = {}  # the arrays grew since they were opened
                seen.update((chunk.part, chunk.index) for chunk in fresh)
                order = rng.permutation(len(fresh)) if self.shuffle else range(len(fresh))
                yield from (fresh[i] for i in order)
                backoff.progressed()
                continue
            status = combined_status(stores)
            if status == layout.STATUS_COMPLETE:
                return
            if status == layout.STATUS_FAILED:
                errors = "; ".join(str(one.manifest.error) for one in stores if one.status == "failed")
                raise CaptureFailedError(f"the capture writing {self.path} failed ({errors}); the rows of "
                                         f"its {len(seen)} committed chunks of this rank / worker came first")
            backoff.wait(f"a new chunk in {self.path}")

    def _row_type(self, column: Column) -> tuple[torch.dtype, tuple[int, ...]]:
        if column.is_token_array:
            return self._token_dtypes[column.name], ()
        return _BUFFER_DTYPES[self.storage_dtypes[column.store]], (self.dims[column.name],)

    def _output(self, gathered: dict[str, torch.Tensor]):
        """One batch as the caller asked for it: a tensor, a dict by key, or stacked; with token ids."""
        values = {c.name: self._convert(c, gathered[c.name]) for c in self.columns}
        if self.single:
            out = values[self.columns[0].name]
        elif self.stack:
            out = torch.stack(list(values.values()), dim=1)
        else:
            out = values
        return (out, gathered[_TOKEN_IDS.name]) if self.return_tokens else out

    def _convert(self, column: Column, batch: torch.Tensor) -> torch.Tensor:
        if column.is_token_array:
            return batch
        if self.storage_dtypes[column.store] == "bfloat16":
            batch = batch.view(torch.bfloat16)
        return batch if batch.dtype == self.dtype else batch.to(self.dtype)


class _MixingBuffer:
    """The rows of every column, mixed together: a chunk is read into the free rows at the end, whole batches
    are gathered out in random order, and the rows left over move to the front for the next fill. One
    permutation serves every column, so a batch holds the same tokens in each.

    Args:
        columns: {name: (dtype, shape of one row)}.
        capacity: rows per column, allocated once.
        generator: the permutations' random source; None keeps store order.

    Thread safety: one thread.
    """

    def __init__(self, columns: dict[str, tuple[torch.dtype, tuple[int, ...]]], capacity: int,
                 generator: torch.Generator | None):
        self.tensors = {name: torch.empty((capacity, *row), dtype=dtype)
                        for name, (dtype, row) in columns.items()}
        self.generator = generator
        self.filled = 0

    def free_rows(self, name: str, rows: int) -> np.ndarray:
        """The next ``rows`` unfilled rows of one column, as numpy (a chunk is read straight into them)."""
        return self.tensors[name][self.filled:self.filled + rows].numpy()

    def add(self, rows: int, keep: torch.Tensor | None = None) -> None:
        """The ``rows`` just read are filled; with ``keep`` (indices among them), only those, moved up."""
        if keep is not None:
            start = self.filled
            for tensor in self.tensors.values():
                tensor[start:start + keep.numel()] = tensor[start:start + rows].index_select(0, keep)
            rows = keep.numel()
        self.filled += rows

    def batches(self, batch_size: int, final: bool, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Whole batches of the filled rows in mixed order (and, if ``final``, the short rest unless
        ``drop_last``); the rows left over stay, at the front."""
        order = (torch.randperm(self.filled, generator=self.generator) if self.generator is not None
                 else torch.arange(self.filled))
        whole = self.filled // batch_size * batch_size
        cuts = list(range(0, whole, batch_size))
        if final and whole < self.filled and not drop_last:
            cuts.append(whole)
        for start in cuts:
            picked = order[start:start + batch_size]
            yield {name: tensor.index_select(0, picked) for name, tensor in self.tensors.items()}
        rest = order[:0] if final else order[whole:]
        for tensor in self.tensors.values():
            tensor[:rest.numel()] = tensor.index_select(0, rest)
        self.filled = rest.numel()


def _check_arguments(keys: list[str], exclude: Sequence[str], batch_size: int, buffer_chunks: int) -> None:
    unknown = set(exclude) - set(_EXCLUDABLE)
    if unknown:
        raise ConfigError(f"exclude={sorted(unknown)}: choose from {', '.join(_EXCLUDABLE)}")
    if batch_size <= 0 or buffer_chunks <= 0:
        raise ConfigError("batch_size and buffer_chunks must be positive")
    if not keys:
        raise ConfigError("key is an empty list: name at least one array, e.g. 'layer_6/residual'")


def _ddp_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if initialized else 0
        world_size = torch.distributed.get_world_size() if initialized else 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _to_device(batch, device: torch.device, non_blocking: bool):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: _to_device(value, device, non_blocking) for key, value in batch.items()}
    return tuple(_to_device(value, device, non_blocking) for value in batch)
