"""The streaming core end to end: real tiny models, real zarr stores on disk."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch

import engine
from engine import CaptureConfig, CaptureEngine, open_store
from engine.capture.hookpoints import resolve_hook_points
from engine.format.layout import FLAG_BOS, FLAG_FIRST, FLAG_LAST

from fakes import GATE_ENV, use_sink
from helpers import (
    D_MLP,
    D_MODEL,
    assert_store_rows,
    expected_rows,
    ragged_batch,
    reference_capture,
    tiny_model,
)

ALL_POINTS = dict(capture_residual=True, capture_mlp_hidden=True, capture_mlp_out=True, capture_attn_out=True)
POINT_NAMES = ["residual", "mlp_hidden", "mlp_out", "attn_out"]


def run_capture(model, cfg, batches, tokenizer=None):
    with reference_capture(model, list(cfg.layer_indices), list(cfg.points)) as ref:
        with CaptureEngine(model, cfg, tokenizer=tokenizer) as cap, torch.no_grad():
            for batch in batches:
                model(**batch)
    return cap, ref


@pytest.mark.parametrize("side", ["right", "left"])
def test_stored_rows_equal_model_activations(family, side, tmp_path):
    model = tiny_model(family)
    batches = [ragged_batch(5, 9, seed=s, side=side) for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=7, num_writers=3,
                        **ALL_POINTS)
    cap, ref = run_capture(model, cfg, batches)
    masks = [b["attention_mask"] for b in batches]
    store = open_store(cfg.output_dir)
    n_real = int(sum(m.sum() for m in masks))
    assert store.status == "complete" and store.num_tokens == n_real == cap.stats.tokens
    for layer in (0, 1):
        for point in POINT_NAMES:
            key = f"layer_{layer}/{point}"
            stored = store[key][:]
            assert stored.shape == (n_real, D_MLP if point == "mlp_hidden" else D_MODEL)
            np.testing.assert_array_equal(stored.astype(np.float32), expected_rows(ref[key], masks))
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).numpy()
    np.testing.assert_array_equal(store["tokens/input_ids"][:], ids)


def test_chunks_of_whole_disk_units_are_stored_exactly(tmp_path):
    """Chunks of 8 KiB and 20 KiB per array are written with O_DIRECT where the filesystem takes it (durable,
    local, Linux), the last, partial one partly so: every row is the model's, and every checksum holds."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(5, 30, seed=s) for s in range(5)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], chunk_tokens=64, num_writers=2)
    _, ref = run_capture(model, cfg, batches)
    masks = [b["attention_mask"] for b in batches]
    store = open_store(cfg.output_dir, verify=True)
    assert store.num_tokens % 64, "the last chunk is partial"
    for key in ("layer_1/residual", "layer_1/mlp_hidden"):
        assert 64 * store[key].shape[1] * 2 % 4096 == 0
        np.testing.assert_array_equal(store[key][:].astype(np.float32), expected_rows(ref[key], masks))


def test_residual_matches_hidden_states_through_pipeline(tmp_path):
    model = tiny_model("llama")
    batch = ragged_batch(4, 8, seed=3)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], capture_mlp_hidden=False, chunk_tokens=4)
    with CaptureEngine(model, cfg), torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    expected = out.hidden_states[1][batch["attention_mask"].bool()].half().numpy()
    np.testing.assert_array_equal(open_store(cfg.output_dir)["layer_0/residual"][:], expected)


def test_every_token_exactly_once_with_many_writers(tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(6, 11, seed=s) for s in range(30)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], chunk_tokens=5, num_writers=4, pinned_slots=3)
    run_capture(model, cfg, batches)
    store = open_store(cfg.output_dir)
    seq, pos = store["tokens/sequence"][:], store["tokens/position"][:]
    flags = store["tokens/flags"][:]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).numpy()
    assert len(set(zip(seq.tolist(), pos.tolist()))) == len(seq) == lengths.sum()
    assert np.all(np.diff(seq) >= 0), "rows are stored in forward order"
    for s in np.unique(seq):
        positions = pos[seq == s]
        np.testing.assert_array_equal(positions, np.arange(lengths[s]))
        assert flags[seq == s][0] & FLAG_FIRST and flags[seq == s][-1] & FLAG_LAST
    assert set(np.flatnonzero(lengths == 0)).isdisjoint(seq), "all-padding rows store nothing"
    assert np.all((store["tokens/input_ids"][:] == 1) == ((flags & FLAG_BOS) != 0))


