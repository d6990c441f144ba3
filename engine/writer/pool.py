"""The writer pool: staged batches -> compacted rows in chunk buffers -> whole chunks to the sink -> commit.

The messages, the shutdown protocol and the ordering rules are in ``engine.writer.protocol``.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Callable, Mapping

import numpy as np

from engine.errors import ConfigError
from engine.format import layout
from engine.format.encoding import scale_key, squared_error_and_norm
from engine.format.files import page_aligned_empty
from engine.format.layout import ChunkStats, CommitRecord
from engine.format.statistics import ChunkMoments, Statistics, chunk_summary, decodable, mark_outliers
from engine.store.sink import Sink
from engine.writer.protocol import (
    PARENT_CHECK_S,
    BatchInfo,
    Flushed,
    Free,
    FromWriter,
    NonFinite,
    Totals,
    WriterSpec,
    error_norms_key,
    is_error_norms,
    send_error,
)
from engine.writer.slots import SlotMemory

_SENTINEL = object()


@dataclasses.dataclass
class _Chunk:
    index: int
    arrays: dict[str, np.ndarray]
    filled: int = 0
    undecided: int = 0      # rows whose ``last`` bit waits for the next batch, flush or close
    last: list[int] = dataclasses.field(default_factory=list)  # offsets of rows decided ``last``
    stall_seconds: float = 0.0  # waits of the forwards whose first row it holds (its commit record's)
    # a resumed chunk's kept rows: (squared error, squared norm) per 8-bit array, from the record they had
    kept_errors: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Job:
    slot: int
    batch: BatchInfo
    ids: np.ndarray | None        # (batch, seq) token ids in shared memory (None: an inputs_embeds forward)
    mask: np.ndarray | None       # (batch, seq) attention mask (None: every token is real)
    keep: np.ndarray | None       # flat indices of the batch's non-pad tokens (None: every token)
    pieces: list[tuple[_Chunk, int, int, int]]  # (chunk, offset in chunk, first, last) over the kept rows
    stored: np.ndarray            # per row: its sequence's tokens stored before this batch (positions go on)
    previous: np.ndarray          # per row: the token before this batch's first (-1: none)
    released: list[_Chunk]        # chunks this batch's decisions completed: its thread commits them


@dataclasses.dataclass
class _Flush:
    """A flush, queued behind the batches it waits for: it ends the open sequences in order."""

    target: int
    request: int
    released: list[_Chunk] = dataclasses.field(default_factory=list)


class _OpenSequences:
    """The sequences of the newest batch while the next forward may continue them (see the module docstring).

    Per batch row: ``newest``, the store row of its newest token, whose ``last`` bit is undecided (-1: none
    stored yet); ``stored``, its tokens stored so far; ``last_token``, the id of the newest (-1: none).

    Thread safety: under the pool's order lock.
    """

    def __init__(self, batch_size: int):
        self.newest = np.full(batch_size, -1, dtype=np.int64)
        self.stored = np.zeros(batch_size, dtype=np.int64)
        self.last_token = np.full(batch_size, -1, dtype=np.int64)

    def extend(self, start: int, real: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Add a batch whose kept rows start at store row ``start`` (``real``: (batch, seq) bool). Returns the
        rows whose ``last`` bit this decides as not last (superseded) and those now undecided."""
        per_row = real.sum(axis=1)
        has = per_row > 0
        newest = start + np.cumsum(per_row) - 1
        superseded = self.newest[has]
        self.newest[has] = newest[has]
        self.stored += per_row
        if ids is not None and has.any():
            rows = np.flatnonzero(has)
            columns = real.shape[1] - 1 - np.argmax(real[rows, ::-1], axis=1)
            self.last_token[rows] = ids[rows, columns]
        return superseded, newest[has]



