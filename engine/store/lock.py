"""One writer per store: an exclusive lock taken before anything in the store is changed.

Local folders. A store ``acts.zarr`` is locked with ``fcntl.flock`` on ``acts.zarr.lock`` beside it
(beside, not inside, so that zarr tools listing the store see only zarr nodes). The kernel releases the lock
when its last holder dies, so ``kill -9`` never leaves a stale lock. The capturing process hands its
descriptor to the writer process (one open file, shared), so the lock is held until both have closed it: an
orphaned writer still finishing a chunk keeps a resume out until it is gone (it exits within a second of its
parent, see ``engine.writer.protocol``). The file holds the holder's host, pid and start time, for the message
a loser sees.

The lock file goes with its last holder, and still no two processes ever lock two different files of the
same name:

1. Acquire: open (creating) the file, ``flock`` it, then check that the path still names the file locked
   (``os.fstat`` of the descriptor and ``os.stat`` of the path: the same ``st_dev`` and ``st_ino``). A path
   that is gone or names another file means a releasing holder removed this one after it was opened: close,
   and start again from the open. So a lock counts only on the file the path names.
2. Release: close this process's descriptor, then open the file the path names afresh and ``flock`` it
   (non-blocking): granted, it proves that nobody holds the file any more, and the file is unlinked while
   that lock is held. An acquirer that opened it just before then finds the path gone at step 1 and locks the
   next file; one that opens the path after creates that next file. Refused (a writer process still
   exiting, the next writer, a ``check_unlocked``), the file stays: the next holder removes it at its own
   release.

Why not unlink at once, while the capturing process still holds its descriptor: the writer process shares
that lock, and may outlive the release (an orphan; a writer killed a moment before, whose descriptors close
as it exits). Unlinked under its feet, the lock would no longer keep anyone out: a new writer would create
and lock a new file of the same name while the old writer still wrote chunks. The fresh lock of step 2 is
granted only once the writer process's copy is closed too. The engine releases after its writer process
has exited, so a run's close removes the file (unless a check holds it at that moment). A forked child (a
DataLoader worker) closes what it inherited and removes nothing (its parent holds the lock); a holder
killed with ``kill -9`` leaves the file, never the lock.

Object storage (``s3://`` and S3-compatible servers). Nothing is released when a process dies, so the lock is
an object with a lease:

1. Acquire: PUT ``acts.zarr.lock`` beside the store's prefix with ``If-None-Match: *`` (create-only: of two
   writers exactly one PUT succeeds). The body holds the owner (host, pid, since, command, a random token),
   the lease and a heartbeat count.
2. Heartbeat: a daemon thread of the capturing process rewrites the object every ``lease / 3`` with
   ``If-Match: <its last ETag>`` (the count changes the body, so every beat changes the ETag). One wakeup per
   20 s: nothing is added to the forward pass.
3. Age: the server's clock alone (the ``Date`` of a GET minus the object's ``Last-Modified``), so clock skew
   between hosts never makes a live lock look stale.
4. Break: a lock whose age exceeds its lease is taken over only with ``break_lock=True`` (``--break-lock``),
   by a PUT with ``If-Match: <the stale ETag>``: of two breakers exactly one wins, and a holder that beats in
   between wins over both. A lock within its lease is never broken.
5. Lost: a beat whose condition fails (the lock was broken, or deleted) means another process owns the store:
   ``on_lost`` is called (the engine stops its writer process at once) and the store is not touched again.
6. Fencing: a beat comes every lease / 3, so a holder that was stopped past its lease (SIGSTOP, a paused
   VM) and whose lock was broken meanwhile would, on waking, write chunks and commit records over the new
   owner's before its next beat. So every write proves the lease first (``LeaseFence``): the writer process,
   before a chunk, an array change or the final manifest, and the capturing process before it marks a store
   failed, read the lock object and rewrite it with ``If-Match: <the ETag just read>``. A token other than
   the run's, or no lock object, means the lock was broken: StoreLockedError, and nothing is written. A proof
   moves the object's Last-Modified to now, so no breaker can take the lock for a whole lease after it; the
   writer proves at most once per ``lease * PROOF_EVERY`` of the monotonic clock (which runs on while a
   process is stopped). What remains: a process stopped for longer than the lease between a proof and the
   write it allowed (one PUT) can still land that write.
7. Release at close: DELETE with ``If-Match: <its ETag>`` (after a proof changed the ETag, the one read back,
   if the token is still the run's).

The lease is ``LEASE_S`` = 60 s: three beats fit in it, so a holder survives two lost PUTs (S3's own retries
take up to ~20 s), while a killed job's store can be taken over a minute after its death. The writer process
needs no beat of its own: it exits within a second of its capturing process (``engine.writer.protocol``),
long before the lease ends. Other fsspec protocols have no lock yet: writing to one warns once.

Readers take no lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

from engine.errors import StoreLockedError, StorePathError
from engine.format.location import Location

# A holder that died on this host leaves its writer process exiting for up to a second: wait that long.
ORPHAN_GRACE_S = 5.0
# ``check_unlocked`` and a release's removal lock the file for microseconds: who meets either tries again this
# long.
PROBE_GRACE_S = 0.2
# Seconds an object-storage lock lives without a heartbeat (see the module docstring for the choice).
LEASE_S = 60.0
# A writer proves its lease again before a write once this fraction of the lease has passed since the last
# proof (6 s of a 60 s lease: one GET and one PUT of the lock object per 6 s of writing, at most).
PROOF_EVERY = 0.1
# Proofs in a row that may find the ETag changed by the holder's own heartbeat before one gets through.
_PROOF_TRIES = 5


_HELD: weakref.WeakSet = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say): close the locks' descriptors, which would otherwise keep
    the parent's stores locked for as long as the child lives."""
    for lock in list(_HELD):
        lock.close()  # and nothing more: the parent still holds the lock, so its file stays


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(location: Location) -> Path:
    """The lock file of a local store (object storage locks with an object, ``_LockObject``)."""
    root = location.local
    if root is None:
        raise ValueError(f"{location} is not a local folder: it has no lock file")
    return root.with_name(root.name + ".lock")


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:200]}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command')})")


