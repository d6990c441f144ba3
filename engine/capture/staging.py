"""Staging: device activations -> host slots in shared memory, without making the compute stream wait.

A slot holds one batch: its token ids and attention mask (packed in one ``(2, batch, seq)`` buffer), its
annotations and one buffer per captured point (their names and sizes: ``engine.writer.protocol.SlotLayout``,
shared with the writer process). Every buffer is an anonymous shared-memory file (memfd) mapped
here and, once its descriptor has been handed over, in the writer process: the writer reads the rows where the
hooks put them, with no copy in between.

On CUDA the buffers are registered with the driver (``cudaHostRegister``: pinned), so ``non_blocking`` copies
are true DMA; where the driver refuses (no pinnable memory left), the slot stays unpinned with a warning, and
its copies are then synchronous but still right. Every hook snapshots its tensor on the compute stream (the
cast to the storage dtype, or a copy when the dtype already matches, so later in-place ops of the model cannot
race the transfer). The token ids and mask are snapshotted the same way, packed into one tensor, so a caller
that reuses its input tensors in place (static buffers, CUDA graphs) cannot change what is stored. Once the
batch's last point is staged, a dedicated copy stream waits once on the compute stream (one reused event)
and copies every snapshot into the slot, then records the slot's own event, which the handoff thread waits on
before the writer process reads. The snapshots stay in the slot until the writer process hands it back
(``SlotPool.give_back``), long after their copies are done; so the handoff thread only waits and sends, and
never drops device tensors itself. Nothing here synchronizes the device. On CPU the same calls copy
synchronously.

Work on the forward thread, in dispatched torch ops (counted by ``tests/test_pipeline.py`` with a
``TorchDispatchMode``; the fewer, the less a launch-bound forward feels us):

  =======================  ======  ====================================================
  per                       CPU     CUDA
  =======================  ======  ====================================================
  batch: ids + mask         2       2 (one ``stack`` snapshot, one copy); 3 with a host mask
  batch: each annotation    1       1 (host tensors) or 2 (device tensors)
  hooked point              1       2 (one cast snapshot, one copy)
  =======================  ======  ====================================================

plus on CUDA, per batch, one event record and one wait on the compute stream, one stream switch and the
slot's event record (before: an event, a wait and a stream switch per copy).

Views into the buffers are cached per batch shape (the ``VIEW_SHAPES`` most recent: dynamic padding makes a
shape per batch), so a steady run adds no view ops.

Memory is bounded by ``count`` slots, each sized for the largest batch seen (grown by 25%, never shrunk); all
slots are allocated as soon as the first batch has told the widths of its points, before the second forward.
"""

from __future__ import annotations

import collections
import mmap
import os
import tempfile
import warnings

import numpy as np
import psutil
import torch

from engine.capture.encoder import encode_rows
from engine.errors import BatchError, HookPointError
from engine.format.encoding import Encoding, encoding_of
from engine.writer.protocol import (
    TOKENS_BUFFER,
    BatchInfo,
    SlotLayout,
    annotation_buffer,
    point_buffer,
)

PAGE = mmap.PAGESIZE
VIEW_SHAPES = 8  # batch shapes whose views a slot keeps (a run with dynamic padding has many)


# Slots may take at most this share of the host memory available: they are pinned (never swapped), and the
# writer process, the model and the page cache need the rest.
SLOT_MEMORY_SHARE = 0.5


_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def staging_dtype(dtype: str, encoding: Encoding | None) -> torch.dtype:
    """The dtype of a slot's point buffers for storage dtype ``dtype`` (an 8-bit encoding's slot rows are
    bytes)."""
    return torch.uint8 if encoding is not None else _TORCH_DTYPES[dtype]


def slot_row_bytes(dtype: str, annotations: tuple[str, ...], widths: dict[str, int]) -> int:
    """Bytes one token takes in a slot: its ids, mask and annotations, and a row of every point (``widths``)
    in the slot's form of storage dtype ``dtype``."""
    encoding = encoding_of(dtype)
    layout = SlotLayout(annotations, encoding, staging_dtype(dtype, encoding).itemsize)
    return sum(layout.sizes(1, widths).values())


def slot_memory_shortfall(count: int, tokens: int, row_bytes: int, held: int = 0) -> tuple[int, int] | None:
    """(bytes needed, bytes available) when ``count`` slots of ``tokens`` tokens of ``row_bytes`` each would
    take more than ``SLOT_MEMORY_SHARE`` of the host memory available (``held``: bytes the slots hold now,
    which growing them gives back first); None when they fit."""
    needed = count * tokens * row_bytes
    available = available_host_memory() + held
    return (needed, available) if needed > SLOT_MEMORY_SHARE * available else None


