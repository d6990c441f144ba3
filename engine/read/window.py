"""Windows of chunks served as one array per column: what lets a shuffled batch gather its rows from hundreds
of chunks with one numpy call per array, as a memory map of one file would.

A ``ChunkWindow`` holds an ``AddressRange`` per column. An ``AddressRange`` reserves addresses (no memory:
``PROT_NONE``) and maps each chunk file read-only at a fixed place in it (``MAP_FIXED``), or memory that
rows are read into (compressed chunks, object stores). Row ``r`` of the window's chunk ``s`` then is row
``s * slot_rows + r`` of one ndarray over the range, and gathering a batch from the whole window is one
``np.take``: with one call per chunk instead, a batch from 49 chunks took 30% more CPU, from 325 chunks
70-80% more (benchmarks/results/cpu-2026-12-07/gather_calls.txt).

Each slot starts on a 2 MiB boundary when its chunk is at least that large: a page cache that holds the
file in 2 MiB folios (what a read through a ``MADV_HUGEPAGE`` mapping leaves, see ``populate``) is then
mapped with one page fault per 2 MiB instead of one per 64 KiB: gathering every row of 614 MB took 294
instead of 9,408 faults and 142-191 instead of 268-346 ms of CPU on this project's VM
(benchmarks/results/cpu-2026-12-07/page_faults.txt).

POSIX only (``mmap`` with ``MAP_FIXED`` through libc; Linux and macOS). Torch-free.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import math
import mmap
import os
import sys
import threading
from typing import Iterator

import numpy as np

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20  # a PMD mapping on x86-64 and arm64 with 4 KiB pages
_PROT_NONE = 0
_MAP_FIXED = 0x10  # the same on Linux and macOS; Python's mmap module does not export it
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0x40
# Linux 5.14: read the range into the page cache and map it, as faults would (EINVAL before)
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None
_MAP_FAILED = ctypes.c_void_p(-1).value
POPULATE_STEP = 8 << 20  # bytes populated per call, so a reader ahead stops soon when told to
# Chunk files read ahead at once, each in order: this project's VM read 614 MB at 540-950 MB/s with one
# stream, 930-1850 with two, 1010-1840 with four, where one sequential read() of each file ran at 390-780
# (benchmarks/results/cpu-2026-12-07/read_ahead_streams.txt).
READ_AHEAD_STREAMS = 4


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _mmap(address: int | None, length: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _libc().mmap(address, length, prot, flags, fd, 0)
    if result in (None, _MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, f"mmap of {length} bytes for a window of chunks: {os.strerror(code)}. If the "
                      "process ran out of addresses or mappings (vm.max_map_count), lower "
                      "ActivationDataset's window_bytes")
    return result


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def slot_alignment(nbytes: int) -> int:
    """Where a mapping of ``nbytes`` should start: on a huge page when it can hold one, else on a page."""
    return HUGE_PAGE if nbytes >= HUGE_PAGE else PAGE


def slot_rows(chunk_rows: int, row_bytes: list[int]) -> int:
    """Rows per slot, the same for every column (so a row's index is the same in each): at least a chunk,
    and a whole number of each column's rows that keeps every slot on its column's alignment."""
    unit = 1
    for width in row_bytes:
        alignment = slot_alignment(chunk_rows * width)
        unit = math.lcm(unit, alignment // math.gcd(alignment, width))
    return _round_up(chunk_rows, unit)


class _Addresses:
    """Memory at an address, as numpy's array interface describes it (numpy keeps this object alive, not
    the memory: ``AddressRange.close`` unmaps it)."""

    def __init__(self, address: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.__array_interface__ = {"data": (address, False), "typestr": dtype.str, "shape": shape,
                                    "version": 3}


class AddressRange:
    """Reserved addresses for one column of a window: chunk files mapped read-only, or memory, at fixed
    offsets, all seen through one ndarray (``array``).

    Args:
        nbytes: bytes to reserve (no memory is taken until memory is mapped and written).

    Thread safety: map and close from one thread; ``populate`` may run in another while the range is open
    (its caller makes sure it is done before ``close``). An ndarray from ``array`` must not be used after
    ``close``: its addresses are gone (a read would crash the process), so the window that owns the range
    drops every view before closing it.
    """

    def __init__(self, nbytes: int):
        self.nbytes = max(nbytes, 1)
        self._reserved = _round_up(self.nbytes, PAGE) + HUGE_PAGE  # room to start on a huge page
        self._start: int | None = _mmap(None, self._reserved, _PROT_NONE,
                                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self.base = _round_up(self._start, HUGE_PAGE)

    def map_file(self, offset: int, length: int, fd: int) -> None:
        """Map ``length`` bytes of an open file, read-only and shared with the page cache, at ``offset``. The
        descriptor may be closed afterwards (the mapping holds the file)."""
        _mmap(self.base + offset, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd)
        self._advise(offset, length, getattr(mmap, "MADV_HUGEPAGE", None))

    def map_memory(self, offset: int, length: int) -> None:
        """Writable private memory at ``offset`` (rows read into it; freed when the range is closed)."""
        _mmap(self.base + offset, _round_up(length, PAGE), mmap.PROT_READ | mmap.PROT_WRITE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED)

    def array(self, dtype: np.dtype, row_shape: tuple[int, ...]) -> np.ndarray:
        """The whole range as rows of ``dtype`` (only mapped rows may be read)."""
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = self.nbytes // row_bytes
        return np.asarray(_Addresses(self.base, np.dtype(dtype), (rows, *row_shape)))

    def populate(self, offset: int, length: int) -> bool:
        """Read a mapped file's bytes into the page cache and map them (Linux 5.14+), so gathering rows later
        neither waits for the disk nor takes page faults; elsewhere ask the kernel to read them ahead.
        Through a ``MADV_HUGEPAGE`` mapping the kernel reads in 2 MiB folios. Returns False when the kernel
        refused (the rows are then read when gathered)."""
        code = self._advise(offset, length, _MADV_POPULATE_READ) if _MADV_POPULATE_READ else errno.EINVAL
        if code == errno.EINVAL:
            code = self._advise(offset, length, mmap.MADV_WILLNEED)
        return code == 0

    def _advise(self, offset: int, length: int, advice: int | None) -> int:
        """madvise; 0 or the errno (advice is a hint: the caller decides whether a refusal matters)."""
        if advice is None:
            return 0
        if _libc().madvise(self.base + offset, length, advice) == 0:
            return 0
        return ctypes.get_errno()

    def close(self) -> None:
        """Unmap everything (idempotent)."""
        if self._start is not None:
            _libc().munmap(self._start, self._reserved)
            self._start = None


@dataclasses.dataclass(frozen=True)
class WindowColumn:
    """One array a window serves.

    Attributes:
        name: its key in gathered batches.
        dtype: the dtype its rows are gathered as (the stored bytes, reinterpreted: bfloat16 bits as int16).
        row_shape: one row's shape (``()`` for per-token arrays).
    """

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


class ChunkWindow:
    """Chunks served together: chunk ``s`` of the window is slot ``s``, and its row ``r`` is row
    ``s * slot_rows + r`` of every column's array, so one index array gathers a batch from all of them.

    Call order: ``map_file`` for each mapped (column, slot); ``read_ahead`` once; ``wait_read_ahead``; then
    ``memory``, ``rows`` and ``gather`` while it serves batches; ``close`` (always, also after an error).

    Args:
        columns: the arrays served.
        slots: chunks in the window.
        slot_rows: rows per slot (``slot_rows``: at least a chunk's rows, keeping every slot aligned).

    Thread safety: one thread, but for the reading ahead, which runs in a thread of its own until ``close``.
    """

    def __init__(self, columns: list[WindowColumn], slots: int, slot_rows: int):
        self.columns = {column.name: column for column in columns}
        self.slot_rows = slot_rows
        self._ranges: dict[str, AddressRange] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._mapped: list[tuple[AddressRange, int, int]] = []  # (range, offset, length) read ahead
        self.mapped: set[tuple[str, int]] = set()  # (column, slot) served from a file
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        try:
            for column in columns:
                self._ranges[column.name] = AddressRange(slots * slot_rows * column.row_bytes)
                self._arrays[column.name] = self._ranges[column.name].array(column.dtype, column.row_shape)
        except BaseException:
            self.close()
            raise

    def _offset(self, name: str, slot: int) -> int:
        return slot * self.slot_rows * self.columns[name].row_bytes

    def map_file(self, name: str, slot: int, fd: int, rows: int) -> None:
        """Serve a slot's first ``rows`` rows from a chunk file (its first bytes; the caller checked that it
        holds them, and closes ``fd``)."""
        length = rows * self.columns[name].row_bytes
        length = min(_round_up(length, PAGE), os.fstat(fd).st_size)  # past the end of a file is SIGBUS
        self._ranges[name].map_file(self._offset(name, slot), length, fd)
        self._mapped.append((self._ranges[name], self._offset(name, slot), length))
        self.mapped.add((name, slot))

    def memory(self, name: str, slot: int, rows: int) -> np.ndarray:
        """Memory for a slot's first ``rows`` rows (to read them into), freed at ``close``."""
        self._ranges[name].map_memory(self._offset(name, slot), rows * self.columns[name].row_bytes)
        return self.rows(name, slot, rows)

    def rows(self, name: str, slot: int, rows: int) -> np.ndarray:
        """A view of a slot's first ``rows`` rows (valid until ``close``)."""
        start = slot * self.slot_rows
        return self._arrays[name][start:start + rows]

    def read_ahead(self, after: ChunkWindow | None = None) -> None:
        """Start reading the mapped chunk files into the page cache (``AddressRange.populate``), in slot
        order, READ_AHEAD_STREAMS files at a time, in threads, once ``after``'s reading ahead is done: a
        window is read while the one before is served."""
        previous = after._reader if after is not None else None
        self._reader = threading.Thread(target=self._read_all, args=(previous,), name="actcap-read-ahead",
                                        daemon=True)
        self._reader.start()

    def wait_read_ahead(self) -> None:
        """Wait until the mapped files are read in (a window's batches draw on all its chunks, so the first
        needs nearly all of them anyway). Gathering meanwhile would have the disk read at the random places
        batches fault at, beside the threads' reading each file in order."""
        if self._reader is not None:
            self._reader.join()

    def _read_all(self, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        files, lock = iter(self._mapped), threading.Lock()
        helpers = [threading.Thread(target=self._read_files, args=(files, lock), name="actcap-read-ahead",
                                    daemon=True) for _ in range(READ_AHEAD_STREAMS - 1)]
        for helper in helpers:
            helper.start()
        self._read_files(files, lock)
        for helper in helpers:
            helper.join()

    def _read_files(self, files: Iterator[tuple[AddressRange, int, int]], lock: threading.Lock) -> None:
        """Populate the next file of ``files`` until none is left (or a stop, or the kernel refuses: the
        batches then read what they need, as a hint is not a requirement)."""
        while not self._stop.is_set():
            with lock:
                file = next(files, None)
            if file is None:
                return
            address_range, offset, length = file
            for start in range(offset, offset + length, POPULATE_STEP):
                step = min(POPULATE_STEP, offset + length - start)
                if self._stop.is_set() or not address_range.populate(start, step):
                    self._stop.set()
                    return

    def gather(self, picks: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Rows ``picks`` (window rows: ``slot * slot_rows + row``) of every column into ``out[name]``."""
        for name, target in out.items():
            # mode="clip": numpy buffers `out` in the default mode="raise"; picks are valid by construction
            np.take(self._arrays[name], picks, axis=0, out=target, mode="clip")

    def close(self) -> None:
        """Stop reading ahead, drop the views, unmap every range (idempotent)."""
        self._stop.set()
        if self._reader is not None:
            # One populate step (8 MiB) per stream at most; a step still running after this only reads
            # pages in, and its addresses, unmapped below, are then refused or harmlessly read.
            self._reader.join(timeout=60)
        self._arrays.clear()
        for address_range in self._ranges.values():
            address_range.close()
        self._ranges.clear()
