"""Opening a store for a capture run: check the location, take its lock, then create it or repair it for a
resume. Nothing in an existing store changes before the lock is held and every check has passed."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.capture.config import CaptureConfig
from engine.capture.manifest import now, resume_mismatches
from engine.errors import EngineError, ResumeMismatchError, StorePathError
from engine.format.layout import Manifest
from engine.format.location import Location
from engine.store.access import load_manifest
from engine.store.lifecycle import (
    check_location,
    clear_location,
    continue_store,
    create_store,
    mark_failed,
    release_reserve,
)
from engine.store.lock import StoreLock, acquire
from engine.store.resume import ResumePoint


def claim(location: Location, overwrite: bool, resume: bool,
          break_lock: bool = False) -> tuple[bool, StoreLock | None]:
    """Lock ``location`` for writing; delete an old store there when ``overwrite``. Returns whether a store
    remains to continue, and the lock (None: a protocol without one, see ``engine.store.lock``).

    Args:
        break_lock: take over an object-storage lock older than its lease (a killed job's).

    Raises:
        StoreExistsError, StorePathError: the location cannot be written as asked (checked before the lock
            is taken, so a refused location is left exactly as it was).
        StoreLockedError: another process writes it (nothing was changed, and ``overwrite`` deleted nothing).
    """
    check_location(location, overwrite, resume)
    held = acquire(location, break_lock)
    try:
        exists = check_location(location, overwrite, resume)  # again: it may have changed before the lock
        if exists and overwrite:
            clear_location(location)
            exists = False
        return exists, held
    except BaseException:
        if held is not None:
            held.release()
        raise


@dataclasses.dataclass
class Destination:
    """Where this process writes, checked and locked.

    Attributes:
        location: the store (a multi-process store: this rank's part).
        manifest: this run's manifest, as a new store starts with it (a part's names its rank).
        stored: the stored manifest when the run continues a store, else None.
        lock: held until the run's writer process has exited (None: a protocol without one).

    Thread safety: use from the thread that builds and closes the engine (``owned`` from any thread).
    """

    location: Location
    manifest: Manifest
    stored: Manifest | None
    lock: StoreLock | None

    @property
    def owned(self) -> bool:
        """False once another process broke this run's object-storage lock: then nothing may be written.
        Proved now (a request to the object store), not taken from the last heartbeat."""
        return self.lock is None or self.lock.confirm()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def check_destination(config: CaptureConfig, manifest: Manifest, parts: Any) -> Destination:
    """Claim the store (distributed: rank 0 prepares the root, each rank claims its part) and, for a resume,
    check that the stored run matches this one. Changes nothing but an overwrite.

    Raises:
        ResumeMismatchError: the store was captured with another model or configuration (each field named).
    """
    location = config.location
    if parts is not None:
        parts.prepare(location, manifest, config.overwrite, config.resume, config.break_lock)
        location = parts.part
        manifest = dataclasses.replace(manifest, part={"rank": parts.rank, "world_size": parts.world_size})
    exists, held = claim(location, config.overwrite, config.resume, config.break_lock)
    destination = Destination(location, manifest, None, held)
    if exists:
        try:
            destination.stored = load_manifest(location)
            mismatches = resume_mismatches(destination.stored, manifest)
            if mismatches:
                raise ResumeMismatchError(f"cannot resume {location}: " + "; ".join(mismatches)
                                          + ". Resume with the same model and CaptureConfig, or write a new "
                                          "store")
        except BaseException:
            destination.release()
            raise
    return destination


def open_destination(destination: Destination) -> ResumePoint | None:
    """Create the store, or repair it for a resume; returns where the run continues (None: a new store).

    Raises:
        StorePathError: the storage failed while the store was written (a full disk, a file size limit): the
            store says ``failed`` (when even that cannot be written, the error says so) and no reserve file
            is left.
    """
    writer = dict(destination.lock.owner) if destination.lock is not None else {"since": now()}
    try:
        if destination.stored is None:
            create_store(destination.location, dataclasses.replace(destination.manifest, writers=[writer]))
            return None
        return continue_store(destination.location, destination.manifest.created or now(), writer)
    except OSError as error:
        if isinstance(error, EngineError):  # refused before anything was changed (damage, a path problem)
            raise
        raise _write_failed(destination.location, error) from error


def _write_failed(location: Location, error: OSError) -> StorePathError:
    """The storage failed while the store was being created or repaired: release the reserve (its room is
    what lets the manifest say ``failed`` on a full disk), mark the store failed, and say what to do."""
    release_reserve(location)
    try:
        mark_failed(location, repr(error))
        status = "the store says failed"
    except Exception as second:  # the root document itself could not be written
        status = f"marking the store failed failed too ({second!r})"
    return StorePathError(error.errno, f"cannot write the store at {location}: {error.strerror or error}; "
                                       f"{status}. Free space on its filesystem (or raise the file size "
                                       "limit, ulimit -f) and start again with overwrite=True")
