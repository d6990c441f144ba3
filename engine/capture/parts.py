"""Multi-process capture into one store: each rank writes its own part, rank 0 owns the root.

torchrun starts one process per GPU (and per node). No two processes ever write the same zarr metadata:
rank 0 alone prepares the location (overwrite and resume checks) and writes the root group, its manifest
and ``parts/zarr.json``; each rank writes only under ``parts/rank_{r:05d}`` (``layout.part_path``), a complete
store with its own arrays and commit records, so commit, crash and resume work per rank exactly as with one
process. ``CaptureEngine.close()`` meets the other ranks at a barrier, then rank 0 publishes the top manifest
(status, row counts, merged statistics) read from the parts' manifests.

Every collective step runs on all ranks in the same order; a setup failure on any rank fails every rank
(``agree``) and rank 0's failures are broadcast, so no rank waits on one that gave up.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from typing import Callable

import torch.distributed as dist

from engine.capture.opening import claim
from engine.errors import CaptureError, ConfigError, ResumeMismatchError
from engine.format import layout
from engine.format.layout import Manifest
from engine.format.location import Location
from engine.format.statistics import merge_statistics
from engine.store.access import load_manifest, put_document

# Collectives here wait for the slowest rank's whole share (a resumed rank whose part was complete waits at
# close for the others to finish theirs): a dedicated gloo group with a long timeout, not the default one's
# 10-30 minutes. A dead peer still fails them at once (its socket closes; torchrun stops the others).
COLLECTIVE_TIMEOUT = datetime.timedelta(days=7)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("distributed=True needs torch.distributed initialized: call "
                          "torch.distributed.init_process_group('gloo' or 'nccl') first (under torchrun it "
                          "reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment)")
    return dist.get_rank(), dist.get_world_size()


def _portable(error: BaseException) -> BaseException:
    """The error itself if it can cross to other ranks (pickle), else a CaptureError with its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return CaptureError(f"{type(error).__name__}: {error}")


def _put_manifest(root: Location, manifest: Manifest) -> None:
    put_document(root, "zarr.json", layout.group_document({layout.MANIFEST_ATTR: manifest.to_json()}))


def _prepare_root(root: Location, manifest: Manifest, world_size: int, exists: bool) -> None:
    if exists:
        stored = load_manifest(root)
        if stored.world_size != world_size:
            raise ResumeMismatchError(
                f"cannot resume {root}: it was written by {stored.world_size or 1} process(es), this run "
                f"has {world_size}: resume with the same number of processes (torchrun --nproc_per_node, "
                "--nnodes)")
        # Arrays added after capture (align's tokens/label) are dropped from the parts on resume: here too.
        _put_manifest(root, dataclasses.replace(stored, status=layout.STATUS_OPEN,
                                                token_arrays=manifest.token_arrays))
        return
    # The fields that describe one part (part, first_sequence, resumes) stay in the parts' manifests.
    _put_manifest(root, dataclasses.replace(
        manifest, part=None, first_sequence=0, resumes=[], world_size=world_size,
        parts=[{"path": layout.part_path(rank), "status": layout.STATUS_OPEN, "committed_tokens": 0}
               for rank in range(world_size)]))
    put_document(root, f"{layout.PARTS_GROUP}/zarr.json", layout.group_document(None))


def _part_manifest(part: Location) -> Manifest | None:
    try:
        return load_manifest(part)
    except (KeyError, FileNotFoundError):  # that rank never created its part (it failed first)
        return None


def _part_entry(rank: int, part: Manifest | None) -> dict:
    """A part as the top manifest lists it (a part never created counts as failed, with nothing committed)."""
    if part is None:
        return {"path": layout.part_path(rank), "status": layout.STATUS_FAILED, "committed_tokens": 0,
                "first_sequence": 0, "sequences": 0}
    return {"path": layout.part_path(rank), "status": part.status, "committed_tokens": part.committed_tokens,
            "first_sequence": part.first_sequence, "sequences": part.sequences}


