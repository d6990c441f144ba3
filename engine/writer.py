"""Writer pool: staged slots -> compacted rows in chunk buffers -> whole chunks to the sink -> commit.

Shutdown protocol (cited by CaptureEngine.close; keep both in step):
  1. The producer stops first: hooks are removed, so nothing more is submitted.
  2. One sentinel per writer goes into the FIFO queue behind every staged batch; a writer exits on its
     sentinel, so every batch submitted before close is written.
  3. A writer that fails records its exception and sets the stop event: the others exit at their next
     queue poll, the producer's blocked ``acquire``/``submit`` re-raise it within 50 ms, and ``close``
     joins threads with a timeout loop, so nothing waits forever on a dead thread.
  4. After the join, on a clean close only, the partial last chunk is committed by the closing thread.

Ordering: writers take batches from the queue one at a time under ``_order_lock``, wait on the batch's
copy event, and reserve its row range there, so rows land in forward order whatever the thread timing.
The copying and the chunk writes run outside the lock, in parallel. A chunk is written by the thread that
fills its last row. Commit records can land out of order; readers trust the gap-free prefix only.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from typing import Callable

import numpy as np
import torch

from . import layout
from .errors import CaptureError, ConfigError
from .staging import Slot, SlotPool
from .statistics import Statistics, decode, point_stats

_SENTINEL = object()
_POLL_S = 0.05


@dataclasses.dataclass
class _Chunk:
    index: int
    arrays: dict[str, torch.Tensor]
    filled: int = 0


@dataclasses.dataclass
class _Job:
    slot: Slot
    keep: torch.Tensor          # flat indices of the batch's non-pad tokens
    dense: bool                 # no padding: rows are copied as slices
    pieces: list[tuple[_Chunk, int, int, int]]  # (chunk, offset in chunk, first, last) over keep


class Counters:
    """Run counters shared by the producer and the writers. Thread safety: update under ``lock``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches = 0
        self.tokens_staged = 0
        self.tokens_committed = 0
        self.bytes_committed = 0
        self.chunks_committed = 0
        self.stall_seconds = 0.0
        self.queue_high_water = 0
        self.started = time.perf_counter()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # no numpy bfloat16: hand zarr the raw bits
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


