"""Local files written for keeps: atomic replacement, fsync, and bulk rows that bypass the page cache.

A chunk file that the sink writes itself (a local store without compression, durable or scratch) is
written with ``O_DIRECT`` when its rows allow it (a buffer from ``page_aligned_empty``, and at least one
``DIRECT_UNIT`` of them): on ext4 or XFS the disk reads the rows straight from the writer's buffer, where a
buffered write would copy them into the page cache and write that back later. On this project's 2-core VM
that is 2.8 ms of CPU per 10.5 MB instead of 6.1 (benchmarks/results/cpu-2026-12-03b/direct_write.txt), and
the capture's forward gets the difference. The tail past the last whole unit, and every file on a filesystem
that refuses ``O_DIRECT`` (some FUSE and older tmpfs mounts), is written the ordinary way; the bytes on disk
are the same either way.

A durable pass syncs its files, and then their folders, with one ``syncfs`` each where that is as strong as
an fsync of each (``whole_filesystem_sync``: ext4, XFS or btrfs on Linux 5.17 or later, whose syncfs
reports writeback and journal errors), and with an fsync of each elsewhere (FUSE, NFS, overlay, tmpfs,
older kernels, macOS, where syncfs may not sync or not report a failure). Each fsync is a round trip to the
disk's cache: a chunk's 6 files and commit record ran at 0.77-0.85 of the raw 2-file baseline with an
fsync each, at 0.88-0.93 with syncfs (benchmarks/results/cpu-2026-12-05/chunk_files.txt). PostgreSQL's
``recovery_init_sync_method = syncfs`` makes the same trade for the same reason. A failed syncfs may be
another program's error, so the pass's own files are then fsynced one by one; a filesystem found read-only
after the sync fails the pass.

Each syncfs runs on a descriptor opened before the pass's first write (a "witness", on the filesystem of
the pass's first file): syncfs reports the failures since its descriptor was opened, so one opened later
would miss a failed writeback of this pass that another syncfs (the other writer thread's) had already
reported. Files of the pass on another filesystem (rare) get an fsync each.

Not covered: an ext2 volume mounted by the old ext2 driver shares ext4's type, and its syncfs does not
flush the disk's cache (distributions mount ext2 with the ext4 driver).

Torch-free: the writer process uses it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import sys
import threading
from pathlib import Path

import numpy as np

FILES_PER_PASS = 64  # files one write_files_atomic pass holds open: far below the usual 1024 per process
DIRECT_UNIT = 4096  # O_DIRECT's unit of buffer address, length and file offset on common Linux filesystems
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only; elsewhere every write is buffered
_NO_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP)  # what a filesystem without O_DIRECT (FUSE, tmpfs...) answers
# statfs f_type of the filesystems whose syncfs writes back and commits every file and reports errors
_SYNCFS_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E})  # ext4 (and ext2/3), XFS, btrfs
# Linux release since which syncfs returns writeback errors (5.8) and the filesystem's commit errors (5.17)
_SYNCFS_REPORTS_ERRORS = (5, 17)


def page_aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a ``DIRECT_UNIT`` boundary, so it can be written with O_DIRECT."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + DIRECT_UNIT, dtype=np.uint8)
    offset = -raw.ctypes.data % DIRECT_UNIT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def direct_length(data) -> int:
    """Leading bytes of ``data`` that O_DIRECT can write: whole units from an aligned address (0: none)."""
    if not _O_DIRECT or not isinstance(data, np.ndarray) or not data.flags.c_contiguous:
        return 0
    if data.ctypes.data % DIRECT_UNIT:
        return 0
    return data.nbytes // DIRECT_UNIT * DIRECT_UNIT


def _drop_cached_pages(descriptors: list[int]) -> None:
    """After a sync: the pages are clean, and the kernel may take them back. A capture writes far more than it
    reads back soon; without the drop the page cache grows with every chunk, each written page is a page
    newly taken from free memory, and on virtual machines that first touch is what writing costs most
    (benchmarks/results/cpu-2026-12-03/page_cache.txt)."""
    if hasattr(os, "posix_fadvise"):
        for fd in descriptors:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]  # f_type leads on every Linux ABI


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _kernel_release() -> tuple[int, ...]:
    numbers = os.uname().release.split("-")[0].split(".")[:2]
    return tuple(int(n) for n in numbers if n.isdigit())


# whether this kernel's syncfs reports every failure at all (the filesystem's type is asked per pass)
_KERNEL_SYNCFS_REPORTS = sys.platform.startswith("linux") and _kernel_release() >= _SYNCFS_REPORTS_ERRORS


def whole_filesystem_sync(fd: int) -> bool:
    """Whether one ``syncfs`` on ``fd``'s filesystem makes every file on it as durable as an fsync would,
    and reports any failure. Asked of the filesystem each time (one ``fstatfs``): a device number can come
    back for another filesystem after an unmount, and an overlay's files report their upper layer's."""
    if not _KERNEL_SYNCFS_REPORTS:
        return False
    result = _StatFs()
    known = _libc().fstatfs(fd, ctypes.byref(result)) == 0
    return known and result.f_type & 0xFFFFFFFF in _SYNCFS_FILESYSTEMS


def _syncfs(fd: int) -> None:
    if _libc().syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")


def _sync_one_filesystem(witness: int, items: list, fsync_one) -> None:
    """One syncfs, on a descriptor opened before the writes it vouches for. If it fails, the error may be
    another program's on the same filesystem (syncfs reports every file's), so each of ours is asked with
    fsync, which raises only for an error of its own."""
    try:
        _syncfs(witness)
    except OSError:
        for item in items:
            fsync_one(item)
    if os.fstatvfs(witness).f_flag & os.ST_RDONLY:  # its syncfs (and maybe fsync) do nothing and say 0
        raise OSError(errno.EROFS, "the filesystem is read-only (remounted so after an error?): what was "
                                   "written since is not on disk")


def _sync_each_filesystem(items: list, device_of, fsync_one, witnesses: list[int]) -> None:
    """Group ``items`` by filesystem: one syncfs on the group's witness where the filesystem takes it
    (``whole_filesystem_sync``), an fsync of each item where it does not or no witness is on it."""
    by_device: dict[int, list] = {}
    for item in items:
        by_device.setdefault(device_of(item), []).append(item)
    witness_on = {os.fstat(fd).st_dev: fd for fd in reversed(witnesses)}
    for device, group in by_device.items():
        witness = witness_on.get(device)
        if witness is not None and whole_filesystem_sync(witness):
            _sync_one_filesystem(witness, group, fsync_one)
        else:
            for item in group:
                fsync_one(item)


def sync_all(descriptors: list[int], witnesses: list[int]) -> None:
    """Make the files (or folders) open at ``descriptors`` durable.

    Args:
        witnesses: descriptors opened before any of the writes being made durable. A syncfs reports only
            the failures since its descriptor was opened (and older ones nobody has seen), so a descriptor
            opened after a failed writeback that another syncfs already reported would hide it: only a
            witness's filesystem gets one syncfs, every other item an fsync of its own.
    """
    _sync_each_filesystem(descriptors, lambda fd: os.fstat(fd).st_dev, os.fsync, witnesses)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a file's own writeback errors: reported to a descriptor opened later too (unseen)
    finally:
        os.close(fd)


def sync_paths(paths, witnesses: list[int]) -> None:
    """``sync_all`` of the files and folders at ``paths``, then let the files' cached pages go. Opens one
    descriptor at a time, however many paths there are."""
    paths = list(paths)
    _sync_each_filesystem(paths, lambda path: os.stat(path).st_dev, _fsync_path, witnesses)
    for path in paths:
        if not os.path.isdir(path):
            _drop_cached_pages_of(path)


def _drop_cached_pages_of(path: Path) -> None:
    """Best effort: the file is already on disk, so a file gone since costs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        _drop_cached_pages([fd])
    finally:
        os.close(fd)


