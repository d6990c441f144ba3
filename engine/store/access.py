"""Reading a store's documents: the group, its arrays, the manifest and the commit records (no torch)."""


from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Literal

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from engine.errors import EngineError, StoreFormatError
from engine.format import layout
from engine.format.chunks import (
    store_name,
)
from engine.format.files import write_file_atomic
from engine.format.layout import CommitRecord, Manifest
from engine.format.location import Location

# Without this, zarr compares every chunk with the fill value before writing it (~0.4 GB/s cap).
_METADATA_FIX = ("the store's metadata is damaged: restore it from a copy (the other arrays can still be "
                 "read with zarr alone)")


def _json_bytes(doc: dict) -> Any:
    return default_buffer_prototype().buffer.from_bytes(json.dumps(doc, sort_keys=True).encode())


def put_json(store: Store, key: str, doc: dict) -> None:
    """One object write (LocalStore writes a temp file and renames it: no torn record after SIGKILL)."""
    sync(store.set(key, _json_bytes(doc)))


def put_document(location: Location, key: str, doc: dict, durable: bool = True,
                 store: Store | None = None) -> None:
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


def open_group(location: Location, mode: Literal["r", "r+"] = "r") -> zarr.Group:
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


def read_commit_records(store: Store, where: str, manifest: Manifest,
                        damaged: list[str] | None = None) -> dict[int, CommitRecord]:
    """All commit records in a store (at ``where``, for messages), by chunk index (not always contiguous).

    Raises:
        StoreFormatError: a record is damaged (not JSON, a field missing or wrong, other rows than its
            chunk's), unless ``damaged`` is given: then each damaged record is named there and left out (a
            resume cuts the store back before it).
    """
    indices = record_indices(store)
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


def record_indices(store: Store) -> list[int]:
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
    prefix: list[CommitRecord] = []
    while len(prefix) in records:
        record = records[len(prefix)]
        if prefix and record.row_start != prefix[-1].row_stop:
            break
        prefix.append(record)
    return prefix


def delete_key(store: Store, key: str) -> None:
    sync(store.delete(key))


def delete_array(store: Store, key: str) -> None:
    """Remove an array node and its chunks."""
    sync(store.delete_dir(key))


def is_our_store(location: Location) -> bool:
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


