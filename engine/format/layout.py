"""Every on-disk name and layout rule of a capture store, in one place.

A store is one zarr v3 group:

  zarr.json                         group; attributes["manifest"] is the manifest (see README)
  layer_{i}/{point}                 (n_tokens, dim) activations, one array per captured point
  extra/{name}                      (n_tokens, dim) user-named module outputs
  tokens/input_ids|sequence|position|flags   (n_tokens,) per-token metadata; row r of every array is one token
  commits/                          group; one child group per committed chunk:
  commits/chunk_{k:012d}/zarr.json  its attributes are the chunk's commit record (written last, one PUT)

All arrays share the row chunking ``chunk_tokens``: chunk k is rows [k*chunk_tokens, (k+1)*chunk_tokens).

A multi-process store (one process per GPU, ``CaptureConfig(distributed=True)``) is a root group whose
manifest lists its parts; each part is a complete store as above, written by one rank only:

  zarr.json                         root group; manifest with "parts" (written by rank 0 only)
  parts/zarr.json                   group (rank 0)
  parts/rank_{r:05d}/...            rank r's store: its own manifest, arrays and commit records

Rows of the whole store are the parts' committed rows in rank order.

Records as types: the manifest (``Manifest``) and each chunk's commit record (``CommitRecord``) are built and
read only through the types below, whose ``from_json`` checks every field and raises StoreFormatError naming
the document and what was expected.

Format version 2 adds to each commit record ``files``: for every array written with the chunk,
``{"crc32c": c, "nbytes": n}`` (``ChunkFile``): every chunk the capture wrote must be there, at that length,
with those rows (the writer stores every chunk, even one zarr would skip as equal to the fill value).
Format version 3 (only stores of an 8-bit storage dtype, ``int8`` or ``float8_e4m3``: older readers would
read their codes as values) adds a scale array per activation array, ``scales/<array path>`` (n_tokens, 1)
float32, written and checksummed with every chunk like the rest (``engine.format.encoding`` has the encoding
and how to decode it), and to each record's stats ``squared_error`` and ``squared_norm``: the sums, over the
chunk's rows, of the squared error of the decoded values against the captured ones and of the captured squared
norms (their ratio's square root is the relative RMS error the encoding introduced).

Version 1 stores (records without ``files``) still read: an uncompressed chunk that is there
must have a whole chunk's length, but an absent one reads as zeros (zarr skipped chunks equal to the fill
value, so absence proves nothing) and nothing can be verified. The same holds for arrays added after the
capture (align's ``tokens/label``), which no record describes.

What the checksum covers: ``crc32c`` is the CRC32C (Castagnoli) of the chunk's committed rows as a reader
gets them back: rows [row_start, row_stop) of the array in C order, little-endian, ``token_count x row bytes``
bytes. ``nbytes`` is the length of the stored chunk file or object. Why the rows and not the stored bytes:
  - For an uncompressed array (the default) they are the same bytes: the rows are the first bytes of the
    stored chunk, so a reader verifies the bytes it has just read, without decoding. What follows the rows
    in a partial chunk (a hole in a sparse file, or zarr's fill value) holds no data and is not covered.
  - Compressed chunks, and every chunk of an object store, are written through zarr's codec pipeline, which
    does not hand the encoded bytes back: checksumming the stored bytes would mean encoding every chunk
    twice or reading it back. The rows are in the writer's memory when it commits, so their checksum costs
    one pass over memory (the writer process's, never the capturing process's). A reader checks a
    compressed chunk after decoding it, which also catches damage that still decodes.
  - The stored size (one stat, or one HEAD on an object store) catches a missing or truncated
    chunk without reading it, so readers check it on every chunk they read; checksums are checked on demand
    (``open_store(verify=True)``, ``ActivationDataset(verify=True)``, ``inspect --verify``) and by a resume.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, NamedTuple

import numpy as np

from engine.errors import StoreFormatError
from engine.format.encoding import ENCODINGS, encoding_of, scale_key

FORMAT_NAME = "actcap"
FORMAT_VERSION = 3
PLAIN_FORMAT_VERSION = 2  # stores of float16, bfloat16 or float32 activations: readable by version 2 readers
FIRST_CHECKSUMMED_VERSION = 2  # commit records carry ``files`` from this version on
MANIFEST_ATTR = "manifest"
COMMITS_GROUP = "commits"
PARTS_GROUP = "parts"

# Per-token metadata arrays and their on-disk dtypes.
TOKEN_ARRAYS: dict[str, np.dtype] = {
    "tokens/input_ids": np.dtype("int32"),
    "tokens/sequence": np.dtype("int64"),
    "tokens/position": np.dtype("int32"),
    "tokens/flags": np.dtype("uint8"),
}

ANNOTATION_DTYPES = ("int32", "int64")


def token_arrays(annotations: dict[str, str]) -> dict[str, np.dtype]:
    """Per-token arrays of a store: the fixed ones plus ``tokens/<name>`` for each annotation."""
    return {**TOKEN_ARRAYS, **{f"tokens/{name}": np.dtype(dtype) for name, dtype in annotations.items()}}


# Bits of tokens/flags.
FLAG_BOS = 1        # token id is the model's BOS id
FLAG_SPECIAL = 2    # token id is one of the model's special ids (bos / eos / pad / tokenizer specials)
FLAG_FIRST = 4      # first stored token of its sequence
FLAG_LAST = 8       # last stored token of its sequence
FLAG_DOC_START = 16  # first token of a document packed after a separator (the previous token is BOS or EOS)
FLAG_OUTLIER = 32   # its norm at some captured point is far above its neighbours' (engine.format.statistics)
FLAG_BITS = {"bos": FLAG_BOS, "special": FLAG_SPECIAL, "first": FLAG_FIRST, "last": FLAG_LAST,
             "doc_start": FLAG_DOC_START, "outlier": FLAG_OUTLIER}
# Rows readers and the manifest statistics leave out unless told otherwise: attention sinks (BOS, each
# sequence's first token) and norm outliers ("massive activations"), whose norms are orders of magnitude above
# the rest and would steer normalization (docs/reading.md has the measurement).
EXCLUDED_BY_DEFAULT = ("bos", "first", "outlier")

# Manifest status values.
STATUS_OPEN = "open"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

# Storage dtypes: name -> zarr dtype on disk. bfloat16 has no zarr dtype: its raw bits are stored as uint16
# and the array attribute "encoding" says so (view the numpy uint16 data as torch.bfloat16 to decode). The
# 8-bit ones store codes with a scale array beside (engine.format.encoding).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("float16"),
    "float32": np.dtype("float32"),
    "bfloat16": np.dtype("uint16"),
    **{name: encoding.code_dtype for name, encoding in ENCODINGS.items()},
}
BFLOAT16_ENCODING = "bfloat16-bits-in-uint16"
SCALE_DTYPE = np.dtype("float32")


def format_version(dtype: str) -> int:
    """The format version a new store of this storage dtype is written in."""
    return FORMAT_VERSION if encoding_of(dtype) is not None else PLAIN_FORMAT_VERSION


def stored_row_bytes(dtype: str, dim: int) -> int:
    """Bytes on disk per row of one activation array of width ``dim`` (the scale included)."""
    return dim * STORAGE_DTYPES[dtype].itemsize + (SCALE_DTYPE.itemsize if encoding_of(dtype) else 0)


def stored_arrays(manifest: Manifest) -> list[str]:
    """Every array the capture writes with each chunk: activations, an 8-bit store's scales, tokens."""
    return [*manifest.arrays, *scale_arrays(manifest.dtype, manifest.arrays), *manifest.token_arrays]


