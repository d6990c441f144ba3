"""Committed chunks as readers get them: read whole, and checked against their commit records.

Every read checks the chunk's stored size first (the fstat of the chunk file, opened by ``open_chunk_file``,
or one HEAD of the object); with ``verify`` it also compares the CRC32C of the rows read with the record's. A
chunk that is missing, of the wrong size, not a regular file, undecodable or fails its checksum raises
StoreCorruptError naming array, chunk and file, and none of its rows is returned. What the checksum covers,
and why, is written down in ``engine.format.layout``.

A store never reads outside its own folder: every local chunk file is opened by ``open_chunk_file``, which
follows no symbolic link below the store's folder (a linked chunk file or folder raises StoreFormatError)
and never blocks on a FIFO or device put in a chunk's place.

Torch-free (numpy and zarr): the capturing process (a resume), the writer process and the readers use it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import crc32c as _crc32c
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from engine.errors import StoreCorruptError, StoreFormatError
from engine.format.layout import ChunkFile, CommitRecord, Manifest

from . import layout

DAMAGE_FIX = ("restore the store from a copy, or resume the capture (a resume verifies the chunks it keeps, "
              "cuts back to the last good one and captures the rest again)")
METADATA_FIX = ("restore the named zarr.json files (or the whole store) from a copy: the rows on disk are "
                "read through them and the commit records, so no reader or resume can trust them until they "
                "agree")


def crc32c(rows: np.ndarray) -> int:
    """CRC32C of an array's bytes in C order (no copy of a C-contiguous array).

    The ``crc32c`` package releases the GIL while it runs (on buffers of 32 KiB and more), so the writer
    process's threads checksum their chunks side by side, and beside their statistics: google-crc32c (which
    zarr brings) holds it, and two threads took as long as one did for both
    (benchmarks/results/cpu-2026-12-04c/gil.txt)."""
    # The ignore: numpy's stubs give ndarray __buffer__ (the buffer protocol) only from Python 3.12.
    return _crc32c.crc32c(np.ascontiguousarray(rows))  # type: ignore[arg-type]


def plain_encoded(array: zarr.Array) -> bool:
    """True when a chunk is stored as the raw little-endian C-order rows (no filters or compressors)."""
    return not array.compressors and not array.filters


def local_plain(array: zarr.Array) -> bool:
    """True when a chunk's committed rows are the first bytes of a local file, as this machine's ndarrays
    hold them (plain encoded, a local folder, a little-endian machine): they can be read or mapped as they
    are."""
    return plain_encoded(array) and sys.byteorder == "little" and local_root(array) is not None


def chunk_key(array: zarr.Array, chunk_index: int) -> str:
    """Store key of one row chunk of an array (``layer_0/residual/c/3/0``)."""
    key = array.metadata.encode_chunk_key((chunk_index,) + (0,) * (array.ndim - 1))
    return f"{array.path}/{key}" if array.path else key


def local_root(array: zarr.Array) -> Path | None:
    """The folder of the store an array is in (a part's folder in a multi-process store); None on other
    stores."""
    store = array.store
    return Path(store.root) if isinstance(store, zarr.storage.LocalStore) else None


def local_chunk_path(array: zarr.Array, chunk_index: int) -> Path | None:
    """The file of one row chunk of an array in a local folder (None on other stores)."""
    root = local_root(array)
    return None if root is None else root / chunk_key(array, chunk_index)


def local_chunk_folder(array: zarr.Array) -> Path | None:
    """The folder every chunk file of a local array lies under (``<array>/c`` with zarr's default chunk key
    encoding, the array's own folder with the v2 one); None on other stores."""
    first, second = local_chunk_path(array, 0), local_chunk_path(array, 1)
    return None if first is None or second is None else Path(os.path.commonpath([first, second]))


def store_name(store: Store) -> str:
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


# ---- local chunk files: opened inside the store only, and only when they are files ------------------------

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO for reading would wait for a writer; a regular file reads the same with it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class _NotAFile(Exception):
    """Internal: what stands where a chunk file should be (``open_chunk_file`` returns it as a problem)."""


def link_refused(root: Path, relative: str) -> StoreFormatError:
    """The error for a symbolic link at ``relative`` below a store's folder ``root``."""
    return StoreFormatError(f"{root / relative} is a symbolic link: a store reads only its own files, "
                            "never through a link to somewhere else (it could serve another store's rows). "
                            "The fix: replace the link by the file or folder it points to (copy it in), or "
                            "restore the store from a copy")


def _open_folder(parent: int, name: str, root: Path, relative: str) -> int:
    """Open the folder ``name`` in the open folder ``parent``, refusing a symbolic link."""
    try:
        return os.open(name, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
        raise link_refused(root, relative)
    raise _NotAFile(f"{root / relative} is not a folder")


def open_below(root: Path, relative: str) -> int:
    """A descriptor of the folder ``relative`` below ``root``, reached without following a symbolic link
    (``root`` itself may be one: it is what the caller named).

    Raises:
        FileNotFoundError: there is no such folder.
        StoreFormatError: a symbolic link on the way.
    """
    folder = os.open(root, _FOLDER_FLAGS)
    done: list[str] = []
    try:
        for name in filter(None, relative.split("/")):
            done.append(name)
            inner = _open_folder(folder, name, root, "/".join(done))
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder


def _kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_chunk_file(root: Path, key: str) -> int | str:
    """Open the chunk file ``key`` of the store in folder ``root`` for reading: every local chunk read goes
    through here.

    Nothing outside the store is read: no symbolic link below ``root`` is followed. And nothing hangs: lstat
    must say a regular file before the open (a FIFO in a chunk's place would block the open, a device could
    do anything), the open cannot block (``O_NONBLOCK``, ``O_NOFOLLOW``), and its fstat must agree.

    Returns:
        The open descriptor (the caller closes it), or a problem ("a FIFO where a chunk file should be").

    Raises:
        FileNotFoundError: the chunk is absent (whether that is damage is the caller's to decide).
        StoreFormatError: the file, or a folder on the way, is a symbolic link.
    """
    folders, _, name = key.rpartition("/")
    try:
        folder = open_below(root, folders)
    except _NotAFile as problem:
        return f"{problem} where the chunk file's folder should be"
    try:
        found = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if stat.S_ISLNK(found.st_mode):
            raise link_refused(root, key)
        if _kind(found.st_mode) is not None:
            return f"{_kind(found.st_mode)} where the chunk file should be"
        fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
    finally:
        os.close(folder)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino) or _kind(opened.st_mode) is not None:
        os.close(fd)
        return "replaced by something else while it was opened"
    return fd


def _file_nbytes(root: Path, key: str) -> int | str | None:
    """The length of a local chunk file, None when there is none, or a problem (``open_chunk_file``)."""
    try:
        opened = open_chunk_file(root, key)
    except FileNotFoundError:
        return None
    if isinstance(opened, str):
        return opened
    try:
        return os.fstat(opened).st_size
    finally:
        os.close(opened)


def stored_nbytes(array: zarr.Array, chunk_index: int) -> int | str | None:
    """The stored length of a chunk (None: there is none), or what is wrong with its file: one open and fstat
    of the file (``open_chunk_file``), or one HEAD of the object."""
    root = local_root(array)
    if root is not None:
        return _file_nbytes(root, chunk_key(array, chunk_index))
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
    """What is wrong with a chunk's stored size (or its file), or None."""
    found = stored_nbytes(array, chunk_index)
    if isinstance(found, str):
        return found
    return _size_problem(found, expected_nbytes(array, file), absent_means_fill(file))


def open_local_chunk(array: zarr.Array, chunk_index: int, file: ChunkFile | None, needed: int) -> int | None:
    """``open_chunk_file`` of a chunk of a ``local_plain`` array, checked against its commit record (its
    length, and at least ``needed`` bytes: its committed rows) before any of its bytes is read; None when it
    is absent and may be (its rows are the fill value: ``absent_means_fill``). The caller closes it.

    Raises:
        StoreCorruptError: the chunk is missing or wrong, named as ``read_chunk`` names it.
        StoreFormatError: it, or a folder on its way, is a symbolic link.
    """
    root = local_root(array)
    assert root is not None, "open_local_chunk is for local_plain arrays"
    try:
        opened = open_chunk_file(root, chunk_key(array, chunk_index))
    except FileNotFoundError:
        if absent_means_fill(file):
            return None
        opened = "missing"
    if isinstance(opened, int):
        size = os.fstat(opened).st_size
        problem = _size_problem(size, expected_nbytes(array, file), absent_ok=False)
        if problem is None and size < needed:
            problem = f"{size} bytes, shorter than its committed rows ({needed} bytes)"
        if problem is None:
            return opened
        os.close(opened)
        opened = problem
    raise corrupt_error([describe(array, chunk_index, opened)])


def _read_file(array: zarr.Array, chunk_index: int, out: np.ndarray, file: ChunkFile | None) -> str | None:
    """A plain local chunk's first ``len(out)`` rows into ``out`` with readinto (no temporary)."""
    # The ignore: numpy's stubs give ndarray __buffer__ (the buffer protocol) only from Python 3.12.
    target = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    root = local_root(array)
    assert root is not None, "_read_file is for local_plain arrays"
    try:
        opened = open_chunk_file(root, chunk_key(array, chunk_index))
    except FileNotFoundError:
        if not absent_means_fill(file):
            return "missing"
        out.view(array.dtype)[...] = array.fill_value
        return None
    if isinstance(opened, str):
        return opened
    with open(opened, "rb", buffering=0) as f:
        problem = _size_problem(os.fstat(f.fileno()).st_size, expected_nbytes(array, file), absent_ok=False)
        done = 0
        while problem is None and done < len(target):
            got = f.readinto(target[done:])
            if not got:
                return f"{done} bytes, shorter than its {len(out)} committed rows"
            done += got
    return problem


def _read_zarr(array: zarr.Array, chunk_index: int, out: np.ndarray, file: ChunkFile | None) -> str | None:
    problem = size_problem(array, chunk_index, file)
    if problem is not None:
        return problem
    start = chunk_index * array.chunks[0]
    try:
        out[...] = np.asarray(array[start:start + out.shape[0]]).view(out.dtype)
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
    problem = (_read_file(array, chunk_index, out, file) if direct
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


# ---- array metadata against the manifest and the commit records -------------------------------------------


def _captured_arrays(manifest: Manifest) -> dict[str, tuple[np.dtype | None, tuple[int, ...] | None]]:
    """Every array the capture writes with each chunk: key -> (its dtype, its row shape; None for an
    activation array, whose width the commit records give)."""
    activations = layout.STORAGE_DTYPES.get(manifest.dtype)
    tokens = layout.token_arrays(manifest.annotations)
    scales = layout.scale_arrays(manifest.dtype, manifest.arrays)
    return {**{key: (activations, None) for key in manifest.arrays},
            **{key: (layout.SCALE_DTYPE, (1,)) for key in scales},
            **{key: (np.dtype(dtype), ()) for key, dtype in tokens.items()}}


def _record_problems(record: CommitRecord, activations: set[str], captured: set[str],
                     store: str) -> list[str]:
    """A commit record must list every array the capture wrote (``activations``: the manifest's activation
    arrays; ``captured``: every array): one that leaves an array out would have that array's chunk read as
    fill values (or not at all)."""
    index = record.chunk_index
    where = f"commit record of chunk {index} ({store}/{layout.commit_record_key(index)})"
    problems = []
    if record.dims.keys() != activations:
        problems.append(f"the {where} lists the activation arrays {sorted(record.dims)}, the manifest "
                        f"{sorted(activations)}")
    missing = sorted(captured - record.files.keys()) if record.files else []
    if missing:
        problems.append(f"the {where} has no stored chunk of {', '.join(missing)}")
    return problems


def _widths(records: list[CommitRecord], key: str) -> set[int]:
    return {record.dims[key] for record in records if key in record.dims}


def _array_metadata_problem(array: zarr.Array, expected: tuple[np.dtype | None, tuple[int, ...] | None],
                            widths: set[int], manifest: Manifest, rows: int) -> str | None:
    """What in one array's zarr.json disagrees with the manifest and the commit records, or None."""
    dtype, row_shape = expected
    activations = row_shape is None
    if activations and len(widths) > 1:
        return f"its commit records disagree on its width: {sorted(widths)}"
    # An activation array's width comes from the records (None: no chunk committed yet, nothing to misread).
    if activations and widths:
        row_shape = (next(iter(widths)),)
    chunks = None if row_shape is None else (manifest.chunk_tokens, *row_shape)
    checks = [("data type", array.dtype, dtype),
              ("row shape", array.shape[1:], row_shape),
              ("chunk shape", array.chunks, chunks),
              ("codecs", "none" if plain_encoded(array) else "compressing",
               "none" if manifest.compressor is None else "compressing")]
    for what, found, wanted in checks:
        if wanted is not None and found != wanted:
            return f"{what} {found}, the manifest and commit records say {wanted}"
    if array.shape[0] < rows:
        return f"{array.shape[0]} rows, fewer than the {rows} committed"
    return None


def metadata_problems(arrays: dict[str, zarr.Array], records: list[CommitRecord], manifest: Manifest,
                      rows: int, where: str) -> list[str]:
    """Check the arrays of one store (or part) against its manifest and its committed chunks' records: each
    captured array is there once a chunk is committed, with the dtype, width, chunking and codecs they say,
    and room for the ``rows`` committed; each record lists every array. Reads nothing (the metadata is open).

    Args:
        arrays: the store's arrays that exist, by key; where: the store, for messages.

    Returns: one line per problem (array, its zarr.json, what disagrees); empty when all agree.
    """
    captured = _captured_arrays(manifest)
    activations, every = set(manifest.arrays), set(captured)
    problems = [problem for record in records
                for problem in _record_problems(record, activations, every, where)]
    for key, expected in captured.items():
        array = arrays.get(key)
        if array is None:
            if records:
                problems.append(f"{key} ({where}/{key}/zarr.json): missing, but {len(records)} commit "
                                "records list it")
            continue
        problem = _array_metadata_problem(array, expected, _widths(records, key), manifest, rows)
        if problem is not None:
            problems.append(f"{key} ({where}/{key}/zarr.json): {problem}")
    return problems


def metadata_error(problems: list[str]) -> StoreCorruptError:
    """StoreCorruptError listing every array whose metadata disagrees with the store's records."""
    listing = "\n  ".join(problems)
    return StoreCorruptError(f"array metadata disagrees with the store's manifest and commit records, so the "
                             f"committed rows cannot be read as they were written:\n  {listing}\nThe fix: "
                             f"{METADATA_FIX}", problems)
