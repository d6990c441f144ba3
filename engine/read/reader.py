"""Reading a store: the committed view (only rows of the gap-free prefix of committed chunks), checked.

Every chunk read is first checked against its commit record's size (``engine.format.chunks``: one fstat or
HEAD, no read); ``open_store(verify=True)`` also verifies every committed chunk's CRC32C when the store is
opened. A complete store whose commit records cover other rows than its manifest says raises
StoreCorruptError: a deleted or wrong record never shortens it silently. So does an array whose metadata (its
zarr.json: dtype, width, chunking, codecs, rows) disagrees with the manifest and the records, or a record that
leaves an array out: rows are never read through metadata that would misread them. A multi-process store's
parts follow the same rules, each on its own, and lie where its layout puts them, inside the store.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import warnings

import numpy as np
import zarr

from engine.errors import StoreCorruptError, StoreFormatError
from engine.format import layout
from engine.format.chunks import (
    DAMAGE_FIX,
    check_size,
    chunk_problem,
    corrupt_error,
    describe,
    metadata_error,
    metadata_problems,
    open_below,
    size_problem,
)
from engine.format.encoding import Encoding, encoding_of, scale_key
from engine.format.layout import CommitRecord, Manifest
from engine.format.location import Location
from engine.store.access import (
    committed_prefix,
    existing_arrays,
    manifest_of,
    open_group,
    read_commit_records,
)


class CommittedArray:
    """One array limited to its committed rows; in a multi-process store, the parts' rows in rank order.
    Indexing rows with an int or a slice returns numpy arrays; the chunks read are first checked against their
    commit records' sizes (StoreCorruptError: a missing or truncated chunk never reads as zeros).

    Args:
        pieces: (zarr array, commit records of its committed chunks) per part, in order (one piece for a
            single-process store).

    Thread safety: read-only; safe from several threads.
    """

    def __init__(self, pieces: list[tuple[zarr.Array, list[CommitRecord]]]):
        self.pieces = pieces
        self._piece_rows = [records[-1].row_stop if records else 0 for _, records in pieces]
        first = pieces[0][0]
        self.shape = (sum(self._piece_rows), *first.shape[1:])
        self.dtype = first.dtype
        self.attrs = dict(first.attrs)

    @property
    def zarr(self) -> zarr.Array:
        """The zarr array of a single-process store (a multi-process store has one per part: ``pieces``)."""
        if len(self.pieces) != 1:
            raise TypeError(f"this array spans {len(self.pieces)} parts: use .pieces, one zarr array per "
                            "part")
        return self.pieces[0][0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        first, rest = index[0], index[1:]
        if isinstance(first, (int, np.integer)):
            if not -self.shape[0] <= first < self.shape[0]:
                raise IndexError(f"row {first} is outside the {self.shape[0]} committed rows")
            row = int(first) % self.shape[0]
            return self._rows(range(row, row + 1), rest)[0]
        if not isinstance(first, slice):
            raise TypeError("index rows with an int or a slice (use .zarr or .pieces for other selections)")
        rows = range(*first.indices(self.shape[0]))
        if rows.step > 0:
            return self._rows(rows, rest)
        return self._rows(rows[::-1], rest)[::-1]  # a negative step: the same rows read forwards

    def _rows(self, rows: range, rest: tuple) -> np.ndarray:
        """The rows of a forward range, piece by piece: each piece reads only its selected rows (zarr fetches
        only the chunks holding them), after checking those chunks' sizes."""
        out, offset = [], 0
        for (array, records), count in zip(self.pieces, self._piece_rows):
            local = rows[bisect.bisect_left(rows, offset):bisect.bisect_left(rows, offset + count)]
            if len(local):
                _check_sizes(array, records, local[0] - offset, local[-1] - offset)
                selection = (slice(local.start - offset, local.stop - offset, local.step), *rest)
                out.append(np.asarray(array[selection]))
            offset += count
        if not out:
            return np.asarray(self.pieces[0][0][(slice(0, 0), *rest)])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


class DecodedArray:
    """An 8-bit encoded activation array read as float32 values: its codes times its rows' scales
    (``engine.format.encoding``). Indexing rows with an int or a slice returns float32 numpy arrays, checked
    as ``CommittedArray`` checks them (the scale array's chunks too).

    Attributes:
        codes: the stored codes (``CommittedArray``); scales: the (n, 1) float32 scales; encoding: the
            ``Encoding``.

    Thread safety: read-only; safe from several threads.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, codes: CommittedArray, scales: CommittedArray, encoding: Encoding):
        self.codes, self.scales, self.encoding = codes, scales, encoding
        self.shape = codes.shape
        self.attrs = codes.attrs

    @property
    def pieces(self) -> list[tuple[zarr.Array, list[CommitRecord]]]:
        """The codes' zarr arrays and records, per part."""
        return self.codes.pieces

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows, columns = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        codes, scales = self.codes[rows], self.scales[rows]
        flat = codes.reshape(-1, self.shape[1])
        values = self.encoding.decode(flat, scales.reshape(-1, 1), np.empty(flat.shape, dtype=np.float32))
        values = values.reshape(codes.shape)
        return values[(slice(None), *columns)] if codes.ndim == 2 else values[columns]

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


