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


def prepare_location(location: Location, overwrite: bool, resume: bool) -> bool:
    """Check the output location; remove an old store when ``overwrite``. Returns True if a store exists."""
    path = location.local
    if path is None:
        store = location.zarr_store()
        exists = not sync(store.is_empty(""))
        _check_existing(location, exists, overwrite, resume)
        if exists and overwrite:
            sync(store.delete_dir(""))
        return exists and not overwrite
    if path.exists() and not path.is_dir():
        raise StorePathError(f"output_dir {path} is a file: point output_dir at a folder for the zarr store")
    exists = path.is_dir() and any(path.iterdir())
    _check_existing(location, exists, overwrite, resume)
    if exists and overwrite:
        shutil.rmtree(path)
        exists = False
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StorePathError(f"cannot create {path}: {parent} is a file, not a folder; choose another output_dir")
    if not os.access(parent, os.W_OK):
        raise StorePathError(f"cannot write under {parent} (read-only or no permission): choose an output_dir "
                             "in a writable folder")
    return exists


def _write_file_atomic(path: Path, data) -> None:
    """Write bytes to a temp file beside ``path`` and rename it over (as LocalStore does); the write and
    rename release the GIL, which the forward thread needs more than we do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
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


def _reserve_space(path: Path) -> Path:
    """Hold back space beside the store (``<store>.reserve``) for the final manifest if the disk fills."""
    reserve = path.with_name(path.name + ".reserve")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(reserve, "wb") as f:
        f.write(b"\0" * RESERVE_BYTES)
    return reserve


def _compressors(name: str | None):
    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


class ZarrSink:
    """Writes chunks and commit records into one zarr v3 group.

    Args:
        location: where the store is (created).
        chunk_tokens: rows per chunk for every array.
        compressor: None, "zstd" or "blosc".
        manifest: initial manifest (status open).

    Thread safety: ``write_chunk`` from several threads for distinct chunks; the rest from one thread.
    """

    def __init__(self, location: Location, chunk_tokens: int, compressor: str | None, manifest: dict,
                 existing: bool = False):
        token_arrays = {key: np.dtype(dtype) for key, dtype in manifest.get("token_arrays", {}).items()}
        self.chunk_tokens = chunk_tokens
        self._compressors = _compressors(compressor)
        self._root = location.local
        # Whole uncompressed chunks are plain little-endian C-order bytes (zarr's bytes codec): write them as
        # files directly, skipping zarr's Python codec pipeline and event loop, whose GIL use slowed the
        # forward thread (H100 run 1). Partial chunks, compressed arrays, metadata and every write to an
        # object store still go through zarr (one PUT per chunk object).
        self._direct = self._root is not None and compressor is None and sys.byteorder == "little"
        self._store = location.zarr_store()
        self._lock = threading.Lock()
        self._arrays: dict[str, zarr.Array] = {}
        self._reserve = _reserve_space(self._root) if self._root is not None else None
        if existing:
            self._group = zarr.open_group(self._store, mode="r+")
            self._stored_manifest = dict(self._group.attrs[layout.MANIFEST_ATTR])
            own = layout.token_arrays(self._stored_manifest.get("annotations", {}))
            # Arrays added after capture (align's tokens/label) would go stale as rows are added: drop them.
            for key in set(self._stored_manifest["token_arrays"]) - set(own):
                if key in self._group:
                    delete_array(self._store, key)
            self._manifest = {**self._stored_manifest, "token_arrays": {k: str(v) for k, v in own.items()},
                              **manifest}
            for key in (*self._manifest["arrays"], *own):
                if key in self._group:
                    self._arrays[key] = self._group[key]
            # A crash can land between two arrays' resizes: the smallest is what every array has.
            self._capacity = min((array.shape[0] for array in self._arrays.values()), default=0)
            self._group.update_attributes({layout.MANIFEST_ATTR: self._manifest})
            return
        self._capacity = 0
        self._manifest = manifest
        # "w-", not "w": prepare_location already checked and cleared the location, and "w" would delete
        # everything under the store's root first (for an object store, a whole prefix).
        self._group = zarr.open_group(self._store, mode="w-", attributes={layout.MANIFEST_ATTR: manifest})
        self._group.create_group(layout.COMMITS_GROUP, attributes={
            "description": "one child group per committed chunk; its attributes are the chunk's commit record"})
        for key, dtype in token_arrays.items():
            self._create(key, (), dtype, {})

    @property
    def manifest(self) -> dict:
        return dict(self._manifest)

    def flags_array(self) -> zarr.Array:
        return self._arrays["tokens/flags"]

    def point_arrays(self) -> dict[str, zarr.Array]:
        """The activation arrays that exist (a resumed store's)."""
        return {key: array for key, array in self._arrays.items() if not key.startswith("tokens/")}

    def repair(self) -> tuple[ResumePoint, dict[str, np.ndarray]]:
        """Make a crashed or closed store continuable: keep rows up to the resume point, drop the commit
        records of the chunk holding it and of every later chunk (highest first, so the committed prefix is
        valid after every step), delete temp files. Returns the point and the kept rows of the cut chunk:
        the writers start that chunk with them and commit it again, whole. A crash before then only moves
        the next resume point back; no record ever describes rows it does not hold."""
        records = read_commit_records(self._store)
        point = find_resume_point(self._group, committed_prefix(records), self._stored_manifest)
        cut_chunk, kept = divmod(point.rows, self.chunk_tokens)
        for index in sorted(records, reverse=True):
            if index >= cut_chunk:
                delete_key(self._store, layout.commit_record_key(index))
        for leftover in self._root.rglob("*.partial") if self._root is not None else ():
            leftover.unlink()
        start = cut_chunk * self.chunk_tokens
        tail = {key: array[start:point.rows] for key, array in self._arrays.items()} if kept else {}
        return point, tail

    def start_over(self) -> None:
        """Nothing was committed: drop the activation arrays (a crash may have left only some of them; they
        are created again on the first batch) and create any token array a crash kept from being created."""
        with self._lock:
            for key in list(self.point_arrays()):
                delete_array(self._store, key)
                del self._arrays[key]
            for key, dtype in layout.token_arrays(self._manifest.get("annotations", {})).items():
                if key not in self._arrays:
                    self._create(key, (), dtype, {})

    def _create(self, key: str, row_shape: tuple[int, ...], dtype: np.dtype, attributes: dict) -> None:
        self._arrays[key] = self._group.create_array(
            key, shape=(self._capacity, *row_shape), chunks=(self.chunk_tokens, *row_shape), dtype=dtype,
            fill_value=0, compressors=self._compressors, attributes=attributes, config=_ARRAY_CONFIG)

    def create_point_arrays(self, specs: dict[str, tuple[int, np.dtype, dict]]) -> None:
        """Create the activation arrays: key -> (dim, on-disk dtype, attributes)."""
        with self._lock:
            for key, (dim, dtype, attributes) in specs.items():
                self._create(key, (dim,), dtype, attributes)

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
        """Write one chunk's rows of every array, then its commit record (which makes it visible)."""
        start = chunk_index * self.chunk_tokens
        stop = start + record["token_count"]
        self._ensure_capacity(stop)
        whole = record["token_count"] == self.chunk_tokens
        for key, data in arrays.items():
            array = self._arrays[key]
            if whole and self._direct:
                _write_file_atomic(chunk_path(self._root, key, array, chunk_index), data)
            else:
                array[start:stop] = data
        put_json(self._store, layout.commit_record_key(chunk_index),
                 {"zarr_format": 3, "node_type": "group", "attributes": record})

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        """Trim arrays to the committed rows (clean close) and publish the manifest, last. The reserve file
        goes first, so a full disk still has room to say ``failed``."""
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)
        with self._lock:
            if trim:
                self._capacity = rows
                self._resize_all(rows)
        self.update_manifest(manifest_updates)

    def update_manifest(self, updates: dict) -> None:
        with self._lock:
            self._manifest = {**self._manifest, **updates}
            self._group.update_attributes({layout.MANIFEST_ATTR: self._manifest})


class NullSink:
    """Runs the whole pipeline but discards rows: separates our overhead from the disk's."""

    def create_point_arrays(self, specs) -> None:
        pass

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        pass

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        pass