def test_on_disk_contract_and_manifest(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=8, **ALL_POINTS)
    run_capture(model, cfg, [ragged_batch(4, 10, seed=s) for s in range(3)])
    import zarr

    group = zarr.open_group(str(cfg.output_dir), mode="r")
    manifest = group.attrs["manifest"]
    n = manifest["committed_tokens"]
    assert manifest["status"] == "complete" and manifest["format_version"] == 2
    assert manifest["arrays"]["layer_1/mlp_hidden"]["tl_name"] == "blocks.1.mlp.hook_post"
    assert manifest["arrays"]["layer_1/mlp_hidden"]["module_path"] == "transformer.h.1.mlp.c_proj"
    assert manifest["arrays"]["layer_0/residual"]["tl_name"] == "blocks.0.hook_resid_post"
    for key in ["layer_0/residual", "layer_1/attn_out", "tokens/input_ids", "tokens/sequence",
                "tokens/position", "tokens/flags"]:
        assert group[key].shape[0] == n, "after a clean close every array has exactly the committed rows"
    assert group["tokens/input_ids"].dtype == np.int32 and group["tokens/sequence"].dtype == np.int64
    records = [group[f"commits/{name}"].attrs for name in sorted(group["commits"].group_keys())]
    assert [r["chunk_index"] for r in records] == list(range(len(records)))
    assert sum(r["token_count"] for r in records) == n
    for field in ("keys", "shape", "dtype", "num_sequences", "max_seq_len", "token_count", "row_start",
                  "row_stop", "stats", "files"):
        assert field in records[0]
    assert records[0]["stats"]["layer_0/residual"]["nonfinite"] == 0
    token_keys = {f"tokens/{name}" for name in group["tokens"].array_keys()}
    for record in records:  # every array's chunk: the CRC32C of its committed rows and its file's size
        assert set(record["files"]) == {*record["keys"], *token_keys}
        for key, file in record["files"].items():
            array = group[key]
            rows = array[record["row_start"]:record["row_stop"]]
            assert file["crc32c"] == google_crc32c.value(rows.tobytes())
            chunk = Path(cfg.output_dir) / key / array.metadata.encode_chunk_key((record["chunk_index"],)
                                                                                 + (0,) * (array.ndim - 1))
            assert file["nbytes"] == chunk.stat().st_size == 8 * rows[0].nbytes


def test_dask_reads_the_store_without_engine_code(tmp_path):
    da = pytest.importorskip("dask.array")
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    run_capture(model, cfg, [ragged_batch(4, 10, seed=1)])
    array = da.from_zarr(str(cfg.output_dir), component="layer_0/residual")
    np.testing.assert_array_equal(array.compute(), open_store(cfg.output_dir)["layer_0/residual"][:])


