"""CaptureEngine: the public API and the hook handlers; the pieces it drives live beside it.

Call order (who calls what, and when):

  ``CaptureEngine(model, config)``
    1. ``hooks.check_unclaimed``: a model that has an engine attached is refused (one engine per model);
       ``hookpoints.resolve_hook_points``: every point resolved; a bad name fails before anything is written.
    2. ``manifest.build_manifest``: what the store will say about this run.
    3. ``opening.check_destination``: location checked, store locked (one writer per store; an object-store
       lock beats in a thread of its own), a resume compared with the stored run.
       ``opening.open_destination``: the store created, or repaired up to the last whole sequence
       (``resume_sequences`` tells the driver where to continue).
    4. ``handoff.WriterProcess``: the writer process started with one ``writer.WriterSpec``. Should another
       process break the object-store lock, the heartbeat thread stops it (``WriterProcess.stop``).
    5. ``hooks.ModelHooks.attach``: the root pre-hook, one hook per point, early stop.
  each ``model(...)``
    6. ``_on_forward`` (root pre-hook): takes in what the writer process sent (free slots, errors), takes a
       free slot (waiting here is backpressure), ``staging.Stager.stage_tokens``.
    7. ``_on_point`` per point: ``Stager.stage_point``; after the last one ``Stager.finish`` and
       ``WriterProcess.submit`` hand the slot over (then ``StopForward`` when early stop is on).
  ``flush()``: ``WriterProcess.flush``.
  ``close()``
    8. hooks removed (the producer stops first), ``WriterProcess.close``: the writer process drains, commits
       the tail, publishes the manifest and exits (the shutdown protocol in ``engine.writer.protocol``); the
       store's
       lock is released (a lost lock: nothing is written, not even ``failed``); distributed:
       ``parts.PartCoordinator.publish``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from typing import Any, ClassVar

import torch

from engine.capture.config import CaptureConfig
from engine.capture.handoff import WriterProcess
from engine.capture.hookpoints import HookPoint, expected_widths, resolve_hook_points
from engine.capture.hooks import ModelHooks, StopForward, check_unclaimed
from engine.capture.kvcache import CacheTracker, Placement, cache_of
from engine.capture.manifest import build_manifest, point_attributes
from engine.capture.opening import check_destination, open_destination
from engine.capture.parts import PartCoordinator
from engine.capture.staging import BatchInfo, SlotPool, Stager, staging_dtype
from engine.errors import BatchError, CaptureClosedError, CaptureError, HookPointError, StoreLockedError
from engine.format import layout
from engine.format.encoding import encoding_of
from engine.models.loading import max_positions
from engine.store.lifecycle import mark_failed, release_reserve
from engine.store.resume import ResumePoint
from engine.writer.protocol import WriterSpec


@dataclasses.dataclass(frozen=True)
class CaptureStats:
    """A snapshot of a run's counters (``CaptureEngine.stats``).

    Attributes:
        batches: forward passes staged and handed to the writer process.
        tokens_staged: positions of those batches (batch size times sequence length), pad positions
            included. Pads are never stored, so this exceeds ``tokens_committed`` even once every batch is
            written: it counts work done, not tokens lost.
        tokens_committed: rows committed to the store (real tokens only).
        bytes_committed: those rows' bytes, before compression.
        chunks_committed: chunks committed.
        stall_seconds: time the forward pass waited for a free slot (backpressure).
        queue_high_water: most batches handed to the writer process and not yet copied out.
        queue_depth: batches handed over and not yet copied out, now.
        slot_bytes: host memory held by staging slots.
        elapsed_seconds: since the engine started.

    Thread safety: immutable.
    """

    batches: int
    tokens_staged: int
    tokens_committed: int
    bytes_committed: int
    chunks_committed: int
    stall_seconds: float
    queue_high_water: int
    queue_depth: int
    slot_bytes: int
    elapsed_seconds: float

    @property
    def tokens(self) -> int:
        """Same as tokens_committed (the name of earlier releases)."""
        return self.tokens_committed

    @property
    def bytes_written(self) -> int:
        """Same as bytes_committed (the name of earlier releases)."""
        return self.bytes_committed

    @property
    def mb_per_s(self) -> float:
        """Committed megabytes per second since the engine started."""
        return self.bytes_committed / 1e6 / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.tokens_committed:,} tokens committed ({self.batches:,} batches staged: "
                f"{self.tokens_staged:,} positions counting padding, which is never stored), "
                f"{self.bytes_committed / 1e6:,.1f} MB in {self.chunks_committed:,} chunks, "
                f"{self.mb_per_s:,.1f} MB/s, stalled {self.stall_seconds:.2f} s, "
                f"queue high-water {self.queue_high_water}, slots {self.slot_bytes / 1e6:,.1f} MB")


def _token_ids(model_config, name: str) -> list[int]:
    value = getattr(model_config, name, None)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _model_device(model: torch.nn.Module) -> torch.device:
    """The model's one compute device; a model spread over several GPUs is refused (one copy stream and one
    event per batch cover one device only)."""
    devices = {tensor.device for tensor in (*model.parameters(), *model.buffers())}
    if any(device.type == "meta" for device in devices):  # refused before its store is created
        raise HookPointError("the model's weights are on the meta device (no values, as from_config under "
                             "torch.device('meta') makes them): a forward cannot compute activations. Load "
                             "weights first: engine.load_model(...), or model.to_empty(device=...) and then "
                             "load a state dict")
    gpus = sorted({str(device) for device in devices if device.type == "cuda"})
    if len(gpus) > 1:
        raise HookPointError(f"the model is spread over {', '.join(gpus)}: capture supports a model on one "
                             "device (load it with device_map=None on one GPU, or capture each device's "
                             "layers in a process of its own)")
    return torch.device(gpus[0]) if gpus else next(iter(devices), torch.device("cpu"))


class CaptureEngine:
    """Captures activations of a HuggingFace model into a zarr store while the model runs.

    Hooks are attached on construction; every ``model(...)`` call (keyword ``input_ids`` /
    ``attention_mask`` as produced by a tokenizer) is captured until ``close()``. Pad tokens (mask 0) are
    dropped; a call without a mask keeps every token. Rows are written by a writer process of its own (see
    the call order above), so the model's process only stages copies.

    Args:
        model: a transformers causal LM or base model (any of ``engine.capture.hookpoints.ADAPTERS``'s
            families for canonical points; any model for ``extra_modules``), on one device.
        config: what to capture and where.
        tokenizer: optional; its special ids are flagged in ``tokens/flags`` and its name is recorded.

    Attributes:
        resume_sequences: input sequences this process had already stored (resume: feed from there on).
        points: the resolved hook points.

    Thread safety: run the model's forward passes, ``flush`` and ``close`` from one thread. ``stats`` may be
    read from any thread. One engine per model at a time.

    Example:
        >>> with CaptureEngine(model, CaptureConfig("acts.zarr", layer_indices=[6])) as cap:
        ...     for batch in loader:
        ...         model(**batch)
    """

    # Sink class the writer process builds, per ``config.sink`` (tests and benchmarks name slow or failing
    # sinks of their own here; they must be importable in the writer process).
    sink_factory: ClassVar[dict[str, str]] = {"zarr": "engine.store.sink:ZarrSink",
                                              "null": "engine.store.sink:NullSink"}

    def __init__(self, model: torch.nn.Module, config: CaptureConfig, tokenizer: Any = None):
        self.config = config
        self._model = model
        self._closed = False
        self._current = None              # slot of the forward pass in progress
        self._skip_forward = False        # the forward in progress has no tokens
        self._empty_rows = 0              # its rows: counted as fed once it has returned
        self._entered = 0                 # nested ``with`` blocks: the outermost one closes
        self._pending_annotations: dict[str, torch.Tensor] = {}
        self._dims: dict[str, int] = {}   # point widths, known after the first batch
        self._caches = CacheTracker()     # which sequences a forward with a KV cache continues
        self._batches = 0
        self._tokens_staged = 0
        self._stall_seconds = 0.0
        self._detached_depth = 0
        self._point_count = 0
        self._started = time.perf_counter()
        self.resume_sequences = 0
        self._next_sequence = config.first_sequence
        self._destination = None
        self._parts = PartCoordinator() if config.distributed else None  # joins first: a collective
        with contextlib.ExitStack() as undo:
            if self._parts is not None:
                undo.callback(self._parts.release)
            with self._on_every_rank():
                check_unclaimed(model)
                self.points: list[HookPoint] = resolve_hook_points(model, config.layer_indices, config.points,
                                                                   config.extra_modules)
                self._point_count = len({point.key for point in self.points})
                self._device = _model_device(model)
                self._max_positions = max_positions(getattr(model, "config", None))
                self._expected_widths = expected_widths(model, self.points)
                self._keeps_cache = bool(getattr(getattr(model, "config", None), "use_cache", False))
                manifest = (build_manifest(model, config, self.points, tokenizer)
                            if config.sink == "zarr" else None)
            with self._on_every_rank():  # every rank's checks pass before any rank repairs or writes its part
                if manifest is not None:
                    self._destination = check_destination(config, manifest, self._parts)
                    undo.callback(self._destination.release)
            with self._on_every_rank():  # a rank that failed here fails every rank; undo cleans up
                resume = None
                if self._destination is not None:
                    resume = open_destination(self._destination)
                    undo.callback(release_reserve, self._destination.location)
                self._start_pipeline(model, tokenizer, resume, undo)
            undo.pop_all()

    # ---- setup ---------------------------------------------------------------------------------
    def _start_pipeline(self, model: torch.nn.Module, tokenizer: Any, resume: ResumePoint | None,
                        undo: contextlib.ExitStack) -> None:
        config = self.config
        encoding = encoding_of(config.dtype)
        dtype = staging_dtype(config.dtype, encoding)
        gpu = self._device if self._device.type == "cuda" else None
        self._pool = SlotPool(config.pinned_slots, gpu, dtype, tuple(config.annotations), encoding)
        undo.callback(self._pool.release)
        self._stager = Stager(self._device, dtype, encoding)
        if resume is not None:
            self.resume_sequences = max(resume.sequences - config.first_sequence, 0)
            self._next_sequence = config.first_sequence + self.resume_sequences
        self._writer = WriterProcess(self._writer_spec(model, tokenizer, resume), self._pool, gpu,
                                     self._destination.lock.fd if self._destination and self._destination.lock
                                     else None)
        undo.callback(self._writer.abort)
        if self._destination is not None and self._destination.lock is not None:
            self._destination.lock.on_lost(self._stop_writing)
        self._hooks = ModelHooks(model, self.points, self, self._on_forward, self._on_forward_end,
                                 self._on_point, config.early_stop)
        self._hooks.attach()

    def _writer_spec(self, model: torch.nn.Module, tokenizer: Any, resume: ResumePoint | None) -> WriterSpec:
        config = self.config
        model_config = getattr(model, "config", None)  # plain torch modules have none
        special = {*_token_ids(model_config, "bos_token_id"), *_token_ids(model_config, "eos_token_id"),
                   *_token_ids(model_config, "pad_token_id"),
                   *(getattr(tokenizer, "all_special_ids", None) or [])}
        bos = _token_ids(model_config, "bos_token_id") or [getattr(tokenizer, "bos_token_id", None)]
        # documents are packed after a BOS or an EOS (engine.cli.corpus): the token after one starts one
        separators = {*bos, *_token_ids(model_config, "eos_token_id"),
                      getattr(tokenizer, "eos_token_id", None)}
        return WriterSpec(
            sink=self.sink_factory[config.sink],
            location=self._destination.location if self._destination else None,
            chunk_tokens=config.chunk_tokens, compressor=config.compressor, dtype=config.dtype,
            point_attributes=point_attributes(self.points, config.dtype),
            token_arrays={key: str(dtype) for key, dtype in layout.token_arrays(config.annotations).items()},
            annotations=tuple(config.annotations), bos_id=bos[0], special_ids=tuple(sorted(special)),
            separator_ids=tuple(sorted(token for token in separators if token is not None)),
            outlier_norm_ratio=self._outlier_norm_ratio(),
            num_writers=config.num_writers, statistics=config.statistics,
            start_row=resume.rows if resume is not None else 0,
            kept_statistics=resume.statistics if resume is not None else None, durable=config.durable,
            kept_errors=resume.kept_errors if resume is not None else None,
            parent_pid=os.getpid(),
            lock_owner=self._destination.lock.owner if self._destination and self._destination.lock else None)

    def _outlier_norm_ratio(self) -> float | None:
        """The config's, but a resumed store captured without outlier flags goes on without them (the rows and
        statistics of one store follow one rule; a store's ratio itself must match, see manifest.py)."""
        stored = self._destination.stored if self._destination is not None else None
        ratio = self.config.outlier_norm_ratio
        if stored is not None and stored.outlier_norm_ratio is None:
            if ratio is not None:
                warnings.warn(f"{self.config.location} was captured without outlier flags "
                              "(outlier_norm_ratio None, or an engine before them): the resume goes on "
                              "without them", stacklevel=4)
            return None
        return ratio

    def _stop_writing(self, lost: StoreLockedError) -> None:
        """Heartbeat thread: another process broke this run's lock, so the store is no longer this run's."""
        error = CaptureError(str(lost))
        error.__cause__ = lost
        self._writer.stop(error)

    @contextlib.contextmanager
    def _on_every_rank(self):
        """Distributed: a setup phase that fails on one rank fails on all (``PartCoordinator.agree``), so no
        rank waits in a collective for one that gave up. A no-op for a single process."""
        try:
            yield
        except BaseException as error:
            if self._parts is not None:
                self._parts.agree(error)
            raise
        if self._parts is not None:
            self._parts.agree(None)

    # ---- hooks (forward thread) ------------------------------------------------------------------
    # These run inside the model's forward, where every line of Python is forward time: the common path is
    # kept short (see staging.py for the torch ops it dispatches).
    def _on_forward(self, module, args, kwargs) -> None:
        try:
            self._writer.poll()
        except BaseException:
            self._hooks.remove()  # a failed engine must not keep intercepting the model
            raise
        if self._stager.cuda and torch.cuda.is_current_stream_capturing():
            raise HookPointError("capture cannot run inside CUDA graph capture (the hooks hand slots to "
                                 "another process on every forward): capture the graph inside "
                                 "engine.detached() and run the captured model eagerly")
        if self._current is not None:
            self._abandon_current()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise HookPointError("the model was called without input_ids or inputs_embeds: capture needs "
                                 "one of them as a keyword or first argument")
        shape = reference.shape
        batch_size, seq_len = shape[0], shape[1] if len(shape) > 1 else 1
        self._check_device("input_ids" if input_ids is not None else "inputs_embeds", reference)
        placement = self._caches.place(kwargs, batch_size)
        attention_mask = self._check_batch(batch_size, seq_len, attention_mask, placement.past)
        annotations = self._pending_annotations
        if annotations:
            self._pending_annotations = {}
        self._skip_forward = batch_size * seq_len == 0
        if self._skip_forward:
            # fed too once the forward returns (``_on_forward_end``); continued sequences were counted already
            self._empty_rows = 0 if placement.continues else batch_size
            return
        if annotations or self.config.annotations:
            self._check_annotations(annotations, batch_size, seq_len)
        planned = self.config.max_batch_tokens or 0
        self._pool.check_memory(batch_size * seq_len, self._dims or self._expected_widths, planned)
        slot, waited = self._writer.acquire()
        self._current = slot  # from here on, a failure (even in reserve) gives the slot back
        first = placement.first_sequence if placement.continues else self._next_sequence
        slot.reserve(BatchInfo(self._batches, batch_size, seq_len, first, input_ids is not None,
                               attention_mask is not None, placement.continues,
                               self._may_continue(kwargs, placement), waited), self._dims, planned)
        if not placement.continues:
            self._next_sequence += batch_size
        self._caches.begin(placement, kwargs, batch_size, first, seq_len)
        self._stager.stage_tokens(slot, input_ids, attention_mask, annotations)
        self._stall_seconds += waited

    def _may_continue(self, kwargs: dict, placement: Placement) -> bool:
        """Whether the next forward may continue this one's sequences: it keeps a KV cache (one was passed,
        or the model returns one) and returns at all (early stop returns None)."""
        if self.config.early_stop:
            return False
        keeps = kwargs.get("use_cache")
        return placement.continues or cache_of(kwargs) is not None or (
            self._keeps_cache if keeps is None else bool(keeps))

    def _on_forward_end(self, module, args, kwargs, output) -> None:
        """A forward that returned with its slot still open ran without some hooked points: their rows would
        be missing, so the batch is dropped with an error instead of being dropped in silence. A KV cache the
        model made and returned belongs to the sequences just captured. An empty batch that returned counts as
        fed (resume_sequences counts its rows); one whose forward raised does not."""
        self._caches.returned(output)
        if self._skip_forward:
            self._next_sequence += self._empty_rows
            self._skip_forward, self._empty_rows = False, 0
        slot = self._current
        if slot is None:
            return
        missing = sorted({point.key for point in self.points} - slot.captured)
        self._abandon_current()
        raise HookPointError(
            f"the forward returned without running the hooks of {', '.join(missing)}: nothing of this batch "
            "is stored. A model compiled with torch.compile and run before the engine was created keeps "
            "running code that skips hooks added later: create the CaptureEngine before the first compiled "
            "forward, or call torch._dynamo.reset() first. Otherwise these modules did not run in this "
            "forward: capture points that every forward runs")

    def _check_batch(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None,
                     past: int) -> torch.Tensor | None:
        """Check a forward's shapes; returns the mask of its new tokens (a forward that continues a KV cache
        may pass the mask of the cached tokens too, as generate() does)."""
        if self._max_positions is not None and past + seq_len > self._max_positions:
            raise BatchError(f"sequence length {past + seq_len} exceeds the model's {self._max_positions} "
                             f"positions: truncate inputs to at most {self._max_positions} tokens (tokenizer "
                             "truncation=True)")
        if attention_mask is None:
            return None
        if past and attention_mask.shape == (batch_size, past + seq_len):
            attention_mask = attention_mask[:, past:]
        elif attention_mask.shape != (batch_size, seq_len):
            cached = (f" after a KV cache of {past} tokens: pass the mask of the new tokens, or of the "
                      f"cached and new ones {(batch_size, past + seq_len)}" if past
                      else ": pass one mask value per token")
            raise BatchError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{(batch_size, seq_len)}{cached}")
        self._check_device("attention_mask", attention_mask)
        return attention_mask

    def _check_device(self, name: str, tensor: torch.Tensor) -> None:
        """Ids, mask and annotations: a GPU tensor on another device than the model's would be copied on a
        stream the batch's event does not cover (host tensors are copied synchronously: they are fine)."""
        if tensor.is_cuda and tensor.device != self._device:
            raise BatchError(f"{name} is on {tensor.device} but the model on {self._device}: pass it on the "
                             "model's device (or on the CPU)")

    def _abandon_current(self) -> None:
        """Release the slot of a forward that failed before its last point, once its copies have landed. Its
        sequence numbers are given back: a batch that is not stored is not counted as fed (like one refused by
        the checks), so a retry leaves no gap in ``tokens/sequence`` and a resume does not skip it."""
        slot, self._current = self._current, None
        if slot is None:
            return
        self._caches.end("whose forward failed (the cache may hold part of it)")
        if slot.batch is not None and not slot.batch.continues:  # None: interrupted before reserve began
            self._next_sequence = slot.batch.first_sequence
        if self._stager.cuda:
            self._stager.finish(slot)
            slot.event.synchronize()  # error path only: in-flight copies must not hit a reused slot
        self._pool.give_back(slot.index)

    def _on_point(self, point: HookPoint, tensor: torch.Tensor) -> None:
        slot = self._current
        if slot is None:
            if self._skip_forward:
                return
            raise HookPointError(f"{point.module_path} ran outside a forward pass of the captured model: "
                                 "call the model passed to CaptureEngine, not one of its submodules")
        shape, batch = tensor.shape, slot.batch
        if len(shape) != 3 or shape[0] != batch.batch_size or shape[1] != batch.seq_len:
            raise HookPointError(f"{point.module_path} produced shape {tuple(shape)}; expected "
                                 f"({batch.batch_size}, {batch.seq_len}, dim) like input_ids")
        if not self._dims:  # the first batch: its widths become the store's
            self._check_width(point, shape[-1])
        self._stager.stage_point(slot, point.key, tensor)
        if len(slot.captured) == self._point_count:
            self._submit(slot)
            if self.config.early_stop:
                raise StopForward  # caught by the wrapper around the root forward

    def _check_width(self, point: HookPoint, width: int) -> None:
        expected = self._expected_widths.get(point.key)
        if expected is not None and width != expected:
            raise HookPointError(
                f"{point.key} ({point.module_path}) has width {width} but the model's config says "
                f"{expected}: nothing of this batch is stored. A tensor-parallel shard or a model changed "
                "after loading holds part of each activation: capture the whole model on one device (or "
                "gather the shards into one tensor and capture that module through extra_modules)")

    def _submit(self, slot) -> None:
        self._stager.finish(slot)
        if not self._dims:  # the first batch told the widths: size every slot now, before the second forward
            self._first_batch(slot)
        elif slot.unannounced:
            self._writer.announce(slot)
        self._current = None  # after the steps that can fail: until then a failure gives the slot back
        self._batches += 1
        self._tokens_staged += slot.batch.batch_size * slot.batch.seq_len
        self._writer.submit(slot)

    def _first_batch(self, slot) -> None:
        """Check that every slot sized like this one fits in host memory (the widths are all known now), send
        the widths, size every slot and hand the writer process every buffer; if any of it fails (pinning
        memory can), the next batch does it again."""
        dims = dict(slot.dims)
        self._pool.check_sized_like(slot, planned=slot.capacity == self.config.max_batch_tokens)
        self._writer.send_dims(dims)
        self._pool.allocate_all(slot)
        for each in self._pool.slots:
            self._writer.announce(each)
        self._dims = dims

    # ---- public --------------------------------------------------------------------------------
    @property
    def stats(self) -> CaptureStats:
        """Counters so far: tokens, bytes, stall seconds, queue high-water, MB/s (up to date: what the writer
        process has reported is taken in first)."""
        self._writer.refresh()
        progress = self._writer.progress
        return CaptureStats(self._batches, self._tokens_staged, progress.tokens_committed,
                            progress.bytes_committed, progress.chunks_committed, self._stall_seconds,
                            progress.in_flight_high_water, self._pool.in_flight, self._pool.nbytes,
                            time.perf_counter() - self._started)

    def annotate(self, **values: torch.Tensor) -> None:
        """Per-token values for the next forward pass: one ``(batch, seq)`` integer tensor per name declared
        in ``CaptureConfig.annotations`` (all of them, every forward). Stored at ``tokens/<name>``."""
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed")
        self._pending_annotations = dict(values)

    def _check_annotations(self, values: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> None:
        declared = set(self.config.annotations)
        if set(values) != declared:
            raise BatchError(f"annotations for this forward are {sorted(values)} but the config declares "
                             f"{sorted(declared)}: call engine.annotate(...) with exactly those before each "
                             "forward")
        for name, tensor in values.items():
            self._check_device(f"annotation {name!r}", tensor)
            if tensor.is_floating_point() or tensor.is_complex():
                raise BatchError(f"annotation {name!r} is {tensor.dtype}: pass integer values")
            if tuple(tensor.shape) != (batch_size, seq_len):
                raise BatchError(f"annotation {name!r} has shape {tuple(tensor.shape)}; expected "
                                 f"({batch_size}, {seq_len}) like input_ids")

    def flush(self) -> None:
        """Wait until every captured batch has left its slot and every full chunk is committed (the partial
        last chunk waits for more rows or close()).

        Sequences a KV cache could still continue end here: call it after a decode loop, not between its
        forwards (a later forward continuing them is refused).

        Raises:
            CaptureError: the writer process failed or died.
            CaptureClosedError: the engine is closed.
        """
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed: everything it captured was flushed by "
                                     "close()")
        self._caches.end("whose sequences flush() ended (call flush() after a decode loop, not between "
                         "its forwards)")
        self._writer.flush()

    @contextlib.contextmanager
    def detached(self):
        """Run the model without capture inside this block (hooks come back after it; nests). On CUDA the
        batches already captured are handed over first, so no thread of the engine synchronizes with the
        device inside the block (CUDA graph capture forbids it).

        Raises:
            CaptureError: a batch in flight could not be handed over (its copies failed or never finished),
                or the writer process failed; the block does not run.
        """
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed")
        self._writer.drain()
        self._caches.end("whose sequences a detached() block ended (its forwards are not captured)")
        self._detached_depth += 1
        self._hooks.remove()
        try:
            yield self
        finally:
            self._detached_depth -= 1
            if not self._closed and self._detached_depth == 0:
                self._hooks.attach()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def writer_pid(self) -> int:
        """The writer process's pid (it exits at ``close()``, or by itself if this process dies)."""
        return self._writer.pid

    def close(self, failed: bool = False) -> None:
        """Flush, unhook, and publish the manifest (``complete``, or ``failed`` if ``failed`` or the writer
        process failed). Follows the shutdown protocol in ``engine.writer.protocol``. Idempotent.

        Raises:
            CaptureError: the writer process failed or died (original exception chained); committed chunks
                stay readable.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._close_part(failed)
        except BaseException as error:
            if self._parts is not None:
                try:
                    self._parts.publish()  # the other ranks are waiting for this one
                except BaseException as publish_error:
                    error.add_note(f"publishing the top manifest failed too: {publish_error!r}")
            raise
        if self._parts is not None:
            self._parts.publish()

    def _close_part(self, failed: bool) -> None:
        """Close this process's store (the whole store, unless distributed): the writer process, then the
        store (marked failed if the writer did not publish it; the lock), then the slots. Every step runs
        whatever failed before it: a device error (a CUDA error is sticky: every later call raises it) still
        closes the writer process, as failed, and frees the lock and the slots. The first error is raised,
        the later ones noted on it."""
        self._hooks.remove()  # the producer stops first
        errors: list[BaseException] = []
        steps = (self._abandon_current,  # before the close message: it gives back the batch's sequences
                 lambda: self._writer.close(failed or bool(errors), self._next_sequence),
                 self._release_destination, self._release_slots)
        for step in steps:
            try:
                step()
            except BaseException as error:
                errors.append(error)
        if errors:
            first, *later = errors
            for error in later:
                first.add_note(f"while closing, after it: {error!r}")
            raise first

    def _release_slots(self) -> None:
        """Unmap the slots once no copy can land in them any more. A device that never finished a copy (the
        handoff thread gave up waiting) leaves them mapped until the process exits."""
        if self._writer.copies_stuck:
            return
        try:
            self._stager.synchronize()
        finally:
            self._pool.release()

    def _release_destination(self) -> None:
        """Mark the store failed if the writer process did not publish its manifest, then free the lock (the
        writer process has exited)."""
        if self._destination is None:
            return
        try:
            if not self._writer.finalized and self._destination.owned:
                mark_failed(self._destination.location, repr(self._writer.error))
        finally:
            self._destination.release()

    def __enter__(self) -> "CaptureEngine":
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed: create a new one to capture again")
        self._entered += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._entered -= 1
        if self._entered > 0:  # a ``with`` nested in another on this engine: capture goes on until the outer
            return False       # one ends (an error that leaves the outer block fails the run there)
        self.close(failed=exc_type is not None)
        if exc_type is KeyboardInterrupt and self.config.sink == "zarr":
            warnings.warn(f"capture interrupted: committed chunks in {self.config.location} are intact. "
                          "Continue with CaptureConfig(..., resume=True) and feed input sequences from "
                          "engine.resume_sequences on", stacklevel=2)
        return False