def acquire(location: Location, break_lock: bool = False) -> StoreLock | None:
    """Lock ``location`` for writing (None: a protocol without a lock, after a warning).

    Args:
        location: the store.
        break_lock: take over an object-storage lock whose heartbeat is older than its lease.

    Raises:
        StoreLockedError: another process holds it; nothing was changed.
    """
    if location.local is not None:
        return FileLock.acquire(location)
    target = _lock_object(location)
    return None if target is None else ObjectLock.acquire(location, target, break_lock)


def check_unlocked(location: Location, break_lock: bool = False) -> None:
    """Raise StoreLockedError if another process writes ``location`` (what ``acquire`` would raise), changing
    nothing: the command line asks before it loads a model. ``acquire`` still decides."""
    if location.local is not None:
        _check_file_unlocked(location)
        return
    target = _lock_object(location)
    holder = None if target is None else target.holder()
    if holder is not None and not (break_lock and holder.stale):
        raise StoreLockedError(holder.refusal(location, break_lock))


# ---- local folders ----------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _exiting_orphan(holder: dict) -> bool:
    """The holder died on this host: what still holds the lock is its writer process, which is exiting."""
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not _alive(holder["pid"])


def _file_refusal(location: Location, holder: dict) -> str:
    return (f"{location} is being written by {_describe(holder)}: one writer per store. Wait for it to "
            "finish, or write to another output_dir (nothing was changed)")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder may have removed it, and
    another process created a new one there, since ``fd`` was opened)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _lock_file(location: Location, operation: int, create: bool) -> int | None:
    """Open the lock file and ``flock`` it with ``operation`` (non-blocking), trying again while a holder is
    letting go (a release's removal holds it for microseconds, an exiting orphan for up to a second).

    Returns:
        The descriptor, locked, of the file the path names; None when ``create`` is False and there is no
        lock file to open (or none can be there: the folder is missing, a file, or unreadable; whoever
        writes the store names that problem).

    Raises:
        StoreLockedError: another process holds it.
        StorePathError: the path kept naming another file than the one locked (a filesystem whose ``stat``
            and ``fstat`` disagree cannot be locked safely).
    """
    path = lock_path(location)
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC
    started = time.monotonic()
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _file_holder(fd)
            os.close(fd)
            waited = time.monotonic() - started
            if waited < PROBE_GRACE_S or (_exiting_orphan(holder) and waited < ORPHAN_GRACE_S):
                time.sleep(0.02)
                continue
            raise StoreLockedError(_file_refusal(location, holder)) from None
        if _names(path, fd):
            return fd
        os.close(fd)  # removed by its last holder after this open: lock the file the path names now
        if time.monotonic() - started > ORPHAN_GRACE_S:
            raise StorePathError(f"cannot lock {path}: the path keeps naming another file than the one "
                                 "locked (stat and fstat disagree on this filesystem); put the store on a "
                                 "local filesystem")


