"""What ActivationDataset reads: columns (arrays) of one store, or of several captures of the same corpus read
side by side (two models, or a base and a fine-tuned model: crosscoders); the committed chunks they share;
the checks that their rows are the same tokens; and waiting, with backoff, for a store a capture is still
writing.

Commit records come from ``open_store`` (the gap-free committed prefix of each part, as ``CommitRecord``s):
``shared_chunks`` takes from them each chunk's rows and the stored size and checksum of every array read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from engine.errors import ConfigError, FollowTimeoutError, StoreFormatError
from engine.format import layout
from engine.format.layout import ChunkFile
from engine.format.location import Location
from engine.read.reader import CaptureStore, open_store
from engine.store.access import has_root_document

# Per-token arrays that must be equal, chunk by chunk, for stores to be read side by side.
ALIGNMENT_ARRAYS = ("tokens/input_ids", "tokens/sequence", "tokens/position")

StoreLike = str | os.PathLike | Location | CaptureStore


class ChunkRef(NamedTuple):
    """One committed chunk: the part (writing process) of the store, its index within the part, its rows, and
    its commit records' ``files`` entry of each (store, array) read, in the order given to ``shared_chunks``
    (None: the record has none, format version 1)."""

    part: int
    index: int  # type: ignore[assignment]  # hides tuple.index(), which no caller uses on a ChunkRef
    rows: int
    files: tuple[ChunkFile | None, ...]


@dataclasses.dataclass(frozen=True)
class Column:
    """One array read into every batch.

    Attributes:
        name: its key in yielded dicts: the array path, prefixed ``{store name}/`` when stores are zipped.
        store: index of its store.
        key: its array path in that store.
    """

    name: str
    store: int
    key: str

    @property
    def is_token_array(self) -> bool:
        return self.key.startswith("tokens/")


def open_stores(stores: StoreLike | Mapping[str, StoreLike], storage_options: dict | None,
                opener=open_store) -> tuple[list[str | None], list[CaptureStore]]:
    """(names, opened stores): one store is named None; a mapping zips stores by name."""
    if not isinstance(stores, Mapping):
        return [None], [_open(stores, storage_options, opener)]
    if not stores or not all(isinstance(name, str) and name and "/" not in name for name in stores):
        raise ConfigError(f"zipped stores need names without '/' (they prefix the yielded keys), got "
                          f"{list(stores)}")
    return list(stores), [_open(store, storage_options, opener) for store in stores.values()]


def _open(store: StoreLike, storage_options: dict | None, opener) -> CaptureStore:
    if isinstance(store, CaptureStore):
        return store if opener is open_store else opener(store.location, None)
    return opener(store, storage_options)


def activation_keys(store: CaptureStore) -> list[str]:
    """The activation arrays a store lists (while capturing, until its first batch, they may not exist)."""
    return list(store.manifest.arrays)


def check_keys(name: str | None, store: CaptureStore, keys: Sequence[str], tokens_allowed: bool,
               listed_only: bool = False) -> None:
    """Every key is an array of the store: an activation array, or (``tokens_allowed``) a per-token one.
    ``listed_only``: the manifest listing it is enough (a capture creates the arrays at its first batch)."""
    known = (activation_keys(store) if listed_only
             else [key for key in store.keys() if key in store.manifest.arrays])
    if tokens_allowed:
        known += list(store.manifest.token_arrays)
    for key in keys:
        if key not in known:
            where = store.path if name is None else f"{name} ({store.path})"
            raise ConfigError(f"{key!r} is not an activation array of {where}: choose one of "
                              f"{', '.join(known)}")


def columns_of(names: list[str | None], keys: Sequence[str]) -> list[Column]:
    """Every key of every store, stores outer; zipped stores prefix each name with the store's."""
    return [Column(key if name is None else f"{name}/{key}", number, key)
            for number, name in enumerate(names) for key in keys]


def check_same_corpus(names: list[str | None], stores: list[CaptureStore]) -> None:
    """Stores read side by side must be chunked alike; complete ones must hold the same number of rows."""
    first, first_name = stores[0], names[0]
    for name, store in zip(names[1:], stores[1:]):
        differences = [f"{what}: {first_name} has {mine}, {name} has {theirs}" for what, mine, theirs in (
            ("chunk_tokens", first.manifest.chunk_tokens, store.manifest.chunk_tokens),
            ("parts (capture processes)", len(first.parts), len(store.parts)))
            if mine != theirs]
        if not differences and {first.status, store.status} == {layout.STATUS_COMPLETE}:
            if first.num_tokens != store.num_tokens:
                differences.append(f"rows: {first_name} has {first.num_tokens}, {name} has "
                                   f"{store.num_tokens}")
        if differences:
            raise ConfigError(f"stores {first_name} and {name} cannot be read side by side: "
                              + "; ".join(differences) + ". Capture the same corpus in the same order, with "
                              "the same chunk_tokens and number of processes")


