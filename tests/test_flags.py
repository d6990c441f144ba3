"""Rows flagged as they are written: norm outliers ("massive activations") are marked, left out of the
statistics and of training reads by default, counted, and stay readable; the first token of each packed
document is marked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import ActivationDataset, CaptureConfig, CaptureEngine, open_store
from engine.format.layout import FLAG_BOS, FLAG_DOC_START, FLAG_FIRST, FLAG_OUTLIER

from helpers import tiny_model

DIM, SEQ, BATCH, SEQUENCES = 32, 16, 4, 24
MASSIVE = {(0, 3), (1, 1), (2, 9), (3, 15)}  # (sequence % 4, position) of the rows 200x the others' norm


class MassiveModel(torch.nn.Module):
    """Emits at ``points.x`` random rows that depend only on their sequence number (every token id of a row
    is it) and position, a few of them (``MASSIVE``) 200 times larger, like the massive activations of real
    models at delimiters."""

    def __init__(self):
        super().__init__()
        self.points = torch.nn.ModuleDict({"x": torch.nn.Identity()})

    def forward(self, input_ids, attention_mask=None):
        rows = torch.stack([torch.randn(SEQ, DIM, generator=torch.Generator().manual_seed(int(row[0])))
                            for row in input_ids])
        for row, sequence in enumerate(input_ids[:, 0].tolist()):
            for massive, position in MASSIVE:
                if sequence % BATCH == massive:
                    rows[row, position] *= 200
        self.points["x"](rows)


def feed(model, first: int, stop: int) -> None:
    for start in range(first, stop, BATCH):
        numbers = torch.arange(start, min(start + BATCH, stop))
        model(input_ids=numbers[:, None].expand(-1, SEQ))


def capture(path, **overrides) -> str:
    model = MassiveModel()
    cfg = CaptureConfig(path / "s.zarr", points=[], extra_modules={"x": "points.x"}, chunk_tokens=32,
                        **overrides)
    with CaptureEngine(model, cfg):
        feed(model, 0, SEQUENCES)
    return cfg.output_dir


def massive_rows() -> np.ndarray:
    return np.array(sorted(sequence * SEQ + position for sequence in range(SEQUENCES)
                           for massive, position in MASSIVE if sequence % BATCH == massive))


def test_massive_rows_are_flagged_counted_left_out_of_statistics_and_still_readable(tmp_path):
    store = open_store(capture(tmp_path))
    flags = store["tokens/flags"][:]
    assert np.flatnonzero(flags & FLAG_OUTLIER).tolist() == massive_rows().tolist()
    rows = store["extra/x"][:].astype(np.float64)
    assert np.linalg.norm(rows[massive_rows()], axis=1).min() > 100 * np.median(np.linalg.norm(rows, axis=1))
    kept = (flags & (FLAG_OUTLIER | FLAG_FIRST | FLAG_BOS)) == 0
    stats = store.manifest.statistics["extra/x"]
    norms = np.linalg.norm(rows[kept], axis=1)
    assert stats["count"] == kept.sum() and stats["outlier_rows"] == len(massive_rows())
    np.testing.assert_allclose(stats["mean_squared_norm"], (norms ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["max_norm"], norms.max(), rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], rows[kept].mean(0), rtol=1e-6, atol=1e-6)


def test_readers_leave_outliers_out_by_default_and_serve_them_when_asked(tmp_path):
    path = capture(tmp_path)
    flags = open_store(path)["tokens/flags"][:]
    default = sum(len(batch) for batch in ActivationDataset(path, "extra/x", batch_size=10))
    asked = sum(len(batch) for batch in ActivationDataset(path, "extra/x", batch_size=10,
                                                          exclude=("bos", "first")))
    assert default == ((flags & (FLAG_OUTLIER | FLAG_FIRST | FLAG_BOS)) == 0).sum()
    assert asked == default + len(massive_rows())


def test_no_row_is_flagged_without_a_ratio(tmp_path):
    store = open_store(capture(tmp_path, outlier_norm_ratio=None))
    assert not (store["tokens/flags"][:] & FLAG_OUTLIER).any()
    assert store.manifest.statistics["extra/x"]["outlier_rows"] == 0
    assert store.manifest.outlier_norm_ratio is None


def test_a_resume_flags_the_rows_an_uninterrupted_run_flags(tmp_path):
    """The cut chunk's kept rows are judged again with the rest of their chunk: the same flags and
    statistics as a run that was never interrupted."""
    whole = open_store(capture(tmp_path / "whole"))
    model = MassiveModel()
    cfg = CaptureConfig(tmp_path / "cut" / "s.zarr", points=[], extra_modules={"x": "points.x"},
                        chunk_tokens=32)
    with pytest.raises(RuntimeError, match="interrupted"):
        with CaptureEngine(model, cfg):
            feed(model, 0, 10)
            raise RuntimeError("interrupted (test)")
    with CaptureEngine(model, dataclasses.replace(cfg, resume=True)) as cap:
        feed(model, cap.resume_sequences, SEQUENCES)
    resumed = open_store(cfg.output_dir)
    np.testing.assert_array_equal(resumed["tokens/flags"][:], whole["tokens/flags"][:])
    for field in ("count", "outlier_rows", "mean_squared_norm"):
        assert resumed.manifest.statistics["extra/x"][field] == pytest.approx(
            whole.manifest.statistics["extra/x"][field], rel=1e-9), field


@pytest.mark.parametrize("ratio", [1, 0.5, float("inf"), "10", True])
def test_a_bad_ratio_is_refused(ratio, tmp_path):
    with pytest.raises(Exception, match="outlier_norm_ratio"):
        CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], outlier_norm_ratio=ratio)


def test_the_token_after_a_separator_starts_a_packed_document(tmp_path):
    """Documents packed after BOS (1) or EOS (2) separators: the token after each is flagged doc_start, in
    one forward and across the forwards of a decode loop."""
    model = tiny_model("llama")
    ids = torch.tensor([[1, 7, 8, 2, 9, 10, 1, 11, 12, 13]])
    with torch.no_grad(), CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0],
                                                             points=["residual"])):
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=torch.tensor([[2]]), past_key_values=out.past_key_values, use_cache=True)
        model(input_ids=torch.tensor([[14]]), past_key_values=out.past_key_values, use_cache=True)
    flags = open_store(tmp_path / "s.zarr")["tokens/flags"][:]
    assert np.flatnonzero(flags & FLAG_DOC_START).tolist() == [1, 4, 7, 11]
