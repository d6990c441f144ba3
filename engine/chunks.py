"""Committed chunks as readers get them: read whole, and checked against their commit records.

Every read checks the chunk's stored size first (one stat of the chunk file, or one HEAD of the object: the
open file's fstat when the rows are read with ``readinto``); with ``verify`` it also compares the CRC32C of
the rows read with the record's. A chunk that is missing, of the wrong size, undecodable or fails its
checksum raises StoreCorruptError naming array, chunk and file, and none of its rows is returned. What the
checksum covers, and why, is written down in ``engine.layout``.

Torch-free (numpy and zarr): the capturing process (a resume), the writer process and the readers use it.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import crc32c as _crc32c
import numpy as np
import zarr
from zarr.core.sync import sync

from .errors import StoreCorruptError
from .layout import ChunkFile

DAMAGE_FIX = ("restore the store from a copy, or resume the capture (a resume verifies the chunks it keeps, "
              "cuts back to the last good one and captures the rest again)")


def crc32c(rows: np.ndarray) -> int:
    """CRC32C of an array's bytes in C order (no copy of a C-contiguous array).

    The ``crc32c`` package releases the GIL while it runs (on buffers of 32 KiB and more), so the writer
    process's threads checksum their chunks side by side, and beside their statistics: google-crc32c (which
    zarr brings) holds it, and two threads took as long as one did for both
    (benchmarks/results/cpu-2026-12-04c/gil.txt)."""
    return _crc32c.crc32c(np.ascontiguousarray(rows))


def plain_encoded(array: zarr.Array) -> bool:
    """True when a chunk is stored as the raw little-endian C-order rows (no filters or compressors)."""
    return not array.compressors and not array.filters


def local_plain(array: zarr.Array) -> bool:
    """True when a chunk's committed rows are the first bytes of a local file, as this machine's ndarrays
    hold them (plain encoded, a local folder, a little-endian machine): they can be read or mapped as they
    are."""
    local = isinstance(array.store, zarr.storage.LocalStore)
    return plain_encoded(array) and sys.byteorder == "little" and local


def chunk_key(array: zarr.Array, chunk_index: int) -> str:
    """Store key of one row chunk of an array (``layer_0/residual/c/3/0``)."""
    key = array.metadata.encode_chunk_key((chunk_index,) + (0,) * (array.ndim - 1))
    return f"{array.path}/{key}" if array.path else key


def local_chunk_path(array: zarr.Array, chunk_index: int) -> Path | None:
    """The file of one row chunk of an array in a local folder (None on other stores)."""
    store = array.store
    return store.root / chunk_key(array, chunk_index) if isinstance(store, zarr.storage.LocalStore) else None


def local_chunk_folder(array: zarr.Array) -> Path | None:
    """The folder every chunk file of a local array lies under (``<array>/c`` with zarr's default chunk key
    encoding, the array's own folder with the v2 one); None on other stores."""
    first = local_chunk_path(array, 0)
    return None if first is None else Path(os.path.commonpath([first, local_chunk_path(array, 1)]))


def store_name(store: zarr.abc.store.Store) -> str:
    """Where a zarr store is, for messages: its folder, or its URL."""
    return str(store.root) if isinstance(store, zarr.storage.LocalStore) else str(store)


def chunk_file_name(array: zarr.Array, chunk_index: int) -> str:
    """Where a chunk is, for messages: its file, or its object's URL."""
    return f"{store_name(array.store)}/{chunk_key(array, chunk_index)}"


def full_chunk_nbytes(array: zarr.Array) -> int:
    """Stored length of an uncompressed chunk: always a whole chunk (the last one is a sparse file, or zarr's
    fill value, past its rows)."""
    return int(np.prod(array.chunks)) * array.dtype.itemsize


def expected_nbytes(array: zarr.Array, file: ChunkFile | None) -> int | None:
    """The stored length a chunk must have: the record's (format version 2), that of a whole uncompressed
    chunk (version 1), or None when only its presence can be checked (a compressed chunk of version 1)."""
    if file is not None:
        return file.nbytes
    return full_chunk_nbytes(array) if plain_encoded(array) else None


def stored_nbytes(array: zarr.Array, chunk_index: int) -> int | None:
    """The stored length of a chunk (None: there is none): one stat, or one HEAD of the object."""
    try:
        return sync(array.store.getsize(chunk_key(array, chunk_index)))
    except FileNotFoundError:
        return None


def absent_means_fill(file: ChunkFile | None) -> bool:
    """Whether a chunk may be absent: only one its commit record has no file for (every chunk of format
    version 1, and arrays added after the capture, such as align's ``tokens/label``). zarr does not store a
    chunk whose values all equal the fill value, and reads it back as that value, so such a chunk may never
    have been stored. A version 2 record names every chunk the capture wrote: each must be there."""
    return file is None


def _size_problem(found: int | None, expected: int | None, absent_ok: bool) -> str | None:
    if found is None:
        return None if absent_ok else "missing"
    if expected is not None and found != expected:
        return f"{found} bytes, the commit record says {expected}"
    return None


def size_problem(array: zarr.Array, chunk_index: int, file: ChunkFile | None) -> str | None:
    """What is wrong with a chunk's stored size, or None."""
    return _size_problem(stored_nbytes(array, chunk_index), expected_nbytes(array, file),
                         absent_means_fill(file))


class ChunkFileError(Exception):
    """What is wrong with a chunk file that is there (the message is the problem line ``describe`` takes)."""


_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder",
               stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def _check_regular(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "of an unknown kind")
        raise ChunkFileError(f"{kind}, not a regular file")


def open_chunk_file(path: Path, expected: int | None, needed: int) -> int:
    """A read-only descriptor of a local chunk file, checked before any of its bytes is read: a regular file
    (lstat first: reading a FIFO would block for ever, a symbolic link could lead outside the store; opened
    with ``O_NOFOLLOW | O_NONBLOCK`` so that one swapped in meanwhile cannot either, and checked again with
    fstat), whose length is the one its commit record gives (``expected``; None: any) and holds its
    committed rows (``needed`` bytes). The caller closes the descriptor.

    Raises:
        FileNotFoundError: there is no such file.
        ChunkFileError: it is there and wrong.
    """
    _check_regular(os.lstat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _check_regular(info)
        problem = _size_problem(info.st_size, expected, absent_ok=False)
        if problem is None and info.st_size < needed:
            problem = f"{info.st_size} bytes, shorter than its committed rows ({needed} bytes)"
        if problem is not None:
            raise ChunkFileError(problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_local_chunk(array: zarr.Array, chunk_index: int, file: ChunkFile | None, needed: int) -> int | None:
    """``open_chunk_file`` of a chunk of a ``local_plain`` array: None when it is absent and may be (its rows
    are the fill value: ``absent_means_fill``).

    Raises:
        StoreCorruptError: the chunk is missing or wrong, named as ``read_chunk`` names it.
    """
    try:
        return open_chunk_file(local_chunk_path(array, chunk_index), expected_nbytes(array, file), needed)
    except FileNotFoundError:
        if absent_means_fill(file):
            return None
        problem = "missing"
    except ChunkFileError as error:
        problem = str(error)
    raise corrupt_error([describe(array, chunk_index, problem)])


def _read_file(array: zarr.Array, path: Path, out: np.ndarray, file: ChunkFile | None) -> str | None:
    """A plain local chunk's first ``len(out)`` rows into ``out`` with readinto (no temporary)."""
    target = memoryview(out.reshape(-1).view(np.uint8))
    try:
        fd = open_chunk_file(path, expected_nbytes(array, file), out.nbytes)
    except FileNotFoundError:
        if not absent_means_fill(file):
            return "missing"
        out.view(array.dtype)[...] = array.fill_value
        return None
    except ChunkFileError as problem:
        return str(problem)
    with open(fd, "rb", buffering=0) as f:
        done = 0
        while done < len(target):
            got = f.readinto(target[done:])
            if not got:
                return f"{done} bytes, shorter than its {len(out)} committed rows"
            done += got
    return None


def _kind_problem(array: zarr.Array, chunk_index: int) -> str | None:
    """What is wrong with the kind of a local chunk file zarr is to read (zarr follows a symbolic link)."""
    path = local_chunk_path(array, chunk_index)
    try:
        if path is not None:
            _check_regular(os.lstat(path))
    except FileNotFoundError:
        return None  # size_problem says whether it may be absent
    except ChunkFileError as error:
        return str(error)
    return None


def _read_zarr(array: zarr.Array, chunk_index: int, out: np.ndarray, file: ChunkFile | None) -> str | None:
    problem = _kind_problem(array, chunk_index) or size_problem(array, chunk_index, file)
    if problem is not None:
        return problem
    start = chunk_index * array.chunks[0]
    try:
        out[...] = array[start:start + out.shape[0]].view(out.dtype)
    except OSError:
        raise  # the storage failed, not the chunk
    except Exception as error:  # a codec's error on damaged bytes; zarr names no common class
        return f"cannot be decoded ({type(error).__name__}: {error})"
    return None


def chunk_problem(array: zarr.Array, chunk_index: int, file: ChunkFile | None, out: np.ndarray,
                  verify: bool) -> str | None:
    """Read chunk ``chunk_index``'s first ``len(out)`` rows (its committed rows) into ``out`` and say what is
    wrong with it, or None. Plain chunks of a local store: one readinto; others through zarr. ``verify``:
    compare the rows' CRC32C with ``file``'s (a format version 1 chunk has none to compare)."""
    direct = local_plain(array) and out.flags.c_contiguous
    problem = (_read_file(array, local_chunk_path(array, chunk_index), out, file) if direct
               else _read_zarr(array, chunk_index, out, file))
    if problem is None and verify:
        problem = checksum_problem(out, file)
    return problem


def checksum_problem(rows: np.ndarray, file: ChunkFile | None) -> str | None:
    """What is wrong with a chunk's committed rows as read, by their CRC32C (None: right, or format version 1
    and nothing to compare)."""
    if file is None:
        return None
    found = crc32c(rows)
    if found != file.crc32c:
        return f"CRC32C {found:#010x} of its rows, the commit record says {file.crc32c:#010x}"
    return None


def describe(array: zarr.Array, chunk_index: int, problem: str) -> str:
    """One line naming a bad chunk: array, chunk, file, what is wrong."""
    return f"{array.path} chunk {chunk_index} ({chunk_file_name(array, chunk_index)}): {problem}"


def corrupt_error(problems: list[str]) -> StoreCorruptError:
    """StoreCorruptError listing every bad chunk."""
    if len(problems) == 1:
        return StoreCorruptError(f"committed chunk damaged, its rows are never returned: {problems[0]}. The "
                                 f"fix: {DAMAGE_FIX}", problems)
    listing = "\n  ".join(problems)
    return StoreCorruptError(f"{len(problems)} committed chunks damaged, their rows are never returned:\n  "
                             f"{listing}\nThe fix: {DAMAGE_FIX}", problems)


def read_chunk(array: zarr.Array, chunk_index: int, file: ChunkFile | None, out: np.ndarray,
               verify: bool) -> None:
    """``chunk_problem``, raising StoreCorruptError when there is one."""
    problem = chunk_problem(array, chunk_index, file, out, verify)
    if problem is not None:
        raise corrupt_error([describe(array, chunk_index, problem)])


def check_size(array: zarr.Array, chunk_index: int, file: ChunkFile | None) -> None:
    """StoreCorruptError when a chunk is missing or of the wrong size (one stat or HEAD, no read)."""
    problem = size_problem(array, chunk_index, file)
    if problem is not None:
        raise corrupt_error([describe(array, chunk_index, problem)])