@contextlib.contextmanager
def sync_witness(path: Path):
    """A witness for ``sync_all`` / ``sync_paths``: a descriptor on ``path`` (an existing file or folder, on
    the filesystem about to be written), to open before the writes and keep until they are synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _existing_ancestor(folder: Path) -> Path:
    while not folder.is_dir():
        folder = folder.parent
    return folder


def make_folders(folder: Path, durable: bool) -> None:
    """Create ``folder`` and its missing parents; when ``durable``, each new entry reaches the disk first."""
    changed: set[Path] = set()
    if not durable:
        _make_folders(folder, changed)
        return
    if folder.is_dir():
        return
    with sync_witness(_existing_ancestor(folder)) as witness:
        _make_folders(folder, changed)
        sync_paths(changed, [witness])


def _make_folders(folder: Path, changed: set[Path]) -> None:
    """Create ``folder`` and its missing parents; adds to ``changed`` each folder that got a new entry."""
    if folder.is_dir():
        return
    _make_folders(folder.parent, changed)
    folder.mkdir(exist_ok=True)
    changed.add(folder.parent)


def write_file_atomic(path: Path, data, durable: bool, size: int | None = None) -> int:
    """Write ``data`` (bytes, or an array) to a temp file beside ``path`` and rename it over (as LocalStore
    does). ``size``: the file's length, when longer than ``data`` (the rest is a hole: no disk blocks, reads
    as zeros). ``durable``: the data reaches the disk before the rename, and the rename (and any new folder)
    before this returns. An aligned array's whole units are written with O_DIRECT where the filesystem takes
    it, durable or not. Returns the bytes written with O_DIRECT."""
    return write_files_atomic([(path, data, size)], durable)


def write_files_atomic(files: list[tuple[Path, object, int | None]], durable: bool) -> int:
    """``write_file_atomic`` for several files (path, data, size; distinct paths) in passes of up to
    ``FILES_PER_PASS``: every file written, then (``durable``) every file synced, every rename, every changed
    folder synced. Each file gets the same guarantees as from ``write_file_atomic``; a chunk's files share
    the disk's round trips, so the same syncs took 0.51 ms each instead of 1.22
    (benchmarks/results/cpu-2026-12-04b/batched_sync.txt). A folder made by another call that has not
    returned yet may not be on disk: create shared folders first (``make_folders``). A failure leaves no
    temp file; files renamed before it stay. ``data`` may be a callable returning the data, called when its
    file's turn comes (a chunk's flags, final once its statistics are). Returns the bytes written with
    O_DIRECT."""
    return sum(_write_pass(files[start:start + FILES_PER_PASS], durable)
               for start in range(0, len(files), FILES_PER_PASS))


def _write_pass(files: list[tuple[Path, object, int | None]], durable: bool) -> int:
    if not durable:
        return _write_and_rename(files, None)
    # One witness per syncfs: each descriptor's syncfs reports a failure once, so the folders' syncfs needs
    # its own to see a failure (of a folder made by this pass) that the files' syncfs reported first. The
    # pass's files sit on one filesystem as a rule; any elsewhere get an fsync each.
    ancestor = _existing_ancestor(files[0][0].parent)
    with sync_witness(ancestor) as for_files, sync_witness(ancestor) as for_folders:
        return _write_and_rename(files, (for_files, for_folders))


def _write_and_rename(files: list[tuple[Path, object, int | None]], witnesses: tuple[int, int] | None) -> int:
    """The pass: durable when given witnesses (for the files' sync, for the folders' sync)."""
    changed: set[Path] = set()
    partials: list[Path] = []
    descriptors: list[int] = []
    direct = 0
    try:
        for path, data, size in files:
            _make_folders(path.parent, changed)
            partials.append(path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial"))
            fd, written = _write_new_file(partials[-1], data() if callable(data) else data, size)
            descriptors.append(fd)
            direct += written
        if witnesses is not None:
            sync_all(descriptors, [witnesses[0]])
            _drop_cached_pages(descriptors)
        while descriptors:
            os.close(descriptors.pop())  # popped first: a close that fails is not closed again below
        for partial, (path, _, _) in zip(partials, files):
            os.replace(partial, path)
            changed.add(path.parent)
        if witnesses is not None:
            sync_paths(changed, [witnesses[1]])
        return direct
    except BaseException:
        for fd in descriptors:  # the error raised is the first one, not a cleanup's
            with contextlib.suppress(OSError):
                os.close(fd)
        for partial in partials:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)  # a full disk gets its space back
        raise


def _bytes_of(data) -> memoryview:
    if isinstance(data, np.ndarray):
        # Also an array with no elements. The ignore: numpy's stubs give ndarray __buffer__ (the buffer
        # protocol) only from Python 3.12.
        return memoryview(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    return memoryview(data).cast("B")


def _write_new_file(path: Path, data, size: int | None) -> tuple[int, int]:
    """Create ``path`` holding ``data`` (``size`` long); returns its open descriptor and the bytes written
    with O_DIRECT."""
    payload = _bytes_of(data)
    direct = direct_length(data)
    fd = _open_new(path, direct=direct > 0)
    try:
        done = 0
        if direct and fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
            done = _write_direct(fd, payload[:direct])
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write_all(fd, payload[done:])
        if size is not None and size > len(payload):
            os.ftruncate(fd, size)
        return fd, done
    except BaseException:
        os.close(fd)
        raise


def _open_new(path: Path, direct: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644)
        except OSError as error:
            if error.errno not in _NO_DIRECT:
                raise
    return os.open(path, flags, 0o644)


def _write_direct(fd: int, payload: memoryview) -> int:
    """Write whole units with O_DIRECT; returns the bytes written, short when the filesystem refuses a write
    or writes less than asked (the rest then goes buffered)."""
    done = 0
    while done < len(payload):
        try:
            written = os.write(fd, payload[done:])
        except OSError as error:
            if error.errno not in _NO_DIRECT:
                raise
            break
        if not written:
            raise OSError(errno.EIO, f"no bytes written to descriptor {fd}")
        done += written
        if written % DIRECT_UNIT:
            break
    return done


def _write_all(fd: int, payload: memoryview) -> None:
    done = 0
    while done < len(payload):
        written = os.write(fd, payload[done:])
        if not written:
            raise OSError(errno.EIO, f"no bytes written to descriptor {fd}")
        done += written