@dataclasses.dataclass
class _Committed:
    rows: int
    nbytes: int
    moments: dict[str, ChunkMoments]     # key -> its moments (empty without statistics)
    summaries: Mapping[str, ChunkStats]  # key -> the commit record's stats entry


class CommittedPrefix:
    """Totals and statistics of the gap-free prefix of committed chunks, the rows readers trust. A chunk whose
    predecessor is still being written (or failed) counts once the gap closes, so the manifest never counts a
    row a reader cannot see.

    Thread safety: ``add`` from any writer thread; read the totals under ``lock``.
    """

    def __init__(self, chunks: int, chunk_tokens: int, statistics: Statistics | None):
        self.lock = threading.Lock()
        self.chunks = chunks
        self.tokens = chunks * chunk_tokens
        self.bytes = 0
        self.statistics = statistics
        self._waiting: dict[int, _Committed] = {}

    def add(self, index: int, committed: _Committed) -> tuple[int, int, int]:
        """Count chunk ``index``; returns the (tokens, bytes, chunks) of the prefix now."""
        with self.lock:
            self._waiting[index] = committed
            while self.chunks in self._waiting:
                chunk = self._waiting.pop(self.chunks)
                self.tokens += chunk.rows
                self.bytes += chunk.nbytes
                self.chunks += 1
                for key, moments in chunk.moments.items():
                    assert self.statistics is not None, "moments are only computed when statistics are kept"
                    self.statistics.add(key, moments, chunk.summaries[key])
            return self.tokens, self.bytes, self.chunks