def _publish(root: Location, world_size: int) -> None:
    parts = [_part_manifest(root.child(layout.part_path(rank))) for rank in range(world_size)]
    present = [part for part in parts if part is not None]
    statuses = {layout.STATUS_FAILED if part is None else part.status for part in parts}
    status = (layout.STATUS_FAILED if layout.STATUS_FAILED in statuses
              else layout.STATUS_COMPLETE if statuses == {layout.STATUS_COMPLETE} else layout.STATUS_OPEN)
    _put_manifest(root, dataclasses.replace(
        load_manifest(root), status=status,
        committed_tokens=sum(part.committed_tokens for part in present),
        committed_chunks=sum(part.committed_chunks for part in present),
        sequences=max((part.sequences for part in present), default=0),
        statistics=merge_statistics([part.statistics for part in present]),
        parts=[_part_entry(rank, part) for rank, part in enumerate(parts)],
        closed=datetime.datetime.now(datetime.timezone.utc).isoformat()))


class PartCoordinator:
    """This process's share of a multi-process store, and the collective steps around it.

    Every rank calls the same steps in the same order: construct (joins a gloo group), ``agree`` after each
    setup phase, ``prepare``, ``agree``, then ``publish`` at close.

    Attributes:
        rank, world_size: from the default process group.
        part: where this rank writes (``layout.part_path(rank)`` under the root), set by ``prepare``.

    Thread safety: call from the thread that runs the model, on every rank.
    """

    def __init__(self):
        self.rank, self.world_size = process_group()
        self._group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        self.root: Location | None = None
        self.part: Location | None = None
        self._root_lock = None  # rank 0 holds the root's lock for the run

    def _on_rank0(self, step: Callable[[], None]) -> None:
        """Run ``step`` on rank 0; every rank then raises rank 0's exception if it failed (also a barrier)."""
        outcome: list[BaseException | None] = [None]
        error = None
        if self.rank == 0:
            try:
                step()
            except BaseException as exc:
                error, outcome = exc, [_portable(exc)]
        dist.broadcast_object_list(outcome, src=0, group=self._group)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise outcome[0]

    def agree(self, error: BaseException | None) -> None:
        """Collective: every rank learns whether any rank failed its setup. A rank without an error of its
        own raises CaptureError naming the failed ranks; a failed rank goes on to raise its own error."""
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                               group=self._group)
        failed = [f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
        if failed and error is None:
            raise CaptureError("capture could not start on every rank, so this rank stops too: "
                               + "; ".join(failed))

    def prepare(self, root: Location, manifest: Manifest, overwrite: bool, resume: bool,
                break_lock: bool) -> None:
        """Rank 0 locks and prepares the whole store (overwrite, resume checks, root documents); every rank
        learns where its part is (and locks it itself, ``opening.claim``)."""
        self.root = root
        self.part = root.child(layout.part_path(self.rank))
        self._on_rank0(lambda: self._claim_root(manifest, overwrite, resume, break_lock))

    def _claim_root(self, manifest: Manifest, overwrite: bool, resume: bool, break_lock: bool) -> None:
        exists, self._root_lock = claim(self.root, overwrite, resume, break_lock)
        try:
            _prepare_root(self.root, manifest, self.world_size, exists)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the root's lock (rank 0; a no-op elsewhere). Idempotent."""
        if self._root_lock is not None:
            self._root_lock.release()
            self._root_lock = None

    def publish(self) -> None:
        """After every rank closed its part: rank 0 writes the top manifest; every rank returns after it."""
        dist.barrier(group=self._group)
        try:
            self._on_rank0(self._publish_root)
        finally:
            self.release()

    def _publish_root(self) -> None:
        if self._root_lock is not None and not self._root_lock.confirm():
            raise self._root_lock.lost  # another process owns the root now: leave its manifest alone
        _publish(self.root, self.world_size)
