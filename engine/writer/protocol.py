"""The writer process's protocol: its spec, its messages, the layout of the slots and the shutdown.

It runs in its own interpreter (``python -m engine.writer``, started by ``engine.capture.handoff``), so its
work never takes the GIL of the process that runs the model: a launch-bound forward pass feels every GIL
hand-off to a writer thread. It imports no torch (numpy and zarr only), so it starts in a fraction of a
second.

Messages (``engine.writer.channel``), one frozen dataclass each, below; the receivers ``match`` on them:
capturing process -> writer process:
  WriterSpec                           first message: what to write and where
  Buffer(slot, name, nbytes) + 1 fd    a slot buffer was (re)allocated: map it
  Dims(widths)                         the points' widths, before the first batch (again if the first
                                       batch's slots could not be made)
  Batch(slot, info)                    a staged batch whose copies have landed (``info``: its BatchInfo)
  Flush(batches, request)              end the sequences still open (below), answer Flushed(request) once
                                       that many batches are done
  Close(failed, sequences)             drain, commit the tail (unless failed), publish the manifest
writer process -> capturing process:
  Free(slot)                           the slot's rows are copied out: reuse it
  Totals(tokens, nbytes, chunks)       committed totals
  Flushed(request)                     the flush is done
  NonFinite(key, count)                a chunk holds non-finite values: sent for the first such chunk only
  Closed(status, finalized)            the answer to Close
  Failure(cause, traceback)            a failure (``cause``: the exception, or None where it does not
                                       pickle); the capturing process raises CaptureError
Batch, Free and Totals (once per batch or chunk) are packed with ``struct`` by the channel (``PACKED``);
the others are pickled.

Slot buffers (``SlotLayout``): the capturing process fills them (``engine.capture.staging``), this one reads
them (``engine.writer.slots``).

Shutdown protocol (cited by CaptureEngine.close and handoff.WriterProcess.close; keep all three in step):
  1. The producer stops first: hooks are removed, so nothing more is submitted; on CUDA the handoff thread
     forwards every batch it holds and ends, then the capturing process sends the close message (``failed``
     if the handoff thread failed: batches behind its failure were never sent).
  2. The close message comes behind every batch (one FIFO channel); the main thread puts one sentinel per
     writer thread behind the batches in the queue, so every batch submitted before close is written.
  3. A writer thread that fails records its exception, sends it, sets the stop event and puts a sentinel in
     the queue for each thread: the others exit at their next job; the capturing process raises it at its
     next forward, flush or close.
  4. After the threads are joined, on a clean close only, the partial last chunk is committed, then the
     manifest is published (status ``complete`` or ``failed``), Closed is sent and the process exits.
  5. If the capturing process dies (its end of the channel closes, or this process is re-parented), this one
     exits at once, mid-write or mid-drain if need be: no orphan keeps writing into a store that a resume may
     be repairing (it also holds the store's lock until it exits, see ``engine.store.lock``).

Ordering: writers take batches from the queue one at a time under ``_order_lock`` and reserve their row range
there, so rows land in forward order whatever the thread timing. The copying and the chunk writes run outside
the lock, in parallel. A chunk is written by the thread that fills its last row: its rows from the sink's I/O
thread while this one computes the chunk's statistics and checksums, its commit record after both. Commit
records can land out of order; readers trust the gap-free prefix only.

Sequences that continue (forwards with a KV cache: ``generate()``, decode loops): a batch may continue the
sequences of the batch before it, row for row (``BatchInfo.continues``: the capturing process checked that
its cache is the one that batch filled). Its rows then keep their sequence numbers, their positions count on
from the tokens already stored, and ``doc_start`` looks at the token before across the two forwards. Whether
a row is the ``last`` of its sequence is known only when the next batch, ``flush`` or ``close`` comes, so the
newest stored row of each sequence that may continue stays undecided until then (``_OpenSequences``), and a
chunk holding an undecided row is not committed: its ``last`` bits are set as it commits. ``flush`` and
``close`` end the open sequences (the capturing process refuses to continue them afterwards).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import struct
import traceback
from typing import Callable, ClassVar, NamedTuple

import numpy as np

from engine.format import layout
from engine.format.encoding import Encoding, encoding_of
from engine.format.location import Location

PARENT_CHECK_S = 0.25  # how often the writer process checks that its capturing process is alive


@dataclasses.dataclass(frozen=True)
class WriterSpec:
    """Everything the writer process needs, sent as its first message.

    Args:
        sink: ``module:Class`` of the sink (``engine.store.sink:ZarrSink`` or ``engine.store.sink:NullSink``;
            tests and benchmarks name slow or failing sinks of their own).
        location: the store (already created, or repaired for a resume, by the capturing process).
        chunk_tokens: rows per chunk; compressor: None, ``zstd`` or ``blosc``; dtype: storage dtype name.
        point_attributes: activation array key -> its zarr attributes (arrays are created on the first batch,
            when the widths are known).
        token_arrays: per-token array key -> numpy dtype name (``layout.token_arrays``).
        annotations: names of the per-token annotations (each a slot buffer, ``annotation_buffer``).
        bos_id, special_ids: token ids flagged ``bos`` / ``special``.
        separator_ids: token ids that end a packed document (BOS, EOS): the token after one is flagged
            ``doc_start``.
        outlier_norm_ratio: rows whose norm exceeds this many times their neighbours' median are flagged
            ``outlier`` (``engine.format.statistics``); None: never.
        num_writers: writer threads.
        statistics: keep the manifest's running statistics.
        start_row: rows already in the store (a resume continues after them).
        kept_statistics: a resume's statistics of the whole chunks it keeps (``Statistics.to_json``),
            computed by the capturing process in the same read that verified them (``engine.store.resume``),
            so the kept chunks are read once; None for a new store.
        kept_errors: an 8-bit store's resume whose cut chunk keeps exactly the rows its old record covered:
            that record's (squared error, squared norm) per activation array; None otherwise (the new
            record's sums then cover only the rows written after the resume).
        durable: fsync chunk files before their commit record.
        parent_pid: the capturing process (this process exits when it is gone).
        lock_owner: the store lock's record (``StoreLock.owner``); for an object-storage lock the sink proves
            the lease with it before every write (``engine.store.lock.LeaseFence``). None: no lock.
    """

    sink: str
    location: Location | None
    chunk_tokens: int
    compressor: str | None
    dtype: str
    point_attributes: dict[str, dict]
    token_arrays: dict[str, str]
    annotations: tuple[str, ...]
    bos_id: int | None
    special_ids: tuple[int, ...]
    separator_ids: tuple[int, ...]
    outlier_norm_ratio: float | None
    num_writers: int
    statistics: bool
    start_row: int
    kept_statistics: dict | None
    durable: bool
    parent_pid: int
    lock_owner: dict | None = None
    kept_errors: dict | None = None

    @property
    def storage_dtype(self) -> np.dtype:
        return layout.STORAGE_DTYPES[self.dtype]

    @property
    def encoding(self) -> Encoding | None:
        return encoding_of(self.dtype)

    @property
    def slot_dtype(self) -> np.dtype:
        """Elements of a point's slot buffer: the storage dtype, or an 8-bit encoding's slot rows' bytes."""
        return np.dtype(np.uint8) if self.encoding is not None else self.storage_dtype

    @property
    def slot_layout(self) -> SlotLayout:
        return SlotLayout(self.annotations, self.encoding, self.slot_dtype.itemsize)


