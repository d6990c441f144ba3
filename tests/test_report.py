"""The report (``python -m engine report``): the numbers behind each picture against numpy over a small store
the engine captured (a tiny model whose token 7 has a massive embedding, captured in two runs), valid PNG
files, the page in a real headless browser, bounded memory, and the one-line error without matplotlib."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import CaptureConfig, CaptureEngine, open_store
from engine.cli.main import main
from engine.format.layout import EXCLUDED_BY_DEFAULT, FLAG_BITS, FLAG_BOS, FLAG_FIRST
from engine.report.document import (
    BINS_PER_DECADE,
    NORM_EDGES,
    committed_chunks,
    histogram_quantile,
    position_edges,
    sampled,
    scan,
    write_report,
)

from helpers import assert_png, hide_matplotlib, ragged_batch, tiny_model

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("layer_0/residual", "layer_0/mlp_hidden")
BIN = 10 ** (1 / BINS_PER_DECADE)  # a histogram quantile is within one bin of numpy's
EXCLUDED = sum(FLAG_BITS[name] for name in EXCLUDED_BY_DEFAULT)


@dataclasses.dataclass
class Captured:
    path: Path
    stall_seconds: float


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Captured:
    """A store of two runs (a capture and its resume) of a tiny gpt2 whose token 7 embeds 300x too large:
    its rows are massive activations at the residual, flagged outlier by the writer."""
    path = tmp_path_factory.mktemp("report") / "s.zarr"
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[7] *= 300
    config = CaptureConfig(path, layer_indices=[0], points=["residual", "mlp_hidden"], chunk_tokens=96)
    stall = 0.0
    for run, seeds in enumerate((range(0, 12), range(12, 24))):
        with CaptureEngine(model, dataclasses.replace(config, resume=run > 0)) as cap, torch.no_grad():
            for seed in seeds:
                model(**ragged_batch(4, 32, seed=seed))
        stall += cap.stats.stall_seconds
    return Captured(path, stall)


@pytest.fixture(scope="module")
def report(captured, tmp_path_factory):
    return write_report(captured.path, tmp_path_factory.mktemp("out") / "report")


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: np.array([float(row[i]) if row[i] else np.nan for row in rows[1:]])
            for i, name in enumerate(rows[0])}


@dataclasses.dataclass
class Rows:
    """numpy's view of a store's rows: float64 norms, positions, kinds (as masks)."""

    norms: np.ndarray
    positions: np.ndarray
    read: np.ndarray
    sink: np.ndarray
    outlier: np.ndarray

    @classmethod
    def of(cls, path: Path, key: str, rows: np.ndarray | None = None) -> Rows:
        store = open_store(path)
        rows = slice(None) if rows is None else rows
        flags = store["tokens/flags"][:][rows]
        sink = (flags & (FLAG_BOS | FLAG_FIRST)) != 0
        excluded = (flags & EXCLUDED) != 0
        return cls(np.linalg.norm(store[key][:].astype(np.float64)[rows], axis=1),
                   store["tokens/position"][:][rows], ~excluded, sink, excluded & ~sink)


def assert_within_a_bin(estimate, exact):
    assert exact / BIN <= estimate <= exact * BIN, (estimate, exact)


@pytest.mark.parametrize("key", KEYS)
def test_norm_by_position_is_numpys(captured, report, key):
    rows = Rows.of(captured.path, key)
    table = read_csv(report.folder / f"{key.replace('/', '.')}.norm_by_position.csv")
    positions = np.unique(rows.positions)
    np.testing.assert_array_equal(table["position_start"], positions)
    np.testing.assert_array_equal(table["position_stop"], positions + 1)
    for i, position in enumerate(positions):
        at = rows.positions == position
        counts = [(at & kind).sum() for kind in (rows.read, rows.sink, rows.outlier)]
        assert [table[name][i] for name in ("rows_read", "rows_sink", "rows_outlier")] == counts
        assert table["rows"][i] == at.sum()
        np.testing.assert_allclose(table["mean_norm"][i], rows.norms[at].mean(), rtol=1e-5)
        np.testing.assert_allclose(table["max_norm"][i], rows.norms[at].max(), rtol=1e-5)
        assert_within_a_bin(table["p99_norm"][i], np.quantile(rows.norms[at], 0.99, method="inverted_cdf"))
        read = rows.norms[at & rows.read]
        np.testing.assert_allclose(table["mean_norm_read"][i], read.mean() if read.size else np.nan,
                                   rtol=1e-5)
        if read.size:
            assert_within_a_bin(table["p99_norm_read"][i], np.quantile(read, 0.99, method="inverted_cdf"))
        flagged = rows.norms[at & rows.outlier]
        np.testing.assert_allclose(table["max_norm_outlier"][i], flagged.max() if flagged.size else np.nan,
                                   rtol=1e-5)
    assert (table["p99_norm"] <= table["max_norm"]).all()  # an estimate inside the max's bin is capped
    assert table["rows_sink"][0] == table["rows"][0] > 0  # every first token is a sink
    assert table["rows_outlier"].sum() > 0  # token 7's rows


def test_the_massive_activations_stand_out(captured, report):
    """What the picture must show at a glance: flagged rows far above the rows read, at their positions."""
    table = read_csv(report.folder / "layer_0.residual.norm_by_position.csv")
    flagged = table["rows_outlier"] > 0
    assert (table["max_norm_outlier"][flagged] > 10 * table["p99_norm_read"][flagged]).all()
    read = table["p99_norm_read"][table["rows_read"] > 0]  # position 0 holds only sinks
    assert (read < report.summary["arrays"]["layer_0/residual"]["outlier_threshold"]).all()


@pytest.mark.parametrize("key", KEYS)
def test_histogram_and_outlier_threshold_are_numpys(captured, report, key):
    rows = Rows.of(captured.path, key)
    table = read_csv(report.folder / f"{key.replace('/', '.')}.norm_histogram.csv")
    edges = np.concatenate([[0.0], NORM_EDGES, [np.inf]])
    first = np.searchsorted(edges, table["norm_low"][0])
    np.testing.assert_allclose(table["norm_low"], edges[first:first + len(table["norm_low"])])
    for kind in ("read", "sink", "outlier"):
        counts, _ = np.histogram(rows.norms[getattr(rows, kind)], edges)
        assert counts.sum() == table[f"rows_{kind}"].sum()
        np.testing.assert_array_equal(counts[first:first + len(table["norm_low"])], table[f"rows_{kind}"])
    entry = report.summary["arrays"][key]
    median = np.quantile(rows.norms[~rows.sink], 0.5, method="inverted_cdf")  # the writer's rule skips sinks
    assert_within_a_bin(entry["median_norm"], median)
    assert entry["outlier_threshold"] == pytest.approx(10 * entry["median_norm"])
    assert entry["outlier_norm_ratio"] == open_store(captured.path).manifest.outlier_norm_ratio == 10
    saved = json.loads((report.folder / "report.json").read_text())["arrays"][key]
    assert saved["median_norm"] == entry["median_norm"] and saved["rows_outlier"] == rows.outlier.sum()


@pytest.mark.parametrize("key", KEYS)
def test_drift_is_numpys(captured, report, key):
    rows = Rows.of(captured.path, key)
    table = read_csv(report.folder / f"{key.replace('/', '.')}.drift.csv")
    places = committed_chunks(open_store(captured.path))
    blocks = -(-32 // len(places))  # a store of few chunks has each cut in blocks: 32 points at least
    expected = [block for place in places
                for block in np.array_split(np.arange(place.start, place.stop), blocks) if block.size]
    assert len(table["row_start"]) == len(expected) >= 32
    for i, block in enumerate(expected):
        assert (table["row_start"][i], table["row_stop"][i]) == (block[0], block[-1] + 1)
        np.testing.assert_allclose(table["mean_norm"][i], rows.norms[block].mean(), rtol=1e-5)
        np.testing.assert_allclose(table["max_norm"][i], rows.norms[block].max(), rtol=1e-5)
        read = block[rows.read[block]]
        assert table["rows_read"][i] == read.size
        np.testing.assert_allclose(table["mean_norm_read"][i], rows.norms[read].mean(), rtol=1e-5)


def test_capture_timeline_is_the_commit_records(captured, report):
    store = open_store(captured.path)
    records = sorted(store.chunks, key=lambda record: record.committed_at)
    table = read_csv(report.folder / "capture.csv")
    np.testing.assert_array_equal(table["chunk"], [record.chunk_index for record in records])
    np.testing.assert_array_equal(table["committed_at"], [record.committed_at for record in records])
    np.testing.assert_array_equal(table["tokens"], [record.token_count for record in records])
    np.testing.assert_array_equal(table["stall_seconds"], [record.stall_seconds for record in records])
    assert 0 <= table["stall_seconds"].sum() <= captured.stall_seconds + 1e-9  # a resume rewrites a record
    # two runs: the resume's commits come after it, and its first rate counts from the resume
    resumed = store.manifest.resumes[0]["at"]
    second = table["run"] == 1
    assert set(table["run"]) == {0, 1} and second.any() and (~second).any()
    assert (table["committed_at"][second] > _epoch(resumed)).all()
    assert (table["committed_at"][~second] < _epoch(resumed)).all()
    first = np.flatnonzero(second)[0]
    start = table["run_start_seconds"][first]
    np.testing.assert_allclose(table["seconds"][first] - start, table["committed_at"][first]
                               - _epoch(resumed), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(table["tokens_per_s"][first],
                               table["tokens"][first] / (table["seconds"][first] - start), rtol=1e-9)
    assert (table["tokens_per_s"] > 0).all() and np.diff(table["seconds"]).min() >= 0


def _epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def test_each_picture_is_a_png_beside_its_numbers(report):
    pictures = [path for path in report.files if path.suffix == ".png"]
    assert len(pictures) == 3 * len(KEYS) + 1
    for picture in pictures:
        assert_png(picture)
        assert picture.with_suffix(".csv").is_file()
    assert {path.name for path in report.files} >= {"index.html", "report.json", "capture.csv"}


def test_a_store_of_format_version_1_is_drawn_with_what_it_lacks_said(tmp_path):
    """Records without stall seconds and a manifest without an outlier rule: the pictures say so."""
    report = write_report(ROOT / "tests" / "data" / "format_v1_store", tmp_path / "v1")
    entry = report.summary["arrays"]["layer_0/residual"]
    assert entry["outlier_norm_ratio"] is None and entry["outlier_threshold"] is None
    assert entry["rows_read"] + entry["rows_sink"] == 15
    assert report.summary["capture"]["stall_seconds"] is None
    assert np.isnan(read_csv(tmp_path / "v1" / "capture.csv")["stall_seconds"]).all()
    for picture in report.files:
        if picture.suffix == ".png":
            assert_png(picture)


def test_sample_reads_chunks_evenly_spaced(captured, tmp_path, capsys):
    out = tmp_path / "sampled"
    assert main(["report", str(captured.path), "--out", str(out), "--sample", "3"]) == 0
    printed = capsys.readouterr().out
    places = committed_chunks(open_store(captured.path))
    chosen = [places[i] for i in sampled(len(places), 3)]
    assert len(chosen) == 3 and chosen[0] is not chosen[-1] and chosen[-1].stop == places[-1].stop
    rows = np.concatenate([np.arange(place.start, place.stop) for place in chosen])
    reference = Rows.of(captured.path, "layer_0/residual", rows)
    table = read_csv(out / "layer_0.residual.norm_by_position.csv")
    assert table["rows"].sum() == rows.size and table["rows_outlier"].sum() == reference.outlier.sum()
    np.testing.assert_allclose(table["mean_norm"][0], reference.norms[reference.positions == 0].mean(),
                               rtol=1e-5)
    summary = json.loads((out / "report.json").read_text())
    assert (summary["chunks_read"], summary["committed_chunks"]) == (3, len(places))
    assert f"3 of {len(places)} committed chunks read" in printed and "index.html" in printed
    # the capture's timeline covers every commit, sampled or not
    assert len(read_csv(out / "capture.csv")["chunk"]) == len(places)


def test_without_matplotlib_one_line_names_the_extra_before_any_work(captured, tmp_path):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "engine", "report", str(captured.path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=hide_matplotlib(tmp_path / "hide"))
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.count("\n") == 1 and 'pip install "actcap-engine[plot]"' in done.stderr, done.stderr


def test_a_store_not_there_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(tmp_path / "none.zarr")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "none.zarr" in error


def test_quantiles_of_a_histogram_are_within_a_bin():
    norms = np.random.default_rng(0).lognormal(3, 2, size=(5, 2000))
    bins = np.floor((np.log10(norms) + 4) * BINS_PER_DECADE).astype(int) + 1
    counts = np.stack([np.bincount(row, minlength=len(NORM_EDGES) + 1) for row in bins])
    for q in (0.01, 0.5, 0.99, 1.0):
        for estimate, row in zip(histogram_quantile(counts, q), norms):
            assert_within_a_bin(estimate, np.quantile(row, q, method="inverted_cdf"))
    assert np.isnan(histogram_quantile(np.zeros(len(NORM_EDGES) + 1), 0.5))


def test_long_sequences_share_position_buckets_past_the_first():
    edges = position_edges(5000)
    assert list(edges[:129]) == list(range(129)) and edges[-1] >= 5000 and len(edges) - 1 <= 1024
    assert len(np.unique(np.diff(edges[128:]))) == 1
    assert list(position_edges(40)) == list(range(41))


def test_report_reads_in_bounded_memory(tmp_path):
    """A chunk at a time: scanning a 25 MB store holds a few chunks' worth, not the array."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import synthetic_store

    path = synthetic_store(tmp_path / "big.zarr", dim=256, batch=8, seq_len=128, forwards=48,
                           chunk_tokens=1024)
    store = open_store(path)
    array_bytes = store["extra/x"].shape[0] * 256 * 2
    tracemalloc.start()
    try:
        points = scan(store, committed_chunks(store), ["extra/x"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert points["extra/x"].histogram.sum() == store.num_tokens == 48 * 8 * 128
    assert peak < array_bytes / 4, f"peak {peak / 1e6:.1f} MB reading a {array_bytes / 1e6:.1f} MB array"


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to open the page in (Debian: apt-get install "
                    "chromium); the report's numbers and images are checked without it")
def test_the_page_shows_its_pictures_in_a_headless_browser(report, tmp_path):
    import matplotlib.image

    shot = tmp_path / "page.png"
    # as root (CI, containers) chromium needs --no-sandbox; the network flags keep it off a closed network
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                    "--window-size=900,2400", f"--screenshot={shot}", report.page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert (pixels < 0.9).any(axis=-1).mean() > 0.02, "the page rendered blank"
    # the plots' own colours (matplotlib's C0 blue and C2 green lines): the images loaded, not broken icons
    for colour in ((31, 119, 180), (44, 160, 44)):
        near = (np.abs(pixels * 255 - colour) < 40).all(axis=-1)
        assert near.sum() > 200, f"no {colour} pixels: the page's images did not load"