def _check_sizes(array: zarr.Array, records: list[CommitRecord], first: int, last: int) -> None:
    """StoreCorruptError unless every chunk holding rows ``first..last`` has its recorded size."""
    chunk_tokens = array.chunks[0]
    for record in records[first // chunk_tokens:last // chunk_tokens + 1]:
        check_size(array, record.chunk_index, record.files.get(array.path))


@dataclasses.dataclass
class StorePart:
    """One process's part of a store (the whole store, for a single-process capture).

    Attributes:
        location: where the part is.
        group: its zarr group (None: the rank never created it).
        manifest: its manifest (None: the rank never created it).
        chunks: commit records of its committed chunks, in order.
        num_tokens: its committed rows.
    """

    location: Location
    group: zarr.Group | None
    manifest: Manifest | None
    chunks: list[CommitRecord]
    num_tokens: int


def _open_group(location: Location) -> zarr.Group | None:
    try:
        return open_group(location)
    except (FileNotFoundError, KeyError):
        return None


def _open_part(location: Location, group: zarr.Group | None, listed_tokens: int | None) -> StorePart:
    """A part and its committed chunks. ``listed_tokens``: the rows the top manifest of a complete
    multi-process store lists for it (None: a single-process store, or one not complete)."""
    part = StorePart(location, None, None, [], 0)
    if group is not None:
        manifest = manifest_of(group)
        chunks = committed_prefix(read_commit_records(group.store, str(location), manifest))
        part = StorePart(location, group, manifest, chunks, sum(record.token_count for record in chunks))
        if manifest.status == layout.STATUS_COMPLETE:
            _check_complete(part, manifest.committed_tokens)
    if listed_tokens is not None:
        _check_complete(part, listed_tokens)
    return part


def _check_complete(part: StorePart, committed_tokens: int) -> None:
    """A complete store's commit records cover exactly the rows its manifest says (else StoreCorruptError)."""
    if part.num_tokens != committed_tokens:
        record = f"{part.location}/{layout.commit_record_key(len(part.chunks))}"
        problem = (f"{part.location} is complete and its manifest says {committed_tokens} committed tokens, "
                   f"but its gap-free commit records cover {part.num_tokens}: commit record {record} is "
                   "missing or does not follow the one before it")
        raise StoreCorruptError(f"{problem}. Reading on would silently shorten the store. The fix: "
                                f"{DAMAGE_FIX}", (problem,))


def _open_parts(location: Location, group: zarr.Group, manifest: Manifest) -> list[StorePart]:
    """The parts of a store: one, or a multi-process store's in rank order."""
    if manifest.parts is None:
        return [_open_part(location, group, None)]
    complete = manifest.status == layout.STATUS_COMPLETE
    places = [(_part_location(location, rank, entry), entry) for rank, entry in enumerate(manifest.parts)]
    return [_open_part(place, _open_group(place), entry.get("committed_tokens") if complete else None)
            for place, entry in places]


def _part_location(location: Location, rank: int, entry) -> Location:
    """Where part ``rank`` is: only ever ``layout.part_path(rank)`` inside the store. A manifest naming
    another path (``../victim.zarr``) or a part folder that is a symbolic link would make the store read
    another one: StoreFormatError."""
    path = layout.part_path(rank)
    if not isinstance(entry, dict) or entry.get("path") != path:
        found = entry.get("path") if isinstance(entry, dict) else entry
        raise StoreFormatError(f"{location}/zarr.json: the manifest lists part {rank} at {found!r}; expected "
                               f"{path!r} (a store reads only inside its own folder). The fix: restore this "
                               "zarr.json from a copy")
    root = location.local
    if root is not None:
        try:
            os.close(open_below(root, path))
        except FileNotFoundError:  # that rank never created its part
            pass
    return location.child(path)


class CaptureStore:
    """A capture store opened for reading; a multi-process store's parts read as one, in rank order.

    Args:
        path: local folder or URL (``s3://bucket/prefix``).
        storage_options: fsspec options of a URL (default: the usual environment variables).
        verify: verify every committed chunk now (``check(checksums=True)``: reads the whole store) and raise
            StoreCorruptError listing every bad one.

    Attributes:
        location: where the store is; path: its local folder (Path) or URL (str).
        manifest: the Manifest (group attribute ``manifest``; a multi-process store's top manifest).
        parts: StorePart per process (one for a single-process store).
        chunks: commit records of the committed chunks, in order (part after part).
        num_tokens: committed rows (the same for every array).

    Raises (constructing):
        StoreFormatError: not a capture store, or its metadata (a zarr.json, the manifest, a commit record) is
            damaged; the message names the file and what was expected.
        StoreCorruptError: a complete store's commit records do not cover its committed rows, an array's
            metadata disagrees with the manifest and records (or a record leaves an array out), or
            (``verify``) a committed chunk is missing, of the wrong size, not a file, or fails its checksum.

    Thread safety: read-only; safe from several threads. Re-open to see chunks committed later.
    """

    def __init__(self, path: str | os.PathLike | Location, storage_options: dict | None = None,
                 verify: bool = False):
        self.location = Location.of(path, storage_options)
        self.path = self.location.local or self.location.url
        self.group = _open_group(self.location)
        if self.group is None:
            raise StoreFormatError(f"no capture store at {self.location}")
        self.manifest = manifest_of(self.group)
        self.parts = _open_parts(self.location, self.group, self.manifest)
        self.chunks = [record for part in self.parts for record in part.chunks]
        self.num_tokens = sum(part.num_tokens for part in self.parts)
        listed = layout.stored_arrays(self.manifest)
        self._arrays = [existing_arrays(part.group, listed) if part.group is not None else {}
                        for part in self.parts]
        problems = [problem for part, arrays in zip(self.parts, self._arrays) if part.manifest is not None
                    for problem in metadata_problems(arrays, part.chunks, part.manifest, part.num_tokens,
                                                     str(part.location))]
        if problems:
            raise metadata_error(problems)
        if verify:
            self._verify()

    @property
    def status(self) -> str:
        return self.manifest.status

    def keys(self) -> list[str]:
        """Array paths: activation arrays first (as captured; an 8-bit one once its scale array exists, which
        a capture creates first), an 8-bit store's ``scales/*``, then ``tokens/*``."""
        existing = {key for arrays in self._arrays for key in arrays}
        encoded = encoding_of(self.manifest.dtype) is not None
        return [key for key in layout.stored_arrays(self.manifest) if key in existing and not
                (encoded and key in self.manifest.arrays and scale_key(key) not in existing)]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> CommittedArray | DecodedArray:
        """An array's committed rows; an 8-bit store's activation arrays decoded to float32 (``DecodedArray``:
        its ``codes`` and ``scales`` are the stored arrays)."""
        if key not in self.keys():
            raise KeyError(f"{key!r} is not in this store: it has {', '.join(self.keys())}")
        encoding = encoding_of(self.manifest.dtype)
        if encoding is not None and key in self.manifest.arrays:
            return DecodedArray(self._committed(key), self._committed(scale_key(key)), encoding)
        return self._committed(key)

    def _committed(self, key: str) -> CommittedArray:
        pieces = [(arrays[key], part.chunks) for part, arrays in zip(self.parts, self._arrays)
                  if key in arrays]
        return CommittedArray([piece for piece in pieces if piece[1]] or pieces[:1])

    def check(self, checksums: bool = False) -> list[str]:
        """Check every committed chunk of every array against its commit record: its stored size (one stat or
        HEAD each), and with ``checksums`` the CRC32C of its rows (reads the whole store).

        Returns: one line per bad chunk (array, chunk, file, what is wrong); empty when all are good.
        """
        problems = []
        for part, arrays in zip(self.parts, self._arrays):
            for array in arrays.values():
                problems += _array_problems(array, part.chunks, checksums)
        return problems

    @property
    def unverifiable_chunks(self) -> int:
        """Committed chunks without checksums (written in format version 1): only sizes can be checked."""
        return sum(not record.files for record in self.chunks)

    def _verify(self) -> None:
        problems = self.check(checksums=True)
        if problems:
            raise corrupt_error(problems)
        if self.unverifiable_chunks:
            warnings.warn(f"{self.unverifiable_chunks} committed chunks of {self.location} were written in "
                          "format version 1, without checksums: only their sizes were checked",
                          RuntimeWarning, stacklevel=3)


def _array_problems(array: zarr.Array, records: list[CommitRecord], checksums: bool) -> list[str]:
    buffer = None
    problems = []
    for record in records:
        file = record.files.get(array.path)
        problem = size_problem(array, record.chunk_index, file)
        if problem is None and checksums:
            if buffer is None:  # once a chunk's stored size agreed: sizes that were lies allocate nothing
                rows = max(each.token_count for each in records)
                buffer = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
            problem = chunk_problem(array, record.chunk_index, file, buffer[:record.token_count], verify=True)
        if problem is not None:
            problems.append(describe(array, record.chunk_index, problem))
    return problems


def open_store(path: str | os.PathLike | Location, storage_options: dict | None = None,
               verify: bool = False) -> CaptureStore:
    """Open a capture store read-only (local folder or URL): a view of its committed chunks.

    Args:
        verify: verify every committed chunk now (sizes and CRC32C: reads the whole store) and raise
            StoreCorruptError listing every bad one. Without it, each chunk's size is still checked when it is
            read.
    """
    return CaptureStore(path, storage_options, verify)
