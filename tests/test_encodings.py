"""8-bit storage encodings (int8, float8_e4m3 with a float32 scale per row): the stored codes and scales
against an independent reference of the encoding, decoding by every reader (open_store, ActivationDataset,
the SAELens export, zarr alone), checksums and records covering the scale arrays, the error the writer
records, statistics of the decoded values, a resume, and the errors for what cannot be stored."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import zarr

from engine import ActivationDataset, CaptureConfig, CaptureEngine, StoreCorruptError, open_store
from engine.errors import ConfigError
from engine.format.encoding import ENCODINGS

from helpers import assert_statistics_match, cli, expected_rows, ragged_batch, reference_capture, tiny_model

KEY = "layer_1/residual"
MLP = "layer_1/mlp_hidden"
MAX_CODE = {"int8": 127.0, "float8_e4m3": 448.0}


def capture(path, dtype: str, forwards: int = 6, start: int = 0, **config):
    """A tiny gpt2's layer 1 (residual and mlp_hidden) over ragged batches; returns (reference tensors per
    key, batches)."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(8, 32, seed=seed) for seed in range(start, start + forwards)]
    cfg = CaptureConfig(path, layer_indices=[1], chunk_tokens=64, dtype=dtype, **config)
    with reference_capture(model, [1], ["residual", "mlp_hidden"]) as ref, torch.no_grad(), \
            CaptureEngine(model, cfg):
        for batch in batches:
            model(**batch)
    return ref, batches


