"""Staging: device activations -> host slots, without making the compute stream wait.

On CUDA every hook snapshots its tensor on the compute stream (cast to the storage dtype, or a copy when
the dtype already matches, so later in-place ops of the model cannot race the transfer), then a dedicated
copy stream waits on the compute stream and copies the snapshot with ``non_blocking=True`` into a pinned
host slot; ``record_stream`` keeps the snapshot's memory alive until that copy is done. After the batch's
last hook an event is recorded on the copy stream; writers ``event.synchronize()`` before touching a slot
(peers that skip this read half-copied buffers). Nothing in a hook synchronizes the device.

On CUDA the hooks also compute each batch's statistics on the device from the snapshot (see
statistics.py) and copy the small result along with the rows.

On CPU the same calls copy synchronously into plain (unpinned) host slots.

The pool of slots is the memory bound: ``count`` slots, each sized for the largest batch seen.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Callable

import torch

from .statistics import MOMENTS_HEAD, attention_sinks, batch_moments


@dataclasses.dataclass
class BatchInfo:
    """Host-side facts of one forward pass, known without touching device data."""

    index: int            # forward-pass number in this run
    batch_size: int
    seq_len: int
    first_sequence: int   # global sequence index of row 0


class Slot:
    """Host buffers for one batch: token ids, attention mask and every captured point.

    Thread safety: owned by one thread at a time (the producer until enqueued, then one writer).
    """

    def __init__(self, index: int, pin: bool, dtype: torch.dtype):
        self.index = index
        self._pin = pin
        self._dtype = dtype
        self.capacity = 0
        self._ids = torch.empty(0, dtype=torch.int64)
        self._mask = torch.empty(0, dtype=torch.int64)
        self._annotations: dict[str, torch.Tensor] = {}
        self._points: dict[str, torch.Tensor] = {}
        self._moments: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        self.batch: BatchInfo | None = None
        self.captured: set[str] = set()
        self.event: torch.cuda.Event | None = None

    def _alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self._pin)

    def reserve(self, batch: BatchInfo) -> None:
        """Start a batch: size token buffers for it (grown with 25% headroom, never shrunk)."""
        tokens = batch.batch_size * batch.seq_len
        if tokens > self.capacity:
            self.capacity = max(tokens, self.capacity + self.capacity // 4)
            self._ids = self._alloc(self.capacity, torch.int64)
            self._mask = self._alloc(self.capacity, torch.int64)
            self._annotations = {}
            self._points = {}  # reallocated at the new capacity on each point's next capture
        self.batch = batch
        self.captured = set()
        self.event = None

    def point_buffer(self, key: str, dim: int) -> torch.Tensor:
        """(batch, seq, dim) view of one point's buffer, allocated on the point's first capture."""
        buffer = self._points.get(key)
        if buffer is None or buffer.numel() < self.capacity * dim:
            buffer = self._points[key] = self._alloc(self.capacity * dim, self._dtype)
        self.dims[key] = dim
        b = self.batch
        return buffer[: b.batch_size * b.seq_len * dim].view(b.batch_size, b.seq_len, dim)

    def point_rows(self, key: str) -> torch.Tensor:
        """(batch * seq, dim) view of a captured point, for the writers."""
        dim = self.dims[key]
        return self._points[key][: self.batch.batch_size * self.batch.seq_len * dim].view(-1, dim)

    def moments_buffer(self, key: str) -> torch.Tensor:
        """One point's batch moments (layout: statistics.MOMENTS_HEAD), when computed on the device."""
        buffer = self._moments.get(key)
        if buffer is None:
            buffer = self._moments[key] = self._alloc(MOMENTS_HEAD + self.dims[key], torch.float64)
        return buffer

    def token_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq) views of the input ids and attention mask."""
        n = self.batch.batch_size * self.batch.seq_len
        shape = (self.batch.batch_size, self.batch.seq_len)
        return self._ids[:n].view(shape), self._mask[:n].view(shape)

    def annotation_buffer(self, name: str) -> torch.Tensor:
        """(batch, seq) int64 view of one per-token annotation."""
        if name not in self._annotations:
            self._annotations[name] = self._alloc(self.capacity, torch.int64)
        n = self.batch.batch_size * self.batch.seq_len
        return self._annotations[name][:n].view(self.batch.batch_size, self.batch.seq_len)

    @property
    def nbytes(self) -> int:
        buffers = (self._ids, self._mask, *self._points.values(), *self._annotations.values(),
                   *self._moments.values())
        return sum(t.numel() * t.element_size() for t in buffers)


class SlotPool:
    """A fixed number of slots; ``acquire`` blocks while all are in use (that wait is backpressure).

    Thread safety: acquire/release from any thread.
    """

    def __init__(self, count: int, pin: bool, dtype: torch.dtype):
        self.slots = [Slot(i, pin, dtype) for i in range(count)]
        self._free: queue.Queue[Slot] = queue.Queue(maxsize=count)
        for slot in self.slots:
            self._free.put_nowait(slot)

    def acquire(self, check: Callable[[], None]) -> tuple[Slot, float]:
        """A free slot and the seconds waited for it; ``check`` runs while waiting and may raise."""
        try:
            return self._free.get_nowait(), 0.0
        except queue.Empty:
            pass
        start = time.perf_counter()
        while True:
            check()  # a dead writer pool must not leave the forward pass waiting forever
            try:
                return self._free.get(timeout=0.05), time.perf_counter() - start
            except queue.Empty:
                continue

    def release(self, slot: Slot) -> None:
        slot.batch = None
        self._free.put_nowait(slot)

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)


class Stager:
    """Copies a batch's tensors into a slot: async on a side CUDA stream, or synchronously on CPU.

    Thread safety: call from the thread that runs the forward pass.

    Args:
        device: the model's device.
        dtype: storage dtype of activations.
        bos_id: BOS token id or None (for the device statistics' attention sinks).
        device_statistics: compute each batch's moments in the hooks (``Slot.moments_buffer``).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, bos_id: int | None = None,
                 device_statistics: bool = False):
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self.device_statistics = device_statistics
        self._device = device
        self._bos_id = bos_id
        self._stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._excluded: tuple[torch.Tensor, torch.Tensor] | None = None  # this batch's, for batch_moments

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, snapshot: bool = True) -> torch.Tensor:
        """Copy ``src`` into ``dst``; returns the tensor holding the copied values on ``src``'s device."""
        if not self.cuda or not src.is_cuda:
            dst.copy_(src)
            return dst
        if snapshot and src.is_floating_point():
            src = src.to(self.dtype, copy=True)
        self._stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self._stream)
        return src

    def stage_tokens(self, slot: Slot, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     annotations: dict[str, torch.Tensor]) -> None:
        for name, values in annotations.items():
            self._copy(slot.annotation_buffer(name), values)
        ids, mask = slot.token_buffers()
        if input_ids is None:
            ids.fill_(-1)  # inputs_embeds forward: no token ids to record
        else:
            self._copy(ids, input_ids)
        if attention_mask is None:
            mask.fill_(1)  # no mask: every token is real
        else:
            self._copy(mask, attention_mask)
        if self.device_statistics:
            self._excluded = attention_sinks(input_ids, attention_mask, self._bos_id, tuple(ids.shape),
                                             self._device)

    def stage_point(self, slot: Slot, key: str, tensor: torch.Tensor) -> None:
        dim = tensor.shape[-1]
        staged = self._copy(slot.point_buffer(key, dim), tensor)
        if self.device_statistics:
            moments = batch_moments(staged.reshape(-1, dim), *self._excluded)
            self._copy(slot.moments_buffer(key), moments, snapshot=False)  # a fresh tensor nothing modifies
        slot.captured.add(key)

    def finish(self, slot: Slot) -> None:
        """Mark the batch's copies; writers wait on this event before reading the slot."""
        if self.cuda:
            slot.event = torch.cuda.Event()
            slot.event.record(self._stream)
