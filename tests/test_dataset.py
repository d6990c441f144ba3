"""ActivationDataset and running statistics on a real store."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import engine
from engine import ActivationDataset, CaptureConfig, CaptureEngine, ConfigError, open_store
from engine.format.layout import FLAG_BOS, FLAG_FIRST
from engine.format.statistics import as_float32_with_range, chunk_summary

from fakes import use_sink
from helpers import assert_statistics_match, ragged_batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from synthetic import synthetic_store  # noqa: E402

KEY = "layer_1/residual"
ROW_BYTES = 64 * 2  # KEY's float16 rows


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "s.zarr"
    model = tiny_model("llama")
    cfg = CaptureConfig(path, layer_indices=[1], chunk_tokens=16, num_writers=3)
    with CaptureEngine(model, cfg), torch.no_grad():
        for seed in range(12):
            model(**ragged_batch(5, 10, seed=seed))
    return path


def rows_of(batches) -> np.ndarray:
    rows = torch.cat(list(batches)).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def stored_rows(path, exclude_bos=False) -> np.ndarray:
    store = open_store(path)
    rows = store[KEY][:].astype(np.float32)
    if exclude_bos:
        rows = rows[(store["tokens/flags"][:] & FLAG_BOS) == 0]
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("exclude", [(), ("bos",)])
def test_every_row_exactly_once_per_epoch(store_path, exclude):
    ds = ActivationDataset(store_path, KEY, batch_size=7, exclude=exclude, buffer_chunks=2)
    expected = stored_rows(store_path, exclude_bos=bool(exclude))
    assert 0 < len(expected) and (not exclude or len(expected) < open_store(store_path).num_tokens)
    for _ in range(2):
        batches = list(ds)
        assert all(b.shape == (7, 64) for b in batches[:-1]) and batches[0].dtype == torch.float32
        np.testing.assert_array_equal(rows_of(batches), expected)


def test_drop_last_and_tokens(store_path):
    ds = ActivationDataset(store_path, KEY, batch_size=7, drop_last=True, exclude=(), return_tokens=True)
    batches = list(ds)
    assert all(rows.shape[0] == ids.shape[0] == 7 for rows, ids in batches)
    assert len(batches) == open_store(store_path).num_tokens // 7


def test_order_differs_per_epoch_and_seed_and_repeats_for_the_same_pair(store_path):
    def order(seed, epoch):
        ds = ActivationDataset(store_path, KEY, batch_size=9, seed=seed)
        ds.set_epoch(epoch)
        return torch.cat(list(ds)).numpy()

    assert np.array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    unshuffled = torch.cat(list(ActivationDataset(store_path, KEY, batch_size=9, shuffle=False, exclude=())))
    np.testing.assert_array_equal(unshuffled.numpy(), open_store(store_path)[KEY][:].astype(np.float32))


def test_ranks_are_disjoint_and_cover_everything(store_path):
    parts = [rows_of(ActivationDataset(store_path, KEY, batch_size=5, rank=r, world_size=3, exclude=()))
             for r in range(3)]
    union = np.concatenate(parts)
    np.testing.assert_array_equal(union[np.lexsort(union.T[::-1])], stored_rows(store_path))
    assert all(len(p) for p in parts)


@pytest.mark.parametrize("window_bytes", [1, engine.read.dataset.WINDOW_BYTES])  # windows: one chunk, all
def test_dataloader_workers_are_disjoint(store_path, window_bytes):
    ds = ActivationDataset(store_path, KEY, batch_size=8, exclude=(), window_bytes=window_bytes)
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    np.testing.assert_array_equal(rows_of(loader), stored_rows(store_path))


def test_bad_arguments(store_path):
    with pytest.raises(ConfigError, match="not an activation array"):
        ActivationDataset(store_path, "tokens/flags")
    with pytest.raises(ConfigError, match="exclude"):
        ActivationDataset(store_path, KEY, exclude=("eos",))
    with pytest.raises(ConfigError, match="rank"):
        ActivationDataset(store_path, KEY, rank=2, world_size=2)


def test_statistics_equal_numpy(store_path):
    assert_statistics_match(store_path, KEY, 64)


def test_statistics_of_every_array_equal_numpy(tmp_path):
    model = tiny_model("llama")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], chunk_tokens=16, num_writers=3)
    with CaptureEngine(model, cfg), torch.no_grad():
        for seed in range(6):
            model(**ragged_batch(5, 10, seed=seed))
    for key, dim in ((KEY, 64), ("layer_1/mlp_hidden", 160)):
        assert_statistics_match(cfg.output_dir, key, dim)


def test_counts_and_statistics_cover_only_the_rows_readers_see_after_a_failure(tmp_path, monkeypatch):
    """The second chunk fails after the third was committed: the failed store's counts and statistics are
    those of its gap-free prefix (the first chunk), never of rows staged but not committed, nor of the
    committed chunk after the gap, which no reader sees."""
    use_sink(monkeypatch, "GapSink")
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], capture_mlp_hidden=False, chunk_tokens=16,
                        num_writers=2)
    cap = CaptureEngine(model, cfg)
    with pytest.raises(engine.CaptureError), torch.no_grad():
        for seed in range(40):  # no KV cache: each chunk commits once filled (its sequences end with it)
            model(**ragged_batch(4, 10, seed=seed), use_cache=False)
        cap.close()
    cap.close()
    store = open_store(cfg.output_dir)
    assert (tmp_path / "s.zarr" / "commits" / "chunk_000000000002").exists(), "a chunk after the gap"
    assert store.status == "failed" and store.num_tokens == store.manifest.committed_tokens == 16
    assert_statistics_match(cfg.output_dir, "layer_0/residual", 64)


def test_statistics_survive_resume(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], capture_mlp_hidden=False, chunk_tokens=8)
    import dataclasses

    for part, resume in ((range(0, 3), False), (range(3, 6), True)):
        with CaptureEngine(model, dataclasses.replace(cfg, resume=resume)), torch.no_grad():
            for seed in part:
                model(**ragged_batch(3, 7, seed=seed))
    assert open_store(cfg.output_dir).num_tokens % 8  # the resumed run continued a cut chunk
    assert_statistics_match(cfg.output_dir, "layer_0/residual", 64)


EVERY_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


@pytest.mark.parametrize("finite_only", [True, False], ids=["finite", "with-inf-and-nan"])
def test_statistics_decode_every_float16_value_exactly(finite_only):
    """The statistics' own float16 decoding (not numpy's cast) gives numpy's float32 for every bit pattern:
    subnormals, both zeros, the largest values, and (through the exact fallback) inf and nan."""
    halves = EVERY_HALF[np.isfinite(EVERY_HALF)] if finite_only else EVERY_HALF
    out = np.empty(halves.shape, dtype=np.float32)
    if finite_only:  # the bit arithmetic alone, without the fallback
        decoded = engine.format.statistics._finite_half_to_float32(halves, out)
    else:
        decoded, low, high = as_float32_with_range(halves, "float16", out)
        assert np.isnan(low) and np.isnan(high)
    np.testing.assert_array_equal(decoded.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_float16_subnormals_stay_exact_when_the_thread_flushes_denormals():
    """torch.set_flush_denormal(True) makes float32 arithmetic treat subnormals as zero on this thread; the
    statistics then decode float16 with numpy's cast, and subnormals keep their values."""
    halves = EVERY_HALF[np.isfinite(EVERY_HALF)]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        decoded, _, _ = as_float32_with_range(halves, "float16", np.empty(halves.shape, dtype=np.float32))
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(decoded.view(np.uint32), halves.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_chunk_summary_matches_float64_numpy(dtype, monkeypatch):
    """Commit-record stats, moments and outliers of a chunk with inf, nan, subnormal, sink and massive rows,
    against float64 numpy over numpy's own conversion; blocks of at most 64 rows (603 rows: blocks of 60 and
    61), so that some hold an inf or nan and some not."""
    monkeypatch.setattr(engine.format.statistics, "BLOCK_BYTES", 64 * 48 * 4)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((603, 48)) * 40).astype(np.float32)
    values[5, 3], values[9, 0], values[9, 1], values[300, 7] = np.inf, -np.inf, np.nan, 2.0 ** -20
    values[[100, 101, 401]] *= 50  # massive rows: 50x the others' norms (100 is a sink: not an outlier)
    flags = np.where(np.arange(603) % 50 == 0, FLAG_FIRST, 0).astype(np.uint8)
    if dtype == "bfloat16":
        stored = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
        exact = torch.from_numpy(stored).view(torch.bfloat16).float().numpy().astype(np.float64)
    else:
        stored = values.astype(dtype)
        exact = stored.astype(np.float64)
    summary, moments, outliers = chunk_summary(stored, dtype, flags, outlier_ratio=10)
    finite = np.isfinite(exact)
    assert (summary.min, summary.max) == (exact[finite].min(), exact[finite].max())
    assert summary.nonfinite == (~finite).sum() == 3
    assert np.flatnonzero(outliers).tolist() == [101, 401] and moments.outlier_rows == 2
    kept = finite.all(axis=1) & (flags == 0) & ~outliers
    norms = np.linalg.norm(exact[kept], axis=1)
    assert moments.count == kept.sum() and moments.sink_rows == 13
    np.testing.assert_allclose(moments.total, exact[kept].sum(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(moments.squared_norms, (norms ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(moments.norms, norms.sum(), rtol=1e-5)
    assert moments.max_norm == pytest.approx(norms.max(), rel=1e-6)


def test_statistics_can_be_turned_off(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, statistics=False)
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 7))
    store = open_store(cfg.output_dir)
    assert store.manifest.statistics == {} and store.num_tokens > 0


def test_batch_larger_than_a_window(store_path):
    ds = ActivationDataset(store_path, KEY, batch_size=100, window_bytes=1, exclude=())  # one chunk each
    batches = list(ds)
    assert all(b.shape[0] == 100 for b in batches[:-1])
    np.testing.assert_array_equal(rows_of(batches), stored_rows(store_path))


# ---- windows: how rows are shuffled ------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", [(), ("bos",)])
def test_every_row_once_across_windows_with_the_rest_carried(store_path, exclude):
    """Windows of 3 chunks, batches of 7 that no window's rows fill exactly: each window's last rows open the
    next window's first batch, every batch but the last is whole, every row comes once with its own tokens."""
    keys = [KEY, "tokens/sequence", "tokens/position"]
    ds = ActivationDataset(store_path, keys, batch_size=7, exclude=exclude,
                           window_bytes=3 * 16 * (ROW_BYTES + 8 + 4))
    windows = ds._windows(ds.chunks)
    assert len(windows) >= 3 and {len(window) for window in windows[:-1]} == {3}
    batches = list(ds)
    assert all(len(batch[KEY]) == 7 for batch in batches[:-1])
    np.testing.assert_array_equal(rows_of(batch[KEY] for batch in batches),
                                  stored_rows(store_path, exclude_bos=bool(exclude)))
    store = open_store(store_path)
    pairs = zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist())
    where = {pair: row for row, pair in enumerate(pairs)}
    served = [where[pair] for batch in batches
              for pair in zip(batch["tokens/sequence"].tolist(), batch["tokens/position"].tolist())]
    np.testing.assert_array_equal(torch.cat([batch[KEY] for batch in batches]).numpy(),
                                  store[KEY][:][served].astype(np.float32))


@pytest.fixture(scope="module")
def many_sequences(tmp_path_factory):
    """640 sequences of 8 tokens in 80 chunks of 64 rows."""
    return synthetic_store(tmp_path_factory.mktemp("mix") / "s.zarr", dim=8, batch=16, seq_len=8, forwards=40,
                           chunk_tokens=64)


def distinct_sequences_per_batch(data) -> float:
    return float(np.mean([len(torch.unique(batch["tokens/sequence"])) for batch in data]))


def test_batches_mix_like_uniform_sampling(many_sequences):
    """The mixing figure of benchmarks/reader.py: distinct sequences per batch against uniform random batches
    of the same rows. A window of the whole store mixes like them; a window of one chunk cannot."""
    sequences = open_store(many_sequences)["tokens/sequence"][:]
    rng = np.random.default_rng(0)
    uniform = np.mean([len(np.unique(rng.choice(sequences, 256, replace=False))) for _ in range(50)])
    keys = ["extra/x", "tokens/sequence"]
    whole = ActivationDataset(many_sequences, keys, batch_size=256, exclude=(), drop_last=True)
    assert distinct_sequences_per_batch(whole) > 0.9 * uniform
    one_chunk = ActivationDataset(many_sequences, keys, batch_size=256, exclude=(), drop_last=True,
                                  window_bytes=1)
    assert distinct_sequences_per_batch(one_chunk) < 0.25 * uniform  # 5 chunks of 8 sequences at most


def anonymous_bytes() -> int:
    info = psutil.Process().memory_info()
    return info.rss - info.shared  # mapped chunk files are page cache (file-backed), not the process's


def test_mapped_windows_cost_page_cache_not_process_memory(tmp_path):
    """A 64 MB store in one window: the process holds the window's row indices and a batch or two, not the
    window's rows."""
    path = synthetic_store(tmp_path / "s.zarr", dim=1024, batch=8, seq_len=512, forwards=8, chunk_tokens=2048)
    data = ActivationDataset(path, "extra/x", batch_size=1024, exclude=(), dtype=torch.float16)
    assert len(data._windows(data.chunks)) == 1
    list(data)  # the allocator's first large blocks
    before, peak, rows = anonymous_bytes(), 0, 0
    for batch in data:
        peak, rows = max(peak, anonymous_bytes()), rows + len(batch)
    assert rows == 32768 and peak - before < 16e6  # the window is 64 MB; a batch 2 MB
