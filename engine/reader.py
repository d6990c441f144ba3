"""Reading a store: the committed view (only rows of the gap-free prefix of committed chunks)."""

from __future__ import annotations

import bisect
import dataclasses
import os

import numpy as np
import zarr

from . import layout
from .errors import StoreFormatError
from .location import Location
from .store import committed_prefix, read_commit_records

_GROUP_NOT_FOUND = getattr(zarr.errors, "GroupNotFoundError", FileNotFoundError)


class CommittedArray:
    """One array limited to its committed rows; in a multi-process store, the parts' rows in rank order.
    Indexing rows with an int or a slice returns numpy arrays.

    Args:
        pieces: (zarr array, committed rows) per part, in order (one piece for a single-process store).

    Thread safety: read-only; safe from several threads.
    """

    def __init__(self, pieces: list[tuple[zarr.Array, int]]):
        self.pieces = pieces
        first = pieces[0][0]
        self.shape = (sum(rows for _, rows in pieces), *first.shape[1:])
        self.dtype = first.dtype
        self.attrs = dict(first.attrs)

    @property
    def zarr(self) -> zarr.Array:
        """The zarr array of a single-process store (a multi-process store has one per part: ``pieces``)."""
        if len(self.pieces) != 1:
            raise TypeError(f"this array spans {len(self.pieces)} parts: use .pieces, one zarr array per part")
        return self.pieces[0][0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        first, rest = index[0], index[1:]
        if isinstance(first, (int, np.integer)):
            if not -self.shape[0] <= first < self.shape[0]:
                raise IndexError(f"row {first} is outside the {self.shape[0]} committed rows")
            row = int(first) % self.shape[0]
            return self._rows(range(row, row + 1), rest)[0]
        if not isinstance(first, slice):
            raise TypeError("index rows with an int or a slice (use .zarr or .pieces for other selections)")
        rows = range(*first.indices(self.shape[0]))
        if rows.step > 0:
            return self._rows(rows, rest)
        return self._rows(rows[::-1], rest)[::-1]  # a negative step: the same rows read forwards

    def _rows(self, rows: range, rest: tuple) -> np.ndarray:
        """The rows of a forward range, piece by piece: each piece reads only its selected rows (zarr fetches
        only the chunks holding them)."""
        out, offset = [], 0
        for array, count in self.pieces:
            local = rows[bisect.bisect_left(rows, offset):bisect.bisect_left(rows, offset + count)]
            if len(local):
                out.append(array[(slice(local.start - offset, local.stop - offset, local.step), *rest)])
            offset += count
        if not out:
            return self.pieces[0][0][(slice(0, 0), *rest)]
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


@dataclasses.dataclass
class StorePart:
    """One process's part of a store (the whole store, for a single-process capture).

    Attributes:
        location: where the part is.
        group: its zarr group (None: the rank never created it).
        chunks: commit records of its committed chunks, in order.
        num_tokens: its committed rows.
    """

    location: Location
    group: zarr.Group | None
    chunks: list[dict]
    num_tokens: int


def _open_group(location: Location) -> zarr.Group | None:
    try:
        return zarr.open_group(location.zarr_store(read_only=True), mode="r")
    except (FileNotFoundError, KeyError, _GROUP_NOT_FOUND):
        return None


def _open_part(location: Location, group: zarr.Group | None) -> StorePart:
    if group is None:
        return StorePart(location, None, [], 0)
    chunks = committed_prefix(read_commit_records(group.store))
    return StorePart(location, group, chunks, sum(record["token_count"] for record in chunks))


class CaptureStore:
    """A capture store opened for reading; a multi-process store's parts read as one, in rank order.

    Args:
        path: local folder or URL (``s3://bucket/prefix``).
        storage_options: fsspec options of a URL (default: the usual environment variables).

    Attributes:
        location: where the store is; path: its local folder (Path) or URL (str).
        manifest: the manifest dict (group attribute ``manifest``; a multi-process store's top manifest).
        parts: StorePart per process (one for a single-process store).
        chunks: commit records of the committed chunks, in order (part after part).
        num_tokens: committed rows (the same for every array).

    Thread safety: read-only; safe from several threads. Re-open to see chunks committed later.
    """

    def __init__(self, path: str | os.PathLike | Location, storage_options: dict | None = None):
        self.location = Location.of(path, storage_options)
        self.path = self.location.local or self.location.url
        self.group = _open_group(self.location)
        if self.group is None:
            raise StoreFormatError(f"no capture store at {self.location}")
        self.manifest = dict(self.group.attrs.get(layout.MANIFEST_ATTR) or {})
        if self.manifest.get("format") != layout.FORMAT_NAME:
            raise StoreFormatError(f"{self.location} is a zarr group but not a capture store (no manifest)")
        if self.manifest.get("format_version", 0) > layout.FORMAT_VERSION:
            raise StoreFormatError(f"{self.location} has format version {self.manifest['format_version']}; this "
                                   f"engine reads up to {layout.FORMAT_VERSION}: upgrade the package")
        if "parts" in self.manifest:
            self.parts = [_open_part(part, _open_group(part))
                          for part in (self.location.child(entry["path"]) for entry in self.manifest["parts"])]
        else:
            self.parts = [_open_part(self.location, self.group)]
        self.chunks = [record for part in self.parts for record in part.chunks]
        self.num_tokens = sum(part.num_tokens for part in self.parts)

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    def keys(self) -> list[str]:
        """Array paths: activation arrays first (as captured), then ``tokens/*``."""
        existing = self._existing()
        listed = (*self.manifest.get("arrays", {}), *self.manifest.get("token_arrays", layout.TOKEN_ARRAYS))
        return [key for key in listed if key in existing]

    def _existing(self) -> set[str]:
        found = set()
        for part in self.parts:
            for name, node in part.group.members() if part.group is not None else ():
                if isinstance(node, zarr.Group) and name != layout.COMMITS_GROUP:
                    found.update(f"{name}/{child}" for child, _ in node.arrays())
        return found

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> CommittedArray:
        if key not in self.keys():
            raise KeyError(f"{key!r} is not in this store: it has {', '.join(self.keys())}")
        pieces = [(part.group[key], part.num_tokens) for part in self.parts
                  if part.group is not None and key in part.group]
        return CommittedArray([piece for piece in pieces if piece[1]] or pieces[:1])


def open_store(path: str | os.PathLike | Location, storage_options: dict | None = None) -> CaptureStore:
    """Open a capture store read-only (local folder or URL): a view of its committed chunks."""
    return CaptureStore(path, storage_options)
