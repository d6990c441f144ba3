"""The sinks the writer process writes through: ``ZarrSink`` (a store) and ``NullSink`` (nothing), both
``Sink``s.

Writers call ``write_chunk`` from several threads for *distinct* chunks (safe in zarr); every metadata
change (array creation, capacity growth, trim, manifest) happens under one lock here, because zarr's
resize/append rewrite ``zarr.json`` from in-memory shape without a lock of their own.
"""


from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import zarr
from zarr.core.sync import sync

from engine.format import layout
from engine.format.chunks import (
    chunk_key,
    crc32c,
    full_chunk_nbytes,
    local_chunk_folder,
    local_chunk_path,
    plain_encoded,
)
from engine.format.files import make_folders, sync_paths, sync_witness, write_files_atomic
from engine.format.layout import ChunkFile, CommitRecord
from engine.format.location import Location
from engine.store.access import existing_arrays, manifest_of, open_group, put_document
from engine.store.lifecycle import ARRAY_CONFIG, create_array, release_reserve
from engine.store.lock import LeaseFence

_FLAGS = "tokens/flags"  # written last: the commit record's statistics set its outlier bits


class SinkSettings(Protocol):
    """What a sink is opened with (the writer process's ``WriterSpec`` has it all)."""

    @property
    def location(self) -> Location | None: ...

    @property
    def chunk_tokens(self) -> int: ...

    @property
    def compressor(self) -> str | None: ...

    @property
    def durable(self) -> bool: ...

    @property
    def num_writers(self) -> int: ...

    @property
    def lock_owner(self) -> dict | None: ...


class Sink(Protocol):
    """Where the writer process's chunks go: the writer's pool and server call exactly these methods. The
    writer process opens the class ``WriterSpec.sink`` names (``module:Class``: ``ZarrSink``, ``NullSink``, or
    a test's or benchmark's own).

    Thread safety: ``write_chunk`` from several writer threads at once, for distinct chunks; the other methods
    from one thread at a time.
    """

    @classmethod
    def open(cls, spec: SinkSettings) -> Sink:
        """The sink of the run ``spec`` describes (its store already created, or repaired for a resume)."""

    def point_arrays(self) -> dict[str, zarr.Array]:
        """The activation arrays that exist (a resumed store's): key -> array, ``shape[1]`` its width."""

    def all_arrays(self) -> dict[str, zarr.Array]:
        """Every array that exists: a resume copies the kept rows of its cut chunk from them."""

    def create_point_arrays(self, specs: dict[str, tuple[int, np.dtype, dict]]) -> None:
        """Create the activation arrays, in order: key -> (width, stored dtype, attributes)."""

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray],
                    make_record: Callable[[], CommitRecord]) -> None:
        """Write one chunk's rows of every array, then its commit record. ``make_record()`` sets the
        ``outlier`` bits of ``tokens/flags``: that array is written once it has returned."""

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        """Trim the arrays to ``rows`` if ``trim``, then publish the manifest (``manifest_updates``: the
        Manifest fields that change)."""


