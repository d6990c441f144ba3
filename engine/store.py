"""The store: zarr v3 group creation, chunk writes with commit records, manifest updates.

Writers call ``write_chunk`` from several threads for *distinct* chunks (safe in zarr); every metadata
change (array creation, capacity growth, trim, manifest) happens under one lock here, because zarr's
resize/append rewrite ``zarr.json`` from in-memory shape without a lock of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import layout
from .chunks import (
    chunk_key,
    crc32c,
    full_chunk_nbytes,
    link_refused,
    local_chunk_folder,
    local_chunk_path,
    metadata_error,
    metadata_problems,
    plain_encoded,
    store_name,
)
from .errors import EngineError, StoreExistsError, StoreFormatError, StorePathError
from .files import make_folders, sync_paths, sync_witness, write_file_atomic, write_files_atomic
from .layout import ChunkFile, CommitRecord, Manifest
from .location import Location
from .lock import LeaseFence
from .resume import ResumePoint, scan_committed

# Without this, zarr compares every chunk with the fill value before writing it (~0.4 GB/s cap).
_ARRAY_CONFIG = {"write_empty_chunks": True}
_FLAGS = "tokens/flags"  # written last: the commit record's statistics set its outlier bits
_METADATA_FIX = ("the store's metadata is damaged: restore it from a copy (the other arrays can still be "
                 "read with zarr alone)")


def _json_bytes(doc: dict) -> Any:
    return default_buffer_prototype().buffer.from_bytes(json.dumps(doc, sort_keys=True).encode())


def put_json(store: zarr.abc.store.Store, key: str, doc: dict) -> None:
    """One object write (LocalStore writes a temp file and renames it: no torn record after SIGKILL)."""
    sync(store.set(key, _json_bytes(doc)))


def put_document(location: Location, key: str, doc: dict, durable: bool = True,
                 store: zarr.abc.store.Store | None = None) -> None:
    """One JSON document: a local store's with ``write_file_atomic`` (on disk before this returns when
    ``durable``, the default: a multi-process store's root and group documents, written once or twice a
    run, are what opens it), an object store's as one PUT (through ``store`` when one is open)."""
    if location.local is None:
        put_json(store or location.zarr_store(), key, doc)
    else:
        write_file_atomic(location.local / key, json.dumps(doc, sort_keys=True).encode(), durable)


async def _get_many(store, keys: list[str]) -> list[bytes | None]:
    async def one(key):
        buf = await store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    return list(await asyncio.gather(*(one(k) for k in keys)))


async def _list_dir(store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


@contextlib.contextmanager
def metadata_of(where: str, what: str):
    """Turn zarr's errors on a damaged ``zarr.json`` (bare JSONDecodeError, ValueError, TypeError naming no
    file) into StoreFormatError naming ``where`` and ``what`` was expected. A missing node stays an error of
    its own (FileNotFoundError, KeyError): it is not damage."""
    try:
        yield
    except (EngineError, FileNotFoundError, KeyError):
        raise
    except (ValueError, TypeError) as error:
        raise StoreFormatError(f"{where}: expected {what}, found metadata zarr cannot read "
                               f"({type(error).__name__}: {error}). The fix: {_METADATA_FIX}") from error


def open_group(location: Location, mode: str = "r") -> zarr.Group:
    """A store's root group (``mode`` "r" opens it read-only).

    Raises:
        FileNotFoundError: there is no group there.
        StoreFormatError: its ``zarr.json`` is damaged.
    """
    with metadata_of(f"{location}/zarr.json", "a zarr v3 group document (a capture store's root)"):
        return zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode)


def open_array(group: zarr.Group, key: str) -> zarr.Array:
    """One array of a group (KeyError when there is none; StoreFormatError when its zarr.json is damaged)."""
    where = f"{store_name(group.store)}/{key}"
    with metadata_of(f"{where}/zarr.json", f"the zarr array metadata of {key}"):
        try:
            array = group[key]
        except KeyError as missing:  # no node; or (zarr says it alike) a document lacking a field
            document = f"{group.path}/{key}/zarr.json".lstrip("/")
            if sync(group.store.exists(document)):
                raise ValueError(f"a document without the field {missing}") from missing
            raise
    if not isinstance(array, zarr.Array):
        raise StoreFormatError(f"{where} is a group; expected the array {key}. The fix: {_METADATA_FIX}")
    return array


