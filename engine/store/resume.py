"""Where a store can be continued, and what a resume keeps.

A resume keeps the rows up to the last sequence end inside the committed prefix whose chunks are whole and
intact: the last row flagged ``last`` after which no sequence is open, i.e. where as many sequences have ended
(``last``) as have begun (``first``). Sequences are stored one after the other, except the sequences a decode
loop over a KV cache continues, whose rows interleave step by step (``engine.writer.protocol``): there the
count is what tells a sequence end that leaves nothing open. Input sequences handled are then those up to the
highest sequence number kept. ``scan_committed`` finds that point with one read of the committed chunks, which
also verifies each of them (size and CRC32C, see ``engine.format.layout``) and computes the statistics of the
whole chunks kept: the writer process starts from those, reading nothing again but the kept rows of the cut
chunk.

Torch-free (numpy and zarr).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import zarr

from engine.errors import StoreFormatError
from engine.format import layout
from engine.format.chunks import chunk_problem, describe
from engine.format.encoding import encoding_of
from engine.format.layout import CommitRecord, Manifest
from engine.format.statistics import ChunkMoments, Statistics, chunk_summary, decodable

_FLAGS = "tokens/flags"
_SEQUENCES = "tokens/sequence"


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a store can be continued exactly.

    Args:
        rows: rows kept; every sequence with a row before this one is complete.
        sequences: input sequences already fully handled: a driver feeds sequences from this index on.
        committed_rows: rows in the gap-free committed prefix of intact chunks (>= rows; the rest belong to a
            cut sequence).
        statistics: ``Statistics.to_json`` of the whole chunks kept (rows [0, rows // chunk_tokens *
            chunk_tokens)), when the point comes from ``scan_committed``; None otherwise.
        damaged: one line per committed chunk found damaged (the point lies before the first of them).
        kept_errors: an 8-bit store's cut chunk whose kept rows are exactly the rows its record covered (a
            complete store continued after its partial last chunk): that record's (squared error, squared
            norm) per activation array, which the chunk's new record adds to its own; None otherwise.
    """

    rows: int
    sequences: int
    committed_rows: int
    statistics: dict | None = None
    damaged: tuple[str, ...] = ()
    kept_errors: dict | None = None


def closing_ends(flags: np.ndarray, open_before: int) -> tuple[np.ndarray, int]:
    """The rows of a chunk's ``flags`` that end a sequence and leave none open (``open_before``: sequences
    open before its first row), and the sequences open after its last row."""
    begun = (flags & layout.FLAG_FIRST) != 0
    ended = (flags & layout.FLAG_LAST) != 0
    open_after = open_before + np.cumsum(begun, dtype=np.int64) - np.cumsum(ended, dtype=np.int64)
    return np.flatnonzero(ended & (open_after == 0)), int(open_after[-1]) if open_after.size else open_before


def find_resume_point(group: zarr.Group, prefix: list[CommitRecord], manifest: Manifest) -> ResumePoint:
    """Where a resume of this store (part) would continue, without verifying its chunks' checksums (what
    ``inspect`` shows, and what the command line checks a job against before it starts): the decision of
    ``scan_committed``, made from the ``tokens/flags`` column alone. It reads 1 byte per row; a resume's
    verified scan agrees on every store whose committed chunks are intact, and on a damaged one continues
    earlier, before the damage."""
    return scan_committed({_FLAGS: _array(group, _FLAGS)}, prefix, manifest, verify=False,
                          sequences=_array(group, _SEQUENCES))


def _array(group: zarr.Group, key: str) -> zarr.Array:
    node = group[key]
    if not isinstance(node, zarr.Array):
        raise StoreFormatError(f"{group.store_path}/{key} is a group; expected the array {key}")
    return node


@dataclasses.dataclass
class _Scan:
    """What the scan has learnt so far. ``pending``: moments of chunks not yet known to be whole and kept
    (those from the chunk holding the last sequence end on; at most the chunks one sequence spans)."""

    statistics: Statistics
    chunk_tokens: int
    outlier_ratio: float | None
    last_end: tuple[int, int] | None = None   # (row, record number in the prefix) of the last closing end
    open_sequences: int = 0                   # sequences begun and not ended after the rows read
    committed: int = 0
    pending: list[tuple[int, dict[str, tuple[layout.ChunkStats, ChunkMoments]]]] = dataclasses.field(
        default_factory=list)

    def keep_whole_chunks_before(self, rows: int) -> None:
        """Merge the pending chunks that lie wholly before row ``rows`` (in chunk order: deterministic)."""
        whole = rows // self.chunk_tokens
        while self.pending and self.pending[0][0] < whole:
            _, entries = self.pending.pop(0)
            for key, (summary, moments) in entries.items():
                self.statistics.add(key, moments, summary)


