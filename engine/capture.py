"""CaptureEngine: forward hooks -> staging slots -> writer pool -> committed zarr chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import threading
import time
import warnings
from typing import Any

import torch

from . import layout
from .config import CaptureConfig
from .errors import BatchError, CaptureClosedError, HookPointError, ResumeMismatchError
from .hookpoints import HookPoint, family_of, resolve_hook_points
from .location import Location
from .parts import StoreParts
from .staging import BatchInfo, SlotPool, Stager
from .statistics import rebuild
from .store import NullSink, ZarrSink, prepare_location, read_manifest
from .writer import Counters, WriterPool

class StopForward(Exception):
    """Raised by the last hook of a forward pass when early_stop is on; the root forward returns None."""


_NO_INSTANCE_FORWARD = object()

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class CaptureStats:
    """A snapshot of a run's counters (``CaptureEngine.stats``)."""

    batches: int
    tokens_staged: int
    tokens: int               # committed rows
    bytes_written: int
    chunks_committed: int
    stall_seconds: float      # time the forward pass waited for a free slot (backpressure)
    queue_high_water: int
    queue_depth: int
    slot_bytes: int           # host memory held by staging slots
    elapsed_seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def _token_ids(config, name: str) -> list[int]:
    value = getattr(config, name, None)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _resume_fields(stored: dict, new: dict):
    """(field, stored value, this run's value) for everything a resumed store must share with the run."""
    yield "model", stored["model"]["name"], new["model"]["name"]
    yield "architecture", stored["model"]["architecture"], new["model"]["architecture"]
    for field in ("layers", "points", "extra_modules", "dtype", "chunk_tokens", "compressor", "annotations"):
        yield field, stored.get(field), new.get(field)
    yield "first_sequence", stored.get("first_sequence", 0), new["first_sequence"]
    # A multi-process store's root is resumed by rank 0 (parts.py); a single process must not take it over.
    yield "world_size (processes writing parts; resume with torchrun)", stored.get("world_size"), None
    yield ("hooked modules", {k: v["module_path"] for k, v in stored["arrays"].items()},
           {k: v["module_path"] for k, v in new["arrays"].items()})


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def _statistics_on_device(device: torch.device) -> bool:
    """Whether the hooks compute statistics (on a GPU: yes, so the writers stay light; see statistics.py)."""
    return device.type == "cuda"


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class CaptureEngine:
    """Captures activations of a HuggingFace model into a zarr store while the model runs.

    Hooks are attached on construction; every ``model(...)`` call (keyword ``input_ids`` /
    ``attention_mask`` as produced by a tokenizer) is captured until ``close()``. Pad tokens (mask 0) are
    dropped; a call without a mask keeps every token.

    Args:
        model: a transformers causal LM or base model (any of ``engine.hookpoints.ADAPTERS``'s families
            for canonical points; any model for ``extra_modules``), on one device.
        config: what to capture and where.
        tokenizer: optional; its special ids are flagged in ``tokens/flags`` and its name is recorded.

    Thread safety: run the model's forward passes from one thread at a time. ``stats`` may be read from
    any thread. Not re-entrant: one engine per model at a time.

    Example:
        >>> with CaptureEngine(model, CaptureConfig("acts.zarr", layer_indices=[6])) as cap:
        ...     for batch in loader:
        ...         model(**batch)
    """

    def __init__(self, model: torch.nn.Module, config: CaptureConfig, tokenizer: Any = None):
        self.config = config
        self._model = model
        self._closed = False
        self._current = None            # slot of the forward pass in progress
        self._skip_forward = False      # the forward in progress has no tokens
        self._next_sequence = config.first_sequence
        self._handles: list = []
        self._wrapped_forward = None  # what _wrap_forward replaced, while it is installed
        self._pending_annotations: dict[str, torch.Tensor] = {}
        self._counters = Counters()
        self._warned_nonfinite = False
        self._nonfinite_lock = threading.Lock()
        # Distributed: join first (collective), then each setup phase succeeds or fails on every rank alike.
        self._parts = StoreParts() if config.distributed else None
        with self._on_every_rank():
            self.points: list[HookPoint] = resolve_hook_points(model, config.layer_indices, config.points,
                                                               config.extra_modules)
            manifest = self._manifest(model, tokenizer) if config.sink == "zarr" else None
        location = stored = None
        with self._on_every_rank():  # checked on every rank before any rank repairs or writes its part
            if config.sink == "zarr":
                location, stored = self._check_location(manifest)
        self._dtype = _TORCH_DTYPES[config.dtype]
        self._max_positions = _max_positions(model)
        device = _model_device(model)
        # Resume: this process's input sequences already fully stored; feed its sequences from this index on.
        self.resume_sequences = 0
        with contextlib.ExitStack() as undo:
            with self._on_every_rank():  # a rank that failed here fails every rank; undo cleans up
                self._sink, resumed = self._open_sink(manifest, location, stored)
                self._build_pipeline(model, tokenizer, resumed, device, undo)
            undo.pop_all()

    # ---- setup ---------------------------------------------------------------------------------
    def _build_pipeline(self, model: torch.nn.Module, tokenizer: Any, resumed: tuple | None,
                        device: torch.device, undo: contextlib.ExitStack) -> None:
        """Slots, stager, writers (continuing ``resumed``, _open_sink's resume point and rows), hooks;
        ``undo`` takes what must be torn down."""
        config = self.config
        self._pool = SlotPool(config.pinned_slots, pin=device.type == "cuda", dtype=self._dtype)
        model_config = getattr(model, "config", None)  # plain torch modules have none
        special = sorted({*_token_ids(model_config, "bos_token_id"),
                          *_token_ids(model_config, "eos_token_id"), *_token_ids(model_config, "pad_token_id"),
                          *(getattr(tokenizer, "all_special_ids", None) or [])})
        bos = _token_ids(model_config, "bos_token_id") or [getattr(tokenizer, "bos_token_id", None)]
        device_statistics = config.statistics and _statistics_on_device(device)
        self._stager = Stager(device, self._dtype, bos[0], device_statistics)
        start_row, writer_resume = 0, None
        if resumed is not None:
            point, tail = resumed
            self.resume_sequences = max(point.sequences - config.first_sequence, 0)
            self._next_sequence = config.first_sequence + self.resume_sequences
            full_chunks = point.rows // config.chunk_tokens
            self._counters.tokens_committed = full_chunks * config.chunk_tokens
            self._counters.chunks_committed = full_chunks
            arrays = self._sink.point_arrays()
            stats = rebuild(arrays, self._sink.flags_array(), full_chunks * config.chunk_tokens,
                            config.chunk_tokens, config.dtype) if config.statistics else None
            start_row = point.rows
            writer_resume = ({key: a.shape[1] for key, a in arrays.items()}, tail, stats)
        self._writers = WriterPool(self._sink, self._pool, config.num_writers, config.chunk_tokens,
                                   self._dtype, bos[0], special, self._create_arrays, self._counters,
                                   self._note_nonfinite, layout.token_arrays(config.annotations),
                                   start_row=start_row, resumed=writer_resume,
                                   statistics=config.statistics, device_statistics=device_statistics,
                                   single_threaded=device.type == "cuda")
        undo.callback(self._writers.abort)
        undo.callback(self._remove_hooks)
        self._attach()

    def _manifest(self, model: torch.nn.Module, tokenizer: Any) -> dict:
        from . import __version__
        from .registry import find_model

        cfg = self.config
        config = getattr(model, "config", None)
        name = cfg.model_name or getattr(config, "name_or_path", None) or type(model).__name__
        spec = find_model(name)
        return {
            "format": layout.FORMAT_NAME,
            "format_version": layout.FORMAT_VERSION,
            "engine_version": __version__,
            "status": layout.STATUS_OPEN,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model": {"name": name, "hf_repo_id": spec.hf_repo_id if spec else None,
                      "architecture": getattr(config, "model_type", None), "class": type(model).__name__,
                      "revision": getattr(config, "_commit_hash", None)},
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "layers": list(cfg.layer_indices),
            "points": list(cfg.points),
            "extra_modules": dict(cfg.extra_modules),
            "arrays": {p.key: {"module_path": p.module_path, "tl_name": p.tl_name, "capture": p.capture,
                               "layer": p.layer, "point": p.point} for p in self.points},
            "token_arrays": {key: str(dtype) for key, dtype in layout.token_arrays(cfg.annotations).items()},
            "annotations": dict(cfg.annotations),
            "flag_bits": layout.FLAG_BITS,
            "dtype": cfg.dtype,
            "chunk_tokens": cfg.chunk_tokens,
            "compressor": cfg.compressor,
            "first_sequence": cfg.first_sequence,
            "committed_tokens": 0,
            "committed_chunks": 0,
            "sequences": cfg.first_sequence,
        }

    @contextlib.contextmanager
    def _on_every_rank(self):
        """Distributed: a setup phase that fails on one rank fails on all (``StoreParts.agree``), so no rank
        waits in a collective for one that gave up. A no-op for a single process."""
        try:
            yield
        except BaseException as error:
            if self._parts is not None:
                self._parts.agree(error)
            raise
        if self._parts is not None:
            self._parts.agree(None)

    def _check_location(self, manifest: dict) -> tuple[Location, dict | None]:
        """Where this process writes, and the stored manifest when it continues a store (checked against this
        run). Changes nothing there but an overwrite (and, distributed, rank 0's root documents)."""
        cfg = self.config
        location = cfg.location
        if self._parts is not None:
            self._parts.prepare(location, manifest, cfg.overwrite, cfg.resume)
            location = self._parts.part
            manifest["part"] = {"rank": self._parts.rank, "world_size": self._parts.world_size}
        if not prepare_location(location, cfg.overwrite, cfg.resume):
            return location, None
        stored = read_manifest(location)
        mismatches = [f"{field}: the store has {old!r}, this run has {new!r}"
                      for field, old, new in _resume_fields(stored, manifest) if old != new]
        if mismatches:
            raise ResumeMismatchError(f"cannot resume {location}: " + "; ".join(mismatches)
                                      + ". Resume with the same model and CaptureConfig, or write a new store")
        return location, stored

    def _open_sink(self, manifest: dict | None, location: Location | None, stored: dict | None):
        """The sink, and (resume point, kept rows of the cut chunk) when continuing an existing store."""
        cfg = self.config
        if cfg.sink == "null":
            return NullSink(), None
        if stored is None:
            return ZarrSink(location, cfg.chunk_tokens, cfg.compressor, manifest), None
        resumes = stored.get("resumes", []) + [{"at": manifest["created"], "status_before": stored.get("status")}]
        sink = ZarrSink(location, cfg.chunk_tokens, cfg.compressor,
                        {"status": layout.STATUS_OPEN, "resumes": resumes, "error": None}, existing=True)
        point, tail = sink.repair()
        resumes[-1].update(rows=point.rows, sequences=point.sequences, dropped_rows=point.committed_rows - point.rows)
        sink.update_manifest({"resumes": resumes})
        if point.committed_rows == 0:  # crashed before its first commit, maybe while creating arrays
            sink.start_over()
            return sink, None
        return sink, (point, tail)

    def _create_arrays(self, dims: dict[str, int]) -> None:
        """First batch: the widths are known now; create one array per captured point."""
        disk_dtype = layout.STORAGE_DTYPES[self.config.dtype]
        specs = {}
        for point in self.points:
            attributes = {"module_path": point.module_path, "tl_name": point.tl_name, "layer": point.layer,
                          "point": point.point, "capture": point.capture, "dtype": self.config.dtype}
            if self.config.dtype == "bfloat16":
                attributes["encoding"] = layout.BFLOAT16_ENCODING
            specs[point.key] = (dims[point.key], disk_dtype, attributes)
        self._sink.create_point_arrays(specs)

    def _attach(self) -> None:
        if self.config.early_stop:
            self._wrap_forward()
        self._handles.append(self._model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for point in self.points:
            self._handles.append(point.attach(functools.partial(self._on_point, point)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._wrapped_forward is not None:  # undo _wrap_forward, restoring exactly what was there
            previous = self._wrapped_forward
            self._wrapped_forward = None
            if previous is _NO_INSTANCE_FORWARD:
                self._model.__dict__.pop("forward", None)
            else:
                self._model.forward = previous

    def _wrap_forward(self) -> None:
        """Early stop: the root forward returns None once every point is captured; later layers never run.
        Wraps the forward in place now (an instance-level one, e.g. accelerate's, included)."""
        self._wrapped_forward = self._model.__dict__.get("forward", _NO_INSTANCE_FORWARD)
        original = self._model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except StopForward:
                return None

        self._model.forward = forward

    # ---- hooks (forward thread) ------------------------------------------------------------------
    def _check_writers(self) -> None:
        try:
            self._writers.check()
        except BaseException:
            self._remove_hooks()  # a failed engine must not keep intercepting the model
            raise

    def _on_forward(self, module, args, kwargs) -> None:
        self._check_writers()
        self._abandon_current()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise HookPointError("the model was called without input_ids or inputs_embeds: capture needs "
                                 "one of them as a keyword or first argument")
        batch_size, seq_len = reference.shape[0], reference.shape[1] if reference.dim() > 1 else 1
        if self._max_positions is not None and seq_len > self._max_positions:
            raise BatchError(f"sequence length {seq_len} exceeds the model's {self._max_positions} positions: "
                             f"truncate inputs to at most {self._max_positions} tokens (tokenizer truncation=True)")
        annotations, self._pending_annotations = self._pending_annotations, {}
        self._skip_forward = batch_size * seq_len == 0
        if self._skip_forward:
            self._next_sequence += batch_size  # empty rows were fed too: resume_sequences counts them
            return
        self._check_annotations(annotations, batch_size, seq_len)
        slot, waited = self._pool.acquire(self._check_writers)
        batch = BatchInfo(self._counters.batches, batch_size, seq_len, self._next_sequence)
        self._next_sequence += batch_size
        slot.reserve(batch)
        self._current = slot
        self._stager.stage_tokens(slot, input_ids, kwargs.get("attention_mask"), annotations)
        with self._counters.lock:
            self._counters.stall_seconds += waited

    def _abandon_current(self) -> None:
        """Release the slot of a forward that raised before its last point, once its copies have landed."""
        if self._current is None:
            return
        self._stager.finish(self._current)
        if self._current.event is not None:
            self._current.event.synchronize()  # error path only: in-flight copies must not hit a reused slot
        self._pool.release(self._current)
        self._current = None

    def _on_point(self, point: HookPoint, tensor: torch.Tensor) -> None:
        slot = self._current
        if slot is None:
            if self._skip_forward:
                return
            raise HookPointError(f"{point.module_path} ran outside a forward pass of the captured model: "
                                 "call the model passed to CaptureEngine, not one of its submodules")
        if tuple(tensor.shape[:2]) != (slot.batch.batch_size, slot.batch.seq_len) or tensor.dim() != 3:
            raise HookPointError(f"{point.module_path} produced shape {tuple(tensor.shape)}; expected "
                                 f"({slot.batch.batch_size}, {slot.batch.seq_len}, dim) like input_ids")
        self._stager.stage_point(slot, point.key, tensor.detach())
        if len(slot.captured) == len(self.points):
            tokens = slot.batch.batch_size * slot.batch.seq_len  # read before a writer may recycle the slot
            self._stager.finish(slot)
            self._current = None
            self._writers.submit(slot)
            with self._counters.lock:
                self._counters.batches += 1
                self._counters.tokens_staged += tokens
            if self.config.early_stop:
                raise StopForward  # caught by the wrapper around the root forward

    def _note_nonfinite(self, key: str, count: int) -> None:
        with self._nonfinite_lock:
            if self._warned_nonfinite:
                return
            self._warned_nonfinite = True
        warnings.warn(f"{key}: {count} non-finite values in one chunk (stored as they are, counted per chunk "
                      "in the commit records); if this is float16 overflow, capture with dtype='float32' or "
                      "'bfloat16'", RuntimeWarning, stacklevel=2)

    # ---- public --------------------------------------------------------------------------------
    @property
    def stats(self) -> CaptureStats:
        """Counters so far: tokens, bytes, stall seconds, queue high-water, MB/s."""
        c = self._counters
        with c.lock:
            return CaptureStats(c.batches, c.tokens_staged, c.tokens_committed, c.bytes_committed,
                                c.chunks_committed, c.stall_seconds, c.queue_high_water,
                                self._writers.queue_depth(), self._pool.nbytes, time.perf_counter() - c.started)

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
                             f"{sorted(declared)}: call engine.annotate(...) with exactly those before each forward")
        for name, tensor in values.items():
            if tensor.is_floating_point() or tensor.is_complex():
                raise BatchError(f"annotation {name!r} is {tensor.dtype}: pass integer values")
            if tuple(tensor.shape) != (batch_size, seq_len):
                raise BatchError(f"annotation {name!r} has shape {tuple(tensor.shape)}; expected "
                                 f"({batch_size}, {seq_len}) like input_ids")

    def flush(self) -> None:
        """Wait until every captured batch has left its slot and every full chunk is committed (the partial
        last chunk waits for more rows or close()).

        Raises:
            CaptureError: a writer failed.
        """
        self._writers.wait_written()

    @contextlib.contextmanager
    def detached(self):
        """Run the model without capture inside this block (hooks come back after it)."""
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed")
        self._remove_hooks()
        try:
            yield self
        finally:
            if not self._closed:
                self._attach()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, failed: bool = False) -> None:
        """Flush, unhook, and publish the manifest (``complete``, or ``failed`` if ``failed`` or a writer
        failed). Follows the shutdown protocol in ``engine.writer``. Idempotent.

        Raises:
            CaptureError: a writer failed (original exception chained); committed chunks stay readable.
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
        """Close this process's store (the whole store, unless distributed)."""
        self._remove_hooks()  # producer first
        self._abandon_current()
        error = None
        try:
            rows = self._writers.close(commit_tail=not failed)
        except BaseException as exc:
            error, rows = exc, None
        failed = failed or self._writers.error is not None
        status = layout.STATUS_FAILED if failed or error is not None else layout.STATUS_COMPLETE
        c = self._counters
        cause = self._writers.error or (error.__cause__ if error is not None else None) or error
        try:
            self._sink.finalize(c.tokens_committed, {
                "status": status, "committed_tokens": c.tokens_committed, "committed_chunks": c.chunks_committed,
                "sequences": self._next_sequence,
                "statistics": self._writers.statistics.to_json() if self._writers.statistics else {},
                "error": repr(cause) if cause is not None else None,
                "closed": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }, trim=status == layout.STATUS_COMPLETE and rows == c.tokens_committed)
        except BaseException as finalize_error:
            if error is not None:
                raise error from finalize_error  # the writer's failure stays the headline
            raise
        if error is not None:
            raise error

    def __enter__(self) -> "CaptureEngine":
        if self._closed:
            raise CaptureClosedError("this CaptureEngine is closed: create a new one to capture again")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None)
        if exc_type is KeyboardInterrupt and self.config.sink == "zarr":
            warnings.warn(f"capture interrupted: committed chunks in {self.config.location} are intact. Continue "
                          "with CaptureConfig(..., resume=True) and feed input sequences from "
                          "engine.resume_sequences on", stacklevel=2)
        return False


# The original design's name for the same class.
ActivationCapture = CaptureEngine


def create_gpt2_capture(model: torch.nn.Module, output_dir: str | os.PathLike, layer_indices=(6,),
                        capture_residual: bool = True, capture_mlp_hidden: bool = True,
                        **config: Any) -> CaptureEngine:
    """The original design's factory: a CaptureEngine on a GPT-2 style model (any supported family works).

    Extra keyword arguments go to CaptureConfig.
    """
    if family_of(model) != "gpt2":
        warnings.warn("create_gpt2_capture on a non-GPT-2 model: hook points resolve by the model's own "
                      "family; prefer CaptureEngine", stacklevel=2)
    cfg = CaptureConfig(output_dir=output_dir, layer_indices=tuple(layer_indices),
                        capture_residual=capture_residual, capture_mlp_hidden=capture_mlp_hidden, **config)
    return CaptureEngine(model, cfg)