def existing_arrays(group: zarr.Group, keys: list[str]) -> dict[str, zarr.Array]:
    """The arrays among ``keys`` that exist (StoreFormatError when one's zarr.json is damaged)."""
    arrays = {}
    for key in keys:
        try:
            arrays[key] = open_array(group, key)
        except KeyError:
            continue
    return arrays


def manifest_of(group: zarr.Group) -> Manifest:
    """The manifest of an open store's group."""
    where = f"{store_name(group.store)}/zarr.json"
    return Manifest.from_json(group.attrs.get(layout.MANIFEST_ATTR), where)


def read_commit_records(store: zarr.abc.store.Store, where: str, manifest: Manifest,
                        damaged: list[str] | None = None) -> dict[int, CommitRecord]:
    """All commit records in a store (at ``where``, for messages), by chunk index (not always contiguous).

    Raises:
        StoreFormatError: a record is damaged (not JSON, a field missing or wrong, other rows than its
            chunk's), unless ``damaged`` is given: then each damaged record is named there and left out (a
            resume cuts the store back before it).
    """
    indices = _record_indices(store)
    docs = sync(_get_many(store, [layout.commit_record_key(i) for i in indices]))
    records = {}
    for index, raw in zip(indices, docs):
        if raw is None:
            continue  # deleted since the listing (a resume in progress): not committed
        try:
            records[index] = _parse_record(raw, f"{where}/{layout.commit_record_key(index)}", index, manifest)
        except StoreFormatError as error:
            if damaged is None:
                raise
            damaged.append(str(error))
    return records


def _record_indices(store: zarr.abc.store.Store) -> list[int]:
    """Indices of the chunks that have a commit record (damaged or not), in order."""
    names = sync(_list_dir(store, layout.COMMITS_GROUP))
    return sorted(i for i in map(layout.chunk_index_of, names) if i is not None)


def _parse_record(raw: bytes, where: str, index: int, manifest: Manifest) -> CommitRecord:
    attributes = layout.commit_record_attributes(raw, where, index)
    return CommitRecord.from_json(attributes, where, index, manifest.chunk_tokens, manifest.format_version)


def committed_prefix(records: dict[int, CommitRecord]) -> list[CommitRecord]:
    """The records of chunks 0..k-1 whose rows follow each other with no gap: only these rows are trusted.

    A partial chunk (a resumed store's last chunk, until it is rewritten whole) ends the prefix.
    """
    prefix = []
    while len(prefix) in records:
        record = records[len(prefix)]
        if prefix and record.row_start != prefix[-1].row_stop:
            break
        prefix.append(record)
    return prefix


def delete_key(store: zarr.abc.store.Store, key: str) -> None:
    sync(store.delete(key))


def delete_array(store: zarr.abc.store.Store, key: str) -> None:
    """Remove an array node and its chunks."""
    sync(store.delete_dir(key))


def _is_our_store(location: Location) -> bool:
    """Whether ``location`` holds a capture store (StoreFormatError when its root zarr.json is damaged: a
    folder that may be a store is never taken for something else, and so never overwritten)."""
    try:
        doc = _root_attributes(location).get(layout.MANIFEST_ATTR)
    except (OSError, KeyError):
        return False
    return isinstance(doc, dict) and doc.get("format") == layout.FORMAT_NAME


def _root_attributes(location: Location) -> dict:
    """The root group's attributes, read without opening arrays (KeyError when there is no zarr.json)."""
    raw = sync(_get_many(location.zarr_store(read_only=True), ["zarr.json"]))[0]
    where = f"{location}/zarr.json"
    if raw is None:
        raise KeyError(f"no zarr.json at {location}")
    return layout.root_attributes(raw, where)