def reference_encoding(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(decoded rows, scales) of float32 ``rows`` as the format document defines the encoding, computed here
    with numpy (float8: ml_dtypes-free, through torch's own float8 cast of the scaled values)."""
    scale = np.abs(rows).max(axis=1, keepdims=True) / np.float32(MAX_CODE[dtype])
    safe = np.where(scale > 0, scale, np.float32(1))
    scaled = np.clip(rows / safe, -MAX_CODE[dtype], MAX_CODE[dtype])
    if dtype == "int8":
        codes = np.round(scaled)
    else:
        codes = torch.from_numpy(scaled).to(torch.float8_e4m3fn).float().numpy()
    return (codes * scale).astype(np.float32), scale.astype(np.float32)


@pytest.fixture(scope="module", params=sorted(ENCODINGS))
def encoded(request, tmp_path_factory):
    dtype = request.param
    path = tmp_path_factory.mktemp(dtype) / "s.zarr"
    ref, batches = capture(path, dtype)
    masks = [batch["attention_mask"] for batch in batches]
    truth = {key: expected_rows(ref[key], masks, dtype=torch.float32) for key in (KEY, MLP)}
    return dtype, path, truth


def test_stored_codes_and_scales_are_the_encoding_of_the_captured_rows(encoded):
    dtype, path, truth = encoded
    store = open_store(path, verify=True)
    assert store.manifest.format_version == 3 and store.manifest.dtype == dtype
    for key in (KEY, MLP):
        decoded, scales = reference_encoding(truth[key], dtype)
        array = store[key]
        np.testing.assert_array_equal(array.scales[:], scales)
        np.testing.assert_allclose(array[:], decoded, rtol=1e-6, atol=1e-7, err_msg=key)
        assert array[:].dtype == np.float32 and array[:].shape == truth[key].shape
        bound = scales / 2 if dtype == "int8" else np.abs(truth[key]) / 16 + scales * 2.0 ** -10
        assert (np.abs(array[:] - truth[key]) <= bound * 1.0001 + 1e-7).all()
        assert array.codes[:].dtype == ENCODINGS[dtype].code_dtype
        np.testing.assert_array_equal(array[10:20, 3:7], array[:][10:20, 3:7])
        np.testing.assert_array_equal(array[5], array[:][5])


def test_every_reader_decodes_the_same_values(encoded, tmp_path):
    dtype, path, truth = encoded
    decoded = open_store(path)[KEY][:]
    data = ActivationDataset(path, KEY, batch_size=4096, shuffle=False, exclude=[])
    np.testing.assert_array_equal(next(iter(data)).numpy(), decoded)
    half = ActivationDataset(path, [KEY, MLP], batch_size=4096, shuffle=False, exclude=[],
                             dtype=torch.float16)
    batch = next(iter(half))
    assert batch[KEY].dtype == torch.float16
    np.testing.assert_array_equal(batch[MLP].numpy(), open_store(path)[MLP][:].astype(np.float16))
    # zarr alone, with what the array's attributes say
    group = zarr.open_group(str(path), mode="r")
    attributes = dict(group[KEY].attrs)
    assert attributes["scale_array"] == f"scales/{KEY}" and "float32(code) * scale" in attributes["decode"]
    codes = torch.from_numpy(group[KEY][:len(decoded)])
    values = (codes.view(torch.float8_e4m3fn) if dtype == "float8_e4m3" else codes).float().numpy()
    np.testing.assert_array_equal(values * group[attributes["scale_array"]][:len(decoded)], decoded)


def test_the_saelens_export_decodes(encoded, tmp_path):
    pytest.importorskip("datasets")
    from engine.read.saelens import export_saelens

    dtype, path, truth = encoded
    done = export_saelens(path, tmp_path / "out", KEY, context_size=4, exclude=[])
    assert done.dtype == "float32"
    import datasets

    table = datasets.load_from_disk(str(tmp_path / "out"))
    exported = np.asarray(table[done.hook_name], dtype=np.float32).reshape(-1, truth[KEY].shape[1])
    stored = {bytes(row) for row in open_store(path)[KEY][:]}
    assert len(exported) == done.rows * 4 and {bytes(row) for row in exported} <= stored


def test_records_checksum_the_scales_and_hold_the_encoding_error(encoded, tmp_path):
    dtype, path, truth = encoded
    store = open_store(path)
    for record in store.chunks:
        assert {f"scales/{KEY}", f"scales/{MLP}"} <= set(record.files)
    squared_error = sum(record.stats[KEY].squared_error for record in store.chunks)
    squared_norm = sum(record.stats[KEY].squared_norm for record in store.chunks)
    decoded = store[KEY][:]
    assert squared_norm == pytest.approx(float((truth[KEY].astype(np.float64) ** 2).sum()), rel=1e-5)
    assert squared_error == pytest.approx(float(((decoded - truth[KEY]).astype(np.float64) ** 2).sum()),
                                          rel=1e-3)
    error = np.sqrt(squared_error / squared_norm)
    assert 0 < error < (0.01 if dtype == "int8" else 0.05)
    first = store.chunks[0]
    rows = decoded[:first.token_count]
    assert (first.stats[KEY].min, first.stats[KEY].max) == (float(rows.min()), float(rows.max()))
    out = cli("inspect", str(path), "--verify")
    line = next(line for line in out.splitlines() if line.strip().startswith(KEY))
    shown = float(re.search(rf"{dtype}: relative RMS error ([0-9.]+)", line).group(1))
    assert shown == pytest.approx(error, abs=1e-4)


def test_statistics_describe_the_decoded_values(encoded):
    _, path, truth = encoded
    assert_statistics_match(path, KEY, truth[KEY].shape[1])


def test_a_damaged_scale_chunk_is_caught(encoded, tmp_path):
    import shutil

    _, path, _ = encoded
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    chunk = copy / "scales" / KEY / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=f"scales/{KEY}"):
        open_store(copy, verify=True)
    with pytest.raises(StoreCorruptError, match=f"scales/{KEY}"):
        list(ActivationDataset(copy, KEY, batch_size=64, verify=True))


def test_a_resumed_int8_store_equals_an_uninterrupted_one(tmp_path):
    whole, cut = tmp_path / "whole.zarr", tmp_path / "cut.zarr"
    capture(whole, "int8", forwards=6)
    capture(cut, "int8", forwards=3)
    manifest = json.loads((cut / "zarr.json").read_text())
    manifest["attributes"]["manifest"]["status"] = "open"  # as if the job had been killed after 3 batches
    (cut / "zarr.json").write_text(json.dumps(manifest))
    capture(cut, "int8", forwards=3, start=3, resume=True)
    a, b = open_store(whole, verify=True), open_store(cut, verify=True)
    for key in (KEY, f"scales/{KEY}", "tokens/input_ids", "tokens/position"):
        np.testing.assert_array_equal(b[key][:] if key.startswith(("scales", "tokens")) else b[key].codes[:],
                                      a[key][:] if key.startswith(("scales", "tokens")) else a[key].codes[:])
    assert a.manifest.statistics[KEY]["count"] == b.manifest.statistics[KEY]["count"]
    # the chunk cut at the resume keeps its old record's error sums for the rows it kept
    assert len(b.chunks) == len(a.chunks) and b.num_tokens % 64  # a partial chunk was continued
    for field in ("squared_error", "squared_norm"):
        assert sum(getattr(r.stats[KEY], field) for r in b.chunks) == pytest.approx(
            sum(getattr(r.stats[KEY], field) for r in a.chunks), rel=1e-6)


def test_an_encoded_array_is_listed_only_once_its_scales_exist(encoded, tmp_path):
    """A capture creates the scale arrays first; a reader that opens a store between the two (no chunk
    committed yet) does not see the activation array, so a follower keeps waiting instead of failing."""
    import shutil

    _, path, _ = encoded
    copy = tmp_path / "early.zarr"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "commits")
    (copy / "commits").mkdir()
    shutil.copy(path / "commits" / "zarr.json", copy / "commits" / "zarr.json")
    shutil.rmtree(copy / "scales" / KEY)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["manifest"].update(status="open", committed_tokens=0, committed_chunks=0)
    (copy / "zarr.json").write_text(json.dumps(doc))
    store = open_store(copy)
    assert KEY not in store.keys() and MLP in store.keys()
    with pytest.raises(KeyError, match=KEY):
        store[KEY]


