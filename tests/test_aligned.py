"""ActivationDataset over several arrays, and over stores of the same corpus zipped row by row: every batch
holds the same tokens in every array, checked against the token arrays (tokens/sequence, tokens/position)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import ActivationDataset, CaptureConfig, CaptureEngine, ConfigError, open_store

from helpers import ragged_batch, tiny_model

POINTS = ["layer_1/residual", "layer_1/mlp_out", "layer_1/attn_out"]  # all 64 wide
TOKENS = ["tokens/sequence", "tokens/position"]


def capture(path, seed=0, data_seeds=range(10), shift_ids=0, chunk_tokens=16):
    """A store of a tiny llama (weights from ``seed``) over fixed ragged batches."""
    model = tiny_model("llama", seed=seed)
    cfg = CaptureConfig(path, layer_indices=[1], capture_mlp_hidden=False, capture_mlp_out=True,
                        capture_attn_out=True, chunk_tokens=chunk_tokens)
    with CaptureEngine(model, cfg), torch.no_grad():
        for data_seed in data_seeds:
            batch = ragged_batch(5, 10, seed=data_seed)
            batch["input_ids"] = (batch["input_ids"] + shift_ids) % 256
            model(**batch)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    return {"base": capture(root / "base.zarr"), "tuned": capture(root / "tuned.zarr", seed=1)}


def row_index(path) -> dict[tuple[int, int], int]:
    """(sequence, position) -> row of the store."""
    store = open_store(path)
    pairs = zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist())
    return {pair: row for row, pair in enumerate(pairs)}


def rows_seen(batches) -> list[tuple[int, int]]:
    """(sequence, position) of every yielded row."""
    return [pair for batch in batches for pair in zip(batch["tokens/sequence"].tolist(),
                                                      batch["tokens/position"].tolist())]


def assert_rows_are_the_tokens(path, batches, keys, prefix=""):
    """Each yielded row of each array is the store's row of the token named by the batch's token arrays."""
    index = row_index(path)
    stored = {key: torch.from_numpy(open_store(path)[key][:].astype(np.float32)) for key in keys}
    for batch in batches:
        rows = [index[pair] for pair in zip(batch[f"{prefix}tokens/sequence"].tolist(),
                                            batch[f"{prefix}tokens/position"].tolist())]
        for key in keys:
            assert torch.equal(batch[f"{prefix}{key}"], stored[key][rows]), key


@pytest.mark.parametrize("exclude", [(), ("bos", "first")])
def test_every_array_holds_the_same_tokens_each_once_per_epoch(stores, exclude):
    path = stores["base"]
    data = ActivationDataset(path, POINTS + TOKENS, batch_size=7, buffer_chunks=2, exclude=exclude)
    flags = open_store(path)["tokens/flags"][:]
    expected = int(np.count_nonzero((flags & (1 | 4)) == 0)) if exclude else len(flags)
    for _ in range(2):
        batches = list(data)
        assert set(batches[0]) == set(POINTS + TOKENS) and batches[0][POINTS[0]].shape == (7, 64)
        seen = rows_seen(batches)
        assert len(seen) == len(set(seen)) == expected
        assert_rows_are_the_tokens(path, batches, POINTS)


@pytest.mark.parametrize("rank, world_size, seed", [(0, 1, 0), (1, 3, 5)])
def test_same_shuffle_and_split_as_a_single_key(stores, rank, world_size, seed):
    kwargs = dict(batch_size=6, seed=seed, rank=rank, world_size=world_size, buffer_chunks=1)
    together = list(ActivationDataset(stores["base"], POINTS, **kwargs))
    for key in POINTS:
        alone = list(ActivationDataset(stores["base"], key, **kwargs))
        assert len(alone) == len(together)
        assert all(torch.equal(a, t[key]) for a, t in zip(alone, together))


def test_dataloader_workers_split_arrays_alike(stores):
    data = ActivationDataset(stores["base"], POINTS[:2] + TOKENS, batch_size=8, exclude=())
    data.set_epoch(2)
    batches = list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=2))
    seen = rows_seen(batches)
    assert len(seen) == len(set(seen)) == open_store(stores["base"]).num_tokens
    assert_rows_are_the_tokens(stores["base"], batches, POINTS[:2])


def test_stack(stores):
    stacked = list(ActivationDataset(stores["base"], POINTS, batch_size=9, stack=True, seed=3))
    by_key = list(ActivationDataset(stores["base"], POINTS, batch_size=9, seed=3))
    assert stacked[0].shape == (9, 3, 64)
    assert all(torch.equal(s, torch.stack([d[k] for k in POINTS], 1)) for s, d in zip(stacked, by_key))
    with pytest.raises(ConfigError, match="one width"):
        ActivationDataset(stores["base"], POINTS + TOKENS, stack=True)


def test_zipped_stores_yield_each_models_row_of_the_same_token(stores):
    data = ActivationDataset(stores, ["layer_1/residual"] + TOKENS, batch_size=5, buffer_chunks=2)
    batches = list(data)
    assert set(batches[0]) == {f"{name}/{key}" for name in stores for key in ["layer_1/residual"] + TOKENS}
    for name in stores:
        assert_rows_are_the_tokens(stores[name], batches, ["layer_1/residual"], prefix=f"{name}/")
    assert not torch.equal(batches[0]["base/layer_1/residual"], batches[0]["tuned/layer_1/residual"])
    stacked = ActivationDataset(stores, "layer_1/residual", batch_size=5, buffer_chunks=2, stack=True)
    crosscoder = next(iter(stacked))
    torch.testing.assert_close(crosscoder, torch.stack([batches[0]["base/layer_1/residual"],
                                                        batches[0]["tuned/layer_1/residual"]], 1))


def test_zipping_different_corpora_names_the_difference(stores, tmp_path):
    other_ids = capture(tmp_path / "ids.zarr", shift_ids=1)  # same lengths, other tokens
    with pytest.raises(ConfigError, match="differ in tokens/input_ids at row 0 of chunk 0"):
        ActivationDataset({"base": stores["base"], "other": other_ids}, "layer_1/residual")
    shorter = capture(tmp_path / "short.zarr", data_seeds=range(6))
    with pytest.raises(ConfigError, match="rows: base has"):
        ActivationDataset({"base": stores["base"], "short": shorter}, "layer_1/residual")
    chunked = capture(tmp_path / "chunked.zarr", chunk_tokens=8)
    with pytest.raises(ConfigError, match="chunk_tokens: base has 16, chunked has 8"):
        ActivationDataset({"base": stores["base"], "chunked": chunked}, "layer_1/residual")
    with pytest.raises(ConfigError, match="names without"):
        ActivationDataset({"a/b": stores["base"]}, "layer_1/residual")


def test_endless_batches_cross_epochs_on_the_device(stores):
    data = ActivationDataset(stores["base"], POINTS[0], batch_size=10, drop_last=True, exclude=())
    per_epoch = open_store(stores["base"]).num_tokens // 10  # only each epoch's last short batch is dropped
    stream = data.endless_batches("cpu")
    batches = [next(stream) for _ in range(2 * per_epoch + 1)]
    assert all(b.shape == (10, 64) and b.device.type == "cpu" for b in batches)
    assert data.epoch == 2
    empty = ActivationDataset(stores["base"], POINTS[0], batch_size=10_000, drop_last=True)
    with pytest.raises(ConfigError, match="yielded no batch"):
        next(empty.endless_batches())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_endless_batches_reach_cuda_intact(stores, num_workers):
    """Pinned host batches copied with non_blocking: what arrives on the GPU equals the rows read on the host,
    epoch after epoch, also when DataLoader workers gather them."""
    kwargs = dict(batch_size=10, shuffle=False, exclude=(), drop_last=True)
    epoch = list(ActivationDataset(stores["base"], POINTS, **kwargs))
    stream = ActivationDataset(stores["base"], POINTS, **kwargs).endless_batches("cuda", num_workers)
    for expected in epoch * 2:
        got = next(stream)
        assert all(value.device.type == "cuda" for value in got.values())
        torch.cuda.synchronize()
        assert all(torch.equal(got[key].cpu(), expected[key]) for key in POINTS)