class BatchInfo(NamedTuple):
    """Host-side facts of one forward pass, known without touching device data (sent with each batch)."""

    forward: int          # forward-pass number in this run (not ``index``: that would shadow tuple.index)
    batch_size: int
    seq_len: int
    first_sequence: int   # global sequence index of row 0
    has_ids: bool         # False for an inputs_embeds forward: ids are stored as -1
    has_mask: bool        # False: every token is real
    continues: bool = False      # its rows continue the previous batch's sequences, row for row (KV cache)
    may_continue: bool = False   # the next forward may continue its sequences (it kept a KV cache)
    stall_seconds: float = 0.0   # how long the forward waited for its free slot (backpressure)


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """A slot buffer was (re)allocated: map it. Its descriptor travels with this message."""

    slot: int
    name: str      # SlotLayout's buffer name
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Dims:
    """The points' widths (point key -> width), before the first batch."""

    widths: dict[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """A staged batch whose copies have landed in its slot."""

    slot: int
    info: BatchInfo

    PACKING: ClassVar[struct.Struct] = struct.Struct("<iqiiq????d")  # slot, then BatchInfo's fields

    def fields(self) -> tuple:
        return (self.slot, *self.info)

    @classmethod
    def from_fields(cls, fields: tuple) -> Batch:
        return cls(fields[0], BatchInfo._make(fields[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class Flush:
    """End the open sequences, then answer ``Flushed(request)`` once ``batches`` batches are done."""

    batches: int
    request: int


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Drain, commit the tail unless ``failed``, publish the manifest (``sequences``: the run's count)."""

    failed: bool
    sequences: int


@dataclasses.dataclass(frozen=True, slots=True)
class Free:
    """The slot's rows are copied out: the capturing process may reuse it."""

    slot: int

    PACKING: ClassVar[struct.Struct] = struct.Struct("<i")

    def fields(self) -> tuple:
        return (self.slot,)

    @staticmethod
    @functools.cache  # one per slot, shared (it is frozen): the forward thread builds none per batch
    def from_fields(fields: tuple) -> Free:
        return Free(*fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """Totals of the gap-free prefix of committed chunks."""

    tokens: int
    nbytes: int
    chunks: int

    PACKING: ClassVar[struct.Struct] = struct.Struct("<qqq")

    def fields(self) -> tuple:
        return (self.tokens, self.nbytes, self.chunks)

    @classmethod
    def from_fields(cls, fields: tuple) -> Totals:
        return cls(*fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Flushed:
    """The flush numbered ``request`` is done."""

    request: int


@dataclasses.dataclass(frozen=True, slots=True)
class NonFinite:
    """The first chunk of the run that holds non-finite values: ``count`` of them in array ``key``. The writer
    pool sends it once per run (``WriterPool``); the capturing process warns as it arrives."""

    key: str
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    """The answer to ``Close``: the manifest's status, and whether it was published."""

    status: str
    finalized: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """The writer process failed: ``cause`` (None where the exception does not survive a pickle round trip)
    and its formatted traceback."""

    cause: BaseException | None
    traceback: str


ToWriter = WriterSpec | Buffer | Dims | Batch | Flush | Close
FromWriter = Free | Totals | Flushed | NonFinite | Closed | Failure
Packed = Batch | Free | Totals  # sent once per batch or chunk: packed with ``struct``, not pickled
PACKED: tuple[type[Packed], ...] = (Batch, Free, Totals)


TOKENS_BUFFER = "tokens"  # (2, batch, seq) int64: the token ids, then the attention mask
TOKEN_DTYPE = np.dtype(np.int64)  # the tokens' and the annotations' buffers


def annotation_buffer(name: str) -> str:
    """The slot buffer of an annotation: (batch, seq) int64."""
    return f"annotation/{name}"


def point_buffer(key: str) -> str:
    """The slot buffer of a captured point: (batch * seq, ``SlotLayout.row_width``) elements."""
    return f"point/{key}"


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """The sizes of a slot's shared-memory buffers (names: ``TOKENS_BUFFER``, ``annotation_buffer``,
    ``point_buffer``). Both processes build it: the capturing process sizes and fills the buffers, the writer
    process maps and reads them.

    Args:
        annotations: names of the per-token annotations.
        encoding: the 8-bit encoding whose slot rows a point's buffer holds (``Encoding.slot_row_bytes``
            bytes per row), or None: rows of the storage dtype.
        itemsize: bytes of one element of a point's buffer (1 for an encoding's slot rows).

    Thread safety: immutable.
    """

    annotations: tuple[str, ...]
    encoding: Encoding | None
    itemsize: int

    def row_width(self, dim: int) -> int:
        """Elements of one row of a point ``dim`` wide in its buffer."""
        return self.encoding.slot_row_bytes(dim) if self.encoding is not None else dim

    def point_bytes(self, tokens: int, dim: int) -> int:
        """Bytes of the buffer of a point ``dim`` wide for ``tokens`` tokens."""
        return tokens * self.row_width(dim) * self.itemsize

    def sizes(self, tokens: int, dims: dict[str, int]) -> dict[str, int]:
        """Every buffer of a slot for ``tokens`` tokens (``dims``: point key -> width): name -> bytes."""
        sizes = {TOKENS_BUFFER: 2 * tokens * TOKEN_DTYPE.itemsize}
        sizes.update({annotation_buffer(name): tokens * TOKEN_DTYPE.itemsize for name in self.annotations})
        sizes.update({point_buffer(key): self.point_bytes(tokens, dim) for key, dim in dims.items()})
        return sizes


_ERROR_NORMS = "#error_norms/"  # not an array path: these chunk buffers are never stored


def error_norms_key(key: str) -> str:
    """Chunk buffer of an encoded point's per-row error and row norms in units of the scale (the slot
    header's; the commit record keeps their squared sums)."""
    return _ERROR_NORMS + key


def is_error_norms(key: str) -> bool:
    """Whether a chunk buffer holds error norms (kept for the record, never written to the store)."""
    return key.startswith(_ERROR_NORMS)


def send_error(send: Callable[[Failure], None], exc: BaseException) -> None:
    """Send a failure with its traceback; the exception itself only if it survives a pickle round trip."""
    text = "".join(traceback.format_exception(exc))
    try:
        portable = pickle.loads(pickle.dumps(exc))
    except Exception:
        portable = None
    try:
        send(Failure(portable, text))
    except OSError:
        pass  # the capturing process is gone