def scale_arrays(dtype: str, activation_keys) -> list[str]:
    """The scale arrays that go with these activation arrays in a store of this storage dtype (none unless it
    is an 8-bit one)."""
    return [scale_key(key) for key in activation_keys] if encoding_of(dtype) is not None else []


def array_key(layer: int, point: str) -> str:
    """Array path of a canonical hook point."""
    return f"layer_{layer}/{point}"


def extra_array_key(name: str) -> str:
    """Array path of a user-named module."""
    return f"extra/{name}"


def commit_group_path(chunk_index: int) -> str:
    """Group path whose attributes are the commit record of one chunk."""
    return f"{COMMITS_GROUP}/chunk_{chunk_index:012d}"


def commit_record_key(chunk_index: int) -> str:
    """Store key of one chunk's commit record (a zarr v3 group metadata document)."""
    return commit_group_path(chunk_index) + "/zarr.json"


def chunk_index_of(commit_name: str) -> int | None:
    """Chunk index from a child name of the commits group, or None for anything else (zarr.json, temp
    files)."""
    if not commit_name.startswith("chunk_"):
        return None
    digits = commit_name[len("chunk_"):]
    return int(digits) if digits.isdigit() else None


def part_path(rank: int) -> str:
    """Path of one rank's part in a multi-process store."""
    return f"{PARTS_GROUP}/rank_{rank:05d}"


# ---- records as types -----------------------------------------------------------------------------------

