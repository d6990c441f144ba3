"""A store's report: the numbers behind its pictures, read chunk by chunk, and the files that show them.

``python -m engine report STORE`` (``write_report``) writes, per activation array, three pictures: the L2 norm
of its rows by position in the sequence, a histogram of the norms with the outlier rule's threshold marked,
and the mean norm over the run (drift); and for the capture itself, tokens/s and stall seconds over time,
from the commit records. Each picture is a PNG beside a CSV of exactly the numbers it draws; ``index.html``
shows them all with the manifest's summary, which ``report.json`` holds too.

Reading: committed chunks only, one chunk of one array in memory at a time (``sample`` reads fewer, evenly
spaced over the run). Norms are computed as the writer's statistics compute them (float32 blocks of at most
``statistics.BLOCK_BYTES``). What is kept per array is a histogram of the norms at each position (40 bins per
decade from 1e-4 to 1e8), sums and maxima: its size depends on the sequence length, never on the number of
rows, so a store larger than memory is read in bounded memory. Quantiles (p99, the median) come from those
histograms: within one bin (a factor 10 ** (1 / 40), 6%) of the exact ones.

Rows are counted in three kinds, since the rows a trainer reads are not all the rows a store holds:
``read`` (what ``ActivationDataset`` serves by default), ``sink`` (flagged bos or first: attention sinks)
and ``outlier`` (flagged outlier by the writer; any other row left out by default would count here too).
Rows holding a non-finite value have no norm: they are counted apart.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.format.layout import EXCLUDED_BY_DEFAULT, FLAG_BITS, CommitRecord
from engine.format.statistics import BLOCK_BYTES, SINK_FLAGS, as_float32_with_range, row_squared_norms
from engine.read.reader import CaptureStore, open_store
from engine.report import plots

BINS_PER_DECADE = 40
LOG10_LOW, LOG10_HIGH = -4, 8
_BINS = (LOG10_HIGH - LOG10_LOW) * BINS_PER_DECADE
# Norm bins: 0 holds norms below 1e-4 (zero too), i in 1.._BINS holds [NORM_EDGES[i-1], NORM_EDGES[i]),
# _BINS + 1 holds 1e8 and above
NORM_EDGES = 10.0 ** np.linspace(LOG10_LOW, LOG10_HIGH, _BINS + 1)
EXACT_POSITIONS = 128         # positions that keep a bucket each however long the sequences (sinks sit there)
MAX_POSITION_BUCKETS = 1024   # beyond, positions share equal-width buckets: the accumulators stay small
MIN_DRIFT_POINTS = 32         # a store of fewer chunks has its chunks cut finer in the drift picture
# tokens/s is averaged over RATE_WINDOW commits (more in a long run: TIMELINE_POINTS windows in all), since
# chunks that fill while others are written commit close together: one interval would swing the rate
RATE_WINDOW, TIMELINE_POINTS = 4, 60
KINDS = ("read", "sink", "outlier")
READ, SINK, OUTLIER = range(len(KINDS))
_EXCLUDED = sum(FLAG_BITS[name] for name in EXCLUDED_BY_DEFAULT)


def row_norms(rows: np.ndarray, dtype: str) -> np.ndarray:
    """L2 norm of each stored row, as float64 (inf or nan for a row holding a non-finite value), computed in
    float32 blocks of at most BLOCK_BYTES as the writer's statistics compute them.

    Args:
        rows: (n, dim) rows as the store reads them (bfloat16 as its uint16 bits; an 8-bit store's decoded).
        dtype: the store's storage dtype name (``manifest.dtype``).
    """
    out = np.empty(len(rows))
    step = max(1, BLOCK_BYTES // (4 * max(rows.shape[1], 1)))
    buffer = np.empty((min(step, len(rows)), rows.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), step):
        stored = rows[start:start + step]
        block, _, _ = as_float32_with_range(stored, dtype, buffer[:len(stored)])
        out[start:start + len(stored)] = np.sqrt(row_squared_norms(block))
    return out


def row_kinds(flags: np.ndarray) -> np.ndarray:
    """Each row's kind (READ, SINK or OUTLIER) from its ``tokens/flags``; a sink flagged outlier is a sink."""
    kinds = np.full(flags.shape, READ, dtype=np.intp)
    kinds[(flags & _EXCLUDED) != 0] = OUTLIER
    kinds[(flags & SINK_FLAGS) != 0] = SINK
    return kinds


def norm_bins(norms: np.ndarray) -> np.ndarray:
    """The histogram bin of each (finite) norm: see NORM_EDGES."""
    scaled = np.floor((np.log10(np.maximum(norms, 1e-300)) - LOG10_LOW) * BINS_PER_DECADE)
    return (np.clip(scaled, -1, _BINS) + 1).astype(np.intp)


def histogram_quantile(counts: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of the norms counted in ``counts`` (bins as NORM_EDGES, on the last axis): the bin
    of the inverted-CDF quantile (``numpy.quantile(..., method="inverted_cdf")``: the ceil(q * n)-th smallest
    norm), interpolated in log space as if its norms were evenly spread there. NaN where nothing was counted.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    rank = np.maximum(np.ceil(q * total), 1)
    cumulative = np.cumsum(counts, axis=-1)
    index = np.argmax(cumulative >= rank, axis=-1)[..., None]
    inside = np.take_along_axis(counts, index, -1)
    before = np.take_along_axis(cumulative, index, -1) - inside
    fraction = (rank - before - 0.5) / np.maximum(inside, 1)
    log_norm = LOG10_LOW + (np.clip(index - 1 + fraction, 0, _BINS)) / BINS_PER_DECADE
    return np.where(total > 0, 10.0 ** log_norm, np.nan)[..., 0]


def position_edges(max_len: int) -> np.ndarray:
    """Bucket edges over positions [0, max_len): one bucket per position up to MAX_POSITION_BUCKETS of them;
    for longer sequences the first EXACT_POSITIONS keep one each and the rest share equal-width buckets."""
    if max_len <= MAX_POSITION_BUCKETS:
        return np.arange(max_len + 1)
    width = -(-(max_len - EXACT_POSITIONS) // (MAX_POSITION_BUCKETS - EXACT_POSITIONS))
    return np.concatenate([np.arange(EXACT_POSITIONS), np.arange(EXACT_POSITIONS, max_len + width, width)])


class PointNorms:
    """What the report keeps of one activation array's norms: per kind of row and position bucket, a
    histogram, the sum and the largest norm; per block of rows in capture order, the drift figures.

    Args:
        edges: position bucket edges (``position_edges``).

    Thread safety: none; one reader adds chunks in turn.
    """

    def __init__(self, edges: np.ndarray):
        self.edges = edges
        buckets = len(edges) - 1
        self.histogram = np.zeros((len(KINDS), buckets, _BINS + 2), dtype=np.int64)
        self.norm_sum = np.zeros((len(KINDS), buckets))
        self.norm_max = np.zeros((len(KINDS), buckets))
        self.nonfinite_rows = 0
        self.drift: list[tuple[int, int, int, float, float, int, float]] = []

    def add(self, norms: np.ndarray, kinds: np.ndarray, positions: np.ndarray, first_row: int,
            blocks: int) -> None:
        """Count one chunk's rows: their norms, kinds and positions; the chunk's first row in the store, and
        in how many blocks its rows enter the drift figures."""
        finite = np.isfinite(norms)
        self.nonfinite_rows += int(finite.size - np.count_nonzero(finite))
        buckets = np.searchsorted(self.edges, positions, side="right") - 1
        cell = (kinds * self.histogram.shape[1] + buckets)[finite]
        good = norms[finite]
        self.histogram.reshape(-1)[:] += np.bincount(cell * (_BINS + 2) + norm_bins(good),
                                                     minlength=self.histogram.size)
        self.norm_sum.reshape(-1)[:] += np.bincount(cell, weights=good, minlength=self.norm_sum.size)
        np.maximum.at(self.norm_max.reshape(-1), cell, good)
        for block in np.array_split(np.arange(len(norms)), blocks):
            if block.size:
                self.drift.append(_drift_entry(norms[block], kinds[block], first_row + int(block[0])))

    def by_position(self) -> dict[str, np.ndarray]:
        """The norm-by-position table: a row per position bucket that holds rows."""
        counts = self.histogram.sum(axis=-1)
        every = counts.sum(axis=0)
        held = every > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            table = {
                "position_start": self.edges[:-1], "position_stop": self.edges[1:], "rows": every,
                "rows_read": counts[READ], "rows_sink": counts[SINK], "rows_outlier": counts[OUTLIER],
                "mean_norm": self.norm_sum.sum(axis=0) / every,
                "p99_norm": _p99(self.histogram.sum(axis=0), self.norm_max.max(axis=0)),
                "max_norm": self.norm_max.max(axis=0),
                "mean_norm_read": self.norm_sum[READ] / counts[READ],
                "p99_norm_read": _p99(self.histogram[READ], self.norm_max[READ]),
                "max_norm_outlier": np.where(counts[OUTLIER] > 0, self.norm_max[OUTLIER], np.nan),
            }
        return {name: column[held] for name, column in table.items()}

    def histogram_table(self) -> dict[str, np.ndarray]:
        """Rows per norm bin and kind, over the bins from the first to the last that holds any."""
        counts = self.histogram.sum(axis=1)  # (kind, bin)
        held = np.flatnonzero(counts.sum(axis=0))
        bins = np.arange(held[0], held[-1] + 1) if held.size else np.arange(0)
        low = np.concatenate([[0.0], NORM_EDGES])[bins]
        high = np.concatenate([NORM_EDGES, [np.inf]])[bins]
        return {"norm_low": low, "norm_high": high, **{f"rows_{kind}": counts[i, bins]
                                                      for i, kind in enumerate(KINDS)}}

    def drift_table(self) -> dict[str, np.ndarray]:
        names = ("row_start", "row_stop", "rows", "mean_norm", "max_norm", "rows_read", "mean_norm_read")
        columns = list(zip(*self.drift)) if self.drift else [()] * len(names)
        return {name: np.array(column, dtype=np.float64 if "norm" in name else np.int64)
                for name, column in zip(names, columns)}

    def median_norm(self) -> float:
        """Median norm of the rows the writer's outlier rule measures against: finite rows that are not
        sinks (the flagged outliers among them)."""
        return float(histogram_quantile(self.histogram[[READ, OUTLIER]].sum(axis=(0, 1)), 0.5))


def _p99(counts: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """The histograms' p99, never above the largest norm (an estimate inside the largest norm's bin can pass
    it; NaN where nothing was counted)."""
    return np.minimum(histogram_quantile(counts, 0.99), largest)


def _drift_entry(norms: np.ndarray, kinds: np.ndarray, first_row: int) -> tuple:
    """(row_start, row_stop, finite rows, their mean norm, the largest, rows read, their mean norm)."""
    finite = np.isfinite(norms)
    read = finite & (kinds == READ)
    good = norms[finite]
    return (first_row, first_row + len(norms), int(finite.sum()),
            float(good.mean()) if good.size else math.nan, float(good.max()) if good.size else math.nan,
            int(read.sum()), float(norms[read].mean()) if read.any() else math.nan)


@dataclasses.dataclass(frozen=True)
class ChunkPlace:
    """A committed chunk and its rows in the whole store (a multi-process store's parts in rank order)."""

    start: int
    stop: int
    record: CommitRecord


def committed_chunks(store: CaptureStore) -> list[ChunkPlace]:
    """Every committed chunk of the store with its rows in the store, in row order."""
    places, offset = [], 0
    for part in store.parts:
        places += [ChunkPlace(offset + record.row_start, offset + record.row_stop, record)
                   for record in part.chunks]
        offset += part.num_tokens
    return places


def sampled(count: int, sample: int | None) -> list[int]:
    """Indices of the chunks to read: all of them, or at most ``sample`` evenly spaced over the run (the first
    and the last included)."""
    if sample is None or sample >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(sample - 1, 1)) for i in range(sample)})


def activation_keys(store: CaptureStore) -> list[str]:
    """The store's activation arrays, as captured."""
    return [key for key in store.keys() if key in store.manifest.arrays]


def scan(store: CaptureStore, chunks: list[ChunkPlace], keys: list[str]) -> dict[str, PointNorms]:
    """Read ``chunks`` one at a time (its flags and positions, then each array in turn) into a PointNorms per
    array of ``keys``."""
    edges = position_edges(max(place.record.max_seq_len for place in chunks))
    points = {key: PointNorms(edges) for key in keys}
    blocks = max(1, -(-MIN_DRIFT_POINTS // len(chunks)))
    arrays = {key: store[key] for key in (*keys, "tokens/flags", "tokens/position")}
    for place in chunks:
        rows = slice(place.start, place.stop)
        kinds, positions = row_kinds(arrays["tokens/flags"][rows]), arrays["tokens/position"][rows]
        for key in keys:
            norms = row_norms(arrays[key][rows], store.manifest.dtype)
            points[key].add(norms, kinds, positions, place.start, blocks)
    return points


def _run_starts(store: CaptureStore) -> list[float]:
    """When each run that wrote the store began, as epoch seconds: the first when it took the store's lock
    (its ``writers`` entry, to the second), each later one at its resume (``resumes``, to the microsecond:
    a resume can follow the run before within a second)."""
    manifests = [store.manifest, *(part.manifest for part in store.parts if part.manifest is not None)]
    firsts = [_epoch(manifest.writers[0].get("since")) for manifest in manifests if manifest.writers]
    resumes = [_epoch(entry.get("at")) for manifest in manifests for entry in manifest.resumes]
    first = min((t for t in firsts if t is not None), default=None)
    return sorted({t for t in (first, *resumes) if t is not None})


def _epoch(text) -> float | None:
    """Epoch seconds of an ISO time; None for a missing or unreadable one (that run starts at its first
    commit)."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def capture_timeline(store: CaptureStore, places: list[ChunkPlace]) -> dict[str, np.ndarray]:
    """The capture's picture's table, a row per committed chunk in commit order: when it committed (epoch
    seconds, and seconds since the first run began), its tokens, the tokens/s committed up to it
    (``_commit_rates``), the seconds its forwards waited for a free slot (NaN where the record does not say),
    its run (0, then one more per resume) and when that run began."""
    records = sorted((place.record for place in places), key=lambda record: record.committed_at)
    times = np.array([record.committed_at for record in records])
    starts = np.array(_run_starts(store) or [times[0]])
    run = np.maximum(np.searchsorted(starts, times, side="right") - 1, 0)
    run_start = np.minimum(starts[run], times)
    origin = min(starts[0], times[0])
    tokens = np.array([record.token_count for record in records])
    rate = _commit_rates(times, tokens, run, run_start, max(RATE_WINDOW, len(records) // TIMELINE_POINTS))
    stall = [math.nan if record.stall_seconds is None else record.stall_seconds for record in records]
    return {"chunk": np.array([record.chunk_index for record in records]), "committed_at": times,
            "seconds": times - origin, "tokens": tokens, "tokens_per_s": rate,
            "stall_seconds": np.array(stall, dtype=np.float64), "run": run,
            "run_start_seconds": run_start - origin}


def _commit_rates(times: np.ndarray, tokens: np.ndarray, run: np.ndarray, run_start: np.ndarray,
                  window: int) -> np.ndarray:
    """Tokens/s committed up to each commit: its tokens and those of the ``window`` - 1 commits before it,
    over the time since the commit before those, counting only commits of its own run (a resume's first
    commits count from the resume, not across the pause before it). NaN where no time passed."""
    rate = np.full(len(times), np.nan)
    for i in range(len(times)):
        first = max(i - window + 1, 0)
        first += int(np.count_nonzero(run[first:i + 1] != run[i]))
        begin = times[first - 1] if first > 0 and run[first - 1] == run[i] else run_start[i]
        if times[i] > begin:
            rate[i] = tokens[first:i + 1].sum() / (times[i] - begin)
    return rate


def write_csv(path: Path, table: dict[str, np.ndarray]) -> Path:
    """A table (column name -> numpy array) as CSV: a header of column names, floats at full precision (their
    repr), NaN as an empty field.

    Returns: ``path``.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(table)
        for row in zip(*table.values()):
            out.writerow([_cell(value.item()) for value in row])
    return Path(path)


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _slug(key: str) -> str:
    return key.replace("/", ".")


@dataclasses.dataclass
class Report:
    """What ``write_report`` wrote.

    Attributes:
        folder: where.
        page: the HTML page (``index.html``).
        files: every file written (pictures, their CSV files, ``report.json``, the page).
        summary: the content of ``report.json``.
    """

    folder: Path
    page: Path
    files: list[Path]
    summary: dict

    def describe(self) -> list[str]:
        """What the command prints: chunks read, per array what stood out, where the page is."""
        s = self.summary
        lines = [f"{s['chunks_read']} of {s['committed_chunks']} committed chunks read "
                 f"({s['committed_tokens']:,} rows in the store)"]
        for key, entry in s["arrays"].items():
            lines.append(f"{key}: median norm {_fmt(entry['median_norm'])}, {entry['rows_sink']:,} sinks, "
                         f"{entry['rows_outlier']:,} rows flagged outlier, {entry['nonfinite_rows']:,} "
                         "non-finite")
        return [*lines, f"{len(self.files)} files -> {self.page}"]


def write_report(path: str | os.PathLike, out: str | os.PathLike, sample: int | None = None,
                 storage_options: dict | None = None) -> Report:
    """Write a store's report into the folder ``out`` (created; files of an earlier report are replaced).

    Args:
        path: the store (local folder or URL).
        out: the report's folder.
        sample: read at most this many committed chunks, evenly spaced over the run (default: all of them).
            The capture's timeline always covers every commit record.
        storage_options: fsspec options of a URL.

    Returns: a Report.

    Raises:
        ConfigError: matplotlib is missing (checked before anything is read), ``sample`` is below 1, or the
            store has no committed chunk yet.
        StoreFormatError, StoreCorruptError: as ``open_store`` and its reads raise them.

    Thread safety: reads the store (a capture may be writing it: only its committed chunks are read); writes
    only into ``out``, so two reports of one store need two folders.
    """
    plots.load_pyplot()  # a missing extra fails before any work
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample {sample}: read at least one chunk")
    store = open_store(path, storage_options)
    places = committed_chunks(store)
    if not places:
        raise ConfigError(f"{store.location} has no committed chunk yet: nothing to draw (a capture commits "
                          f"its first chunk after {store.manifest.chunk_tokens:,} rows)")
    chosen = [places[i] for i in sampled(len(places), sample)]
    keys = activation_keys(store)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    summary = _summary(store, len(chosen), len(places))
    files, sections = [], []
    for key, norms in scan(store, chosen, keys).items():
        entry, figures = _draw_point(store, key, norms, folder)
        summary["arrays"][key].update(entry)
        files += [file for pair in figures for file in pair]
        sections.append((key, figures))
    timeline = capture_timeline(store, places)
    figure = (plots.capture_timeline(timeline, f"{_name(store)}: the capture", folder / "capture.png"),
              write_csv(folder / "capture.csv", timeline))
    files += figure
    summary["capture"] = _capture_summary(timeline)
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=_json_number))
    page = folder / "index.html"
    page.write_text(_page(summary, sections, figure), encoding="utf-8")
    return Report(folder, page, [*files, folder / "report.json", page], summary)


def _name(store: CaptureStore) -> str:
    return store.location.local.name if store.location.local is not None else str(store.location)


def _draw_point(store: CaptureStore, key: str, norms: PointNorms, folder: Path) -> tuple[dict, list]:
    """One array's three pictures and their CSV files; returns its report.json entry and the (png, csv)
    pairs."""
    ratio = store.manifest.outlier_norm_ratio or _part_ratio(store)
    median = norms.median_norm()
    threshold = ratio * median if ratio is not None and math.isfinite(median) else None
    rule = (f"outlier rule: {ratio:g} x median norm {median:,.4g} = {threshold:,.4g} (applied per block of "
            "rows, against its median)" if threshold is not None else
            "no outlier rule was applied to this store (its manifest has no outlier_norm_ratio)")
    stem, title = folder / _slug(key), f"{_name(store)}: {key}"
    tables = {"norm_by_position": norms.by_position(), "norm_histogram": norms.histogram_table(),
              "drift": norms.drift_table()}
    pictures = {
        "norm_by_position": lambda path: plots.norm_by_position(tables["norm_by_position"],
                                                                f"{title}: norm by position", path),
        "norm_histogram": lambda path: plots.norm_histogram(tables["norm_histogram"], f"{title}: row norms",
                                                            threshold, rule, path),
        "drift": lambda path: plots.drift(tables["drift"], f"{title}: mean norm over the run", path),
    }
    figures = [(draw(Path(f"{stem}.{name}.png")), write_csv(Path(f"{stem}.{name}.csv"), tables[name]))
               for name, draw in pictures.items()]
    counts = tables["norm_histogram"]
    entry = {"median_norm": median if math.isfinite(median) else None,  # JSON has no NaN
             "outlier_norm_ratio": ratio, "outlier_threshold": threshold,
             "rows_read": int(counts["rows_read"].sum()), "rows_sink": int(counts["rows_sink"].sum()),
             "rows_outlier": int(counts["rows_outlier"].sum()), "nonfinite_rows": norms.nonfinite_rows,
             "files": [path.name for pair in figures for path in pair]}
    return entry, figures


def _part_ratio(store: CaptureStore) -> float | None:
    """A multi-process store's rule is in its parts' manifests."""
    ratios = [part.manifest.outlier_norm_ratio for part in store.parts if part.manifest is not None]
    return next((ratio for ratio in ratios if ratio is not None), None)


def _json_number(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _summary(store: CaptureStore, read: int, chunks: int) -> dict:
    """The manifest's summary for report.json and the page (NaN-free: JSON has no NaN)."""
    m = store.manifest
    stats = m.statistics or {}
    arrays = {key: {name: stats.get(key, {}).get(name) for name in (
        "count", "mean_norm", "max_norm", "norm_scaling_factor", "sink_rows", "outlier_rows", "nonfinite")}
        for key in activation_keys(store)}
    return {"store": str(store.path), "status": m.status, "format_version": m.format_version,
            "engine_version": m.engine_version, "model": m.model.get("name"),
            "architecture": m.model.get("architecture"), "tokenizer": m.tokenizer, "created": m.created,
            "closed": m.closed, "committed_tokens": store.num_tokens, "committed_chunks": chunks,
            "chunks_read": read, "chunk_tokens": m.chunk_tokens, "dtype": m.dtype, "sequences": m.sequences,
            "runs": len(m.writers) or len(m.resumes) + 1, "parts": len(store.parts), "arrays": arrays}


def _capture_summary(timeline: dict[str, np.ndarray]) -> dict:
    stall = timeline["stall_seconds"]
    rate = timeline["tokens_per_s"][np.isfinite(timeline["tokens_per_s"])]
    return {"seconds": float(timeline["seconds"][-1]), "tokens": int(timeline["tokens"].sum()),
            "median_tokens_per_s": float(np.median(rate)) if rate.size else None,
            "stall_seconds": float(np.nansum(stall)) if np.isfinite(stall).any() else None}


_STYLE = ("body{font-family:sans-serif;max-width:780px;margin:1em auto;color:#222}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;"
          "text-align:left}img{max-width:100%;display:block;margin:6px 0}p.files{font-size:12px}")


def _page(summary: dict, sections: list, capture: tuple[Path, Path]) -> str:
    """The HTML page: the summary, then each array's pictures, then the capture's; no script, no outside
    resource (it opens from the folder, offline)."""
    e = html.escape
    store_rows = [(name, summary[name]) for name in (
        "status", "format_version", "engine_version", "model", "architecture", "tokenizer", "created",
        "closed", "committed_tokens", "committed_chunks", "chunks_read", "chunk_tokens", "dtype", "sequences",
        "runs", "parts")]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(summary['store'])}: report</title>"
             f"<style>{_STYLE}</style></head><body><h1>{e(Path(summary['store']).name)}</h1>",
             _table(("field", "value"), store_rows)]
    columns = ("array", "median norm", "outlier threshold", "rows read", "sinks", "outliers", "non-finite",
               "norm_scaling_factor")
    parts.append(_table(columns, [(key, _fmt(a.get("median_norm")), _fmt(a.get("outlier_threshold")),
                                   a.get("rows_read"), a.get("rows_sink"), a.get("rows_outlier"),
                                   a.get("nonfinite_rows"), _fmt(a.get("norm_scaling_factor")))
                                  for key, a in summary["arrays"].items()]))
    for key, figures in sections:
        parts.append(f"<h2>{e(key)}</h2>" + "".join(_figure(png, data) for png, data in figures))
    parts.append("<h2>The capture</h2>" + _figure(*capture))
    return "".join(parts) + "</body></html>\n"


def _figure(png: Path, data: Path) -> str:
    name = html.escape(png.name)
    return (f"<img src='{name}' alt='{name}'><p class='files'>numbers: <a href='{html.escape(data.name)}'>"
            f"{html.escape(data.name)}</a></p>")


def _table(header: tuple, rows: list) -> str:
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(cell))}</{tag}>" for cell in row)  # noqa: E731
    return (f"<table><tr>{cells(header, 'th')}</tr>"
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows) + "</table>")


def _fmt(value) -> str:
    return "" if value is None else f"{value:,.4g}"