def test_reader_mid_run_sees_only_committed_chunks(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv(GATE_ENV, str(gate))
    use_sink(monkeypatch, "GatedSink")
    model = tiny_model("gpt2")
    batches = [ragged_batch(4, 10, seed=s) for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=6, num_writers=2, pinned_slots=8)
    with reference_capture(model, [0], ["residual"]) as ref:
        cap = CaptureEngine(model, cfg)
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        deadline = time.time() + 10
        while cap.stats.chunks_committed < 2 and time.time() < deadline:
            time.sleep(0.01)
        mid = open_store(cfg.output_dir)
        assert mid.status == "open" and mid.num_tokens == 12 and len(mid.chunks) == 2
        expected = expected_rows(ref["layer_0/residual"], [b["attention_mask"] for b in batches])
        np.testing.assert_array_equal(mid["layer_0/residual"][:], expected[:12])
        gate.touch()
        cap.close()
    assert open_store(cfg.output_dir).num_tokens == len(expected)


def test_failure_in_with_block_keeps_committed_chunks(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=6)
    with pytest.raises(RuntimeError, match="user code"):
        with CaptureEngine(model, cfg), torch.no_grad():
            model(**ragged_batch(4, 10, seed=0))
            raise RuntimeError("user code failed")
    store = open_store(cfg.output_dir)
    assert store.status == "failed"
    assert store.num_tokens % 6 == 0 and store.num_tokens > 0, "only whole chunks, no partial tail"
    model(**ragged_batch(2, 4))  # hooks are gone: the model runs as before


@pytest.mark.parametrize("sink, failing_function", [
    ("FailingSink", "write_chunk"), ("RowWriteFailingSink", "_write_all_rows"),
    ("DiskAndStatisticsFailingSink", "statistics failed (test)")])
def test_writer_error_reaches_caller_with_cause(tmp_path, monkeypatch, sink, failing_function):
    use_sink(monkeypatch, sink)
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4, pinned_slots=1)
    cap = CaptureEngine(model, cfg)
    with pytest.raises(engine.CaptureError) as info, torch.no_grad():
        for seed in range(50):
            model(**ragged_batch(2, 8, seed=seed))
        cap.close()
    assert isinstance(info.value.__cause__, OSError) and "No space left" in str(info.value)
    assert failing_function in str(info.value), "the failing thread's traceback is in the message"
    cap.close()  # idempotent, does not raise twice
    assert not model._forward_pre_hooks and open_store(cfg.output_dir).status == "failed"


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_every_chunk_folder_is_made_before_the_first_chunk(tmp_path, monkeypatch, compressor):
    """Writer threads committing chunks at once never race to make an array's shared chunk folder (the thread
    that lost could commit a chunk under a folder entry not yet on disk)."""
    use_sink(monkeypatch, "ChunkFolderCheckingSink")
    model = tiny_model("gpt2")
    batches = [ragged_batch(3, 8, seed=s) for s in range(6)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4, num_writers=3,
                        compressor=compressor)
    _, ref = run_capture(model, cfg, batches)
    expected = expected_rows(ref["layer_0/residual"], [b["attention_mask"] for b in batches])
    np.testing.assert_array_equal(open_store(cfg.output_dir)["layer_0/residual"][:], expected)


def test_null_sink_runs_pipeline_and_writes_nothing(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], sink="null", chunk_tokens=4)
    cap, _ = run_capture(model, cfg, [ragged_batch(4, 8, seed=s) for s in range(3)])
    assert cap.stats.tokens > 0 and not (tmp_path / "s.zarr").exists()


def test_backpressure_stalls_without_losing_rows(tmp_path, monkeypatch):
    use_sink(monkeypatch, "SlowSink")
    model = tiny_model("gpt2")
    batches = [ragged_batch(2, 8, seed=s) for s in range(12)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4, pinned_slots=1, num_writers=1)
    cap, ref = run_capture(model, cfg, batches)
    assert cap.stats.stall_seconds > 0 and cap.stats.queue_high_water <= 1
    expected = expected_rows(ref["layer_0/residual"], [b["attention_mask"] for b in batches])
    store = open_store(cfg.output_dir)
    np.testing.assert_array_equal(store["layer_0/residual"][:], expected)
    # every forward's wait is in the commit record of the chunk holding its first row (the report plots them)
    assert sum(record.stall_seconds for record in store.chunks) == pytest.approx(cap.stats.stall_seconds)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_storage_dtypes(dtype, tmp_path):
    model = tiny_model("llama")
    batches = [ragged_batch(3, 6, seed=1)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], capture_mlp_hidden=False, dtype=dtype,
                        chunk_tokens=5)
    _, ref = run_capture(model, cfg, batches)
    array = open_store(cfg.output_dir)["layer_1/residual"]
    data = array[:]
    if dtype == "bfloat16":
        assert data.dtype == np.uint16 and array.attrs["encoding"] == "bfloat16-bits-in-uint16"
        data = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).float().numpy()
    torch_dtype = getattr(torch, dtype)
    np.testing.assert_array_equal(data, expected_rows(ref["layer_1/residual"], [batches[0]["attention_mask"]],
                                                      torch_dtype))


