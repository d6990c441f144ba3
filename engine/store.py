"""The store: zarr v3 group creation, chunk writes with commit records, manifest updates.

Writers call ``write_chunk`` from several threads for *distinct* chunks (safe in zarr); every metadata
change (array creation, capacity growth, trim, manifest) happens under one lock here, because zarr's
resize/append rewrite ``zarr.json`` from in-memory shape without a lock of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import layout
from .errors import StoreExistsError, StorePathError
from .location import Location

# Without this, zarr compares every chunk with the fill value before writing it (~0.4 GB/s cap).
_ARRAY_CONFIG = {"write_empty_chunks": True}


def _json_bytes(doc: dict) -> Any:
    return default_buffer_prototype().buffer.from_bytes(json.dumps(doc, sort_keys=True).encode())


def put_json(store: zarr.abc.store.Store, key: str, doc: dict) -> None:
    """One object write (LocalStore writes a temp file and renames it: no torn record after SIGKILL)."""
    sync(store.set(key, _json_bytes(doc)))


async def _get_many(store, keys: list[str]) -> list[dict | None]:
    async def one(key):
        buf = await store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else json.loads(buf.to_bytes())

    return list(await asyncio.gather(*(one(k) for k in keys)))


async def _list_dir(store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


def read_commit_records(store: zarr.abc.store.Store) -> dict[int, dict]:
    """All commit records in a store, by chunk index (not necessarily contiguous)."""
    names = sync(_list_dir(store, layout.COMMITS_GROUP))
    indices = sorted(i for i in map(layout.chunk_index_of, names) if i is not None)
    docs = sync(_get_many(store, [layout.commit_record_key(i) for i in indices]))
    return {i: doc["attributes"] for i, doc in zip(indices, docs) if doc is not None}


def committed_prefix(records: dict[int, dict]) -> list[dict]:
    """The records of chunks 0..k-1 whose rows follow each other with no gap: only these rows are trusted.

    A partial chunk (a resumed store's last chunk, until it is rewritten whole) ends the prefix.
    """
    prefix = []
    while len(prefix) in records:
        record = records[len(prefix)]
        if prefix and record["row_start"] != prefix[-1]["row_stop"]:
            break
        prefix.append(record)
    return prefix


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a store can be continued exactly.

    Args:
        rows: rows kept; every sequence with a row before this one is complete.
        sequences: input sequences already fully handled: a driver feeds sequences from this index on.
        committed_rows: rows in the gap-free committed prefix (>= rows; the rest belong to a cut sequence).
    """

    rows: int
    sequences: int
    committed_rows: int


def find_resume_point(group: zarr.Group, prefix: list[dict], manifest: dict) -> ResumePoint:
    """The last row that ends a sequence (flag ``last``) within the committed prefix."""
    committed = prefix[-1]["row_stop"] if prefix else 0
    if manifest.get("status") == layout.STATUS_COMPLETE:
        return ResumePoint(committed, int(manifest.get("sequences", 0)), committed)
    flags, sequence = group["tokens/flags"], group["tokens/sequence"]
    for record in reversed(prefix):
        start, stop = record["row_start"], record["row_stop"]
        ends = np.flatnonzero(flags[start:stop] & layout.FLAG_LAST)
        if ends.size:
            last = start + int(ends[-1])
            return ResumePoint(last + 1, int(sequence[last]) + 1, committed)
    return ResumePoint(0, 0, committed)


def delete_key(store: zarr.abc.store.Store, key: str) -> None:
    sync(store.delete(key))


def delete_array(store: zarr.abc.store.Store, key: str) -> None:
    """Remove an array node and its chunks."""
    sync(store.delete_dir(key))


def _is_our_store(location: Location) -> bool:
    try:
        return read_manifest(location).get("format") == layout.FORMAT_NAME
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def read_manifest(location: Location) -> dict:
    """The manifest of a store, read without opening arrays (KeyError when there is none)."""
    doc = sync(_get_many(location.zarr_store(read_only=True), ["zarr.json"]))[0]
    if doc is None:
        raise KeyError(f"no zarr.json at {location}")
    return doc["attributes"][layout.MANIFEST_ATTR]


def _check_existing(location: Location, exists: bool, overwrite: bool, resume: bool) -> None:
    if exists and not _is_our_store(location):
        raise StoreExistsError(f"output_dir {location} is not empty and not a capture store: choose a new or "
                               "empty location (nothing there was changed)")
    if exists and not (overwrite or resume):
        raise StoreExistsError(f"a capture store already exists at {location}: pass overwrite=True to replace "
                               "it or resume=True to continue it")


def check_location(location: Location, overwrite: bool, resume: bool) -> bool:
    """Whether a store exists at ``location``; raises (changing nothing) when it cannot be written as asked."""
    path = location.local
    if path is None:
        exists = not sync(location.zarr_store().is_empty(""))
        _check_existing(location, exists, overwrite, resume)
        return exists
    if path.exists() and not path.is_dir():
        raise StorePathError(f"output_dir {path} is a file: point output_dir at a folder for the zarr store")
    exists = path.is_dir() and any(path.iterdir())
    _check_existing(location, exists, overwrite, resume)
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StorePathError(f"cannot create {path}: {parent} is a file, not a folder; choose another output_dir")
    if not os.access(parent, os.W_OK):
        raise StorePathError(f"cannot write under {parent} (read-only or no permission): choose an output_dir "
                             "in a writable folder")
    return exists


def clear_location(location: Location) -> None:
    """Delete the store at ``location`` (overwrite; the caller holds its lock)."""
    if location.local is None:
        sync(location.zarr_store().delete_dir(""))
    else:
        shutil.rmtree(location.local)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folders(folder: Path, durable: bool) -> None:
    """Create ``folder`` and its missing parents; when ``durable``, each new entry reaches the disk."""
    if folder.is_dir():
        return
    _make_folders(folder.parent, durable)
    folder.mkdir(exist_ok=True)
    if durable:
        _fsync_folder(folder.parent)


def write_file_atomic(path: Path, data, durable: bool, size: int | None = None) -> None:
    """Write bytes to a temp file beside ``path`` and rename it over (as LocalStore does). ``size``: the file's
    length, when longer than ``data`` (the rest is a hole: no disk blocks, reads as zeros). ``durable``: the
    data reaches the disk before the rename, and the rename (and any new folder) before this returns."""
    _make_folders(path.parent, durable)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            if size is not None and size > f.tell():
                f.truncate(size)
            if durable:
                os.fsync(f.fileno())
        os.replace(partial, path)
        if durable:
            _fsync_folder(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk gets its space back
        raise


def _plain_bytes(array: zarr.Array) -> bool:
    """True when a chunk file is the raw little-endian C-order rows (no filters or compressors)."""
    return not array.compressors and not array.filters and sys.byteorder == "little"


def chunk_path(root: Path, key: str, array: zarr.Array, chunk_index: int) -> Path:
    """The file of one row chunk of a local store's array."""
    return root / key / array.metadata.encode_chunk_key((chunk_index,) + (0,) * (array.ndim - 1))


def read_chunk_rows(root: Path | None, key: str, array: zarr.Array, chunk_index: int, out: np.ndarray) -> None:
    """The first ``len(out)`` rows of chunk ``chunk_index`` into ``out``: one readinto for plain chunks of a
    local store (``root``: its folder; no temporary), zarr otherwise."""
    if root is not None and _plain_bytes(array) and out.flags.c_contiguous:
        target = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(chunk_path(root, key, array, chunk_index), "rb", buffering=0) as f:
                done = 0
                while done < len(target):
                    got = f.readinto(target[done:])
                    if not got:
                        break
                    done += got
            if done == len(target):
                return
        except FileNotFoundError:
            pass
    start = chunk_index * array.chunks[0]
    out[...] = array[start:start + out.shape[0]].view(out.dtype)


RESERVE_BYTES = 128 * 1024


def reserve_path(location: Location) -> Path | None:
    """``<store>.reserve`` beside a local store: space held back for the final manifest if the disk fills."""
    root = location.local
    return None if root is None else root.with_name(root.name + ".reserve")


def _reserve_space(location: Location) -> None:
    reserve = reserve_path(location)
    if reserve is not None:
        with open(reserve, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)


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


def create_store(location: Location, manifest: dict) -> None:
    """A new, empty store: the root group with its manifest, the commits group and the per-token arrays (the
    activation arrays come with the first batch, when their widths are known)."""
    # "w-", not "w": prepare_location already checked and cleared the location, and "w" would delete
    # everything under the store's root first (for an object store, a whole prefix).
    group = zarr.open_group(location.zarr_store(), mode="w-", attributes={layout.MANIFEST_ATTR: manifest})
    group.create_group(layout.COMMITS_GROUP, attributes={
        "description": "one child group per committed chunk; its attributes are the chunk's commit record"})
    for key, dtype in manifest["token_arrays"].items():
        _create_array(group, key, 0, (), np.dtype(dtype), manifest["chunk_tokens"], manifest["compressor"], {})
    _reserve_space(location)


def continue_store(location: Location, updates: dict) -> ResumePoint:
    """Make a crashed or closed store continuable and return where to continue.

    Keeps rows up to the resume point and drops the commit records of the chunk holding it and of every later
    chunk (highest first, so the committed prefix is valid after every step); the writer process starts that
    chunk with its kept rows and commits it again, whole. A crash before then only moves the next resume point
    back; no record ever describes rows it does not hold. Also drops temp files and arrays added after capture
    (align's ``tokens/label`` would go stale as rows are added), and when no row is kept (nothing committed,
    maybe a crash while the first batch created the arrays; or no sequence ended yet) the activation arrays,
    which the first batch creates again.
    """
    store = location.zarr_store()
    group = zarr.open_group(store, mode="r+")
    stored = dict(group.attrs[layout.MANIFEST_ATTR])
    chunk_tokens = stored["chunk_tokens"]
    records = read_commit_records(store)
    point = find_resume_point(group, committed_prefix(records), stored)
    own = layout.token_arrays(stored.get("annotations", {}))
    resumes = stored.get("resumes", []) + [{**updates["resume"], "status_before": stored.get("status"),
                                            "rows": point.rows, "sequences": point.sequences,
                                            "dropped_rows": point.committed_rows - point.rows}]
    # Open first: a crash during the repair below must not leave a "complete" manifest over a shortened prefix.
    group.update_attributes({layout.MANIFEST_ATTR: {
        **stored, "token_arrays": {key: str(dtype) for key, dtype in own.items()}, "resumes": resumes,
        "status": layout.STATUS_OPEN, "error": None, **{k: v for k, v in updates.items() if k != "resume"}}})
    cut_chunk = point.rows // chunk_tokens
    for index in sorted(records, reverse=True):
        if index >= cut_chunk:
            delete_key(store, layout.commit_record_key(index))
    for leftover in location.local.rglob("*.partial") if location.local is not None else ():
        leftover.unlink()
    for key in set(stored["token_arrays"]) - set(own):
        if key in group:
            delete_array(store, key)
    for key in stored["arrays"] if point.rows == 0 else ():  # nothing kept: the first batch creates them again
        if key in group:
            delete_array(store, key)
    for key, dtype in own.items():
        if key not in group:  # a crash kept it from being created
            _create_array(group, key, 0, (), dtype, chunk_tokens, stored["compressor"], {})
    _reserve_space(location)
    return point if point.rows else ResumePoint(0, 0, 0)


def mark_failed(location: Location, error: str) -> None:
    """Publish ``failed`` for a store whose writer process died (it can no longer publish anything)."""
    release_reserve(location)
    group = zarr.open_group(location.zarr_store(), mode="r+")
    manifest = dict(group.attrs[layout.MANIFEST_ATTR])
    group.update_attributes({layout.MANIFEST_ATTR: {**manifest, "status": layout.STATUS_FAILED, "error": error}})


class ZarrSink:
    """Writes chunks and commit records into a store made by ``create_store`` or ``continue_store``; opened
    by the writer process, which owns every metadata change from then on.

    Args:
        spec: the writer process's ``WriterSpec`` (location, chunk_tokens, compressor, durable).

    Thread safety: ``write_chunk`` from several threads for distinct chunks; every metadata change (array
    creation, capacity growth, trim, manifest) under one lock here, because zarr's resize rewrites
    ``zarr.json`` from the in-memory shape without a lock of its own.
    """

    def __init__(self, location: Location, chunk_tokens: int, compressor: str | None, durable: bool):
        self.chunk_tokens = chunk_tokens
        self._location = location
        self._compressor = compressor
        self._durable = durable
        self._root = location.local
        # Uncompressed chunks are plain little-endian C-order bytes (zarr's bytes codec): local ones are written
        # as files directly, skipping zarr's codec pipeline. Compressed arrays, metadata and every write to an
        # object store go through zarr (one PUT per chunk object).
        self._direct = self._root is not None and compressor is None and sys.byteorder == "little"
        self._store = location.zarr_store()
        self._lock = threading.Lock()
        self._group = zarr.open_group(self._store, mode="r+")
        self._manifest = dict(self._group.attrs[layout.MANIFEST_ATTR])
        self._arrays = {key: self._group[key] for key in (*self._manifest["arrays"], *self._manifest["token_arrays"])
                        if key in self._group}
        # A crash can land between two arrays' resizes: the smallest is what every array has.
        self._capacity = min((array.shape[0] for array in self._arrays.values()), default=0)

    @classmethod
    def open(cls, spec) -> "ZarrSink":
        return cls(spec.location, spec.chunk_tokens, spec.compressor, spec.durable)

    def flags_array(self) -> zarr.Array:
        return self._arrays["tokens/flags"]

    def point_arrays(self) -> dict[str, zarr.Array]:
        """The activation arrays that exist (a resumed store's)."""
        return {key: array for key, array in self._arrays.items() if not key.startswith("tokens/")}

    def all_arrays(self) -> dict[str, zarr.Array]:
        return dict(self._arrays)

    def create_point_arrays(self, specs: dict[str, tuple[int, np.dtype, dict]]) -> None:
        """Create the activation arrays: key -> (dim, on-disk dtype, attributes)."""
        with self._lock:
            for key, (dim, dtype, attributes) in specs.items():
                self._arrays[key] = _create_array(self._group, key, self._capacity, (dim,), dtype,
                                                  self.chunk_tokens, self._compressor, attributes)

    def _ensure_capacity(self, rows: int) -> None:
        with self._lock:
            if rows <= self._capacity:
                return
            # Grow in big steps: each resize rewrites every array's zarr.json.
            target = max(rows, 2 * self._capacity, 16 * self.chunk_tokens)
            self._capacity = -(-target // self.chunk_tokens) * self.chunk_tokens
            self._resize_all(self._capacity)

    def _resize_all(self, rows: int) -> None:
        for array in self._arrays.values():
            array.resize((rows, *array.shape[1:]))

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        """Write one chunk's rows of every array, then its commit record (which makes it visible). A partial
        chunk (the last one, at close) is written at its real length plus a hole up to the chunk's size, so
        it takes no more disk blocks than its rows."""
        start = chunk_index * self.chunk_tokens
        stop = start + record["token_count"]
        self._ensure_capacity(stop)
        for key, data in arrays.items():
            array = self._arrays[key]
            if self._direct:
                full = self.chunk_tokens * data.itemsize * (data.size // max(len(data), 1))
                write_file_atomic(chunk_path(self._root, key, array, chunk_index), data, self._durable, full)
            else:
                array[start:stop] = data
                if self._durable and self._root is not None:
                    _fsync_file(chunk_path(self._root, key, array, chunk_index))
        self._put_record(chunk_index, record)

    def _put_record(self, chunk_index: int, record: dict) -> None:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": record}
        if self._root is None:
            put_json(self._store, layout.commit_record_key(chunk_index), doc)
        else:
            write_file_atomic(self._root / layout.commit_record_key(chunk_index),
                              json.dumps(doc, sort_keys=True).encode(), self._durable)

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        """Trim arrays to the committed rows (clean close) and publish the manifest, last. The reserve file
        goes first, so a full disk still has room to say ``failed``."""
        release_reserve(self._location)
        with self._lock:
            if trim:
                self._capacity = rows
                self._resize_all(rows)
            self._manifest = {**self._manifest, **manifest_updates}
            self._group.update_attributes({layout.MANIFEST_ATTR: self._manifest})
            if self._durable and self._root is not None:
                _fsync_file(self._root / "zarr.json")
                _fsync_folder(self._root)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class NullSink:
    """Runs the whole pipeline but discards rows: separates our overhead from the disk's."""

    @classmethod
    def open(cls, spec) -> "NullSink":
        return cls()

    def create_point_arrays(self, specs) -> None:
        pass

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        pass

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        pass
