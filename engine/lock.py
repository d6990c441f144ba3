"""One writer per store: an exclusive lock taken before anything in the store is changed.

A local store ``acts.zarr`` is locked with ``fcntl.flock`` on ``acts.zarr.lock`` beside it (beside, not inside,
so that zarr tools listing the store see only zarr nodes). The kernel releases the lock when its last holder
dies, so ``kill -9`` never leaves a stale lock. The capturing process hands its descriptor to the writer
process, so the lock is held until both have exited: an orphaned writer still finishing a chunk keeps a resume
out until it is gone (it exits within a second of its parent, see ``engine.writer``). The lock file is never
deleted (deleting it would let two processes lock two different files of the same name); it holds the
holder's host, pid and start time, for the message a loser sees.

Readers take no lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from .errors import StoreLockedError
from .location import Location

# A holder that died on this host leaves its writer process exiting for up to a second: wait that long.
ORPHAN_GRACE_S = 5.0


_HELD: weakref.WeakSet = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say): close the locks' descriptors, which would otherwise keep the
    parent's stores locked for as long as the child lives."""
    for lock in list(_HELD):
        lock.release()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(location: Location) -> Path | None:
    """The lock file of a local store (None for object storage)."""
    root = location.local
    return None if root is None else root.with_name(root.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('command')})"


def _exiting_orphan(holder: dict) -> bool:
    """The holder died on this host: what still holds the lock is its writer process, which is exiting."""
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not _alive(holder["pid"])


class StoreLock:
    """An exclusive lock on one store, held by this process (and its writer process) until ``release``.

    Attributes:
        fd: the locked descriptor (pass it to the writer process so that it holds the lock too).
        owner: what this holder wrote into the lock file (host, pid, since, command).

    Thread safety: acquire and release from one thread.
    """

    def __init__(self, path: Path, fd: int, owner: dict):
        self.path = path
        self.fd = fd
        self.owner = owner
        _HELD.add(self)

    @classmethod
    def acquire(cls, location: Location) -> StoreLock | None:
        """Lock a local store (None for object storage, which has no lock yet).

        Raises:
            StoreLockedError: another process holds it; nothing was changed.
        """
        path = lock_path(location)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                if _exiting_orphan(holder) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLockedError(f"{location} is being written by {_describe(holder)}: one writer per "
                                       "store. Wait for it to finish, or write to another output_dir "
                                       "(nothing was changed)") from None
            return cls(path, fd, cls._claim(fd))

    @staticmethod
    def _claim(fd: int) -> dict:
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return owner

    def release(self) -> None:
        """Give the lock up (the writer process's copy goes when it exits). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
