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

from engine.format import layout
from engine.format.chunks import chunk_problem, describe
from engine.format.encoding import encoding_of
from engine.format.layout import CommitRecord, Manifest
from engine.format.statistics import ChunkMoments, Statistics, chunk_summary, decodable


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
    """The last sequence end that leaves no sequence open within the committed prefix, from its flags (no
    verification: ``inspect`` shows it; a resume uses ``scan_committed``)."""
    committed = prefix[-1].row_stop if prefix else 0
    if manifest.status == layout.STATUS_COMPLETE and committed == manifest.committed_tokens:
        return ResumePoint(committed, manifest.sequences, committed)
    flags, open_sequences, last_end = group["tokens/flags"], 0, None
    for number, record in enumerate(prefix):
        ends, open_sequences = closing_ends(flags[record.row_start:record.row_stop], open_sequences)
        if ends.size:
            last_end = (number, record.row_start + int(ends[-1]))
    if last_end is None:
        return ResumePoint(0, 0, committed)
    number, row = last_end
    highest = max([int(group["tokens/sequence"][prefix[number].row_start:row + 1].max()),
                   *(record.last_sequence for record in prefix[:number])])
    return ResumePoint(row + 1, highest + 1, committed)


@dataclasses.dataclass
class _Scan:
    """What the scan has learnt so far. ``pending``: moments of chunks not yet known to be whole and kept
    (those from the chunk holding the last sequence end on; at most the chunks one sequence spans)."""

    statistics: Statistics
    chunk_tokens: int
    outlier_ratio: float | None
    last_end: tuple[int, int] | None = None   # (row, highest sequence up to it) of the last closing end read
    open_sequences: int = 0                   # sequences begun and not ended after the rows read
    highest_sequence: int = -1
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


def scan_committed(arrays: dict[str, zarr.Array], prefix: list[CommitRecord],
                   manifest: Manifest) -> ResumePoint:
    """Read every chunk of the committed prefix once, in order: verify it (size and CRC32C of every array in
    ``arrays``: the activation arrays and the capture's own token arrays), stop at the first damaged one, and
    return the resume point within the intact chunks with the statistics of the whole chunks before it."""
    activations = {key: array for key, array in arrays.items() if key in manifest.arrays}
    widths = {key: array.shape[1] for key, array in activations.items()}
    scan = _Scan(Statistics(widths), manifest.chunk_tokens, manifest.outlier_norm_ratio)
    buffers = {key: np.empty((manifest.chunk_tokens, *array.shape[1:]), dtype=array.dtype)
               for key, array in arrays.items()}
    damaged: list[str] = []
    for record in prefix:
        rows = _read_verified(arrays, buffers, record, damaged)
        if rows is None:
            break
        _measure(scan, record, rows, activations, manifest.dtype)
    point = _point(scan, manifest, intact=not damaged and scan.committed == manifest.committed_tokens)
    scan.keep_whole_chunks_before(point.rows)
    return dataclasses.replace(point, statistics=scan.statistics.to_json(), damaged=tuple(damaged),
                               kept_errors=_kept_errors(prefix, point.rows, manifest))


def _kept_errors(prefix: list[CommitRecord], rows: int, manifest: Manifest) -> dict | None:
    """The error sums of the cut chunk's kept rows, when its record covered exactly those rows."""
    if encoding_of(manifest.dtype) is None or rows % manifest.chunk_tokens == 0:  # no chunk is cut
        return None
    cut = next((record for record in prefix if record.row_start < rows == record.row_stop), None)
    if cut is None:  # the cut falls inside a record's rows: the kept rows' own errors are not known
        return None
    return {key: (stats.squared_error or 0.0, stats.squared_norm or 0.0) for key, stats in cut.stats.items()}


def _read_verified(arrays: dict[str, zarr.Array], buffers: dict[str, np.ndarray], record: CommitRecord,
                   damaged: list[str]) -> dict[str, np.ndarray] | None:
    """One chunk's committed rows of every array, or None (and ``damaged`` says why) when it is not intact."""
    rows = {}
    for key, array in arrays.items():
        out = buffers[key][:record.token_count]
        problem = chunk_problem(array, record.chunk_index, record.files.get(key), out, verify=True)
        if problem is not None:
            damaged.append(describe(array, record.chunk_index, problem))
            return None
        rows[key] = out
    return rows


def _measure(scan: _Scan, record: CommitRecord, rows: dict[str, np.ndarray],
             activations: dict[str, zarr.Array], dtype: str) -> None:
    """Note an intact chunk's last closing sequence end and its moments; merge the chunks now known to be
    kept."""
    flags = rows["tokens/flags"]
    ends, scan.open_sequences = closing_ends(flags, scan.open_sequences)
    highest = np.maximum.accumulate(rows["tokens/sequence"])
    if ends.size:
        scan.last_end = (record.row_start + int(ends[-1]), max(scan.highest_sequence, int(highest[ends[-1]])))
    if highest.size:
        scan.highest_sequence = max(scan.highest_sequence, int(highest[-1]))
    scan.committed = record.row_stop
    summaries = {key: chunk_summary(decodable(rows, key, dtype), dtype, flags,
                                    outlier_ratio=scan.outlier_ratio)[:2]
                 for key in activations}
    scan.pending.append((record.chunk_index, summaries))
    if scan.last_end is not None:
        scan.keep_whole_chunks_before(scan.last_end[0] + 1)


def _point(scan: _Scan, manifest: Manifest, intact: bool) -> ResumePoint:
    """A complete store whose every chunk is intact continues after its last row; any other after its last
    sequence end."""
    if intact and manifest.status == layout.STATUS_COMPLETE:
        return ResumePoint(scan.committed, manifest.sequences, scan.committed)
    if scan.last_end is None:
        return ResumePoint(0, 0, scan.committed)
    row, sequence = scan.last_end
    return ResumePoint(row + 1, sequence + 1, scan.committed)
