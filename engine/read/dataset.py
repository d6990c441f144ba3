"""ActivationDataset: shuffled torch batches straight from a store, for SAE training."""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr

from engine.errors import CaptureFailedError, ConfigError, FollowTimeoutError
from engine.format import layout
from engine.format.chunks import (
    checksum_problem,
    corrupt_error,
    describe,
    local_plain,
    open_local_chunk,
    read_chunk,
)
from engine.format.encoding import SCALES_GROUP, encoding_of, scale_key
from engine.read.reader import open_store
from engine.read.sources import (
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
from engine.read.window import ChunkWindow, WindowColumn, slot_rows
from engine.store.access import open_array, open_group

_EXCLUDABLE = {**layout.FLAG_BITS, "pad": 0}  # pad rows are never stored: excluding them is a no-op
# Batch dtype per storage dtype (bfloat16 bits are gathered as int16 and viewed as bfloat16 per batch; 8-bit
# codes are gathered as they are, with their rows' scales in a column of their own, and decoded per batch).
_BATCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.int16,
                 "int8": torch.int8, "float8_e4m3": torch.uint8}
_FLOAT8 = getattr(torch, "float8_e4m3fn", None)
# The token ids yielded with return_tokens are gathered as one more column.
_TOKEN_IDS = Column("<return_tokens>", 0, "tokens/input_ids")
WINDOW_BYTES = 4 << 30  # the default window of mapped chunks, per rank and DataLoader worker
# Chunk files mapped per window (one per chunk and mapped array): two windows are mapped at once, each mapping
# splits its reserved range, and Linux allows 65,530 mappings per process (vm.max_map_count).
WINDOW_MAPPINGS = 8192