def scan_committed(arrays: dict[str, zarr.Array], prefix: list[CommitRecord], manifest: Manifest,
                   verify: bool = True, sequences: zarr.Array | None = None) -> ResumePoint:
    """Read every chunk of the committed prefix once, in order: check it (its size; with ``verify`` the
    CRC32C of every array in ``arrays``: the activation arrays and the capture's own token arrays), stop at
    the first damaged one, and return the resume point within the intact chunks with the statistics of the
    whole chunks before it (None without ``verify``).

    Args:
        arrays: at least ``tokens/flags``; the activation arrays among them get statistics.
        sequences: the ``tokens/sequence`` array (default: ``arrays``'): only the rows of the chunk holding
            the resume point are read from it; the chunks before say their highest sequence in their
            records.
    """
    activations = {key: array for key, array in arrays.items() if key in manifest.arrays}
    widths = {key: array.shape[1] for key, array in activations.items()}
    scan = _Scan(Statistics(widths), manifest.chunk_tokens, manifest.outlier_norm_ratio)
    buffers = {key: np.empty((manifest.chunk_tokens, *array.shape[1:]), dtype=array.dtype)
               for key, array in arrays.items()}
    damaged: list[str] = []
    for number, record in enumerate(prefix):
        rows = _read_checked(arrays, buffers, record, damaged, verify)
        if rows is None:
            break
        _measure(scan, number, record, rows, activations, manifest.dtype)
    intact = not damaged and scan.committed == manifest.committed_tokens
    point = _point(scan, manifest, intact, prefix, arrays[_SEQUENCES] if sequences is None else sequences)
    scan.keep_whole_chunks_before(point.rows)
    return dataclasses.replace(point, statistics=scan.statistics.to_json() if verify else None,
                               damaged=tuple(damaged), kept_errors=_kept_errors(prefix, point.rows, manifest))


def _kept_errors(prefix: list[CommitRecord], rows: int, manifest: Manifest) -> dict | None:
    """The error sums of the cut chunk's kept rows, when its record covered exactly those rows."""
    if encoding_of(manifest.dtype) is None or rows % manifest.chunk_tokens == 0:  # no chunk is cut
        return None
    cut = next((record for record in prefix if record.row_start < rows == record.row_stop), None)
    if cut is None:  # the cut falls inside a record's rows: the kept rows' own errors are not known
        return None
    return {key: (stats.squared_error or 0.0, stats.squared_norm or 0.0) for key, stats in cut.stats.items()}


def _read_checked(arrays: dict[str, zarr.Array], buffers: dict[str, np.ndarray], record: CommitRecord,
                  damaged: list[str], verify: bool) -> dict[str, np.ndarray] | None:
    """One chunk's committed rows of every array, or None (and ``damaged`` says why) when it is not intact."""
    rows = {}
    for key, array in arrays.items():
        out = buffers[key][:record.token_count]
        problem = chunk_problem(array, record.chunk_index, record.files.get(key), out, verify=verify)
        if problem is not None:
            damaged.append(describe(array, record.chunk_index, problem))
            return None
        rows[key] = out
    return rows


def _measure(scan: _Scan, number: int, record: CommitRecord, rows: dict[str, np.ndarray],
             activations: dict[str, zarr.Array], dtype: str) -> None:
    """Note an intact chunk's (the prefix's ``number``-th) last closing sequence end and its moments; merge
    the chunks now known to be kept."""
    flags = rows[_FLAGS]
    ends, scan.open_sequences = closing_ends(flags, scan.open_sequences)
    if ends.size:
        scan.last_end = (record.row_start + int(ends[-1]), number)
    scan.committed = record.row_stop
    summaries = {}
    for key in activations:
        summary, moments, _ = chunk_summary(decodable(rows, key, dtype), dtype, flags,
                                            outlier_ratio=scan.outlier_ratio)
        assert moments is not None  # chunk_summary's default: moments=True
        summaries[key] = (summary, moments)
    scan.pending.append((record.chunk_index, summaries))
    if scan.last_end is not None:
        scan.keep_whole_chunks_before(scan.last_end[0] + 1)


def _point(scan: _Scan, manifest: Manifest, intact: bool, prefix: list[CommitRecord],
           sequences: zarr.Array) -> ResumePoint:
    """A complete store whose every chunk is intact continues after its last row; any other after its last
    sequence end, with every sequence up to the highest one stored by then handled (a decode loop interleaves
    its sequences row by row, so the highest is not always the last row's)."""
    if intact and manifest.status == layout.STATUS_COMPLETE:
        return ResumePoint(scan.committed, manifest.sequences, scan.committed)
    if scan.last_end is None:
        return ResumePoint(0, 0, scan.committed)
    row, number = scan.last_end
    highest = max([int(np.asarray(sequences[prefix[number].row_start:row + 1]).max()),
                   *(record.last_sequence for record in prefix[:number])])
    return ResumePoint(row + 1, highest + 1, scan.committed)