class ZarrSink:
    """Writes chunks and commit records into a store made by ``create_store`` or ``continue_store``; opened
    by the writer process, which owns every metadata change from then on.

    Args:
        location, chunk_tokens, compressor, durable: from the writer process's ``WriterSpec``.
        io_threads: threads that write chunk rows (``open`` gives one per writer thread).
        fence: an object-storage store's lease proof, asked before every write (chunks, array changes, the
            manifest), so that a run whose lock was broken writes nothing more (``engine.store.lock``); None:
            local.

    Thread safety: ``write_chunk`` from several threads for distinct chunks (its ``_write_all_rows`` calls run
    on the I/O threads, which read the chunk's arrays while the calling thread does too: they must not change
    until it returns); every metadata change (array creation, capacity growth, trim, manifest) under one
    lock here, because zarr's resize rewrites ``zarr.json`` from the in-memory shape without a lock of its
    own.
    """

    def __init__(self, location: Location, chunk_tokens: int, compressor: str | None, durable: bool,
                 io_threads: int = 1, fence: LeaseFence | None = None):
        self.chunk_tokens = chunk_tokens
        self._fence = fence
        self._location = location
        self._compressor = compressor
        self._durable = durable
        self._root = location.local
        # Uncompressed chunks are plain little-endian C-order bytes (zarr's bytes codec): local ones are
        # written as files directly, skipping zarr's codec pipeline. Compressed arrays, metadata and every
        # write to an object store go through zarr (one PUT per chunk object).
        self._direct = self._root is not None and compressor is None and sys.byteorder == "little"
        self._lock = threading.Lock()
        self._group = open_group(location, mode="r+")
        self._store = self._group.store
        self._manifest = manifest_of(self._group)
        # Opened arrays forget their creation config: without write_empty_chunks zarr would skip a chunk whose
        # values all equal the fill value (an all-zero tokens/flags chunk), and its commit record would name
        # a chunk that is not there.
        self._arrays = {key: array.with_config(ARRAY_CONFIG) for key, array in existing_arrays(
            self._group, layout.stored_arrays(self._manifest)).items()}
        self._make_chunk_folders(self._arrays.values())
        # A crash can land between two arrays' resizes: the smallest is what every array has.
        self._capacity = min((array.shape[0] for array in self._arrays.values()), default=0)
        self._io = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="actcap-rows")

    @classmethod
    def open(cls, spec) -> "ZarrSink":
        return cls(spec.location, spec.chunk_tokens, spec.compressor, spec.durable, spec.num_writers,
                   LeaseFence.of(spec.location, spec.lock_owner))

    def _prove_lease(self) -> None:
        """Before a write: StoreLockedError if the store's object-storage lock is no longer this run's."""
        if self._fence is not None:
            self._fence.prove()

    def point_arrays(self) -> dict[str, zarr.Array]:
        """The activation arrays that exist (a resumed store's; scale arrays are not activation arrays)."""
        return {key: array for key, array in self._arrays.items() if key in self._manifest.arrays}

    def all_arrays(self) -> dict[str, zarr.Array]:
        return dict(self._arrays)

    def create_point_arrays(self, specs: dict[str, tuple[int, np.dtype, dict]]) -> None:
        """Create the activation arrays: key -> (dim, on-disk dtype, attributes)."""
        self._prove_lease()
        with self._lock:
            for key, (dim, dtype, attributes) in specs.items():
                self._arrays[key] = create_array(self._group, key, self._capacity, (dim,), dtype,
                                                  self.chunk_tokens, self._compressor, attributes)
            self._make_chunk_folders(self._arrays[key] for key in specs)

    def _make_chunk_folders(self, arrays: Iterable[zarr.Array]) -> None:
        """Make each array's chunk folder (zarr's ``c/``) before any chunk is written, synced when durable:
        two writer threads' chunks would otherwise race to make it, and the one that lost could commit a
        chunk under a folder entry the other had not synced yet."""
        if self._root is None:
            return
        for array in arrays:
            make_folders(_local_chunk_folder(array), self._durable)

    def _ensure_capacity(self, rows: int) -> None:
        with self._lock:
            if rows <= self._capacity:
                return
            # Grow in big steps: each resize rewrites every array's zarr.json.
            target = max(rows, 2 * self._capacity, 16 * self.chunk_tokens)
            self._capacity = -(-target // self.chunk_tokens) * self.chunk_tokens
            self._resize_all(self._capacity)

    def _resize_all(self, rows: int) -> None:
        """Resize every array (under the lock). A durable local store's array documents reach the disk
        before a chunk that needs the new shape commits: each is a file renamed over, and after a power loss
        an unsynced one may read empty, leaving its array unreadable."""
        with self._sync_witness() as witness:
            for array in self._arrays.values():
                array.resize((rows, *array.shape[1:]))
            if witness is not None:
                root = self._local_root()
                sync_paths([path for key in self._arrays for path in (root / key / "zarr.json", root / key)],
                           [witness])

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray],
                    make_record: Callable[[], CommitRecord]) -> None:
        """Write one chunk's rows of every array, then its commit record, with each array's checksum and
        stored size (which makes it visible). A partial chunk (the last one, at close) is written at its real
        length plus a hole up to the chunk's size, so it takes no more disk blocks than its rows.

        The rows go to the disk from an I/O thread while ``make_record`` (the chunk's statistics) and the
        checksums run on this one, so that the disk is not idle while the CPU works, nor the other way round
        (benchmarks/results/cpu-2026-12-04/commit_overlap.txt, cpu-2026-12-04b/batched_sync.txt).
        ``make_record`` sets the ``outlier`` bits of ``tokens/flags``, so that array is written last, once it
        has returned (in the same pass: the same syncs)."""
        rows = len(next(iter(arrays.values())))
        self._prove_lease()  # covers this chunk's rows, resizes and record, written right after
        self._ensure_capacity(chunk_index * self.chunk_tokens + rows)
        flags_final: concurrent.futures.Future[None] = concurrent.futures.Future()
        written = self._io.submit(self._write_all_rows, chunk_index, arrays, flags_final)
        try:
            record = make_record()
            flags_final.set_result(None)
            checksums = {key: crc32c(data) for key, data in arrays.items()}
        except BaseException as error:
            if not flags_final.done():
                flags_final.set_exception(error)  # the I/O thread drops the chunk's files
            concurrent.futures.wait([written])  # no write of this chunk outlives its failure
            disk_error = written.exception()
            if disk_error is not None and disk_error is not error:
                raise disk_error  # the disk's error first; the statistics' one is its context
            raise
        files = {key: ChunkFile(checksums[key], nbytes) for key, nbytes in written.result().items()}
        self._put_record(chunk_index, dataclasses.replace(record, files=files))

    def _write_all_rows(self, chunk_index: int, arrays: dict[str, np.ndarray],
                        flags_final: concurrent.futures.Future[None]) -> dict[str, int]:
        """Every array's rows of a chunk, written, ``tokens/flags`` last once ``flags_final`` is done; returns
        each one's stored size. Local files go in one ``write_files_atomic`` pass, so the chunk's files share
        their syncs."""
        def flags_when_final() -> np.ndarray:
            flags_final.result()  # raises the statistics' failure: the pass then leaves no file
            return arrays[_FLAGS]

        ordered = {**{key: data for key, data in arrays.items() if key != _FLAGS}, _FLAGS: flags_when_final}
        if not self._direct:
            return self._write_through_zarr(chunk_index, ordered)
        sizes = {key: full_chunk_nbytes(self._arrays[key]) for key in ordered}
        write_files_atomic([(_local_chunk_path(self._arrays[key], chunk_index), data, sizes[key])
                            for key, data in ordered.items()], self._durable)
        return sizes

    def _write_through_zarr(self, chunk_index: int, arrays: dict) -> dict[str, int]:
        """Every array's rows of a chunk through zarr's codecs and store (a callable's when its turn comes);
        returns each one's stored size. A durable local chunk's files and folders are synced in one call once
        all are written."""
        with self._sync_witness() as witness:
            sizes = {key: self._write_array_chunk(key, chunk_index, data() if callable(data) else data)
                     for key, data in arrays.items()}
            if witness is not None:
                sync_paths(_chunk_paths([self._arrays[key] for key in arrays], chunk_index), [witness])
        return sizes

    def _write_array_chunk(self, key: str, chunk_index: int, data: np.ndarray) -> int:
        array = self._arrays[key]
        start = chunk_index * self.chunk_tokens
        array[start:start + len(data)] = data
        if plain_encoded(array):
            return full_chunk_nbytes(array)
        return sync(array.store.getsize(chunk_key(array, chunk_index)))  # one stat/HEAD

    def _local_root(self) -> Path:
        """The root folder of a local store (where a sync witness was made: ``_sync_witness``)."""
        assert self._root is not None, "only a local store has files to sync"
        return self._root

    @contextlib.contextmanager
    def _sync_witness(self) -> Iterator[int | None]:
        """A durable local store: a sync witness on its root, to open before the writes it will sync
        (``engine.format.files.sync_all``); None otherwise."""
        if not self._durable or self._root is None:
            yield None
            return
        with sync_witness(self._root) as witness:
            yield witness

    def _put_record(self, chunk_index: int, record: CommitRecord) -> None:
        put_document(self._location, layout.commit_record_key(chunk_index),
                     layout.group_document(record.to_json()), self._durable, self._store)

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        """Trim arrays to the committed rows (clean close) and publish the manifest, last
        (``manifest_updates``: the Manifest fields that change). The reserve file goes first, so a full disk
        still has room to say ``failed``."""
        self._prove_lease()
        release_reserve(self._location)
        with self._lock:
            if trim:
                self._capacity = rows
                self._resize_all(rows)
            self._manifest = dataclasses.replace(self._manifest, **manifest_updates)
            self._publish_manifest()
        self._io.shutdown()

    def _publish_manifest(self) -> None:
        with self._sync_witness() as witness:
            self._group.update_attributes({layout.MANIFEST_ATTR: self._manifest.to_json()})
            if witness is not None:
                root = self._local_root()
                sync_paths([root / "zarr.json", root], [witness])


