"""The store: zarr v3 group creation, chunk writes with commit records, manifest updates.

Writers call ``write_chunk`` from several threads for *distinct* chunks (safe in zarr); every metadata
change (array creation, capacity growth, trim, manifest) happens under one lock here, because zarr's
resize/append rewrite ``zarr.json`` from in-memory shape without a lock of their own.
"""

from __future__ import annotations

import asyncio
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
from .errors import StoreExistsError

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
    """The records of chunks 0..k-1 with no gap: only these rows are trusted."""
    prefix = []
    while len(prefix) in records:
        prefix.append(records[len(prefix)])
    return prefix


def _is_our_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return layout.MANIFEST_ATTR in meta.get("attributes", {})


def prepare_location(path: Path, overwrite: bool, resume: bool) -> bool:
    """Check the output path; remove an old store when ``overwrite``. Returns True if a store exists."""
    if path.exists() and not path.is_dir():
        raise StoreExistsError(f"output_dir {path} is a file: point output_dir at a folder for the zarr store")
    exists = path.is_dir() and any(path.iterdir())
    if exists and not _is_our_store(path):
        raise StoreExistsError(f"output_dir {path} is a non-empty folder that is not a capture store: "
                               "choose a new or empty folder (nothing there was changed)")
    if exists and not (overwrite or resume):
        raise StoreExistsError(f"a capture store already exists at {path}: pass overwrite=True to replace it "
                               "or resume=True to continue it")
    if exists and overwrite:
        shutil.rmtree(path)
        exists = False
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise StoreExistsError(f"cannot write under {parent}: choose an output_dir in a writable folder")
    return exists


def _write_file_atomic(path: Path, data) -> None:
    """Write bytes to a temp file beside ``path`` and rename it over (as LocalStore does); the write and
    rename release the GIL, which the forward thread needs more than we do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _compressors(name: str | None):
    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


class ZarrSink:
    """Writes chunks and commit records into one zarr v3 group.

    Args:
        path: the store folder (created).
        chunk_tokens: rows per chunk for every array.
        compressor: None, "zstd" or "blosc".
        manifest: initial manifest (status open).

    Thread safety: ``write_chunk`` from several threads for distinct chunks; the rest from one thread.
    """

    def __init__(self, path: Path, chunk_tokens: int, compressor: str | None, manifest: dict):
        self.chunk_tokens = chunk_tokens
        self._compressors = _compressors(compressor)
        self._root = path
        # Whole uncompressed chunks are plain little-endian C-order bytes (zarr's bytes codec): write them as
        # files directly, skipping zarr's Python codec pipeline and event loop, whose GIL use slowed the
        # forward thread (H100 run 1). Partial chunks, compressed arrays and metadata still go through zarr.
        self._direct = compressor is None and sys.byteorder == "little"
        self._store = zarr.storage.LocalStore(str(path))
        self._group = zarr.open_group(self._store, mode="w", attributes={layout.MANIFEST_ATTR: manifest})
        self._group.create_group(layout.COMMITS_GROUP, attributes={
            "description": "one child group per committed chunk; its attributes are the chunk's commit record"})
        self._arrays: dict[str, zarr.Array] = {}
        self._capacity = 0
        self._lock = threading.Lock()
        self._manifest = manifest
        for key, dtype in layout.TOKEN_ARRAYS.items():
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
                coords = (chunk_index,) + (0,) * (array.ndim - 1)
                _write_file_atomic(self._root / key / array.metadata.encode_chunk_key(coords), data)
            else:
                array[start:stop] = data
        put_json(self._store, layout.commit_record_key(chunk_index),
                 {"zarr_format": 3, "node_type": "group", "attributes": record})

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        """Trim arrays to the committed rows (clean close) and publish the manifest, last."""
        with self._lock:
            if trim:
                self._capacity = rows
                self._resize_all(rows)
            self._manifest = {**self._manifest, **manifest_updates}
            self._group.update_attributes({layout.MANIFEST_ATTR: self._manifest})


class NullSink:
    """Runs the whole pipeline but discards rows: separates our overhead from the disk's."""

    def create_point_arrays(self, specs) -> None:
        pass

    def write_chunk(self, chunk_index: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        pass

    def finalize(self, rows: int, manifest_updates: dict, trim: bool) -> None:
        pass