def test_original_design_entry_points(tmp_path):
    model = tiny_model("gpt2")
    assert engine.ActivationCapture is CaptureEngine
    capture = engine.create_gpt2_capture(model, tmp_path / "s.zarr", layer_indices=[1], chunk_tokens=4)
    with torch.no_grad():
        model(**ragged_batch(2, 5))
    capture.close()
    store = open_store(tmp_path / "s.zarr")
    assert store.keys()[:2] == ["layer_1/residual", "layer_1/mlp_hidden"] and store.num_tokens > 0
    with pytest.raises(engine.CaptureClosedError):
        capture.__enter__()


def test_existing_store_needs_overwrite(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4)
    run_capture(model, cfg, [ragged_batch(2, 5)])
    with pytest.raises(engine.StoreExistsError, match="overwrite=True"):
        CaptureEngine(model, cfg)
    assert open_store(cfg.output_dir).status == "complete", "nothing was touched"

    run_capture(model, dataclasses.replace(cfg, overwrite=True), [ragged_batch(1, 3)])
    assert open_store(cfg.output_dir).num_tokens <= 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_tokens=0), "chunk_tokens must be a positive int"),
    (dict(num_writers=-1), "num_writers"),
    (dict(pinned_slots=0), "pinned_slots"),
    (dict(max_batch_tokens=0), "max_batch_tokens must be a positive int"),
    (dict(dtype="int4"), "dtype 'int4' is not supported"),
    (dict(layer_indices=[]), "layer_indices is empty"),
    (dict(layer_indices=[1, 1]), "duplicates"),
    (dict(capture_residual=False, capture_mlp_hidden=False), "no hook point selected"),
    (dict(overwrite=True, resume=True), "contradict"),
    (dict(sink="s3"), "sink"),
])
def test_config_errors_say_what_to_change(kwargs, match, tmp_path):
    base = dict(output_dir=tmp_path / "s.zarr", layer_indices=[0])
    with pytest.raises(engine.ConfigError, match=match):
        CaptureConfig(**{**base, **kwargs})


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(CaptureConfig)])
def test_every_config_field_is_type_checked(field, tmp_path):
    """Issue 32: each field, a field added later included, refuses a value of another type than it declares.
    Before: booleans took any value (overwrite="false" is true, and replaced a store)."""
    base = dict(output_dir=tmp_path / "s.zarr", layer_indices=[0])
    with pytest.raises(engine.ConfigError, match=f"^{field} must be "):
        CaptureConfig(**{**base, field: object()})


def test_a_string_is_not_a_boolean_and_overwrites_nothing(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4)
    run_capture(model, cfg, [ragged_batch(2, 5)])
    before = open_store(cfg.output_dir).manifest
    for field in ("overwrite", "durable", "statistics", "resume", "early_stop"):
        with pytest.raises(engine.ConfigError, match=f"{field} must be True or False, got 'false'.*not a "
                                                     "boolean"):
            dataclasses.replace(cfg, **{field: "false"})
    assert open_store(cfg.output_dir).manifest == before, "nothing was replaced"


@pytest.mark.parametrize("name", [".", "..", ".hidden"])
def test_an_extra_module_name_cannot_leave_its_folder(name, tmp_path):
    """Issue 32: ``..`` passed the name check (the array would be ``extra/..``: the store's root)."""
    with pytest.raises(engine.ConfigError, match="do not start with '.'"):
        CaptureConfig(tmp_path / "s.zarr", points=[], extra_modules={name: "transformer.h.0"})


def test_config_is_frozen(tmp_path):
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_tokens = 3


def test_early_stop_skips_later_layers_and_stores_the_same_rows(tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(3, 7, seed=s) for s in range(3)]
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    model.transformer.h[1].register_forward_hook(lambda *a: calls.append("block1"))
    full = CaptureConfig(tmp_path / "full.zarr", layer_indices=[0], chunk_tokens=4)
    early = CaptureConfig(tmp_path / "early.zarr", layer_indices=[0], chunk_tokens=4, early_stop=True)
    with CaptureEngine(model, early) as cap, torch.no_grad():
        outputs = [model(**batch) for batch in batches]
        assert outputs == [None, None, None] and calls == []
        with cap.detached():
            assert model(**batches[0]) is not None and calls == ["block1", "lm_head"]
    run_capture(model, full, batches)
    for key in ("layer_0/residual", "layer_0/mlp_hidden", "tokens/sequence"):
        np.testing.assert_array_equal(open_store(early.output_dir)[key][:],
                                      open_store(full.output_dir)[key][:])
    assert model(**batches[0]) is not None, "the model's own forward is restored after close"