def _chunk_paths(arrays: list[zarr.Array], chunk_index: int) -> list[Path]:
    """What must reach the disk for chunk files that zarr wrote (each a temp file renamed over, in folders it
    may have made): each file, and each folder from its own up to its array's chunk folder."""
    paths: dict[Path, None] = {}  # in order, each once
    for array in arrays:
        path, top = _local_chunk_path(array, chunk_index), _local_chunk_folder(array)
        paths[path] = None
        while path != top:
            path = path.parent
            paths[path] = None
    return list(paths)


def _local_chunk_path(array: zarr.Array, chunk_index: int) -> Path:
    """``local_chunk_path`` of an array of a local store (the only kind whose chunk files are named)."""
    path = local_chunk_path(array, chunk_index)
    assert path is not None, "a local store's array has chunk files"
    return path


def _local_chunk_folder(array: zarr.Array) -> Path:
    """``local_chunk_folder`` of an array of a local store."""
    folder = local_chunk_folder(array)
    assert folder is not None, "a local store's array has a chunk folder"
    return folder


class NullSink:
    """Runs the whole pipeline but discards rows: separates our overhead from the disk's. A ``Sink`` with no
    arrays."""

    @classmethod
    def open(cls, spec) -> "NullSink":
        return cls()

    def point_arrays(self) -> dict[str, zarr.Array]:
        return {}

    def all_arrays(self) -> dict[str, zarr.Array]:
        return {}

    def create_point_arrays(self, specs) -> None:
        pass

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray],
                    make_record: Callable[[], CommitRecord]) -> None:
        make_record()

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        pass