def has_root_document(location: Location) -> bool:
    """Whether a store's root ``zarr.json`` exists (whatever it holds)."""
    return sync(location.zarr_store(read_only=True).exists("zarr.json"))


def load_manifest(location: Location) -> Manifest:
    """The manifest of a store, read without opening arrays.

    Raises:
        KeyError: there is no store at ``location``.
        StoreFormatError: its zarr.json or manifest is damaged, or it is not a capture store.
    """
    return Manifest.from_json(_root_attributes(location).get(layout.MANIFEST_ATTR), f"{location}/zarr.json")


def read_manifest(location: Location) -> dict:
    """``load_manifest`` as its JSON document, for code that merges manifests as dicts (engine.opening)."""
    return load_manifest(location).to_json()


def _check_existing(location: Location, exists: bool, overwrite: bool, resume: bool) -> None:
    if exists and not _is_our_store(location):
        raise StoreExistsError(f"output_dir {location} is not empty and not a capture store: choose a new or "
                               "empty location (nothing there was changed)")
    if exists and not (overwrite or resume):
        raise StoreExistsError(f"a capture store already exists at {location}: pass overwrite=True to "
                               "replace it or resume=True to continue it")


def check_location(location: Location, overwrite: bool, resume: bool) -> bool:
    """Whether a store exists at ``location``; raises (changing nothing) when it cannot be written as
    asked."""
    path = location.local
    if path is None:
        exists = not sync(location.zarr_store().is_empty(""))
        _check_existing(location, exists, overwrite, resume)
        return exists
    if path.exists() and not path.is_dir():
        raise StorePathError(f"output_dir {path} is a file: point output_dir at a folder for the zarr store")
    exists = path.is_dir() and any(path.iterdir())
    _check_existing(location, exists, overwrite, resume)
    link = _first_link(path) if exists and resume else None
    if link is not None:  # a resume would read, cut back and write chunks through it: outside the store
        raise link_refused(path, str(link.relative_to(path)))
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StorePathError(f"cannot create {path}: {parent} is a file, not a folder; choose another "
                             "output_dir")
    if not os.access(parent, os.W_OK):
        raise StorePathError(f"cannot write under {parent} (read-only or no permission): choose an "
                             "output_dir in a writable folder")
    return exists