def test_a_row_holding_a_non_finite_value_decodes_as_nan_and_is_counted(tmp_path):
    model = tiny_model("gpt2")

    def poison(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 3, 5] = float("inf")  # one value of one real row of the first forward
        return output

    handle = model.transformer.h[1].register_forward_hook(poison)
    path = tmp_path / "s.zarr"
    with pytest.warns(RuntimeWarning), torch.no_grad(), CaptureEngine(
            model, CaptureConfig(path, layer_indices=[1], capture_mlp_hidden=False, dtype="int8")):
        model(**ragged_batch(2, 16, seed=0))
    handle.remove()
    store = open_store(path, verify=True)
    values = store[KEY][:]
    assert np.isnan(values[3]).all() and np.isfinite(np.delete(values, 3, axis=0)).all()
    assert sum(record.stats[KEY].nonfinite for record in store.chunks) == values.shape[1]


def test_a_compressed_int8_store_round_trips(tmp_path):
    ref, batches = capture(tmp_path / "z.zarr", "int8", forwards=2, compressor="zstd")
    plain_ref, _ = capture(tmp_path / "p.zarr", "int8", forwards=2)
    np.testing.assert_array_equal(open_store(tmp_path / "z.zarr", verify=True)[KEY][:],
                                  open_store(tmp_path / "p.zarr")[KEY][:])


def test_unknown_or_unproducible_encodings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="dtype 'int4' is not supported: use one of .*int8, float8_e4m3"):
        CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], dtype="int4")
    from engine.capture import encoder
    monkeypatch.setitem(encoder._CODE_DTYPES, "float8_e4m3", None)  # a torch without float8
    with pytest.raises(ConfigError, match="float8_e4m3.*torch.float8_e4m3fn.*dtype='int8'"):
        CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], dtype="float8_e4m3")