def _check_file_unlocked(location: Location) -> None:
    fd = _lock_file(location, fcntl.LOCK_SH, create=False)  # shared: two checks never refuse each other
    if fd is not None:
        os.close(fd)


def _remove_unheld(path: Path) -> None:
    """Unlink the lock file if no process holds it (the module docstring says why this is safe). A file
    left behind is harmless: the next holder locks and later removes it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return  # gone already (the next holder removed it), or not ours to open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _names(path, fd):
            os.unlink(path)
    except OSError:
        pass  # held (BlockingIOError): by a writer process still exiting, the next writer or a check
    finally:
        os.close(fd)


class FileLock:
    """An exclusive lock on one local store, held by this process (and its writer process) until ``release``.

    Attributes:
        fd: the locked descriptor (pass it to the writer process so that it holds the lock too).
        owner: what this holder wrote into the lock file (host, pid, since, command).
        lost: always None: the kernel never takes a lock away from a live holder.

    Thread safety: acquire and release from one thread.
    """

    lost = None

    def __init__(self, path: Path, fd: int, owner: dict):
        self.path = path
        self.fd = fd
        self.owner = owner
        _HELD.add(self)

    @classmethod
    def acquire(cls, location: Location) -> FileLock:
        """Lock a local store.

        Raises:
            StoreLockedError: another process holds it; nothing was changed.
        """
        path = lock_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_file(location, fcntl.LOCK_EX, create=True)
        assert fd is not None  # None only when the file may not be created
        return cls(path, fd, cls._claim(fd))

    @staticmethod
    def _claim(fd: int) -> dict:
        owner = _owner()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return owner

    def on_lost(self, callback: Callable[[StoreLockedError], None]) -> None:
        """Nothing to watch: a kernel lock is held until its holders exit."""

    def confirm(self) -> bool:
        """Always True: a kernel lock is never taken away from a live holder."""
        return True

    def close(self) -> None:
        """Close this process's descriptor and leave the file (a forked child: its parent holds the lock).
        Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Give the lock up and remove the lock file, unless another process still holds it: a writer process
        that has not exited keeps the lock, and then the file stays. Idempotent."""
        if self.fd >= 0:
            self.close()
            _remove_unheld(self.path)


# ---- object storage ---------------------------------------------------------------------------------------


def _precondition_failed(error: OSError) -> bool:
    """Whether a conditional request failed its condition. s3fs turns a failed ``If-None-Match`` into
    FileExistsError, a failed ``If-Match`` into an OSError caused by the server's PreconditionFailed (or 409
    ConditionalRequestConflict: a concurrent conditional write won), and ``If-Match`` on a missing object into
    FileNotFoundError."""
    code = getattr(error.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(error, (FileExistsError, FileNotFoundError)) \
        or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _taker(holder: _Holder | None) -> str:
    return _describe(holder.record) if holder is not None else "nobody (the lock object was deleted)"


def _lost(location: Location, taker: str) -> StoreLockedError:
    """The error of a run whose lock is no longer its own (``taker``: who has it now)."""
    return StoreLockedError(f"{location}: this process lost its lock to {taker} (its heartbeat had stopped "
                            "for longer than the lease, and the lock was broken): it writes nothing more "
                            "there; chunks committed so far stay")


@dataclasses.dataclass(frozen=True)
class _Holder:
    """The lock object as read: its body, ETag and age (server clock)."""

    record: dict
    etag: str
    age_s: float

    @property
    def lease_s(self) -> float:
        lease = self.record.get("lease_s")
        return float(lease) if isinstance(lease, (int, float)) else LEASE_S

    @property
    def stale(self) -> bool:
        return self.age_s > self.lease_s

    def refusal(self, location: Location, break_lock: bool) -> str:
        """The StoreLockedError message: who holds the store, and what the loser can do."""
        who = f"{location} is being written by {_describe(self.record)}; its lock's last heartbeat was " \
              f"{self.age_s:.0f} s ago (lease {self.lease_s:.0f} s)"
        if self.stale:
            return (f"{who}: that process seems gone. If it is, pass break_lock=True (--break-lock) to take "
                    "the store over (nothing was changed)")
        rule = "; a lock is broken only after its lease" if break_lock else ""
        return f"{who}: one writer per store{rule}. Wait for it to finish, or write to another output_dir " \
               "(nothing was changed)"


@dataclasses.dataclass(frozen=True)
class _LockObject:
    """Where an object-storage lock lives: ``<store>.lock`` beside the store's prefix, on s3fs."""

    fs: Any
    bucket: str
    key: str

    def put(self, record: dict, **condition: str) -> str:
        """One conditional PUT (``IfNoneMatch="*"`` or ``IfMatch=etag``); returns the new ETag."""
        body = json.dumps(record, sort_keys=True).encode()
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]

    def delete(self, etag: str) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)

    def holder(self) -> _Holder | None:
        """The lock as it is now (None: there is none)."""
        from fsspec.asyn import sync

        try:
            data, response = sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = (email.utils.parsedate_to_datetime(date) if date
               else datetime.datetime.now(datetime.timezone.utc))
        age = (now - response["LastModified"]).total_seconds()
        return _Holder(record if isinstance(record, dict) else {}, response["ETag"], age)

    async def _get(self) -> tuple[bytes, dict]:
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        return await response["Body"].read(), response