class WriterPool:
    """Threads that turn staged batches into committed chunks.

    Args:
        spec: the run.
        sink: where chunks go.
        memory: the mapped slot buffers.
        send: sends a message to the capturing process (thread-safe).

    Thread safety: ``submit``/``request_flush``/``close`` from the main thread; the rest runs in the threads.
    """

    def __init__(self, spec: WriterSpec, sink: Sink, memory: SlotMemory, send: Callable[[FromWriter], None]):
        self._spec = spec
        self._sink = sink
        self._memory = memory
        self._send = send
        self._chunk_tokens = spec.chunk_tokens
        self._special_ids = np.array(sorted(spec.special_ids), dtype=np.int64)
        self._separator_ids = np.array(sorted(spec.separator_ids), dtype=np.int64)
        self._sequences: _OpenSequences | None = None  # the newest batch's, while they may continue
        self._queue: queue.Queue = queue.Queue()
        self._order_lock = threading.Lock()
        self._chunk_lock = threading.Lock()
        self._progress = threading.Lock()
        self._open: dict[int, _Chunk] = {}
        self._spare: list[dict[str, np.ndarray]] = []
        self._dims: dict[str, int] | None = None
        self._next_row = spec.start_row
        self.committed = CommittedPrefix(spec.start_row // spec.chunk_tokens, spec.chunk_tokens, None)
        self._reported_nonfinite = False
        self._done = 0
        self._flush_targets: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        if spec.start_row:
            self._resume()
        self._threads = [threading.Thread(target=self._run, name=f"actcap-writer-{i}", daemon=True)
                         for i in range(spec.num_writers)]
        for thread in self._threads:
            thread.start()

    def _resume(self) -> None:
        """Continue a store: widths are fixed by its arrays, statistics start from those of the whole chunks
        kept (the capturing process's verifying read computed them), and the kept rows of the cut chunk come
        first."""
        self._dims = {key: array.shape[1] for key, array in self._sink.point_arrays().items()}
        whole = self.committed.tokens
        if self._spec.statistics:
            assert self._spec.kept_statistics is not None, "a resume's spec has the kept chunks' statistics"
            self.committed.statistics = Statistics.from_json(self._spec.kept_statistics)
        index, kept = divmod(self._spec.start_row, self._chunk_tokens)
        if kept:
            chunk = self._open[index] = _Chunk(index, self._chunk_buffers(), kept)
            for key, array in self._sink.all_arrays().items():
                chunk.arrays[key][:kept] = array[whole:whole + kept]
            for key in filter(is_error_norms, chunk.arrays):  # the kept rows' norms went with the process ...
                chunk.arrays[key][:kept] = 0
            chunk.kept_errors = dict(self._spec.kept_errors or {})  # ... their sums are in the chunk's record

    # ---- main thread ---------------------------------------------------------------------------
    def submit(self, slot: int, batch: BatchInfo, dims: dict[str, int]) -> None:
        self._queue.put((slot, batch, dims))

    def request_flush(self, target: int, request: int) -> None:
        """End the open sequences behind every batch submitted so far, then send ``Flushed(request)`` once
        ``target`` batches are done."""
        self._queue.put(_Flush(target, request))

    def close(self, commit_tail: bool, while_draining: Callable[[], None]) -> int:
        """Drain and stop the threads (see the protocol above), calling ``while_draining()`` every
        PARENT_CHECK_S meanwhile. Returns the rows assigned so far."""
        for _ in self._threads:
            self._queue.put(_SENTINEL)
        for thread in self._threads:
            while thread.is_alive():
                thread.join(timeout=PARENT_CHECK_S)
                while_draining()
        if commit_tail and self.error is None:
            released = self._end_sequences()
            for chunk in sorted([*released, *self._open.values()], key=lambda chunk: chunk.index):
                self._commit(chunk)
            self._open.clear()
        return self._next_row

    def abort(self) -> None:
        self._halt()
        for thread in self._threads:
            thread.join(timeout=5)

    def _halt(self) -> None:
        """Make every writer thread stop at its next job: each waits on the queue, so each gets a sentinel."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(_SENTINEL)

    # ---- writer threads ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                if isinstance(job, _Flush):
                    self._finish_flush(job)
                else:
                    self._fill(job)
        except BaseException as exc:  # every failure reaches the capturing process
            if self.error is None:
                self.error = exc
                send_error(self._send, exc)
            self._halt()

    def _next_job(self) -> _Job | _Flush | None:
        with self._order_lock:
            item = self._queue.get()
            if item is _SENTINEL or self._stop.is_set():
                return None
            if isinstance(item, _Flush):
                item.released = self._end_sequences()
                return item
            slot, batch, dims = item
            self._check_dims(dims)
            ids, mask = self._memory.token_views(slot, batch)
            keep = None if mask is None else np.flatnonzero(mask.reshape(-1))
            if keep is not None and mask is not None and keep.size == mask.size:
                keep = None  # no padding: rows are copied as slices
            count = batch.batch_size * batch.seq_len if keep is None else keep.size
            start = self._next_row
            self._next_row += count
            pieces = self._plan(start, count)
            if pieces:  # under the order lock, before any row of the batch lands: its chunk is not yet full
                pieces[0][0].stall_seconds += batch.stall_seconds
            real = np.ones((batch.batch_size, batch.seq_len), dtype=bool) if mask is None else mask != 0
            stored, previous, released = self._place(batch, start, real, ids)
            return _Job(slot, batch, ids, mask, keep, pieces, stored, previous, released)

    def _check_dims(self, dims: dict[str, int]) -> None:
        """The first batch fixes the widths and creates the activation arrays; later ones must match."""
        if self._dims is None:
            self._dims = dict(dims)
            if self._spec.statistics:
                self.committed.statistics = Statistics(self._dims)
            self._sink.create_point_arrays(self._array_specs())
        elif dims != self._dims:
            raise ConfigError(f"the model produced widths {dims} but the store holds {self._dims}: "
                              "resume with the model and hook points the store was captured with")

    @property
    def _widths(self) -> dict[str, int]:
        """The points' widths, once fixed: by the first batch (``_check_dims``) or by a resumed store's arrays
        (``_resume``), before any chunk is made."""
        assert self._dims is not None, "the widths are fixed before any chunk is made"
        return self._dims

    def _array_specs(self) -> dict[str, tuple[int, np.dtype, dict]]:
        """The activation arrays to create, in order: an 8-bit store's scale arrays first (a reader lists an
        encoded array once its scales exist), then the activations: key -> (width, dtype, attributes)."""
        encoding = self._spec.encoding
        specs = {scale_key(key): (1, layout.SCALE_DTYPE, encoding.scale_attributes(key))
                 for key in self._widths} if encoding is not None else {}
        specs.update({key: (dim, self._spec.storage_dtype, self._spec.point_attributes[key])
                      for key, dim in self._widths.items()})
        return specs

    def _place(self, batch: BatchInfo, start: int, real: np.ndarray,
               ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[_Chunk]]:
        """Where a batch's sequences stand (under the order lock): each row's tokens stored before it and the
        token before its first, and the ``last`` decisions it makes: the open sequences it does not continue
        end; of those it continues, each row's newest token is superseded by this batch's; its own newest rows
        are decided now unless the next forward may continue them. Returns (stored, previous, the chunks the
        decisions completed)."""
        decisions: list[tuple[np.ndarray, bool]] = []
        sequences = self._sequences
        if not (batch.continues and sequences is not None and len(sequences.newest) == batch.batch_size):
            decisions += self._take_open_sequences()
            sequences = _OpenSequences(batch.batch_size)
        stored, previous = sequences.stored.copy(), sequences.last_token.copy()
        superseded, undecided = sequences.extend(start, real, ids)
        self._count_undecided(undecided)
        decisions.append((superseded, False))
        self._sequences = sequences
        if not batch.may_continue:
            decisions += self._take_open_sequences()
        return stored, previous, self._decide(decisions)

    def _take_open_sequences(self) -> list[tuple[np.ndarray, bool]]:
        """End the open sequences: their newest rows are decided ``last``."""
        sequences, self._sequences = self._sequences, None
        return [] if sequences is None else [(sequences.newest, True)]

    def _end_sequences(self) -> list[_Chunk]:
        """Flush and close: end the open sequences; returns the chunks that completes."""
        return self._decide(self._take_open_sequences())

    def _count_undecided(self, rows: np.ndarray) -> None:
        indices, counts = np.unique(rows // self._chunk_tokens, return_counts=True)
        with self._chunk_lock:
            for index, count in zip(indices.tolist(), counts.tolist()):
                self._open[index].undecided += count

    def _decide(self, decisions: list[tuple[np.ndarray, bool]]) -> list[_Chunk]:
        """Record each (store rows, last?) decision in the rows' chunks; returns the chunks that are now full
        and decided, taken out of the open ones for the caller to commit."""
        released = []
        with self._chunk_lock:
            for rows, last in decisions:
                rows = rows[rows >= 0]
                indices, offsets = np.divmod(rows, self._chunk_tokens)
                for index in np.unique(indices).tolist():
                    chunk = self._open[index]
                    in_chunk = indices == index
                    chunk.undecided -= int(np.count_nonzero(in_chunk))
                    if last:
                        chunk.last += offsets[in_chunk].tolist()
                    if chunk.filled == self._chunk_tokens and not chunk.undecided:
                        released.append(self._open.pop(index))
        return released

    def _plan(self, start: int, count: int) -> list[tuple[_Chunk, int, int, int]]:
        pieces, done = [], 0
        while done < count:
            index, offset = divmod(start + done, self._chunk_tokens)
            take = min(self._chunk_tokens - offset, count - done)
            chunk = self._open.get(index)
            if chunk is None:
                chunk = self._open[index] = _Chunk(index, self._chunk_buffers())
            pieces.append((chunk, offset, done, done + take))
            done += take
        return pieces

    def _chunk_buffers(self) -> dict[str, np.ndarray]:
        with self._chunk_lock:
            if self._spare:
                return self._spare.pop()
        rows = self._chunk_tokens
        buffers = {key: page_aligned_empty((rows, dim), self._spec.storage_dtype)
                   for key, dim in self._widths.items()}
        if self._spec.encoding is not None:
            for key in self._widths:
                buffers[scale_key(key)] = page_aligned_empty((rows, 1), layout.SCALE_DTYPE)
                buffers[error_norms_key(key)] = np.zeros((rows, 2), dtype=np.float32)
        for key, dtype in self._spec.token_arrays.items():
            buffers[key] = page_aligned_empty((rows,), dtype)
        return buffers

    def _token_rows(self, job: _Job) -> dict[str, np.ndarray]:
        """The kept tokens' ids, sequence numbers, positions, flags and annotations. Positions count on from
        the tokens each row's sequence had stored; ``last`` is set as the chunk commits (``_place``)."""
        batch, keep = job.batch, job.keep
        real = np.ones((batch.batch_size, batch.seq_len), dtype=bool) if job.mask is None else job.mask != 0
        flat = slice(None) if keep is None else keep
        positions = (np.cumsum(real, axis=1) - 1 + job.stored[:, None]).reshape(-1)[flat]
        rows_of = (np.arange(real.size) // batch.seq_len)[flat]
        token_ids = (np.full(len(positions), -1, dtype=np.int64) if job.ids is None
                     else job.ids.reshape(-1)[flat])
        previous = np.empty_like(token_ids)
        previous[1:] = token_ids[:-1]
        starts = positions == job.stored[rows_of]  # each row's first token in this batch
        previous[starts] = job.previous[rows_of[starts]]
        flags = (np.where(positions == 0, layout.FLAG_FIRST, 0)
                 | np.where(np.isin(token_ids, self._special_ids), layout.FLAG_SPECIAL, 0)
                 | np.where(np.isin(previous, self._separator_ids), layout.FLAG_DOC_START, 0))
        if self._spec.bos_id is not None:
            flags |= np.where(token_ids == self._spec.bos_id, layout.FLAG_BOS, 0)
        values = {"tokens/input_ids": token_ids, "tokens/sequence": rows_of + batch.first_sequence,
                  "tokens/position": positions, "tokens/flags": flags}
        for name in self._spec.annotations:
            values[f"tokens/{name}"] = self._memory.annotation_view(job.slot, name, batch)[flat]
        return values

    def _fill(self, job: _Job) -> None:
        tokens = self._token_rows(job)
        rows = {name: source for key, dim in self._widths.items()
                for name, source in self._memory.point_rows(job.slot, key, dim, job.batch).items()}
        for chunk, offset, first, last in job.pieces:
            span = slice(offset, offset + last - first)
            for key, source in rows.items():
                if job.keep is None:
                    chunk.arrays[key][span] = source[first:last]
                else:
                    np.take(source, job.keep[first:last], axis=0, out=chunk.arrays[key][span])
            for key, values in tokens.items():
                chunk.arrays[key][span] = values[first:last]
        self._send(Free(job.slot))
        full = []
        with self._chunk_lock:
            for chunk, _, first, last in job.pieces:
                chunk.filled += last - first
                if chunk.filled == self._chunk_tokens and not chunk.undecided:
                    full.append(self._open.pop(chunk.index))
        for chunk in job.released + full:
            self._commit(chunk)
        with self._progress:
            self._done += 1
            reached = [request for target, request in self._flush_targets if target <= self._done]
            self._flush_targets = [(target, request) for target, request in self._flush_targets
                                   if target > self._done]
        for request in reached:
            self._send(Flushed(request))

    def _finish_flush(self, flush: _Flush) -> None:
        """Commit the chunks ending the open sequences completed, then answer once the flush's batches are
        done (their threads commit their own full chunks first)."""
        for chunk in flush.released:
            self._commit(chunk)
        with self._progress:
            if self._done < flush.target:
                self._flush_targets.append((flush.target, flush.request))
                return
        self._send(Flushed(flush.request))

    def _commit(self, chunk: _Chunk) -> None:
        rows = chunk.filled
        arrays = {key: array[:rows] for key, array in chunk.arrays.items() if not is_error_norms(key)}
        error_norms = {key: array[:rows] for key, array in chunk.arrays.items() if is_error_norms(key)}
        if chunk.last:
            arrays["tokens/flags"][chunk.last] |= layout.FLAG_LAST
        moments: dict = {}
        # The sink runs it while the chunk's rows are being written; cached, so the call below only
        # computes it for a sink (of a test's own) that did not.
        make_record = functools.cache(
            lambda: self._record(chunk.index, arrays, moments, chunk.stall_seconds, error_norms,
                                 chunk.kept_errors))
        self._sink.write_chunk(chunk.index, arrays, make_record)
        record = make_record()
        totals = self.committed.add(chunk.index,
                                    _Committed(rows, sum(array.nbytes for array in arrays.values()),
                                               moments, record.stats))
        self._send(Totals(*totals))
        with self._chunk_lock:
            self._spare.append(chunk.arrays)

    def _record(self, index: int, arrays: dict[str, np.ndarray], moments: dict,
                stall_seconds: float, error_norms: dict[str, np.ndarray],
                kept_errors: dict[str, tuple[float, float]]) -> CommitRecord:
        """The chunk's commit record (the sink adds each array's checksum and stored size); its moments per
        array go into ``moments`` (when statistics are kept). Sets the ``outlier`` bits of ``tokens/flags``:
        a sink writes that array once this has returned. An 8-bit store's stats describe the decoded values
        and sum the encoding's error: ``error_norms`` per key, each row's (``engine.format.encoding``), plus
        ``kept_errors``, the sums of a resumed chunk's kept rows when its old record covered exactly them."""
        sequence = arrays["tokens/sequence"]
        flags = arrays["tokens/flags"]
        rows = sequence.shape[0]
        ratio = self._spec.outlier_norm_ratio
        outliers = np.zeros(rows, dtype=bool)
        stats = {}
        for key in self._widths:
            stats[key], entry, flagged = chunk_summary(decodable(arrays, key, self._spec.dtype),
                                                       self._spec.dtype, flags,
                                                       moments=self.committed.statistics is not None,
                                                       outlier_ratio=ratio)
            if self._spec.encoding is not None:
                squared = squared_error_and_norm(error_norms[error_norms_key(key)], arrays[scale_key(key)])
                squared_error, squared_norm = squared.sum(axis=0) + np.asarray(kept_errors.get(key, (0, 0)))
                stats[key] = dataclasses.replace(stats[key], squared_error=float(squared_error),
                                                 squared_norm=float(squared_norm))
            if entry is not None:
                moments[key] = entry
            if flagged is not None:
                outliers |= flagged
            if stats[key].nonfinite:
                self._note_nonfinite(key, stats[key].nonfinite)
        mark_outliers(flags, outliers)
        start = index * self._chunk_tokens
        sequences = np.unique(sequence)  # a decode loop interleaves its sequences row by row
        return CommitRecord(
            chunk_index=index, row_start=start, row_stop=start + rows, dims=dict(self._widths),
            dtype=self._spec.dtype, first_sequence=int(sequences[0]), last_sequence=int(sequences[-1]),
            num_sequences=len(sequences), max_seq_len=int(arrays["tokens/position"].max()) + 1, stats=stats,
            committed_at=time.time(), stall_seconds=stall_seconds)

    def _note_nonfinite(self, key: str, count: int) -> None:
        """Report the run's first chunk with non-finite values, and only that one: the capturing process
        warns for each report, so this is where "warn once" is decided."""
        with self._progress:
            if self._reported_nonfinite:
                return
            self._reported_nonfinite = True
        self._send(NonFinite(key, count))