_REQUIRED = object()
_NONE = type(None)
_RECORD_FIX = ("the record is damaged: delete it and resume the capture (that chunk is then captured again), "
               "or restore the store from a copy")
_MANIFEST_FIX = ("the store's metadata is damaged: restore this zarr.json from a copy (the arrays can still "
                 "be read with zarr alone)")


class _Document:
    """The fields of one JSON object, each read with its type checked; errors name the document and fix."""

    def __init__(self, doc: Any, where: str, what: str, fix: str):
        self.where, self.what, self.fix = where, what, fix
        if not isinstance(doc, dict):
            raise self.error(f"is {type(doc).__name__}, not a JSON object")
        self.doc = doc

    def field(self, name: str, kinds: tuple[type, ...], default: Any = _REQUIRED) -> Any:
        if name not in self.doc:
            if default is _REQUIRED:
                raise self.error(f"has no field {name!r}")
            return default
        value = self.doc[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join("null" if kind is _NONE else kind.__name__ for kind in kinds)
            raise self.error(f"has {name}={value!r}; expected {expected}")
        return value

    def child(self, value: Any, what: str) -> _Document:
        """A JSON object inside this one."""
        return _Document(value, self.where, f"{what} in {self.what}", self.fix)

    def error(self, problem: str) -> StoreFormatError:
        return StoreFormatError(f"{self.where}: {self.what} {problem}. The fix: {self.fix}")


def group_document(attributes: dict | None) -> dict:
    """A zarr v3 group's ``zarr.json`` holding ``attributes`` (the root's manifest, a commit record)."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def _group_attributes(raw: bytes, where: str, what: str, fix: str) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise StoreFormatError(f"{where}: expected the zarr group document holding {what} (JSON), found "
                               f"bytes that are not JSON ({error}). The fix: {fix}") from None
    group = _Document(doc, where, f"the zarr group document holding {what}", fix)
    if group.field("zarr_format", (int,)) != 3 or group.field("node_type", (str,)) != "group":
        raise group.error("is not a zarr v3 group (zarr_format 3, node_type 'group')")
    return group.field("attributes", (dict,))


def root_attributes(raw: bytes, where: str) -> dict:
    """The attributes of a store's root ``zarr.json`` (StoreFormatError naming ``where`` if damaged)."""
    return _group_attributes(raw, where, "a capture store's root", _MANIFEST_FIX)


def commit_record_attributes(raw: bytes, where: str, chunk_index: int) -> dict:
    """The attributes of a commit record's ``zarr.json``: the record's JSON (StoreFormatError if damaged)."""
    return _group_attributes(raw, where, f"the commit record of chunk {chunk_index}", _RECORD_FIX)


class ChunkFile(NamedTuple):
    """One array's stored chunk, as its commit record describes it (format version 2). A named tuple: a
    dataset pickles one per chunk and array to each DataLoader worker.

    Attributes:
        crc32c: CRC32C of the chunk's committed rows (exactly which bytes: the module docstring).
        nbytes: byte length of the stored chunk file or object.
    """

    crc32c: int
    nbytes: int

    def to_json(self) -> dict:
        return {"crc32c": self.crc32c, "nbytes": self.nbytes}


@dataclasses.dataclass(frozen=True)
class ChunkStats:
    """One activation array's values in one chunk, as a reader decodes them: min and max of the finite values
    (None when there are none), non-finite values, and float16 overflows (+-inf in float16 storage). An 8-bit
    store's also has ``squared_error`` and ``squared_norm`` (format version 3: the module docstring); None in
    others."""

    min: float | None
    max: float | None
    nonfinite: int
    fp16_overflow: int
    squared_error: float | None = None
    squared_norm: float | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value is not None or key in ("min", "max")}


class _ReadsLikeJson:
    """Read access by the JSON document's keys (``manifest["statistics"]``, ``record["token_count"]``), beside
    the attributes: what callers of the dict records of format version 1 wrote keeps working."""

    def to_json(self) -> dict[str, Any]:
        """The JSON document (each subclass writes its own)."""
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()


