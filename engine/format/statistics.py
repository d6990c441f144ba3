"""Running statistics of captured arrays, computed by the writer process as each chunk commits.

Per array: count of rows used, mean vector, mean squared L2 norm (dictionary_learning's scale; SAELens-style
``norm_scaling_factor = sqrt(dim) / sqrt(mean_squared_norm)``), mean L2 norm (SAELens'
``expected_average_only_in`` scaling uses ``sqrt(dim) / mean_norm``), max norm, and the non-finite and float16
overflow counts. Each chunk's moments are summed in float32 within blocks of at most ``BLOCK_BYTES`` and in
float64 across blocks, and merged with Chan et al.'s pairwise update in float64, so the result depends on
which writer thread commits which chunk first only by float64 rounding. Statistics only ever cover committed
chunks.

Rows holding any non-finite value are counted but left out of the moments, and so are attention-sink rows
(the first token of each sequence and any BOS: flags ``first`` / ``bos``, counted in ``sink_rows``) and norm
outliers (``outlier_rows``). Outliers are what the writer flags ``outlier`` as it commits a chunk: rows
whose L2 norm exceeds ``outlier_norm_ratio`` (``CaptureConfig``, default 10) times the median norm of their
block, the chunk's rows taken in near-equal blocks of at most ``BLOCK_BYTES`` of float32 (1,820 rows at
width 576). Sinks and rows with a non-finite value are left out already: they are neither in the median nor
flagged. "Massive activations" sit there: in SmolLM2-135M's layer-15 residual (Python docs, 20k tokens) every
row lies within 2x the median norm (169) but 162 rows at 22,000-29,000 (130x): 156 first tokens and six at
position 1 ("\n" or a repeated token) that no other flag marks. Those six alone made ``mean_squared_norm``
2.1e5 instead of 2.9e4 and ``norm_scaling_factor`` 0.052 instead of 0.140. A block median, not a running
one, keeps a row's flag independent of which writer thread commits first, and the same after a resume. SAE
trainers exclude these rows, and norm scaling must match.

Torch-free (numpy): it runs in the writer process.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np

from engine.format.encoding import EncodedRows, encoding_of, scale_key
from engine.format.layout import FLAG_BOS, FLAG_FIRST, FLAG_OUTLIER, ChunkStats

SINK_FLAGS = FLAG_BOS | FLAG_FIRST
# float32 temporaries are made block by block (bounded memory); 4 MiB blocks took 11-12 ms per 50 MB of
# float16 rows against 13-14 for 1 MiB ones, with fewer numpy calls for the writer threads to take the GIL
# back after (benchmarks/results/cpu-2026-12-04c/gil.txt)
BLOCK_BYTES = 4 << 20


_HALF_SCALE = np.float32(2.0 ** 112)  # float16's exponent bias (15) to float32's (127)
_HALF_SIGN_AND_MAGNITUDE = np.uint32(0x8FFFE000).view(np.int32)  # float32 bits kept after the shift
_HALF_DECODED_LIMIT = 65536.0  # a decoded float16 inf or nan: >= 2**16; a finite one: at most 65504


def _finite_half_to_float32(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 rows into ``out`` (float32, same shape), exact for every finite value, subnormals included.
    An inf or nan comes out as a finite number of magnitude >= ``_HALF_DECODED_LIMIT``.

    numpy's own float16 cast is a scalar loop, and it was most of the writer process's CPU per batch; with
    these four in-place integer and float passes a chunk's statistics take 3.4x less time
    (benchmarks/results/cpu-2026-12-03b/chunk_statistics.txt)."""
    bits = out.view(np.int32)
    np.copyto(bits, rows.view(np.int16))  # sign-extends: the float16 sign lands in bit 31
    np.left_shift(bits, 13, out=bits)  # exponent and mantissa into float32's places
    np.bitwise_and(bits, _HALF_SIGN_AND_MAGNITUDE, out=bits)  # drop the sign extension's copies
    np.multiply(out, _HALF_SCALE, out=out)  # rebias the exponent (subnormals become normal)
    return out