def test_flush_waits_for_full_chunks(tmp_path, monkeypatch):
    use_sink(monkeypatch, "SlowSink")
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4, num_writers=2)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        for seed in range(3):
            model(**ragged_batch(2, 8, seed=seed))
        cap.flush()
        staged = int(sum(ragged_batch(2, 8, seed=s)["attention_mask"].sum() for s in range(3)))
        assert cap.stats.tokens == staged // 4 * 4
        assert open_store(cfg.output_dir).num_tokens == staged // 4 * 4


def test_no_race_between_submit_and_slot_recycling(tmp_path):
    """Regression: the forward thread read slot.batch after handing the slot to a writer that may have
    recycled it already; forcing constant thread switches made that fail within ~150 forwards."""
    import sys

    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], sink="null", chunk_tokens=4, num_writers=3,
                        pinned_slots=2)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            for _ in range(400):
                model(input_ids=torch.ones(1, 1, dtype=torch.long))
    finally:
        sys.setswitchinterval(interval)
    assert cap.stats.tokens == 400


def test_early_stop_keeps_an_instance_level_forward(tmp_path):
    model = tiny_model("gpt2")
    calls = []
    original = model.forward

    def instance_forward(*args, **kwargs):  # what accelerate's dispatch hooks install
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = instance_forward
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4, early_stop=True)
    with CaptureEngine(model, cfg), torch.no_grad():
        assert model(**ragged_batch(2, 5)) is None
    assert calls == [1] and model.forward is instance_forward


def test_annotations_are_stored_per_token(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4,
                        annotations={"doc_id": "int64", "char_start": "int32"})
    batches = [ragged_batch(3, 6, seed=s) for s in range(3)]
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        for i, batch in enumerate(batches):
            cap.annotate(doc_id=torch.full((3, 6), 100 + i), char_start=torch.arange(18).view(3, 6))
            model(**batch)
        try:
            model(input_ids=torch.ones(0, 6, dtype=torch.long))  # an empty batch stores nothing to annotate
        except engine.BatchError:
            raise
        except Exception:
            pass  # some transformers versions cannot run an empty batch at all; capture must go on
        with pytest.raises(engine.BatchError, match="annotate"):
            model(**batches[0])  # no annotations for this forward
    store = open_store(cfg.output_dir)
    masks = [b["attention_mask"].bool() for b in batches]
    np.testing.assert_array_equal(store["tokens/doc_id"][:],
                                  np.concatenate([np.full(int(m.sum()), 100 + i)
                                                  for i, m in enumerate(masks)]))
    np.testing.assert_array_equal(store["tokens/char_start"][:],
                                  np.concatenate([torch.arange(18).view(3, 6)[m].numpy() for m in masks]))
    assert store["tokens/char_start"].dtype == np.int32 and "tokens/doc_id" in store.keys()