@dataclasses.dataclass(frozen=True)
class CommitRecord(_ReadsLikeJson):
    """The commit record of one chunk: written after the chunk's data, it makes the chunk visible.

    Attributes:
        chunk_index: k: the chunk holds rows [k * chunk_tokens, k * chunk_tokens + token_count).
        row_start, row_stop: its rows (within its part, for a multi-process store).
        dims: activation array -> width (on disk: ``keys`` and ``shape``).
        dtype: storage dtype name of the activation arrays.
        first_sequence, last_sequence, num_sequences: the sequences its rows belong to.
        max_seq_len: longest position + 1 in the chunk.
        stats: activation array -> its values in this chunk.
        committed_at: seconds since the epoch.
        files: every array written with the chunk -> its stored chunk (empty in format version 1).
        stall_seconds: how long the forwards whose first row it holds waited for a free slot (the capture
            stalled on the writer); None in records written before the field existed.

    Thread safety: immutable.
    """

    chunk_index: int
    row_start: int
    row_stop: int
    dims: Mapping[str, int]
    dtype: str
    first_sequence: int
    last_sequence: int
    num_sequences: int
    max_seq_len: int
    stats: Mapping[str, ChunkStats]
    committed_at: float
    files: Mapping[str, ChunkFile] = dataclasses.field(default_factory=dict)
    stall_seconds: float | None = None

    @property
    def token_count(self) -> int:
        return self.row_stop - self.row_start

    @property
    def keys(self) -> list[str]:
        """The activation arrays, sorted."""
        return sorted(self.dims)

    def to_json(self) -> dict:
        rows = self.token_count
        return {"chunk_index": self.chunk_index, "row_start": self.row_start, "row_stop": self.row_stop,
                "token_count": rows, "keys": self.keys,
                "shape": {key: [rows, self.dims[key]] for key in self.keys}, "dtype": self.dtype,
                "first_sequence": self.first_sequence, "last_sequence": self.last_sequence,
                "num_sequences": self.num_sequences, "max_seq_len": self.max_seq_len,
                "stats": {key: stats.to_json() for key, stats in self.stats.items()},
                "committed_at": self.committed_at,
                "files": {key: file.to_json() for key, file in self.files.items()},
                **({} if self.stall_seconds is None else {"stall_seconds": self.stall_seconds})}

    @classmethod
    def from_json(cls, doc: Any, where: str, chunk_index: int, chunk_tokens: int,
                  format_version: int) -> CommitRecord:
        """The record stored at ``where`` for chunk ``chunk_index`` of a store of ``format_version``.

        Raises:
            StoreFormatError: a field is missing or of the wrong type, the record describes other rows than
                chunk ``chunk_index``'s, or (format version 2) it lacks a checksum of one of its arrays.
        """
        record = _Document(doc, where, f"the commit record of chunk {chunk_index}", _RECORD_FIX)
        start, stop = _rows(record, chunk_index, chunk_tokens)
        dims = _dims(record, stop - start)
        return cls(chunk_index, start, stop, dims, record.field("dtype", (str,)),
                   record.field("first_sequence", (int,)), record.field("last_sequence", (int,)),
                   record.field("num_sequences", (int,)), record.field("max_seq_len", (int,)),
                   _stats(record, dims), record.field("committed_at", (int, float)),
                   _files(record, dims, format_version, record.field("dtype", (str,))),
                   record.field("stall_seconds", (int, float, _NONE), None))


def _rows(record: _Document, chunk_index: int, chunk_tokens: int) -> tuple[int, int]:
    """(row_start, row_stop) of a record, which must be those of chunk ``chunk_index``."""
    index, start = record.field("chunk_index", (int,)), record.field("row_start", (int,))
    stop, count = record.field("row_stop", (int,)), record.field("token_count", (int,))
    first = chunk_index * chunk_tokens
    if (index, start) != (chunk_index, first) or not 0 < count == stop - start <= chunk_tokens:
        raise record.error(f"says chunk {index}, rows [{start}, {stop}) ({count} tokens); expected chunk "
                           f"{chunk_index}, rows from {first}, 1 to {chunk_tokens} tokens")
    return start, stop


def _dims(record: _Document, rows: int) -> dict[str, int]:
    keys, shape = record.field("keys", (list,)), record.field("shape", (dict,))
    if sorted(shape) != sorted(keys) or any(not isinstance(key, str) for key in keys):
        raise record.error(f"lists keys {keys} but shapes of {sorted(shape)}; expected the same array paths")
    for key, dims in shape.items():
        width = dims[1] if isinstance(dims, list) and len(dims) == 2 and dims[0] == rows else None
        if not isinstance(width, int) or isinstance(width, bool):
            raise record.error(f"has shape {dims!r} for {key}; expected [{rows}, width]")
    return {key: shape[key][1] for key in keys}


def _stats(record: _Document, dims: dict[str, int]) -> dict[str, ChunkStats]:
    entries = record.field("stats", (dict,))
    stats = {}
    for key in dims:
        entry = record.child(entries.get(key), f"the stats of {key}")
        value = (int, float, _NONE)
        stats[key] = ChunkStats(entry.field("min", value), entry.field("max", value),
                                entry.field("nonfinite", (int,)), entry.field("fp16_overflow", (int,)),
                                entry.field("squared_error", value, None),
                                entry.field("squared_norm", value, None))
    return stats


