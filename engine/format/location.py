"""Where a store lives: a local folder, or an object-store URL (``s3://bucket/prefix``, ``gs://``, ``memory://``
and any other fsspec protocol).

Everything that depends on the kind of location is decided here: which zarr store opens it, whether
direct file I/O is possible (local folders only; ``engine.store.sink`` uses it for whole chunks), and how to
check and clear it. Remote locations go through ``zarr.storage.FsspecStore``: every key is one object, so a
chunk or a commit record is written with a single PUT, which object stores make visible atomically.
Credentials and endpoints come from the usual environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or from ``storage_options`` (passed to the fsspec
filesystem, e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for s3fs).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import zarr
from zarr.abc.store import Store

from engine.errors import StorePathError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclasses.dataclass(frozen=True)
class Location:
    """A store's place: ``url`` is an absolute local path with every symbolic link resolved, or a URL without
    a trailing slash.

    Args:
        url: local path or URL.
        storage_options: fsspec filesystem options of a URL (ignored for local paths).

    Thread safety: immutable; picklable (DataLoader workers open their own stores from it).
    """

    url: str
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, where: str | os.PathLike | Location,
           storage_options: Mapping[str, Any] | None = None) -> Location:
        """A Location from a path, a URL (``file://`` URLs are local paths) or a Location."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if _URL.match(text):
            url = text.rstrip("/")
            if "/" not in url.split("://", 1)[1]:
                raise StorePathError(f"{text} is a bucket's root: name a prefix inside it, e.g. "
                                     f"{url}/acts.zarr (a store at the root would own, and on overwrite "
                                     "delete, the whole bucket)")
            return cls(url, dict(storage_options or {}))
        # Resolved: a store reached through a symbolic link (or a linked parent folder) is the folder it
        # points to, with that folder's one lock; an overwrite replaces that folder's contents, not the link.
        return cls(str(Path(text).expanduser().resolve()))

    @property
    def local(self) -> Path | None:
        """The folder of a local location, None for a remote one."""
        return None if _URL.match(self.url) else Path(self.url)

    def child(self, relative: str) -> Location:
        """The location of a sub-path (a part of a multi-process store)."""
        return dataclasses.replace(self, url=f"{self.url}/{relative}")

    def zarr_store(self, read_only: bool = False) -> Store:
        """A zarr store rooted here."""
        if self.local is not None:
            return zarr.storage.LocalStore(self.url, read_only=read_only)
        try:
            store = zarr.storage.FsspecStore.from_url(self.url, storage_options=dict(self.storage_options),
                                                      read_only=read_only)
        except ImportError as exc:
            raise ImportError(f"{self.url} needs an fsspec filesystem for its protocol ({exc}): for s3:// "
                              "install s3fs (pip install 'actcap-engine[s3]')") from exc
        # fsspec shares one filesystem instance per process and caches its listings: an opened store must
        # see the commit records written since (by another process, or before a crash), not a stale list.
        store.fs.invalidate_cache()
        return store

    def __str__(self) -> str:
        return self.url