def shared_chunks(names: list[str | None], stores: list[CaptureStore],
                  reads: Sequence[tuple[int, str]]) -> list[ChunkRef]:
    """The committed chunks every store has, part after part (a store still being written may be ahead), with
    the ``files`` entry of each (store number, array) in ``reads``."""
    chunks = []
    for number, parts in enumerate(zip(*(store.parts for store in stores))):
        records = [part.chunks for part in parts]
        for index in range(min(map(len, records))):
            sizes = [part_records[index].token_count for part_records in records]
            if len(set(sizes)) > 1:
                raise ConfigError(f"chunk {index} of part {number} holds different rows per store ("
                                  + ", ".join(f"{name}: {size}" for name, size in zip(names, sizes))
                                  + "): the stores are not captures of the same corpus in the same order")
            files = tuple(records[store][index].files.get(key) for store, key in reads)
            chunks.append(ChunkRef(number, index, sizes[0], files))
    return chunks


def check_same_tokens(names: list[str | None], chunk: ChunkRef, tokens: list[dict[str, np.ndarray]]) -> None:
    """The stores' token arrays of one chunk are equal (``tokens``: per store, {array: that chunk's rows})."""
    for name, theirs in zip(names[1:], tokens[1:]):
        for key in ALIGNMENT_ARRAYS:
            differ = np.flatnonzero(tokens[0][key] != theirs[key])
            if differ.size:
                row = int(differ[0])
                raise ConfigError(
                    f"stores {names[0]} and {name} differ in {key} at row {row} of chunk {chunk.index} (part "
                    f"{chunk.part}): {tokens[0][key][row]} vs {theirs[key][row]}. They are not captures of "
                    "the same corpus in the same order (data, tokenizer, --seq-len, --pack, batch order)")


def combined_status(stores: list[CaptureStore]) -> str:
    """``failed`` if any store failed, ``complete`` when every one is, else ``open``."""
    statuses = {store.status for store in stores}
    if layout.STATUS_FAILED in statuses:
        return layout.STATUS_FAILED
    return layout.STATUS_COMPLETE if statuses == {layout.STATUS_COMPLETE} else layout.STATUS_OPEN


class Backoff:
    """Sleeps between polls of a store being written, never spins: 50 ms, doubling up to 2 s, back to 50 ms
    after progress. Raises FollowTimeoutError after ``timeout`` seconds without progress (None: never).

    Thread safety: one per polling loop.
    """

    FIRST_S, LONGEST_S = 0.05, 2.0

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.progressed()

    def progressed(self) -> None:
        self._delay, self._since = self.FIRST_S, time.monotonic()

    def wait(self, what: str, cause: BaseException | None = None) -> None:
        idle = time.monotonic() - self._since
        if self.timeout is not None and idle >= self.timeout:
            raise FollowTimeoutError(f"waited {idle:.1f} s for {what}: is the capture still running? A "
                                     "killed capture leaves its store 'open' (resume it, then read again); "
                                     "for a slow one raise follow_timeout (None waits forever)") from cause
        pause = self._delay if self.timeout is None else min(self._delay, self.timeout - idle)
        time.sleep(pause)
        self._delay = min(2 * self._delay, self.LONGEST_S)


def opener_waiting_for(keys: Sequence[str], backoff: Backoff):
    """An ``open_store`` that waits until the store exists and holds ``keys`` (a capture creates its store
    when it starts and its activation arrays at its first batch). Keys it does not list fail at once, and so
    does a store that exists but cannot be read (damaged metadata)."""

    def open_when_ready(where: str | os.PathLike | Location, storage_options: dict | None) -> CaptureStore:
        while True:
            try:
                store = open_store(where, storage_options)
            except StoreFormatError as missing:
                if has_root_document(Location.of(where, storage_options)):
                    raise  # there is a store, and it is damaged or not a capture store: waiting will not help
                backoff.wait(f"a capture store at {where}", missing)
                continue
            check_keys(None, store, keys, tokens_allowed=True, listed_only=True)
            if all(key in store for key in keys):
                backoff.progressed()
                return store
            backoff.wait(f"the arrays {', '.join(keys)} in {where} (created at the capture's first batch)")

    return open_when_ready