def _files(record: _Document, dims: dict[str, int], format_version: int, dtype: str) -> dict[str, ChunkFile]:
    """Format version 2: every array's stored chunk (an 8-bit store's scale arrays too); version 1 has none (a
    resumed version 1 store's new records have them)."""
    if format_version < FIRST_CHECKSUMMED_VERSION and "files" not in record.doc:
        return {}
    entries = record.field("files", (dict,))
    missing = sorted({*dims, *TOKEN_ARRAYS, *scale_arrays(dtype, dims)} - set(entries))
    if missing:
        raise record.error(f"has no checksum of {', '.join(missing)}; expected one per array written with it")
    files = {}
    for key, value in entries.items():
        entry = record.child(value, f"the file of {key}")
        files[key] = ChunkFile(entry.field("crc32c", (int,)), entry.field("nbytes", (int,)))
    return files


def _json_field(kinds: tuple[type, ...], default: Any = dataclasses.MISSING,
                factory: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, default_factory=factory, metadata={"kinds": kinds})


# Manifest fields written only when set: their presence means something (``parts``: a multi-process store).
_ABSENT_WHEN_NONE = ("part", "world_size", "parts")


@dataclasses.dataclass(frozen=True)
class Manifest(_ReadsLikeJson):
    """The manifest of a store (the root group's ``manifest`` attribute; each part of a multi-process store
    has its own). Fields as in the README's on-disk contract; dict and list fields hold their JSON as it is.

    ``unknown``: fields this version of the engine does not know, written back unchanged.

    Thread safety: immutable (treat the dict and list fields as read-only; change a manifest with
    ``dataclasses.replace``).
    """

    format_version: int = _json_field((int,))
    status: str = _json_field((str,))
    chunk_tokens: int = _json_field((int,))
    dtype: str = _json_field((str,))
    compressor: str | None = _json_field((str, _NONE))
    arrays: dict = _json_field((dict,))
    token_arrays: dict = _json_field((dict,))
    engine_version: str | None = _json_field((str, _NONE), None)
    created: str | None = _json_field((str, _NONE), None)
    model: dict = _json_field((dict,), factory=dict)
    tokenizer: str | None = _json_field((str, _NONE), None)
    layers: list = _json_field((list,), factory=list)
    points: list = _json_field((list,), factory=list)
    extra_modules: dict = _json_field((dict,), factory=dict)
    annotations: dict = _json_field((dict,), factory=dict)
    flag_bits: dict = _json_field((dict,), factory=lambda: dict(FLAG_BITS))
    first_sequence: int = _json_field((int,), 0)
    # None: no row was flagged ``outlier`` (every store captured before the flag existed)
    outlier_norm_ratio: float | None = _json_field((int, float, _NONE), None)
    committed_tokens: int = _json_field((int,), 0)
    committed_chunks: int = _json_field((int,), 0)
    sequences: int = _json_field((int,), 0)
    writers: list = _json_field((list,), factory=list)
    resumes: list = _json_field((list,), factory=list)
    statistics: dict = _json_field((dict,), factory=dict)
    error: str | None = _json_field((str, _NONE), None)
    closed: str | None = _json_field((str, _NONE), None)
    part: dict | None = _json_field((dict, _NONE), None)
    world_size: int | None = _json_field((int, _NONE), None)
    parts: list | None = _json_field((list, _NONE), None)
    unknown: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        doc = {"format": FORMAT_NAME}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "unknown" and not (value is None and field.name in _ABSENT_WHEN_NONE):
                doc[field.name] = value
        return {**doc, **self.unknown}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Manifest:
        """The manifest stored at ``where``.

        Raises:
            StoreFormatError: not a capture store's manifest, a newer format version than this engine reads,
                or a field missing or of the wrong type (the message names it).
        """
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where} is a zarr group but not a capture store (no {FORMAT_NAME!r} "
                                   "manifest)")
        manifest = _Document(doc, where, "the manifest", _MANIFEST_FIX)
        version = manifest.field("format_version", (int,))
        if version > FORMAT_VERSION:
            raise StoreFormatError(f"{where} has format version {version}; this engine reads up to "
                                   f"{FORMAT_VERSION}: upgrade the package")
        values = {field.name: manifest.field(field.name, field.metadata["kinds"], _default(field))
                  for field in dataclasses.fields(cls) if field.name != "unknown"}
        unknown = {key: value for key, value in doc.items() if key not in {*values, "format"}}
        return cls(**values, unknown=unknown)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _REQUIRED