class ActivationDataset(torch.utils.data.IterableDataset):
    """Token-major rows of one or more arrays in random order, each committed row exactly once per epoch.

    Each epoch, this rank's / worker's chunks come in a random order, in windows: as many chunks as
    ``window_bytes`` of mapped chunk files and ``buffer_chunks`` chunks read into memory allow. Uncompressed
    chunks of a local store are mapped read-only, so they cost page cache, not process memory; compressed
    chunks and those of object stores are read into memory (each checked against its commit record's size,
    and with ``verify`` its checksum, before any of its rows is served). A window's rows, less the
    ``exclude``d ones, are permuted uniformly and cut into batches; the rows left at a window's end open the
    next window's first batch. So a store of up to ``window_bytes`` per rank and worker shuffles like uniform
    sampling. One permutation gathers every array (one numpy call per array and batch): a batch holds the
    same tokens in every array. The next window's files are read into the page cache while a window is
    served. Chunks are split disjointly across DDP ranks, then across DataLoader workers.

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
        exclude: flags whose rows are skipped: any of ``engine.format.layout.FLAG_BITS`` (``bos``,
            ``special``, ``first``, ``last``, ``doc_start``, ``outlier``; ``pad`` rows are never stored).
            Default (``layout.EXCLUDED_BY_DEFAULT``): attention sinks, i.e. BOS and each sequence's first
            token, and norm outliers, the rows the manifest statistics leave out too. Zipped stores use the
            first store's flags.
        dtype: dtype of the yielded activations (stored float16 / bfloat16 / float32 is converted).
        rank, world_size: DDP position; default from ``torch.distributed`` when initialized, else 0 and 1.
        buffer_chunks: chunks read into memory per window (compressed arrays, object stores): memory is
            ``buffer_chunks`` chunks of each such array. Mapped chunks do not count.
        return_tokens: also yield the rows' token ids: ``(batch, input_ids)``.
        storage_options: fsspec options when a store is a URL.
        stack: yield one ``(batch, n_arrays, dim)`` tensor, arrays in ``key`` order (zipped stores: store
            after store), not a dict; the arrays must have one width (dictionary_learning's crosscoders).
        follow: read a store a capture is still writing: the constructor waits for the store and its arrays,
            iteration yields chunks as their commit records appear, sleeps with backoff while none is new,
            ends when the manifest says ``complete``; when it says ``failed`` (CaptureFailedError) or after
            ``follow_timeout`` (FollowTimeoutError) it raises, after yielding every committed row it read.
            Chunk (part p, index k) goes to rank ``s % world_size``, worker ``s // world_size`` where
            ``s = (k + p) % (world_size * num_workers)``; each poll's new chunks form the next windows, so
            batches mix the recent chunks.
        follow_timeout: seconds without a new commit before FollowTimeoutError (a killed capture leaves its
            store ``open`` for ever); None waits for ever.
        verify: check each chunk's CRC32C against its commit record as it is read (one pass over the bytes
            read; sizes are checked always). A bad chunk raises StoreCorruptError and none of its rows is
            yielded.
        window_bytes: bytes of mapped chunk files (every array read) one window holds: page cache, not
            process memory (which is a few bytes per row of the window, and a batch). Rows mix uniformly
            within a window; every rank and worker on a machine has one, so keep their sum below its free
            memory (else the page cache drops rows before they are gathered, and reading them again is
            slow). Default 4 GiB.

    Returns (iterating): for one key, ``(batch_size, dim)`` tensors (the last may be shorter unless
    ``drop_last``); for a list of keys or zipped stores, a dict ``{key: (batch_size, dim)}``, or with
    ``stack`` a ``(batch_size, n_arrays, dim)`` tensor; with ``return_tokens``, ``(that, input_ids)``.

    Thread safety: one iterator per dataset object at a time (each runs one thread of its own that reads the
    next window ahead). Works with ``DataLoader(num_workers>0)``: zarr handles are opened lazily inside
    each worker and are not pickled, and windows belong to the iterator of the process that maps them.
    Call ``set_epoch(e)`` before each epoch when using workers or several ranks (as with
    DistributedSampler); single-process iteration advances the epoch by itself.
    """

    def __init__(self, store: StoreLike | Mapping[str, StoreLike], key: str | Sequence[str],
                 batch_size: int = 4096, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 exclude: Sequence[str] = layout.EXCLUDED_BY_DEFAULT,
                 dtype: torch.dtype = torch.float32, rank: int | None = None, world_size: int | None = None,
                 buffer_chunks: int = 4, return_tokens: bool = False, storage_options: dict | None = None,
                 stack: bool = False, follow: bool = False, follow_timeout: float | None = 900.0,
                 verify: bool = False, window_bytes: int = WINDOW_BYTES):
        keys = [key] if isinstance(key, str) else list(key)
        _check_arguments(keys, exclude, batch_size, buffer_chunks, window_bytes)
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
        self.window_bytes = window_bytes
        self._reads = self._read_order(len(opened))
        # (part, chunk index within the part, rows, files) of every committed chunk every store has
        self.chunks = shared_chunks(names, opened, self._reads)
        self.chunk_tokens = opened[0].manifest.chunk_tokens  # rows per chunk file (check_same_corpus: all)
        self.epoch = 0
        self._epoch_set = False
        self._locations = [one.location for one in opened]
        self._part_locations = [[part.location for part in one.parts] for one in opened]
        self._token_dtypes = {c.name: _torch_dtype(opened[c.store][c.key].dtype) for c in self._buffered()
                              if c.is_token_array}
        # which columns' chunks are mapped (the others are read into memory); the same in every part
        self._mapped = {c.name: local_plain(opened[c.store][c.key].pieces[0][0]) for c in self._buffered()}
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
        """The columns the mixing buffer holds: the yielded arrays, an 8-bit store's scales of them, and the
        token ids of ``return_tokens``."""
        scales = [_scale_column(c) for c in self.columns
                  if not c.is_token_array and encoding_of(self.storage_dtypes[c.store]) is not None]
        return self.columns + scales + ([_TOKEN_IDS] if self.return_tokens else [])

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

    @property
    def window_chunks(self) -> int:
        """Chunks per shuffle window (their rows are mixed uniformly), as the window's bounds allow, one at
        least: ``window_bytes`` of mapped chunk files, ``buffer_chunks`` chunks read into memory,
        WINDOW_MAPPINGS."""
        mapped = [c for c in self._buffered() if self._mapped[c.name]]
        most = [WINDOW_MAPPINGS // max(len(mapped), 1)]
        if mapped:
            most.append(self.window_bytes // (self.chunk_tokens * sum(self._window_column(c).row_bytes
                                                                      for c in mapped)))
        if len(mapped) < len(self._buffered()):
            most.append(self.buffer_chunks)
        return max(min(most), 1)

    def _windows(self, chunks: list[ChunkRef]) -> list[list[ChunkRef]]:
        """Consecutive runs of ``chunks``, each a window long (the last maybe shorter)."""
        step = self.window_chunks
        return [chunks[start:start + step] for start in range(0, len(chunks), step)]

    def _window_column(self, column: Column) -> WindowColumn:
        dtype, row_shape = self._row_type(column)
        return WindowColumn(column.name, torch.empty(0, dtype=dtype).numpy().dtype, row_shape)

    def _open_window(self, chunks: list[ChunkRef], after: ChunkWindow | None) -> ChunkWindow:
        """A window of ``chunks`` with their files mapped (checked: StoreCorruptError), read ahead once
        ``after`` is."""
        columns = [self._window_column(c) for c in self._buffered()]
        rows = slot_rows(self.chunk_tokens, [column.row_bytes for column in columns])
        window = ChunkWindow(columns, len(chunks), rows)
        try:
            for slot, chunk in enumerate(chunks):
                for column in self._buffered():
                    if self._mapped[column.name]:
                        self._map(window, column, slot, chunk)
            window.read_ahead(after)
        except BaseException:
            window.close()
            raise
        return window

    def _map(self, window: ChunkWindow, column: Column, slot: int, chunk: ChunkRef) -> None:
        array = self._arrays(column.store, chunk.part)[column.key]
        file = chunk.files[self._reads.index((column.store, column.key))]
        fd = open_local_chunk(array, chunk.index, file, chunk.rows * window.columns[column.name].row_bytes)
        if fd is None:  # absent, and its rows are the fill value (format version 1): read when loaded
            return
        try:
            window.map_file(column.name, slot, fd, chunk.rows)
        finally:
            os.close(fd)  # the mapping holds the file

    def _load(self, window: ChunkWindow, chunks: list[ChunkRef]) -> np.ndarray:
        """Read the window's other chunks into memory, verify the mapped ones (with ``verify``), check zipped
        stores' alignment; returns the window rows to serve (``slot * slot_rows + row``, less excluded):
        4 bytes each where they fit (a window of 4 GiB of 768-wide float16 rows: 11 MB)."""
        dtype = np.int32 if len(chunks) * window.slot_rows < 2**31 else np.int64
        kept = []
        for slot, chunk in enumerate(chunks):
            for column in self._buffered():
                self._fill(window, column, slot, chunk)
            if len(self._locations) > 1:
                self._check_alignment(chunk)
            kept.append(self._kept_rows(chunk, dtype) + dtype(slot * window.slot_rows))
        return np.concatenate(kept) if kept else np.empty(0, dtype=dtype)

    def _fill(self, window: ChunkWindow, column: Column, slot: int, chunk: ChunkRef) -> None:
        """A mapped slot is checked (with ``verify``); any other is read into memory (and checked)."""
        file = chunk.files[self._reads.index((column.store, column.key))]
        array = self._arrays(column.store, chunk.part)[column.key]
        if (column.name, slot) not in window.mapped:
            read_chunk(array, chunk.index, file, window.memory(column.name, slot, chunk.rows), self.verify)
        elif self.verify:
            problem = checksum_problem(window.rows(column.name, slot, chunk.rows), file)
            if problem is not None:
                raise corrupt_error([describe(array, chunk.index, problem)])

    def _kept_rows(self, chunk: ChunkRef, dtype: type) -> np.ndarray:
        """Indices of the chunk's rows that ``exclude`` keeps."""
        if not self.exclude_mask:
            return np.arange(chunk.rows, dtype=dtype)
        flags = np.empty(chunk.rows, dtype=np.uint8)
        self._read(0, "tokens/flags", chunk, flags)
        return np.flatnonzero((flags & self.exclude_mask) == 0).astype(dtype)

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
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        runs = (self._followed_chunks(epoch, worker, num_workers, rng) if self.follow
                else iter([[self.chunks[index] for index in self.my_chunks(epoch, worker, num_workers)]]))
        batches = _Batches(self.batch_size, {c.name: self._row_type(c) for c in self._buffered()})
        stopped = None
        try:
            for run in runs:
                with contextlib.closing(self._served_windows(run)) as windows:
                    for window, picks in windows:
                        if self.shuffle:
                            rng.shuffle(picks)
                        yield from map(self._output, batches.cut(window, picks))
        except (CaptureFailedError, FollowTimeoutError) as error:  # following: the rows read are valid
            stopped = error
        if batches.filled and not self.drop_last:
            yield self._output(batches.rest())
        if stopped is not None:
            raise stopped

    def _served_windows(self, chunks: list[ChunkRef]) -> Iterator[tuple[ChunkWindow, np.ndarray]]:
        """(window, its rows) for each window of ``chunks`` in turn, each loaded when its turn comes, while
        the next one is mapped and read ahead. Every window is closed, also after an error."""
        runs = self._windows(chunks)
        windows: list[ChunkWindow] = []  # the window served, and the one after it
        try:
            for index, run in enumerate(runs):
                if not windows:
                    windows.append(self._open_window(run, None))
                if index + 1 < len(runs):
                    windows.append(self._open_window(runs[index + 1], windows[0]))
                windows[0].wait_read_ahead()
                yield windows[0], self._load(windows[0], run)
                windows.pop(0).close()
        finally:
            for window in windows:
                window.close()

    def _followed_chunks(self, epoch: int, worker: int, num_workers: int,
                         rng: np.random.Generator) -> Iterator[list[ChunkRef]]:
        """This rank's / worker's chunks of a store being written, as they are committed, until it completes:
        the new ones of each poll, in random order.

        Each poll opens the stores afresh: the manifest first, then the commit records, so a store that says
        ``complete`` already shows every chunk it committed."""
        slots, slot = self.world_size * num_workers, self.rank + self.world_size * worker
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
                yield [fresh[i] for i in order]
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
        if column.key.startswith(SCALES_GROUP + "/"):
            return torch.float32, (1,)
        return _BATCH_DTYPES[self.storage_dtypes[column.store]], (self.dims[column.name],)

    def _output(self, gathered: dict[str, torch.Tensor]):
        """One batch as the caller asked for it: a tensor, a dict by key, or stacked; with token ids."""
        values = {c.name: self._convert(c, gathered[c.name], gathered.get(_scale_column(c).name))
                  for c in self.columns}
        if self.single:
            out = values[self.columns[0].name]
        elif self.stack:
            out = torch.stack(list(values.values()), dim=1)
        else:
            out = values
        return (out, gathered[_TOKEN_IDS.name]) if self.return_tokens else out

    def _convert(self, column: Column, batch: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """A column's gathered rows as yielded: bfloat16 bits viewed, 8-bit codes decoded with ``scales``."""
        if column.is_token_array:
            return batch
        storage = self.storage_dtypes[column.store]
        if storage == "bfloat16":
            batch = batch.view(torch.bfloat16)
        elif scales is not None:
            codes = batch.view(_FLOAT8) if storage == "float8_e4m3" else batch
            batch = codes.to(torch.float32).mul_(scales)  # in place: a new product tensor costs 4x
        return batch if batch.dtype == self.dtype else batch.to(self.dtype)


class _Batches:
    """Cuts windows' rows into batches: one gather per column and batch, into a new tensor; rows left at a
    window's end are gathered into the next batch, which the next window completes.

    Args:
        batch_size: rows per batch.
        columns: {name: (dtype, shape of one row)}.

    Thread safety: one thread.
    """

    def __init__(self, batch_size: int, columns: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.batch_size, self.columns = batch_size, columns
        self.pending: dict[str, torch.Tensor] = {}
        self.filled = 0

    def cut(self, window: ChunkWindow, picks: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Every whole batch of the pending rows and ``picks`` (window rows, in serving order)."""
        start = 0
        while start < len(picks):
            if not self.pending:
                self.pending = {name: torch.empty((self.batch_size, *row), dtype=dtype)
                                for name, (dtype, row) in self.columns.items()}
            taken = picks[start:start + self.batch_size - self.filled]
            window.gather(taken, {name: tensor.numpy()[self.filled:self.filled + len(taken)]
                                  for name, tensor in self.pending.items()})
            self.filled += len(taken)
            start += len(taken)
            if self.filled == self.batch_size:
                yield self.rest()

    def rest(self) -> dict[str, torch.Tensor]:
        """The pending rows (a short batch at the end), and none pending after."""
        batch = {name: tensor[:self.filled] for name, tensor in self.pending.items()}
        self.pending, self.filled = {}, 0
        return batch


def _check_arguments(keys: list[str], exclude: Sequence[str], batch_size: int, buffer_chunks: int,
                     window_bytes: int) -> None:
    unknown = set(exclude) - set(_EXCLUDABLE)
    if unknown:
        raise ConfigError(f"exclude={sorted(unknown)}: choose from {', '.join(_EXCLUDABLE)}")
    if batch_size <= 0 or buffer_chunks <= 0 or window_bytes <= 0:
        raise ConfigError(f"batch_size ({batch_size}), buffer_chunks ({buffer_chunks}) and window_bytes "
                          f"({window_bytes}) must be positive")
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


def _scale_column(column: Column) -> Column:
    """The hidden column of an 8-bit encoded column's row scales."""
    return Column(f"{column.name}<scale>", column.store, scale_key(column.key))


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _to_device(batch, device: torch.device, non_blocking: bool):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: _to_device(value, device, non_blocking) for key, value in batch.items()}
    return tuple(_to_device(value, device, non_blocking) for value in batch)
