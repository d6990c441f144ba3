"""The capture command line end to end: a local model folder with a real (offline-trained) fast tokenizer,
a jsonl corpus, then inspect, align and the reader."""

from __future__ import annotations

import json

import numpy as np
import torch

from engine import ActivationDataset, open_store

from conftest import documents
from helpers import cli


def capture(model_dir, corpus, out, *extra):
    return cli("capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 1,
               "--seq-len", 24, "--batch-size", 4, "--chunk-tokens", 32, "--no-progress", *extra)


def test_capture_inspect_align_read(model_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "s.zarr"
    printed = capture(model_dir, corpus, out)
    assert "expected store size" in printed and "[capture] done" in printed
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = documents(30)
    store = open_store(out)
    expected = [tokenizer(t, truncation=True, max_length=24)["input_ids"] for t in texts]
    np.testing.assert_array_equal(store["tokens/input_ids"][:], np.concatenate(expected))
    doc_id, start, end = (store[k][:] for k in ("tokens/doc_id", "tokens/char_start", "tokens/char_end"))
    np.testing.assert_array_equal(doc_id, np.concatenate([[i] * len(e) for i, e in enumerate(expected)]))
    for row in range(0, store.num_tokens, 7):  # each token's span spells the token
        piece = texts[doc_id[row]][start[row]:end[row]]
        token = tokenizer.convert_ids_to_tokens(int(store["tokens/input_ids"][row]))
        assert piece == ("" if token == "<s>" else token)

    report = cli("inspect", out)
    for text in ("status     complete", "layer_1/residual", "layer_1/mlp_hidden", "blocks.1.hook_resid_post",
                 "norm_scale", f"{store.num_tokens:,} committed"):
        assert text in report

    spans = tmp_path / "a.align.jsonl"
    first = texts[0]
    cut = first.index(" ", 10)
    spans.write_text(json.dumps({"doc_id": 0, "spans": [[0, cut, "step1"], [cut, len(first), "step2"]]}) + "\n"
                     + json.dumps({"doc_id": 2, "spans": [[0, 5, "step1"]]}) + "\n")
    assert "labelled with 2 labels" in cli("align", out, spans)
    labels = open_store(out)["tokens/label"][:]
    real = end > start
    assert set(labels[(doc_id == 0) & real]) == {0, 1} and labels[(doc_id == 0) & ~real][0] == -1
    assert np.all(labels[(doc_id == 0) & real & (start < cut)] == 0)
    assert np.all(labels[(doc_id == 0) & real & (start >= cut)] == 1)
    assert np.all(labels[doc_id == 1] == -1) and np.all(labels[(doc_id == 2) & (start >= 5)] == -1)

    rows = torch.cat(list(ActivationDataset(out, "layer_1/residual", batch_size=16, exclude=("bos",))))
    assert rows.shape == (int((store["tokens/flags"][:] & 1 == 0).sum()), 64)


def test_early_stop_stores_what_the_full_forward_stores(model_dir, corpus, tmp_path):
    capture(model_dir, corpus, tmp_path / "early.zarr")
    capture(model_dir, corpus, tmp_path / "full.zarr", "--no-early-stop")
    early, full = open_store(tmp_path / "early.zarr"), open_store(tmp_path / "full.zarr")
    for key in ("layer_1/residual", "layer_1/mlp_hidden", "tokens/input_ids"):
        np.testing.assert_array_equal(early[key][:], full[key][:])


def test_max_tokens_pack_and_resume(model_dir, corpus, tmp_path):
    whole = tmp_path / "whole.zarr"
    capture(model_dir, corpus, whole, "--pack")
    packed = open_store(whole)
    assert packed["tokens/position"][:].max() == 23 and packed.num_tokens > 0
    split = tmp_path / "split.zarr"
    capture(model_dir, corpus, split, "--pack", "--max-tokens", 100)
    assert open_store(split).num_tokens <= 100
    spans = tmp_path / "a.align.jsonl"
    spans.write_text(json.dumps({"doc_id": 0, "spans": [[0, 10, "x"]]}) + "\n")
    cli("align", split, spans)
    assert "tokens/label" in open_store(split).keys()
    assert "resuming after" in capture(model_dir, corpus, split, "--pack", "--resume")
    assert "tokens/label" not in open_store(split).keys(), "a stale label array is dropped on resume"
    for key in ("tokens/input_ids", "tokens/sequence", "tokens/doc_id", "layer_1/residual"):
        np.testing.assert_array_equal(open_store(split)[key][:], packed[key][:])
