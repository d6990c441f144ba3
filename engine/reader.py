"""Reading a store: the committed view (only rows of the gap-free prefix of committed chunks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from . import layout
from .errors import StoreFormatError
from .store import committed_prefix, read_commit_records


class CommittedArray:
    """One array limited to its committed rows. Indexing returns numpy arrays.

    Thread safety: read-only; safe from several threads.
    """

    def __init__(self, array: zarr.Array, rows: int):
        self.zarr = array
        self.shape = (rows, *array.shape[1:])
        self.dtype = array.dtype
        self.attrs = dict(array.attrs)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        first = index[0]
        if isinstance(first, slice):
            first = slice(*first.indices(self.shape[0]))
        elif isinstance(first, (int, np.integer)):
            if not -self.shape[0] <= first < self.shape[0]:
                raise IndexError(f"row {first} is outside the {self.shape[0]} committed rows")
            first = int(first) % self.shape[0]
        else:
            raise TypeError("index rows with an int or a slice (use .zarr for other selections)")
        return self.zarr[(first, *index[1:])]

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


class CaptureStore:
    """A capture store opened for reading.

    Attributes:
        manifest: the manifest dict (group attribute ``manifest``).
        chunks: commit records of the committed chunks, in order.
        num_tokens: committed rows (the same for every array).

    Thread safety: read-only; safe from several threads. Re-open to see chunks committed later.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError if hasattr(zarr.errors, "GroupNotFoundError")
                else FileNotFoundError) as exc:
            raise StoreFormatError(f"no capture store at {self.path}") from exc
        self.manifest = dict(self.group.attrs.get(layout.MANIFEST_ATTR) or {})
        if self.manifest.get("format") != layout.FORMAT_NAME:
            raise StoreFormatError(f"{self.path} is a zarr group but not a capture store (no manifest)")
        if self.manifest.get("format_version", 0) > layout.FORMAT_VERSION:
            raise StoreFormatError(f"{self.path} has format version {self.manifest['format_version']}; this "
                                   f"engine reads up to {layout.FORMAT_VERSION}: upgrade the package")
        self.chunks = committed_prefix(read_commit_records(self.group.store))
        self.num_tokens = sum(record["token_count"] for record in self.chunks)

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    def keys(self) -> list[str]:
        """Array paths: activation arrays first (as captured), then ``tokens/*``."""
        keys = [key for key in self.manifest.get("arrays", {}) if key in self._existing()]
        return keys + list(self.manifest.get("token_arrays", layout.TOKEN_ARRAYS))

    def _existing(self) -> set[str]:
        found = set()
        for name, node in self.group.members():
            if isinstance(node, zarr.Group) and name != layout.COMMITS_GROUP:
                found.update(f"{name}/{child}" for child, _ in node.arrays())
        return found

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> CommittedArray:
        if key not in self.keys():
            raise KeyError(f"{key!r} is not in this store: it has {', '.join(self.keys())}")
        return CommittedArray(self.group[key], self.num_tokens)


def open_store(path: str | os.PathLike) -> CaptureStore:
    """Open a capture store read-only: a view of its committed chunks."""
    return CaptureStore(path)