def dispatched_ops(model, batch, runs: int = 3) -> int:
    """Torch ops the forward thread dispatches over ``runs`` forwards (a TorchDispatchMode is thread-local, so
    the writer process and any other thread are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count(), torch.no_grad():
        for _ in range(runs):
            model(**batch)
    return Count.ops


def test_a_forward_that_fails_after_staging_a_point_leaves_the_next_larger_batch_right(tmp_path):
    """The first forward stages layer 0, then the model raises; the slot's layer-0 buffer was sized for that
    small batch, and a larger next batch must grow it, not index past it or lose its width."""
    model = tiny_model("llama")
    layer_1 = resolve_hook_points(model, [1], ["residual"], {})[0].module
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], points=["residual"], pinned_slots=1)

    def fail_once(module, args, output):
        handle.remove()
        raise RuntimeError("the model failed mid-forward")

    handle = layer_1.register_forward_hook(fail_once)
    with CaptureEngine(model, cfg), torch.no_grad():
        with pytest.raises(RuntimeError, match="mid-forward"):
            model(**ragged_batch(2, 3, seed=0))
        batch = ragged_batch(5, 9, seed=1)
        with reference_capture(model, [0, 1], ["residual"]) as ref:
            model(**batch)
    store = open_store(cfg.output_dir)
    for key in ("layer_0/residual", "layer_1/residual"):
        np.testing.assert_array_equal(store[key][:].astype(np.float32),
                                      expected_rows(ref[key], [batch["attention_mask"]]))


def test_hooks_dispatch_few_ops_per_point(tmp_path):
    """The forward thread's whole cost of capture, in torch ops: at most 4 per hooked point, per-batch work
    included (staging.py's table: on CPU, 2 per batch for ids and mask and 1 per point)."""
    model = tiny_model("gpt2")
    batch = ragged_batch(3, 8)
    base = dispatched_ops(model, batch)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=16, **ALL_POINTS)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**batch)  # the first batch allocates the slots and caches their views
        hooked = dispatched_ops(model, batch)
    points = len(cap.points)
    assert (hooked - base) / 3 == 2 + points <= 4 * points


def counted_slot_allocations(monkeypatch) -> list[int]:
    """The sizes of the staging buffers allocated from now on, in order."""
    from engine.capture import staging
    allocations: list[int] = []
    original = staging.SharedBuffer.__init__

    def counting(self, nbytes, pin):
        allocations.append(nbytes)
        original(self, nbytes, pin)

    monkeypatch.setattr(staging.SharedBuffer, "__init__", counting)
    return allocations