def _lock_object(location: Location) -> _LockObject | None:
    """The lock object of an object-storage location (None, after a warning, where conditional writes are not
    known: protocols other than s3)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location.url + ".lock", **dict(location.storage_options))
    if not hasattr(fs, "call_s3"):
        protocol = location.url.split("://")[0]
        warnings.warn(f"{location} is not locked: the object-storage lock uses S3 conditional writes, which "
                      f"{protocol}:// lacks here; make sure one process at a time writes this store",
                      RuntimeWarning, stacklevel=3)
        return None
    bucket, key, _ = fs.split_path(path)
    return _LockObject(fs, bucket, key)


def _conditional_put(location: Location, target: _LockObject, record: dict, **condition: str) -> str | None:
    """The new ETag, or None when the condition failed (another process holds or took the lock)."""
    try:
        return target.put(record, **condition)
    except OSError as error:
        if _precondition_failed(error):
            return None
        raise StorePathError(f"cannot lock {location}: the conditional PUT of its lock object failed "
                             f"({error!r}). The lock needs an object store with conditional writes "
                             "(If-None-Match, If-Match: AWS S3, MinIO and R2 have them); check the endpoint "
                             "and credentials") from error


class LeaseFence:
    """A run's proof, before it writes, that its object-storage lock is still its own (step 6 of the module
    docstring): one GET of the lock object and one PUT conditional on the ETag read, at most once per
    ``lease * PROOF_EVERY`` unless forced.

    Args:
        location: the store; target: its lock object; owner: the run's lock record (``ObjectLock.owner``:
            its token and lease).

    Thread safety: ``prove`` from any thread (proofs are serialized).
    """

    def __init__(self, location: Location, target: _LockObject, owner: dict):
        self._location = location
        self._target = target
        self._owner = owner
        self._every_s = float(owner.get("lease_s", LEASE_S)) * PROOF_EVERY
        self._proved: float | None = None  # monotonic time a proof started
        self._mutex = threading.Lock()

    @classmethod
    def of(cls, location: Location | None, owner: dict | None) -> LeaseFence | None:
        """The fence of a run that holds an object-storage lock (``owner`` with a token); None for a local
        store (its kernel lock needs none), a store without a lock, or no store."""
        if location is None or location.local is not None or not owner or "token" not in owner:
            return None
        target = _lock_object(location)
        return None if target is None else cls(location, target, owner)

    def prove(self, force: bool = False) -> None:
        """Return once the lock is proved the run's (now, or less than ``lease * PROOF_EVERY`` ago).

        Raises:
            StoreLockedError: the lock was broken (another token holds it) or deleted: write nothing.
            StorePathError: the object store failed the request.
        """
        with self._mutex:
            started = time.monotonic()
            if not force and self._proved is not None and started - self._proved < self._every_s:
                return
            for _ in range(_PROOF_TRIES):
                holder = self._target.holder()
                if holder is None or holder.record.get("token") != self._owner["token"]:
                    raise _lost(self._location, _taker(holder))
                # A body of its own: the ETag must change, so that a breaker holding the old one loses.
                record = {**holder.record, "proof": uuid.uuid4().hex}
                if _conditional_put(self._location, self._target, record, IfMatch=holder.etag) is not None:
                    self._proved = started
                    return
            raise StoreLockedError(f"{self._location}: the lock object changed {_PROOF_TRIES} times while "
                                   "this process tried to prove it still holds it: it writes nothing more "
                                   "there")


class ObjectLock:
    """An exclusive lock on one object-storage store: a lock object with a lease, kept alive by a heartbeat
    thread until ``release`` (the protocol is in this module's docstring).

    Attributes:
        fd: None (nothing to hand to the writer process: it exits with this process, inside the lease).
        owner: host, pid, since, command, token and lease as written in the lock object.
        lost: None while held; the StoreLockedError naming the new holder once a heartbeat found the lock
            taken over (then nothing of the store may be written again by this process).

    Thread safety: ``acquire``, ``on_lost`` and ``release`` from one thread; the heartbeat thread calls the
    ``on_lost`` callback.
    """

    fd = None

    def __init__(self, location: Location, target: _LockObject, owner: dict, etag: str):
        self.owner = owner
        self.lost: StoreLockedError | None = None
        self._location = location
        self._target = target
        self._etag = etag
        self._beats = 0
        self._callback: Callable[[StoreLockedError], None] | None = None
        self._released = False
        self._fence = LeaseFence(location, target, owner)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="actcap-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, location: Location, target: _LockObject, break_lock: bool) -> ObjectLock:
        """Create the lock object; with ``break_lock``, take over one older than its lease.

        Raises:
            StoreLockedError: another process holds it (or broke the same stale lock first); nothing changed.
            StorePathError: the object store refused the conditional PUT for another reason.
        """
        owner = {**_owner(), "token": uuid.uuid4().hex, "lease_s": LEASE_S}
        record = {**owner, "beats": 0}
        for _ in range(3):  # a holder may release between our PUT and our read: then try again
            etag = _conditional_put(location, target, record, IfNoneMatch="*")
            if etag is not None:
                return cls(location, target, owner, etag)
            holder = target.holder()
            if holder is None:
                continue
            if not (break_lock and holder.stale):
                raise StoreLockedError(holder.refusal(location, break_lock))
            etag = _conditional_put(location, target, record, IfMatch=holder.etag)
            if etag is None:
                raise StoreLockedError(f"{location}: another process broke the stale lock first (or its "
                                       "holder came back); nothing was changed")
            return cls(location, target, owner, etag)
        raise StoreLockedError(f"{location}: its lock was taken and released three times while this process "
                               "tried to take it: another writer is starting and stopping there; try again")

    def on_lost(self, callback: Callable[[StoreLockedError], None]) -> None:
        """Call ``callback`` (from the heartbeat thread) if the lock is taken over; at once if it was."""
        self._callback = callback
        if self.lost is not None:
            callback(self.lost)

    def confirm(self) -> bool:
        """Whether the lock is still this run's, proved now (``LeaseFence``): ask before writing into the
        store from this process (a heartbeat may not have noticed a broken lock yet)."""
        if self.lost is None:
            try:
                self._fence.prove(force=True)
            except StoreLockedError as error:
                self.lost = error
        return self.lost is None

    def _beat(self) -> None:
        """Heartbeat thread: rewrite the lock object every lease / 3, conditional on its last ETag."""
        while not self._stop.wait(self.owner["lease_s"] / 3):
            self._beats += 1
            try:
                held = self._refresh()
            except Exception:  # a passing failure (network, throttling): the next beat tries again, and a
                continue       # breaker needs a whole lease without one
            if not held:
                self._lose()
                return

    def _refresh(self) -> bool:
        """One beat; False when the lock is no longer this process's."""
        try:
            self._etag = self._target.put({**self.owner, "beats": self._beats}, IfMatch=self._etag)
            return True
        except OSError as error:
            if not _precondition_failed(error):
                raise
        return self._still_ours()

    def _still_ours(self) -> bool:
        """After a failed condition: a PUT whose reply was lost may have landed. Adopt its ETag if so."""
        holder = self._target.holder()
        if holder is not None and holder.record.get("token") == self.owner["token"]:
            self._etag = holder.etag
            return True
        return False

    def _lose(self) -> None:
        try:
            taker = _taker(self._target.holder())
        except Exception:  # the message only: the loss itself is certain
            taker = "another process"
        self.lost = _lost(self._location, taker)
        if self._callback is not None:
            self._callback(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still this process's. Idempotent; a failed
        delete is a warning (the store is intact; the next writer then needs ``break_lock`` after the
        lease)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        self._thread.join(timeout=self.owner["lease_s"])
        if self.lost is not None:
            return
        try:
            self._delete_if_ours()
        except OSError as error:
            warnings.warn(f"could not remove the lock of {self._location} ({error!r}): the store is intact, "
                          "but the next writer must wait for the lease to end and pass break_lock=True "
                          "(--break-lock)", RuntimeWarning, stacklevel=2)

    def _delete_if_ours(self) -> None:
        try:
            self._target.delete(self._etag)
        except OSError as error:
            if not _precondition_failed(error):
                raise
            if self._still_ours():  # a beat's reply was lost: delete what it wrote
                self._target.delete(self._etag)


# What ``acquire`` returns: both kinds have ``fd``, ``owner``, ``lost``, ``on_lost``, ``confirm`` and
# ``release``.
StoreLock = FileLock | ObjectLock