def _first_link(folder: Path) -> Path | None:
    """The first symbolic link found inside ``folder`` (None: there is none). One scan of the folders, no
    stat per file (the listing says which entries are links)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                return Path(entry.path)
            inner = _first_link(Path(entry.path)) if entry.is_dir(follow_symlinks=False) else None
            if inner is not None:
                return inner
    return None


def clear_location(location: Location) -> None:
    """Delete the store at ``location`` (overwrite; the caller holds its lock)."""
    if location.local is None:
        sync(location.zarr_store().delete_dir(""))
    else:
        shutil.rmtree(location.local)


RESERVE_BYTES = 128 * 1024


def reserve_path(location: Location) -> Path | None:
    """``<store>.reserve`` beside a local store: space held back for the final manifest if the disk fills."""
    root = location.local
    return None if root is None else root.with_name(root.name + ".reserve")


def _reserve_space(location: Location) -> None:
    """Write the reserve file; one the disk had no room for is removed, not left half-written."""
    reserve = reserve_path(location)
    if reserve is not None:
        try:
            with open(reserve, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
        except BaseException:
            reserve.unlink(missing_ok=True)
            raise


def release_reserve(location: Location) -> None:
    """Remove the reserve file (before the final manifest, or when a run stops before its writer started)."""
    reserve = reserve_path(location)
    if reserve is not None:
        reserve.unlink(missing_ok=True)


def _compressors(name: str | None):
    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def _create_array(group: zarr.Group, key: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype,
                  chunk_tokens: int, compressor: str | None, attributes: dict) -> zarr.Array:
    return group.create_array(key, shape=(rows, *row_shape), chunks=(chunk_tokens, *row_shape), dtype=dtype,
                              fill_value=0, compressors=_compressors(compressor), attributes=attributes,
                              config=_ARRAY_CONFIG)


def create_store(location: Location, manifest: Manifest | dict) -> None:
    """A new, empty store: the root group with its manifest, the commits group and the per-token arrays (the
    activation arrays come with the first batch, when their widths are known)."""
    manifest = Manifest.of(manifest, f"the manifest for {location}")
    # "w-", not "w": prepare_location already checked and cleared the location, and "w" would delete
    # everything under the store's root first (for an object store, a whole prefix).
    group = zarr.open_group(location.zarr_store(), mode="w-",
                            attributes={layout.MANIFEST_ATTR: manifest.to_json()})
    group.create_group(layout.COMMITS_GROUP, attributes={
        "description": "one child group per committed chunk; its attributes are the chunk's commit record"})
    for key, dtype in manifest.token_arrays.items():
        _create_array(group, key, 0, (), np.dtype(dtype), manifest.chunk_tokens, manifest.compressor, {})
    _reserve_space(location)


def continue_store(location: Location, updates: dict) -> ResumePoint:
    """Make a crashed or closed store continuable and return where to continue.

    Reads the committed chunks once (``resume.scan_committed``): each is verified (size and CRC32C), the store
    is cut back before the first damaged one, and the returned point carries the statistics of the whole
    chunks kept, for the writer process. Keeps rows up to the resume point and drops the commit records of the
    chunk holding it and of every later chunk (highest first, so the committed prefix is valid after every
    step); the writer process starts that chunk with its kept rows and commits it again, whole. A crash before
    then only moves the next resume point back; no record ever describes rows it does not hold. Also drops
    temp files and arrays added after capture (align's ``tokens/label`` would go stale as rows are added), and
    when no row is kept (nothing committed, maybe a crash while the first batch created the arrays; or no
    sequence ended yet) the activation arrays, which the first batch creates again.

    Args:
        updates: ``{"resume": {...}, "writers": [...]}``: this resume's entry (the rows kept are added to it)
            and the manifest fields that change (engine.opening).
    """
    store = location.zarr_store()
    group = open_group(location, mode="r+")
    stored = manifest_of(group)
    own = layout.token_arrays(stored.annotations)
    damaged: list[str] = []
    records = read_commit_records(store, str(location), stored, damaged)
    arrays = existing_arrays(group, [*stored.arrays, *layout.scale_arrays(stored.dtype, stored.arrays), *own])
    prefix = committed_prefix(records)
    problems = metadata_problems(arrays, prefix, stored, prefix[-1].row_stop if prefix else 0, str(location))
    if problems:  # the kept rows would be read, and new ones written, through metadata that misreads them
        raise metadata_error(problems)
    point = scan_committed(arrays, prefix, stored)
    point = dataclasses.replace(point, damaged=tuple(damaged) + point.damaged)
    if point.damaged:
        warnings.warn(f"resuming {location}: cut back before damaged committed chunks, which are captured "
                      "again:\n  " + "\n  ".join(point.damaged), RuntimeWarning, stacklevel=2)
    # Open first: a crash during the repair below must not leave a "complete" manifest over a shortened
    # prefix.
    group.update_attributes({layout.MANIFEST_ATTR: _resumed_manifest(stored, own, updates, point).to_json()})
    _cut_back(location, store, group, stored, point)
    _reserve_space(location)
    return point if point.rows else ResumePoint(0, 0, 0)


def _cut_back(location: Location, store: zarr.abc.store.Store, group: zarr.Group, stored: Manifest,
              point: ResumePoint) -> None:
    """Drop the records (damaged ones too) from the cut chunk on, highest first; temp files; and arrays that
    do not go on."""
    for index in reversed(_record_indices(store)):
        if index >= point.rows // stored.chunk_tokens:
            delete_key(store, layout.commit_record_key(index))
    for leftover in location.local.rglob("*.partial") if location.local is not None else ():
        leftover.unlink()
    own = layout.token_arrays(stored.annotations)
    for key in set(stored.token_arrays) - set(own):
        if key in group:
            delete_array(store, key)
    # nothing kept: the first batch creates them again
    for key in [*stored.arrays, *layout.scale_arrays(stored.dtype, stored.arrays)] if point.rows == 0 else ():
        if key in group:
            delete_array(store, key)
    for key, dtype in own.items():
        if key not in group:  # a crash kept it from being created
            _create_array(group, key, 0, (), dtype, stored.chunk_tokens, stored.compressor, {})


def _resumed_manifest(stored: Manifest, own: dict[str, np.dtype], updates: dict,
                      point: ResumePoint) -> Manifest:
    entry = {**updates["resume"], "status_before": stored.status, "rows": point.rows,
             "sequences": point.sequences, "dropped_rows": point.committed_rows - point.rows}
    if point.damaged:
        entry["damaged_chunks"] = list(point.damaged)
    changes = {key: value for key, value in updates.items() if key != "resume"}
    return dataclasses.replace(stored, token_arrays={key: str(dtype) for key, dtype in own.items()},
                               resumes=[*stored.resumes, entry], status=layout.STATUS_OPEN, error=None,
                               **changes)


def mark_failed(location: Location, error: str) -> None:
    """Publish ``failed`` for a store whose writer process died (it can no longer publish anything)."""
    release_reserve(location)
    group = open_group(location, mode="r+")
    failed = dataclasses.replace(manifest_of(group), status=layout.STATUS_FAILED, error=error)
    group.update_attributes({layout.MANIFEST_ATTR: failed.to_json()})


class ZarrSink:
    """Writes chunks and commit records into a store made by ``create_store`` or ``continue_store``; opened
    by the writer process, which owns every metadata change from then on.

    Args:
        location, chunk_tokens, compressor, durable: from the writer process's ``WriterSpec``.
        io_threads: threads that write chunk rows (``open`` gives one per writer thread).
        fence: an object-storage store's lease proof, asked before every write (chunks, array changes, the
            manifest), so that a run whose lock was broken writes nothing more (``engine.lock``); None: local.

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
        self._arrays = {key: array.with_config(_ARRAY_CONFIG) for key, array in existing_arrays(
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
                self._arrays[key] = _create_array(self._group, key, self._capacity, (dim,), dtype,
                                                  self.chunk_tokens, self._compressor, attributes)
            self._make_chunk_folders(self._arrays[key] for key in specs)

    def _make_chunk_folders(self, arrays) -> None:
        """Make each array's chunk folder (zarr's ``c/``) before any chunk is written, synced when durable:
        two writer threads' chunks would otherwise race to make it, and the one that lost could commit a
        chunk under a folder entry the other had not synced yet."""
        if self._root is None:
            return
        for array in arrays:
            make_folders(local_chunk_folder(array), self._durable)

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
                sync_paths([path for key in self._arrays for path in (self._root / key / "zarr.json",
                                                                     self._root / key)], [witness])

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
        flags_final = concurrent.futures.Future()
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
                        flags_final: concurrent.futures.Future) -> dict[str, int]:
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
        write_files_atomic([(local_chunk_path(self._arrays[key], chunk_index), data, sizes[key])
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

    @contextlib.contextmanager
    def _sync_witness(self):
        """A durable local store: a sync witness on its root, to open before the writes it will sync
        (``engine.files.sync_all``); None otherwise."""
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
                sync_paths([self._root / "zarr.json", self._root], [witness])


def _chunk_paths(arrays: list[zarr.Array], chunk_index: int) -> list[Path]:
    """What must reach the disk for chunk files that zarr wrote (each a temp file renamed over, in folders it
    may have made): each file, and each folder from its own up to its array's chunk folder."""
    paths: dict[Path, None] = {}  # in order, each once
    for array in arrays:
        path, top = local_chunk_path(array, chunk_index), local_chunk_folder(array)
        paths[path] = None
        while path != top:
            path = path.parent
            paths[path] = None
    return list(paths)


class NullSink:
    """Runs the whole pipeline but discards rows: separates our overhead from the disk's."""

    @classmethod
    def open(cls, spec) -> "NullSink":
        return cls()

    def create_point_arrays(self, specs) -> None:
        pass

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray],
                    make_record: Callable[[], CommitRecord]) -> None:
        make_record()

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        pass