def test_slots_are_allocated_before_the_second_forward(tmp_path, monkeypatch):
    from engine.capture import staging
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=16, pinned_slots=3)
    allocations = counted_slot_allocations(monkeypatch)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**ragged_batch(4, 8, seed=0))
        after_first = len(allocations)
        for seed in range(1, 8):
            model(**ragged_batch(4, 8, seed=seed))
        held = cap.stats.slot_bytes
    assert after_first == 3 * 3 and len(allocations) == after_first, "tokens + 2 points per slot, all at once"
    assert held == sum(-(-n // staging.PAGE) * staging.PAGE for n in allocations), "whole mapped pages"


@pytest.mark.parametrize("planned", [None, 4 * 8, 16])
def test_max_batch_tokens_sizes_every_slot_once(tmp_path, monkeypatch, planned):
    """Batches that grow from 2 x 3 to 4 x 8 tokens: without max_batch_tokens the slots are reallocated
    during later forwards; with 32, every slot is sized at the first batch and none again; with 16, batches
    beyond it still grow the slots. The rows are the same every time."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(2, 3, seed=0), ragged_batch(3, 5, seed=1), ragged_batch(4, 8, seed=2),
               ragged_batch(4, 6, seed=3), ragged_batch(4, 8, seed=4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=16, pinned_slots=3,
                        max_batch_tokens=planned)
    allocations = counted_slot_allocations(monkeypatch)
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**batches[0])
        after_first = len(allocations)
        for batch in batches[1:]:
            model(**batch)
        capacities = [slot.capacity for slot in cap._pool.slots]
    assert after_first == 3 * 3, "tokens + 2 points per slot, all at the first batch"
    if planned == 4 * 8:
        assert len(allocations) == after_first, "no slot reallocated after the first batch"
        assert capacities == [planned] * 3
    else:
        assert len(allocations) > after_first, "batches beyond the slots reallocate them"
        assert max(capacities) == 4 * 8 and min(capacities) >= (planned or 0)
    assert_store_rows(cfg.output_dir, ref, batches)


def test_max_batch_tokens_beyond_host_memory_fails_at_the_first_forward(tmp_path):
    """The slots' memory for the planned batches is checked before the first batch is staged, not when the
    first long batch comes: a clear error naming the fix, nothing stored, nothing allocated."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=16,
                        max_batch_tokens=10 ** 12)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        with pytest.raises(engine.BatchError, match="max_batch_tokens"):
            model(**ragged_batch(2, 3))
        assert cap.stats.batches == 0 and cap.stats.slot_bytes == 0
        assert cap._pool.free_count == cfg.pinned_slots, "the slot came back"
    assert open_store(cfg.output_dir).num_tokens == 0


def test_max_batch_tokens_checks_points_of_unknown_width_before_sizing_every_slot(tmp_path, monkeypatch):
    """A point whose module does not declare its width (an activation function) is left out of the memory
    check before the first batch; once the first batch has told its width, every slot's planned size is
    checked with it before the other slots are allocated."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", points=[], extra_modules={"act": "transformer.h.0.mlp.act"},
                        chunk_tokens=16, max_batch_tokens=4096)
    monkeypatch.setattr(engine.capture.staging, "available_host_memory", lambda: 2 << 20)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        with pytest.raises(engine.BatchError, match="max_batch_tokens, which sized them for 4,096"):
            model(**ragged_batch(2, 3))
        assert cap.stats.batches == 0
        assert sum(slot.nbytes > 0 for slot in cap._pool.slots) == 1, "the other slots were not allocated"
    assert open_store(cfg.output_dir).num_tokens == 0


def compiled_gpt2_and_reference(tmp_path, backend):
    """A tiny gpt2, its ``torch.compile`` form (not run yet), 3 ragged batches, a layer-0 config and the
    reference rows of those batches."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(3, 8, seed=s) for s in range(3)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    return model, torch.compile(model, backend=backend), batches, cfg, ref


def test_torch_compile_captures_the_same_rows(tmp_path):
    model, compiled, batches, cfg, ref = compiled_gpt2_and_reference(tmp_path, "aot_eager")
    with CaptureEngine(model, cfg), torch.no_grad():
        for batch in batches:
            compiled(**batch)
    assert_store_rows(cfg.output_dir, ref, batches)


def test_a_model_compiled_and_run_before_the_engine_is_refused_not_captured_empty(tmp_path):
    """Compiled code made before the hooks existed runs without them (dynamo does not guard on hooks by
    default): the root forward still runs, the points do not. The forward raises, naming them, instead of the
    store ending complete and empty; after torch._dynamo.reset() the same compiled model is captured."""
    model, compiled, batches, cfg, ref = compiled_gpt2_and_reference(tmp_path, "eager")
    try:
        with torch.no_grad():
            compiled(**batches[0])  # compiled before the engine exists
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            with pytest.raises(engine.HookPointError, match="layer_0/residual.*torch._dynamo.reset"):
                compiled(**batches[0])
            assert cap.stats.batches == 0 and cap._pool.free_count == cfg.pinned_slots, "the slot came back"
            torch._dynamo.reset()
            for batch in batches:
                compiled(**batch)
    finally:
        torch._dynamo.reset()
    sequences = open_store(cfg.output_dir)["tokens/sequence"][:]
    assert list(np.unique(sequences)) == list(range(9)), "the refused batch left no gap in the numbering"
    assert_store_rows(cfg.output_dir, ref, batches)


def test_a_small_store_takes_the_disk_its_rows_need(tmp_path):
    """The last, partial chunk of each array is written at its real length (a sparse file up to the chunk's
    size): 100-odd tokens in 8192-token chunks take kilobytes, not a full chunk per array."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=8192)
    batches = [ragged_batch(4, 32, seed=s) for s in range(2)]
    run_capture(model, cfg, batches)
    store = open_store(cfg.output_dir)
    row_bytes = sum(store[key].dtype.itemsize * int(np.prod(store[key].shape[1:])) for key in store.keys())
    chunk_files = [f for f in (tmp_path / "s.zarr").rglob("*") if f.is_file() and "c" in f.parts]
    allocated = sum(f.stat().st_blocks * 512 for f in chunk_files)
    assert store.num_tokens * row_bytes < 8192 * row_bytes / 20, "the test's store is far below one chunk"
    assert allocated <= store.num_tokens * row_bytes + 4096 * len(chunk_files), (allocated, len(chunk_files))
    np.testing.assert_array_equal(store["tokens/sequence"][:], np.repeat(np.arange(8), [
        int(m) for b in batches for m in b["attention_mask"].sum(1)]))


# ---- one engine per model ---------------------------------------------------------------------------------

def stored_rows(path, key="layer_0/residual") -> np.ndarray:
    return open_store(path)[key][:].astype(np.float32)


def test_a_second_engine_on_the_model_is_refused_before_it_opens_its_store(tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(3, 7, seed=s) for s in range(2)]
    first = CaptureConfig(tmp_path / "a.zarr", layer_indices=[0], chunk_tokens=4)
    with reference_capture(model, [0], list(first.points)) as ref:
        with CaptureEngine(model, first), torch.no_grad():
            model(**batches[0])
            with pytest.raises(engine.HookPointError, match="already has a CaptureEngine attached"):
                CaptureEngine(model, CaptureConfig(tmp_path / "b.zarr", layer_indices=[1], chunk_tokens=4))
            model(**batches[1])
    assert [p.name for p in tmp_path.iterdir()] == ["a.zarr"], "b.zarr was never opened"
    masks = [b["attention_mask"] for b in batches]
    expected = expected_rows(ref["layer_0/residual"], masks)
    np.testing.assert_array_equal(stored_rows(first.output_dir), expected)


def test_an_engine_inside_another_engines_detached_block(tmp_path):
    """Engine A detached, engine B captures inside the block and closes, A captures again after it."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(3, 7, seed=s) for s in range(3)]
    outer = CaptureConfig(tmp_path / "a.zarr", layer_indices=[0], chunk_tokens=4, early_stop=True)
    inner = CaptureConfig(tmp_path / "b.zarr", layer_indices=[0], chunk_tokens=4)
    with reference_capture(model, [0], ["residual"]) as ref:
        with CaptureEngine(model, outer) as a, torch.no_grad():
            assert model(**batches[0]) is None
            with a.detached():
                with CaptureEngine(model, inner):
                    assert model(**batches[1]) is not None, "B does not stop early: A's wrapper is off"
            assert model(**batches[2]) is None
    masks = [b["attention_mask"] for b in batches]
    rows = ref["layer_0/residual"]
    np.testing.assert_array_equal(stored_rows(outer.output_dir), expected_rows(rows[::2], masks[::2]))
    np.testing.assert_array_equal(stored_rows(inner.output_dir), expected_rows([rows[1]], masks[1:2]))
    assert open_store(outer.output_dir).status == open_store(inner.output_dir).status == "complete"


def test_leaving_detached_while_another_engine_is_attached_is_an_error(tmp_path):
    model = tiny_model("gpt2")
    a = CaptureEngine(model, CaptureConfig(tmp_path / "a.zarr", layer_indices=[0], chunk_tokens=4))
    with pytest.raises(engine.HookPointError, match="before leaving another engine's detached"):
        with a.detached():
            b = CaptureEngine(model, CaptureConfig(tmp_path / "b.zarr", layer_indices=[0], chunk_tokens=4))
    b.close()
    a.close(failed=True)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_stop_forward_never_reaches_the_caller(tmp_path):
    """Two early-stopping engines cannot share a model; the refused one leaves the first one's wrapper in
    place, and an error inside an early-stopping forward reaches the caller as itself."""
    model = tiny_model("gpt2")
    own_forward = model.forward
    batches = [ragged_batch(3, 7, seed=s) for s in range(2)]
    cfg = CaptureConfig(tmp_path / "a.zarr", layer_indices=[0], chunk_tokens=4, early_stop=True)
    with reference_capture(model, [0], ["residual"]) as ref:
        with CaptureEngine(model, cfg), torch.no_grad():
            wrapped = model.forward
            with pytest.raises(engine.HookPointError, match="already has a CaptureEngine attached"):
                CaptureEngine(model, dataclasses.replace(cfg, output_dir=tmp_path / "b.zarr"))
            assert model.forward == wrapped
            assert model(**batches[0]) is None
            bad = dict(batches[1], attention_mask=batches[1]["attention_mask"][:, :3])
            with pytest.raises(engine.BatchError, match="attention_mask has shape"):
                model(**bad)
            assert model(**batches[1]) is None
    assert model.forward == own_forward and model(**batches[0]) is not None
    rows = ref["layer_0/residual"]
    masks = [b["attention_mask"] for b in batches]
    np.testing.assert_array_equal(stored_rows(cfg.output_dir), expected_rows([rows[0], rows[-1]], masks))