class WriterPool:
    """Threads that turn staged slots into committed chunks.

    Args:
        sink: ZarrSink or NullSink.
        pool: the slot pool (slots go back to it once their rows are copied out).
        num_writers: threads.
        chunk_tokens: rows per chunk.
        dtype: storage torch dtype of activations.
        bos_id: BOS token id or None; special_ids: ids flagged special.
        on_first_batch: called once, under the ordering lock, with {key: dim} before rows are written.
        counters: shared run counters.
        on_nonfinite: called (from a writer thread) with (key, count) when a chunk holds non-finite values.
        token_arrays: name -> numpy dtype of the per-token arrays (layout.token_arrays).
        start_row: first row of this run (resume).
        statistics: keep running statistics; device_statistics: from the slots' batch moments, not chunks.
        single_threaded: one intra-op thread per writer (CUDA models).
        resumed: (widths, kept rows of the cut chunk, statistics of the whole chunks kept) on resume.

    Thread safety: ``submit``/``check`` from the producer thread; ``close`` from one thread.
    """

    def __init__(self, sink, pool: SlotPool, num_writers: int, chunk_tokens: int, dtype: torch.dtype,
                 bos_id: int | None, special_ids: list[int], on_first_batch: Callable[[dict[str, int]], None],
                 counters: Counters, on_nonfinite: Callable[[str, int], None], token_arrays: dict[str, np.dtype],
                 start_row: int = 0, statistics: bool = True, device_statistics: bool = False,
                 single_threaded: bool = False,
                 resumed: tuple[dict[str, int], dict[str, np.ndarray], Statistics] | None = None):
        self._sink = sink
        self._pool = pool
        self._chunk_tokens = chunk_tokens
        self._dtype = dtype
        self._bos_id = bos_id
        self._special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.int64)
        self._on_first_batch = on_first_batch
        self._on_nonfinite = on_nonfinite
        self._counters = counters
        self._dims: dict[str, int] | None = None
        self._token_arrays = token_arrays
        self._want_statistics = statistics
        self._device_statistics = device_statistics  # the hooks computed each batch's moments
        self._single_threaded = single_threaded
        self._queue: queue.Queue = queue.Queue(maxsize=len(pool.slots) + num_writers)
        self._order_lock = threading.Lock()
        self._chunk_lock = threading.Lock()
        self._open: dict[int, _Chunk] = {}
        self._spare: list[dict[str, torch.Tensor]] = []
        self._next_row = start_row
        self.statistics: Statistics | None = None
        if resumed is not None:
            self._resume(start_row, *resumed)
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self._error_text = ""
        self.error_delivered = False  # close() does not raise a failure the caller already received
        self._threads = [threading.Thread(target=self._run, name=f"actcap-writer-{i}", daemon=True)
                         for i in range(num_writers)]
        for thread in self._threads:
            thread.start()

    def _resume(self, start_row: int, dims: dict[str, int], tail: dict[str, np.ndarray],
                statistics: Statistics) -> None:
        """Continue a store: widths are fixed by its arrays, statistics cover the whole chunks kept, and the
        kept rows of the cut chunk come first."""
        self._dims = dims
        self.statistics = statistics
        index, kept = divmod(start_row, self._chunk_tokens)
        if kept:
            chunk = self._open[index] = _Chunk(index, self._chunk_buffers(), kept)
            for key, rows in tail.items():
                target = chunk.arrays[key][:kept]
                target.copy_(decode(rows, "bfloat16" if target.dtype == torch.bfloat16 else str(rows.dtype)))
            if statistics is not None and self._device_statistics:  # no batch brings these rows' moments
                for key in dims:
                    statistics.add_rows(key, chunk.arrays[key][:kept], chunk.arrays["tokens/flags"][:kept], True)

    # ---- producer side -------------------------------------------------------------------------
    def check(self, delivered: bool = True) -> None:
        """Re-raise a writer failure in the calling thread, with the writer's traceback. ``delivered``
        records that the caller has now seen it (close() does not raise it a second time)."""
        if self._error is not None:
            self.error_delivered = self.error_delivered or delivered
            raise CaptureError(f"capture writer failed: {self._error!r}\n"
                               f"--- traceback in writer thread ---\n{self._error_text}") from self._error

    def submit(self, slot: Slot) -> None:
        """Hand a fully staged slot to the writers (never blocks long: the queue holds every slot)."""
        self._put(slot)
        self._submitted += 1  # after the put: an interrupted put must not leave flush() waiting forever
        depth = self._queue.qsize()
        with self._counters.lock:
            self._counters.queue_high_water = max(self._counters.queue_high_water, depth)

    def _put(self, item, delivered: bool = True) -> None:
        while True:
            self.check(delivered)
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def wait_written(self) -> None:
        """Block until every submitted batch is in chunk buffers and every full chunk is committed."""
        with self._progress:
            while self._done < self._submitted:
                self.check()
                self._progress.wait(timeout=_POLL_S)
        self.check()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ---- writer threads ------------------------------------------------------------------------
    def _run(self) -> None:
        if self._single_threaded:
            # CUDA models: without this each writer's torch ops start an OpenMP team as wide as the machine
            # and starve the thread that launches the model's kernels (H100 run 3: 3x slower forwards).
            # In PyTorch this setting also becomes the default of threads created later (documented).
            torch.set_num_threads(1)
        try:
            while (job := self._next_job()) is not None:
                self._fill(job)
        except BaseException as exc:  # every failure reaches the caller through check()
            self._error_text = "".join(traceback.format_exception(exc))
            self._error = exc
            self._stop.set()

    def _next_job(self) -> _Job | None:
        with self._order_lock:
            while True:
                if self._stop.is_set():
                    return None
                try:
                    slot = self._queue.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            if slot is _SENTINEL:
                return None
            if slot.event is not None:
                slot.event.synchronize()
            _, mask = slot.token_buffers()
            flat_mask = mask.reshape(-1) != 0
            keep = flat_mask.nonzero().squeeze(1)
            if self._dims is None:
                self._dims = dict(slot.dims)
                self.statistics = Statistics(self._dims) if self._want_statistics else None
                self._on_first_batch(self._dims)
            elif slot.dims != self._dims:
                raise ConfigError(f"the model produced widths {slot.dims} but the store holds {self._dims}: "
                                  "resume with the model and hook points the store was captured with")
            start, count = self._next_row, keep.numel()
            self._next_row += count
            return _Job(slot, keep, count == flat_mask.numel(), self._plan(start, count))

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

    def _chunk_buffers(self) -> dict[str, torch.Tensor]:
        if self._spare:
            return self._spare.pop()
        rows = self._chunk_tokens
        buffers = {key: torch.empty(rows, dim, dtype=self._dtype) for key, dim in self._dims.items()}
        for key, dtype in self._token_arrays.items():
            buffers[key] = torch.from_numpy(np.empty(rows, dtype=dtype))
        return buffers

    def _token_rows(self, slot: Slot, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        ids, mask = slot.token_buffers()
        real = mask != 0
        positions = (real.cumsum(1) - 1).reshape(-1)[keep]
        rows_of = keep // slot.batch.seq_len
        lengths = real.sum(1)[rows_of]
        token_ids = ids.reshape(-1)[keep]
        flags = (torch.where(positions == 0, layout.FLAG_FIRST, 0)
                 | torch.where(positions == lengths - 1, layout.FLAG_LAST, 0)
                 | torch.where(torch.isin(token_ids, self._special_ids), layout.FLAG_SPECIAL, 0))
        if self._bos_id is not None:
            flags |= torch.where(token_ids == self._bos_id, layout.FLAG_BOS, 0)
        values = {"tokens/input_ids": token_ids, "tokens/sequence": rows_of + slot.batch.first_sequence,
                  "tokens/position": positions, "tokens/flags": flags}
        for key in self._token_arrays:
            if key not in values:
                values[key] = slot.annotation_buffer(key.split("/", 1)[1]).reshape(-1)[keep]
        return values

    def _fill(self, job: _Job) -> None:
        slot = job.slot
        tokens = self._token_rows(slot, job.keep)
        points = {key: slot.point_rows(key) for key in self._dims}
        for chunk, offset, first, last in job.pieces:
            span = slice(offset, offset + last - first)
            for key, source in points.items():
                if job.dense:
                    chunk.arrays[key][span].copy_(source[first:last])
                else:
                    torch.index_select(source, 0, job.keep[first:last], out=chunk.arrays[key][span])
            for key, values in tokens.items():
                chunk.arrays[key][span].copy_(values[first:last])
        if self._device_statistics and self.statistics is not None:
            for key in self._dims:
                self.statistics.add_batch(key, slot.moments_buffer(key))
        self._pool.release(slot)
        full = []
        with self._chunk_lock:
            for chunk, _, first, last in job.pieces:
                chunk.filled += last - first
                if chunk.filled == self._chunk_tokens:
                    full.append(self._open.pop(chunk.index))
        for chunk in full:
            self._commit(chunk)
        with self._progress:
            self._done += 1
            self._progress.notify_all()

    def _commit(self, chunk: _Chunk) -> None:
        rows = chunk.filled
        arrays = {key: tensor[:rows] for key, tensor in chunk.arrays.items()}
        record = self._record(chunk.index, arrays)
        self._sink.write_chunk(chunk.index, {k: _to_numpy(v) for k, v in arrays.items()}, record)
        nbytes = sum(t.numel() * t.element_size() for t in arrays.values())
        with self._counters.lock:
            self._counters.tokens_committed += rows
            self._counters.bytes_committed += nbytes
            self._counters.chunks_committed += 1
        with self._chunk_lock:
            self._spare.append(chunk.arrays)

    def _record(self, index: int, arrays: dict[str, torch.Tensor]) -> dict:
        rows = arrays["tokens/sequence"].shape[0]
        sequence = arrays["tokens/sequence"]
        float16 = self._dtype == torch.float16
        stats = {key: point_stats(arrays[key], float16) for key in self._dims}
        for key, entry in stats.items():
            if self.statistics is not None:
                if not self._device_statistics:
                    self.statistics.add_rows(key, arrays[key], arrays["tokens/flags"], entry["nonfinite"] > 0)
                self.statistics.add_counts(key, entry["nonfinite"], entry["fp16_overflow"])
            if entry["nonfinite"]:
                self._on_nonfinite(key, entry["nonfinite"])
        return {
            "chunk_index": index,
            "row_start": index * self._chunk_tokens,
            "row_stop": index * self._chunk_tokens + rows,
            "token_count": rows,
            "keys": sorted(self._dims),
            "shape": {key: [rows, dim] for key, dim in self._dims.items()},
            "dtype": str(self._dtype).replace("torch.", ""),
            "first_sequence": int(sequence[0]),
            "last_sequence": int(sequence[-1]),
            "num_sequences": int((sequence[1:] != sequence[:-1]).sum()) + 1,
            "max_seq_len": int(arrays["tokens/position"].max()) + 1,
            "stats": stats,
            "committed_at": time.time(),
        }

    # ---- shutdown ------------------------------------------------------------------------------
    def close(self, commit_tail: bool) -> int:
        """Drain and stop the writers (see the protocol above). Returns rows assigned so far."""
        if self._error is None:
            for _ in self._threads:
                try:
                    self._put(_SENTINEL, delivered=False)
                except CaptureError:
                    break  # a writer died meanwhile: the others exit on the stop event
        for thread in self._threads:
            while thread.is_alive():
                thread.join(timeout=_POLL_S)
        if commit_tail and self._error is None:
            for index in sorted(self._open):
                self._commit(self._open.pop(index))
        if not self.error_delivered:
            self.check()
        return self._next_row

    @property
    def error(self) -> BaseException | None:
        """The first writer failure, if any."""
        return self._error

    def abort(self) -> None:
        """Stop without draining (failed construction or an unrecoverable error)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
