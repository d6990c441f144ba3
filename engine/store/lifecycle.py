"""A store's life before and after the writer process: whether a location may be written, creating,
continuing (a resume cuts the store back to its committed prefix), reserving space, marking a failure."""


from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store
from zarr.core.sync import sync

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

from engine.errors import StoreExistsError, StorePathError
from engine.format import layout
from engine.format.chunks import (
    link_refused,
    metadata_error,
    metadata_problems,
)
from engine.format.layout import Manifest
from engine.format.location import Location
from engine.store.access import (
    committed_prefix,
    delete_array,
    delete_key,
    existing_arrays,
    is_our_store,
    manifest_of,
    open_group,
    read_commit_records,
    record_indices,
)
from engine.store.resume import ResumePoint, scan_committed

# Without this, zarr compares every chunk with the fill value before writing it (~0.4 GB/s cap).
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def _check_existing(location: Location, exists: bool, overwrite: bool, resume: bool) -> None:
    if exists and not is_our_store(location):
        raise StoreExistsError(f"output_dir {location} is not empty and not a capture store: choose a new or "
                               "empty location (nothing there was changed)")
    if exists and not (overwrite or resume):
        raise StoreExistsError(f"a capture store already exists at {location}: continue it (resume=True, "
                               "--resume) or replace it (overwrite=True, --overwrite)")


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
    _check_writable(parent, exists)
    return exists


def _check_writable(folder: Path, exists: bool) -> None:
    """Refuse a folder where the store cannot be written. For a new store a folder is made and removed in
    ``folder`` (the nearest existing one): permission bits cannot tell, root passes them on /proc, /sys or a
    read-only mount. An existing store's own folder is not probed (a reader listing it would see the
    probe)."""
    problem = None
    if exists:
        problem = None if os.access(folder, os.W_OK) else "read-only or no permission"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".actcap-write-check-", dir=folder))
        except OSError as error:
            problem = error.strerror or str(error)
    if problem is not None:
        raise StorePathError(f"cannot write under {folder} ({problem}): put the store in a folder you "
                             "can write")


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


def create_array(group: zarr.Group, key: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype,
                  chunk_tokens: int, compressor: str | None, attributes: dict) -> zarr.Array:
    return group.create_array(key, shape=(rows, *row_shape), chunks=(chunk_tokens, *row_shape), dtype=dtype,
                              fill_value=0, compressors=_compressors(compressor), attributes=attributes,
                              config=ARRAY_CONFIG)


def create_store(location: Location, manifest: Manifest) -> None:
    """A new, empty store: the root group with its manifest, the commits group and the per-token arrays (the
    activation arrays come with the first batch, when their widths are known)."""
    # "w-", not "w": prepare_location already checked and cleared the location, and "w" would delete
    # everything under the store's root first (for an object store, a whole prefix).
    group = zarr.open_group(location.zarr_store(), mode="w-",
                            attributes={layout.MANIFEST_ATTR: manifest.to_json()})
    group.create_group(layout.COMMITS_GROUP, attributes={
        "description": "one child group per committed chunk; its attributes are the chunk's commit record"})
    for key, dtype in manifest.token_arrays.items():
        create_array(group, key, 0, (), np.dtype(dtype), manifest.chunk_tokens, manifest.compressor, {})
    _reserve_space(location)


def continue_store(location: Location, started: str, writer: dict) -> ResumePoint:
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
        started: when this run started (its manifest's ``created``): the manifest's new ``resumes`` entry
            says it, with the rows kept and dropped.
        writer: this run's entry for the manifest's ``writers`` (the lock's owner record).
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
    resumed = _resumed_manifest(stored, own, started, writer, point)
    group.update_attributes({layout.MANIFEST_ATTR: resumed.to_json()})
    _cut_back(location, store, group, stored, point)
    _reserve_space(location)
    return point if point.rows else ResumePoint(0, 0, 0)


def _cut_back(location: Location, store: Store, group: zarr.Group, stored: Manifest,
              point: ResumePoint) -> None:
    """Drop the records (damaged ones too) from the cut chunk on, highest first; temp files; and arrays that
    do not go on."""
    for index in reversed(record_indices(store)):
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
            create_array(group, key, 0, (), dtype, stored.chunk_tokens, stored.compressor, {})


def _resumed_manifest(stored: Manifest, own: dict[str, np.dtype], started: str, writer: dict,
                      point: ResumePoint) -> Manifest:
    entry = {"at": started, "status_before": stored.status, "rows": point.rows, "sequences": point.sequences,
             "dropped_rows": point.committed_rows - point.rows}
    if point.damaged:
        entry["damaged_chunks"] = list(point.damaged)
    return dataclasses.replace(stored, token_arrays={key: str(dtype) for key, dtype in own.items()},
                               resumes=[*stored.resumes, entry], writers=[*stored.writers, writer],
                               status=layout.STATUS_OPEN, error=None)


def mark_failed(location: Location, error: str) -> None:
    """Publish ``failed`` for a store whose writer process died (it can no longer publish anything)."""
    release_reserve(location)
    group = open_group(location, mode="r+")
    failed = dataclasses.replace(manifest_of(group), status=layout.STATUS_FAILED, error=error)
    group.update_attributes({layout.MANIFEST_ATTR: failed.to_json()})