_SMALLEST_HALF = np.array([1], dtype=np.uint16).view(np.float16)


def _subnormals_survive() -> bool:
    """False when this thread treats float32 subnormals as zero (denormals-are-zero, set for example by
    ``torch.set_flush_denormal(True)`` or a library built with -ffast-math): the decoder's multiply would then
    turn float16 subnormals into zeros, so numpy's cast is used instead."""
    return bool(_finite_half_to_float32(_SMALLEST_HALF, np.empty(1, dtype=np.float32))[0])


def decodable(arrays: dict[str, np.ndarray], key: str, dtype: str) -> np.ndarray | EncodedRows:
    """The rows of activation array ``key`` as the statistics read them: an 8-bit store's codes go with
    their scales (``arrays`` holds the scale arrays too)."""
    encoding = encoding_of(dtype)
    return arrays[key] if encoding is None else EncodedRows(encoding, arrays[key], arrays[scale_key(key)])


def as_float32_with_range(rows: np.ndarray | EncodedRows, dtype: str,
                          out: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored rows as float32 in ``out`` (float32, the rows' shape), exactly (an 8-bit store's decoded), and
    their min and max (numpy's: nan when there is one); for float16 rows without inf or nan the min and max
    come from the passes that check for them. bfloat16 is stored as its uint16 bits: the high half of a
    float32."""
    if not out.size:
        return out, math.inf, -math.inf
    if isinstance(rows, EncodedRows):
        rows.decode(out)
    elif dtype == "bfloat16":
        bits = out.view(np.uint32)
        np.copyto(bits, rows)
        np.left_shift(bits, 16, out=bits)
    elif dtype == "float16" and _subnormals_survive():
        _finite_half_to_float32(rows, out)
        low, high = out.min(), out.max()
        if -_HALF_DECODED_LIMIT < low and high < _HALF_DECODED_LIMIT:
            return out, float(low), float(high)
        np.copyto(out, rows)  # an inf or nan among them: numpy's exact cast
    else:
        np.copyto(out, rows)
    return out, float(out.min()), float(out.max())


@dataclasses.dataclass(frozen=True)
class ChunkMoments:
    """Sums of one chunk's rows that enter the moments (sinks, outliers and non-finite rows left out)."""

    count: int
    total: np.ndarray        # float64 sum of the rows
    squared_norms: float     # sum of squared L2 norms
    norms: float             # sum of L2 norms
    max_norm: float
    sink_rows: int
    outlier_rows: int


# np.vecdot (numpy 2) is one BLAS dot per row: 0.03 CPU s per float16-GB here against einsum's 0.08-0.10
# (benchmarks/results/cpu-2026-12-07-cpu-per-byte/statistics_kernels.txt); numpy 1.26 has only einsum.
_VECDOT = getattr(np, "vecdot", None)


def row_squared_norms(block: np.ndarray) -> np.ndarray:
    """Each row's squared L2 norm of a float32 block (float32), as the writer's statistics and the report
    compute it."""
    return _VECDOT(block, block) if _VECDOT is not None else np.einsum("ij,ij->i", block, block)


def _blocks(count: int, dim: int) -> list[slice]:
    """The chunk's rows in near-equal blocks of at most BLOCK_BYTES as float32 (equal: a short last block
    would give its rows' outlier test a median of few neighbours)."""
    step = max(1, BLOCK_BYTES // (4 * max(dim, 1)))
    pieces = max(1, -(-count // step))
    bounds = [count * i // pieces for i in range(pieces + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _outliers(row_squared: np.ndarray, usable: np.ndarray, ratio: float) -> np.ndarray:
    """Rows whose L2 norm exceeds ``ratio`` times the median norm of the ``usable`` rows (compared squared:
    the median of squares is the square of the median)."""
    if not usable.any():
        return np.zeros(row_squared.shape, dtype=bool)
    reference = float(np.median(row_squared[usable]))
    return row_squared > ratio * ratio * reference


def chunk_summary(rows: np.ndarray | EncodedRows, dtype: str, flags: np.ndarray, moments: bool = True,
                  outlier_ratio: float | None = None
                  ) -> tuple[ChunkStats, ChunkMoments | None, np.ndarray | None]:
    """A chunk's commit-record stats (min/max of finite values, non-finite and float16-overflow counts),
    when ``moments`` its moments, and when ``outlier_ratio`` the rows that are norm outliers (bool per row;
    the module docstring has the rule); one pass over float32 blocks of the rows."""
    count, dim = rows.shape
    low, high, nonfinite, overflow = math.inf, -math.inf, 0, 0
    sink = (flags & SINK_FLAGS) != 0
    outliers = np.zeros(count, dtype=bool) if outlier_ratio is not None else None
    total = np.zeros(dim, dtype=np.float64)
    squared, norm_sum, max_norm, kept = 0.0, 0.0, 0.0, 0
    blocks = _blocks(count, dim)
    buffer = np.empty((max(block.stop - block.start for block in blocks), dim), dtype=np.float32)
    ones = np.ones(len(buffer), dtype=np.float32)  # column sums as one BLAS call: half sum(axis=0)'s CPU
    for rows_of_block in blocks:
        stored = rows[rows_of_block]
        block, block_low, block_high = as_float32_with_range(stored, dtype, buffer[:len(stored)])
        drop = sink[rows_of_block]
        if np.isfinite(block_low) and np.isfinite(block_high):
            low, high = min(low, block_low), max(high, block_high)
        elif block.size:
            finite = np.isfinite(block)
            nonfinite += int(block.size - np.count_nonzero(finite))
            if dtype == "float16":
                overflow += int(np.count_nonzero(np.isinf(block)))
            if finite.any():
                low, high = min(low, float(block[finite].min())), max(high, float(block[finite].max()))
            drop = drop | ~finite.all(axis=1)
        if not moments and outliers is None:
            continue
        if drop.any():
            block[drop] = 0.0
        row_squared = row_squared_norms(block)
        if outliers is not None:
            assert outlier_ratio is not None  # outliers is made only with a ratio
            flagged = outliers[rows_of_block] = _outliers(row_squared, ~drop, outlier_ratio)
            drop = drop | flagged
            if flagged.any():
                block[flagged] = 0.0
                row_squared[flagged] = 0.0
        if not moments:
            continue
        kept += int(drop.size - np.count_nonzero(drop))
        total += ones[:len(block)] @ block
        squared += float(row_squared.sum(dtype=np.float64))
        row_norms = np.sqrt(row_squared)
        norm_sum += float(row_norms.sum(dtype=np.float64))
        if row_norms.size:
            max_norm = max(max_norm, float(row_norms.max()))
    finite = count and low <= high
    summary = ChunkStats(low if finite else None, high if finite else None, nonfinite, overflow)
    if not moments:
        return summary, None, outliers
    outlier_rows = int(np.count_nonzero(outliers)) if outliers is not None else 0
    return summary, ChunkMoments(kept, total, squared, norm_sum, max_norm, int(np.count_nonzero(sink)),
                                 outlier_rows), outliers


def mark_outliers(flags: np.ndarray, outliers: np.ndarray) -> None:
    """Set the ``outlier`` bit of exactly the rows ``outliers`` says (a resumed chunk's kept rows are judged
    again with the rest of their chunk)."""
    np.bitwise_and(flags, np.uint8(0xFF ^ FLAG_OUTLIER), out=flags)
    flags[outliers] |= FLAG_OUTLIER


class RunningMoments:
    """Mergeable moments of one array. Thread safety: ``merge`` under the caller's lock (see Statistics)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.mean_squared_norm = 0.0
        self.mean_norm = 0.0
        self.max_norm = 0.0
        self.nonfinite = 0
        self.fp16_overflow = 0
        self.sink_rows = 0
        self.outlier_rows = 0

    def merge(self, count: int, mean: np.ndarray, mean_squared_norm: float, mean_norm: float,
              max_norm: float) -> None:
        if count == 0:
            return
        total = self.count + count
        weight = count / total
        self.mean += (mean - self.mean) * weight
        self.mean_squared_norm += (mean_squared_norm - self.mean_squared_norm) * weight
        self.mean_norm += (mean_norm - self.mean_norm) * weight
        self.max_norm = max(self.max_norm, max_norm)
        self.count = total

    def merge_chunk(self, moments: ChunkMoments) -> None:
        kept = max(moments.count, 1)
        self.merge(moments.count, moments.total / kept, moments.squared_norms / kept, moments.norms / kept,
                   moments.max_norm)
        self.sink_rows += moments.sink_rows
        self.outlier_rows += moments.outlier_rows

    @classmethod
    def from_json(cls, entry: dict) -> RunningMoments:
        moments = cls(len(entry["mean"]))
        moments.count, moments.mean = entry["count"], np.asarray(entry["mean"], dtype=np.float64)
        moments.mean_squared_norm, moments.max_norm = entry["mean_squared_norm"], entry["max_norm"]
        moments.mean_norm = entry.get("mean_norm", 0.0)  # absent in stores of format version 1
        moments.nonfinite, moments.fp16_overflow = entry["nonfinite"], entry["fp16_overflow"]
        moments.sink_rows = entry["sink_rows"]
        moments.outlier_rows = entry.get("outlier_rows", 0)  # absent in stores captured before the flag
        return moments

    def to_json(self) -> dict:
        dim = self.mean.shape[0]
        return {"count": self.count, "mean": self.mean.tolist(), "mean_squared_norm": self.mean_squared_norm,
                "mean_norm": self.mean_norm, "max_norm": self.max_norm, "nonfinite": self.nonfinite,
                "fp16_overflow": self.fp16_overflow, "sink_rows": self.sink_rows,
                "outlier_rows": self.outlier_rows,
                "norm_scaling_factor": (math.sqrt(dim / self.mean_squared_norm)
                                        if self.mean_squared_norm > 0 else None)}


class Statistics:
    """Moments of every activation array of a run. Thread safety: ``add`` from any writer thread."""

    def __init__(self, dims: dict[str, int]):
        self._lock = threading.Lock()
        self.arrays = {key: RunningMoments(dim) for key, dim in dims.items()}

    @classmethod
    def from_json(cls, entries: dict) -> Statistics:
        """Statistics from ``to_json``'s result (exact: float64 values survive the round trip)."""
        statistics = cls({})
        statistics.arrays = {key: RunningMoments.from_json(entry) for key, entry in entries.items()}
        return statistics

    def add(self, key: str, moments: ChunkMoments, summary: ChunkStats) -> None:
        """Merge one committed chunk's moments and counts (``chunk_summary``'s results)."""
        with self._lock:
            entry = self.arrays[key]
            entry.merge_chunk(moments)
            entry.nonfinite += summary.nonfinite
            entry.fp16_overflow += summary.fp16_overflow

    def to_json(self) -> dict:
        with self._lock:
            return {key: moments.to_json() for key, moments in self.arrays.items()}


def merge_statistics(entries: list[dict]) -> dict:
    """Manifest statistics of several parts (``Statistics.to_json`` dicts) merged into one."""
    merged: dict[str, RunningMoments] = {}
    for stats in entries:
        for key, entry in stats.items():
            part = RunningMoments.from_json(entry)
            total = merged.setdefault(key, RunningMoments(len(part.mean)))
            total.merge(part.count, part.mean, part.mean_squared_norm, part.mean_norm, part.max_norm)
            total.nonfinite += part.nonfinite
            total.fp16_overflow += part.fp16_overflow
            total.sink_rows += part.sink_rows
            total.outlier_rows += part.outlier_rows
    return {key: moments.to_json() for key, moments in merged.items()}