def grown_capacity(capacity: int, tokens: int) -> int:
    """A slot's new size for a batch of ``tokens`` that it cannot hold: 25% larger at least, so that a run
    whose batches grow a little at a time does not reallocate (and re-pin) at every one."""
    return max(tokens, capacity + capacity // 4)


def available_host_memory() -> int:
    """Bytes of host memory this process can still get: what the kernel says is available, or less where a
    cgroup (a container's limit) allows less."""
    available = psutil.virtual_memory().available
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                available = min(available, int(text) - int(used.read()))
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    return available


def _clear_cuda_error(device: torch.device) -> None:
    """Consume the CUDA runtime's last error, which a failed ``cudaHostRegister`` leaves set: torch's binding
    returns the code without clearing it, and the next kernel launch's check on this thread would raise it as
    its own. torch has no binding of ``cudaGetLastError``, so a tiny launch reads (and clears) it."""
    try:
        with torch.cuda.device(device):
            torch.zeros(1, device=device)
    except RuntimeError:  # the stale error, now consumed
        pass


def _anonymous_file(nbytes: int) -> int:
    """A descriptor of ``nbytes`` of memory with no name on any filesystem (freed when the last user
    closes)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("actcap-slot", os.MFD_CLOEXEC)
    else:  # macOS and others: a temporary file that is already unlinked
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, nbytes)
    return fd


class SharedBuffer:
    """Host memory shared with the writer process (and pinned for DMA when ``pin_device`` is given).

    Args:
        nbytes: size (rounded up to whole pages).
        pin_device: the GPU whose copies fill it: registered with CUDA (in that device's context) so that
            device-to-host copies into it are asynchronous DMA; None: not pinned.

    Thread safety: the owner allocates and releases it; its bytes belong to whoever holds the slot.
    """

    def __init__(self, nbytes: int, pin_device: torch.device | None):
        self.nbytes = max(PAGE, -(-nbytes // PAGE) * PAGE)
        self.fd = _anonymous_file(self.nbytes)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # fault pages in now, not in a hook
        self._map = mmap.mmap(self.fd, self.nbytes, flags=flags)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._pin_device = None
        if pin_device is not None and self._pin(pin_device):
            self._pin_device = pin_device

    def _pin(self, device: torch.device) -> bool:
        """Register the buffer with CUDA; False (after a warning) where the driver refuses: copies into an
        unpinned buffer are synchronous, not wrong."""
        with torch.cuda.device(device):
            error = int(torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), self.nbytes, 1))
        if not error:
            return True
        _clear_cuda_error(device)
        warnings.warn(f"cudaHostRegister of {self.nbytes:,} bytes of shared memory failed (cudaError "
                      f"{error}): this slot buffer is not pinned, so its device-to-host copies run "
                      "synchronously. Lower pinned_slots or the batch size to keep copies asynchronous",
                      RuntimeWarning, stacklevel=2)
        return False

    def typed(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The first ``count`` elements as a flat tensor of ``dtype``."""
        return self.bytes[: count * dtype.itemsize].view(dtype)

    def release(self) -> None:
        """Unpin and close; the memory is freed once the writer has dropped its mapping too. Closes even if
        unpinning raises (after a CUDA error)."""
        try:
            if self._pin_device is not None:
                device, self._pin_device = self._pin_device, None
                with torch.cuda.device(device):
                    error = int(torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr()))
                if error:
                    _clear_cuda_error(device)
                    raise RuntimeError(f"cudaHostUnregister of a {self.nbytes:,}-byte slot buffer failed "
                                       f"(cudaError {error}): the device may be in a failed state")
        finally:
            self.bytes = None
            os.close(self.fd)


def release_each(items) -> None:
    """``release()`` every item, then raise the first failure: one that fails (a CUDA error) must not leave
    the rest held."""
    first = None
    for item in items:
        try:
            item.release()
        except BaseException as error:
            first = first or error
    if first is not None:
        raise first


class Slot:
    """Shared host buffers for one batch.

    ``views`` maps the tokens' and each annotation's buffer name (``SlotLayout``), ``"ids"``, ``"mask"`` and
    each point's key to its view for the current batch's shape (made once per shape; a steady run adds no
    view op).

    Thread safety: owned by one side at a time: the forward process from ``SlotPool.take`` until it is handed
    to the writer process, which hands it back when its rows are copied out.
    """

    def __init__(self, index: int, pin_device: torch.device | None, dtype: torch.dtype, layout: SlotLayout):
        self.index = index
        self._pin_device = pin_device
        self._dtype = dtype
        self._layout = layout
        self.capacity = 0
        self.buffers: dict[str, SharedBuffer] = {}
        self.unannounced: list[str] = []   # buffers the writer process has not been sent yet
        self.dims: dict[str, int] = {}
        self.batch: BatchInfo | None = None
        self.captured: set[str] = set()
        # CUDA: the batch's copies, recorded on the copy stream once all are issued (one event, reused)
        self.event = torch.cuda.Event(blocking=True) if pin_device is not None else None
        # CUDA: (slot view, device snapshot) of each copy; kept until the slot comes back from the writer
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.views: dict[str, torch.Tensor] = {}
        self._views_by_shape: collections.OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = \
            collections.OrderedDict()

    def _allocate(self, sizes: dict[str, int]) -> None:
        """New buffers of these sizes (name -> bytes), replacing any of the same name; each old one goes
        first, so the slot never holds two sets of page-locked memory. If one cannot be made (pinning can
        fail), none of these names has a buffer afterwards; the others are untouched (copies of the batch in
        progress may still be landing in them)."""
        self._views_by_shape.clear()
        self.views = {}
        try:
            self._drop(sizes)
            for name, nbytes in sizes.items():
                self.buffers[name] = SharedBuffer(nbytes, self._pin_device)
                self.unannounced.append(name)
        except BaseException:
            self._drop(sizes)
            raise

    def _drop(self, names) -> None:
        """Release the buffers of these names that the slot holds."""
        self.unannounced = [name for name in self.unannounced if name not in names]
        release_each([self.buffers.pop(name) for name in names if name in self.buffers])

    def release(self) -> None:
        """Release every buffer; the slot holds nothing until it grows again."""
        self._views_by_shape.clear()
        self.views = {}
        self.copies.clear()
        self.unannounced.clear()
        self.capacity = 0
        buffers, self.buffers = list(self.buffers.values()), {}
        release_each(buffers)

    def grow(self, tokens: int, dims: dict[str, int]) -> None:
        """Allocate every buffer for ``tokens`` tokens (``dims``: the point widths known so far, besides those
        of points this slot staged in a forward that failed before the first batch was handed over)."""
        dims = {**self.dims, **dims}
        try:
            self._allocate(self._layout.sizes(tokens, dims))
        except BaseException:
            self.release()  # a slot grows only while free (no copy in flight): empty, the next batch retries
            raise
        self.capacity, self.dims = tokens, dims

    def reserve(self, batch: BatchInfo, dims: dict[str, int], at_least: int = 0) -> None:
        """Start a batch (it is the slot's batch even if growing fails): grow the buffers if it is larger than
        any before (by 25% at least, and to ``at_least`` tokens at least)."""
        self.batch = batch
        tokens = batch.batch_size * batch.seq_len
        if tokens > self.capacity:
            self.grow(max(grown_capacity(self.capacity, tokens), at_least), dims)
        self.captured.clear()
        shape = (batch.batch_size, batch.seq_len)
        views = self._views_by_shape.get(shape)
        if views is None:
            views = self._make_views(shape)
        else:
            self._views_by_shape.move_to_end(shape)
        self.views = views

    def _typed_view(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        return self.buffers[name].typed(dtype, count).view(shape)

    def _make_views(self, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        tokens = self._typed_view(TOKENS_BUFFER, torch.int64, (2, *shape))
        views = self._views_by_shape[shape] = {TOKENS_BUFFER: tokens, "ids": tokens[0], "mask": tokens[1]}
        if len(self._views_by_shape) > VIEW_SHAPES:
            self._views_by_shape.popitem(last=False)
        for name in self._layout.annotations:
            views[annotation_buffer(name)] = self._typed_view(annotation_buffer(name), torch.int64, shape)
        for key, dim in self.dims.items():
            width = self._layout.row_width(dim)
            views[key] = self._typed_view(point_buffer(key), self._dtype, (*shape, width))
        return views

    def point_view(self, key: str, dim: int) -> torch.Tensor:
        """(batch, seq, dim) view of one point's buffer; on the point's first batch, when ``dim`` is known,
        its buffer is allocated."""
        view = self.views.get(key)
        if view is None:
            self._allocate({point_buffer(key): self._layout.point_bytes(self.capacity, dim)})
            self.dims[key] = dim
            self.views = self._make_views((self.batch.batch_size, self.batch.seq_len))
            view = self.views[key]
        return view

    def make_views(self, batch: BatchInfo) -> None:
        """Make every view a batch of ``batch``'s shape uses."""
        if (batch.batch_size, batch.seq_len) not in self._views_by_shape:
            self._make_views((batch.batch_size, batch.seq_len))

    @property
    def nbytes(self) -> int:
        """Host memory this slot holds (whole pages, as mapped)."""
        return sum(buffer.nbytes for buffer in self.buffers.values())


class SlotPool:
    """A fixed number of slots and the indices of the free ones (the writer process returns them).

    Thread safety: from the forward thread only.
    """

    def __init__(self, count: int, pin_device: torch.device | None, dtype: torch.dtype,
                 annotations: tuple[str, ...], encoding: Encoding | None = None):
        self._layout = SlotLayout(annotations, encoding, dtype.itemsize)
        self.slots = [Slot(i, pin_device, dtype, self._layout) for i in range(count)]
        self._free = list(range(count - 1, -1, -1))

    def take(self) -> Slot | None:
        return self.slots[self._free.pop()] if self._free else None

    def give_back(self, index: int) -> None:
        """A slot is free again (the writer process copied its rows out, or its forward failed and its copies
        have landed): its batch and device snapshots are dropped."""
        slot = self.slots[index]
        slot.batch = None
        slot.copies.clear()
        self._free.append(index)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self.slots) - len(self._free)

    def check_memory(self, tokens: int, widths: dict[str, int], at_least: int = 0) -> None:
        """BatchError, before anything is allocated, when every slot grown for a batch of ``tokens`` tokens
        (to ``at_least`` tokens at least, as ``Slot.reserve`` grows them; ``widths``: the captured points'
        widths known so far) would take more than ``SLOT_MEMORY_SHARE`` of the host memory available: pinned
        memory cannot be swapped, and running out of it is an out-of-memory kill, not an error. Nothing to
        check for a batch the slots hold."""
        capacity = max(slot.capacity for slot in self.slots)
        if tokens <= capacity:
            return
        grown = grown_capacity(capacity, tokens)
        self._check_fits(max(grown, at_least), widths, planned=at_least > grown)

    def check_sized_like(self, like: Slot, planned: bool) -> None:
        """``check_memory``'s BatchError for every slot sized like ``like`` (the first batch's slot, whose
        points' widths are all known now: a point whose module does not declare its width was left out
        before), before the other slots are allocated. ``planned``: ``max_batch_tokens`` sized it."""
        self._check_fits(like.capacity, like.dims, planned)

    def _check_fits(self, tokens: int, widths: dict[str, int], planned: bool) -> None:
        row_bytes = sum(self._layout.sizes(1, widths).values())
        shortfall = slot_memory_shortfall(len(self.slots), tokens, row_bytes, self.nbytes)
        if shortfall is not None:
            needed, available = shortfall
            plan = f", or CaptureConfig.max_batch_tokens, which sized them for {tokens:,}" if planned else ""
            raise BatchError(f"{len(self.slots)} staging slots for a batch of {tokens:,} tokens need "
                             f"{needed / 1e9:,.2f} GB of host memory ({row_bytes:,} bytes per token), more "
                             f"than {SLOT_MEMORY_SHARE:.0%} of the {available / 1e9:,.2f} GB available: "
                             f"lower CaptureConfig.pinned_slots or the batch size{plan}. Nothing of this "
                             "batch is stored")

    def allocate_all(self, like: Slot) -> None:
        """Size every other slot like ``like`` and make its views for ``like``'s batch shape (after the first
        batch: no allocation, and for batches of that shape no view op, during later forwards)."""
        for slot in self.slots:
            if slot is not like and slot.capacity < like.capacity:
                slot.grow(like.capacity, like.dims)
            slot.make_views(like.batch)

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)

    def release(self) -> None:
        release_each(self.slots)


# Storage dtypes numpy copies as they are (bfloat16 has no numpy dtype).
_NUMPY_COPIED = (torch.float16, torch.float32, torch.uint8)


def _copy_on_cpu(destination: torch.Tensor, tensor: torch.Tensor) -> None:
    """A host tensor into its slot view. Rows already in the storage dtype and contiguous go through numpy's
    memcpy, on this thread alone: torch's ``copy_`` splits a large copy over its OpenMP threads, which then
    spin, and took 0.26 s of CPU per GB against 0.11 for one thread (benchmarks/results/cpu-2026-12-07b/
    copy_cpu.txt). Casts stay torch's (numpy's float32 to float16 is a scalar loop)."""
    if tensor.dtype == destination.dtype and tensor.dtype in _NUMPY_COPIED and tensor.is_contiguous():
        np.copyto(destination.numpy(), tensor.detach().numpy())
    else:
        destination.copy_(tensor)


class Stager:
    """Copies a batch's tensors into its slot: asynchronously on a side CUDA stream, or synchronously on CPU.

    Args:
        device: the model's device (CUDA: every hooked tensor must be on it).
        dtype: storage dtype of activations (uint8 for an 8-bit encoding's slot rows).
        encoding: the 8-bit encoding each point's rows are encoded with on their device, or None.

    Thread safety: call from the thread that runs the forward pass.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, encoding: Encoding | None = None):
        self.dtype = dtype
        self.encoding = encoding
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._ready = torch.cuda.Event() if self.cuda else None  # where the compute stream stands (reused)

    def _copy_integers(self, slot: Slot, destination: torch.Tensor, values: torch.Tensor) -> None:
        """Ids, a mask or an annotation into its int64 view: from the model's GPU through a snapshot (the
        caller may write the tensor once the forward returns), from the CPU at once."""
        if values.is_cuda:
            slot.copies.append((destination, values.to(torch.int64, copy=True)))
        else:
            destination.copy_(values)

    def stage_tokens(self, slot: Slot, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     annotations: dict[str, torch.Tensor]) -> None:
        """Stage a batch's ids, mask and annotations (each on the model's device or on the CPU)."""
        if torch.is_grad_enabled():  # never record autograd history into a slot (the usual caller has it off)
            with torch.no_grad():
                return self.stage_tokens(slot, input_ids, attention_mask, annotations)
        views = slot.views
        for name, values in annotations.items():
            self._copy_integers(slot, views[annotation_buffer(name)], values)
        if (input_ids is not None and attention_mask is not None
                and input_ids.is_cuda and attention_mask.is_cuda):  # one snapshot and one copy, not two
            if attention_mask.dtype != input_ids.dtype:
                attention_mask = attention_mask.to(input_ids.dtype)
            slot.copies.append((views[TOKENS_BUFFER], torch.stack((input_ids, attention_mask))))
            return
        for name, values in (("ids", input_ids), ("mask", attention_mask)):
            if values is not None:
                self._copy_integers(slot, views[name], values)

    def stage_point(self, slot: Slot, key: str, tensor: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.stage_point(slot, key, tensor)
        destination = slot.views.get(key)
        if destination is None:
            destination = slot.point_view(key, tensor.shape[-1])
        if self.cuda:
            if tensor.device != self.device:
                raise HookPointError(f"{key} is on {tensor.device} but the model's first parameters are on "
                                     f"{self.device}: capture needs a model on one device (for a model "
                                     "spread over GPUs, capture each device's layers with their own "
                                     "engine)")
            # contiguous: a strided snapshot would cost the copy stream a kernel and a buffer of its own
            # (an 8-bit encoding's rows are a new tensor made on the device: the snapshot too)
            slot.copies.append((destination, encode_rows(tensor, self.encoding) if self.encoding else
                                tensor.to(self.dtype, copy=True, memory_format=torch.contiguous_format)))
        else:
            _copy_on_cpu(destination, encode_rows(tensor, self.encoding) if self.encoding else tensor)
        slot.captured.add(key)

    def synchronize(self) -> None:
        """Wait for every copy issued so far (CUDA; before the slots are released)."""
        if self.cuda:
            self._stream.synchronize()

    def finish(self, slot: Slot) -> None:
        """After the batch's last point (CUDA): the copy stream waits once for the compute stream's work so
        far (the snapshots), copies every snapshot into the slot, and records the slot's event, which the
        handoff thread waits on before the writer process reads."""
        if not self.cuda:
            return
        self._ready.record(torch.cuda.current_stream(self.device))
        self._stream.wait_event(self._ready)
        with torch.cuda.stream(self._stream):
            for destination, snapshot in slot.copies:
                destination.copy_(snapshot, non_blocking=True)
        slot.event.record(self._stream)
