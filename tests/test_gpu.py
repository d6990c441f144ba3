"""The CUDA path: side-stream copies into pinned shared slots, event-synchronized handoff. Skipped without a
GPU (run with ``python -m pytest -m gpu`` on a CUDA machine; ``benchmarks/gpu_check.sh`` does)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_pipeline import dispatched_ops

import engine
from engine import CaptureConfig, CaptureEngine, open_store

from helpers import (
    assert_statistics_match,
    assert_store_rows,
    expected_rows,
    ragged_batch,
    reference_capture,
    tiny_model,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_batch(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def assert_slots_pinned(cap: CaptureEngine) -> None:
    """Every shared slot buffer is registered with CUDA (device-to-host copies are true DMA)."""
    pinned = [buffer.bytes.is_pinned() for slot in cap._pool.slots for buffer in slot.buffers.values()]
    assert pinned and all(pinned)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_cuda_rows_equal_model_activations(family, model_dtype, tmp_path):
    model = tiny_model(family, dtype=model_dtype).cuda()
    batches = [cuda_batch(ragged_batch(8, 96, seed=s)) for s in range(40)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], capture_attn_out=True, chunk_tokens=256,
                        num_writers=4, pinned_slots=3)
    with reference_capture(model, [0, 1], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            for batch in batches:
                model(**batch)
            assert_slots_pinned(cap)
    assert_store_rows(cfg.output_dir, ref, batches)
    store = open_store(cfg.output_dir)
    for key in ref:
        assert_statistics_match(cfg.output_dir, key, store[key].shape[1])


def test_inputs_reused_in_place_after_the_forward_store_what_the_model_saw(tmp_path):
    """Static input buffers (CUDA graphs, a reused batch): the caller overwrites ids and mask right after the
    forward, while the copies may still be in flight; the store keeps what the model saw."""
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(8, 64, seed=s)) for s in range(12)]
    ids = torch.empty_like(batches[0]["input_ids"])
    mask = torch.empty_like(batches[0]["attention_mask"])
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=128, pinned_slots=2)
    with CaptureEngine(model, cfg), torch.no_grad():
        for batch in batches:
            ids.copy_(batch["input_ids"])
            mask.copy_(batch["attention_mask"])
            model(input_ids=ids, attention_mask=mask)
            ids.fill_(7)
            mask.fill_(1)
    stored = open_store(cfg.output_dir)["tokens/input_ids"][:]
    expected = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).cpu().numpy()
    np.testing.assert_array_equal(stored, expected)


def test_hooks_never_synchronize_the_device(tmp_path):
    model = tiny_model("gpt2").cuda()
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=64, pinned_slots=2)
    batch = cuda_batch(ragged_batch(4, 32, seed=0))
    with reference_capture(model, [0, 1], list(cfg.points)) as ref, torch.no_grad():
        model(**batch)
    cap = CaptureEngine(model, cfg)
    outputs = {point.key: ref[point.key][0].cuda() for point in cap.points}

    def forward():
        cap._on_forward(model, (), batch)
        for point in cap.points:
            cap._on_point(point, outputs[point.key])

    forward()  # warm-up: allocates and registers every slot (registration may synchronize)
    cap.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        for _ in range(3):
            forward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cap.close()
    mask = batch["attention_mask"].cpu()
    for point in cap.points:
        np.testing.assert_array_equal(open_store(cfg.output_dir)[point.key][:].astype(np.float32),
                                      expected_rows(ref[point.key] * 4, [mask] * 4))


def test_cuda_hooks_dispatch_few_ops_per_point(tmp_path):
    """staging.py's table on CUDA: 2 ops per batch (stack snapshot + copy), 2 per point
    (cast snapshot + copy)."""
    model = tiny_model("gpt2").cuda()
    batch = cuda_batch(ragged_batch(3, 8))
    base = dispatched_ops(model, batch)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=16)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**batch)
        hooked = dispatched_ops(model, batch)
    assert (hooked - base) / 3 == 2 + 2 * len(cap.points) <= 4 * len(cap.points)


def test_cuda_graph_capture_is_refused(tmp_path):
    model = tiny_model("gpt2").cuda()
    batch = cuda_batch(ragged_batch(2, 16))
    with CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0])), torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), pytest.raises(engine.HookPointError, match="CUDA graph"):
            with torch.cuda.graph(graph):
                model(**batch)


def test_a_cuda_graph_captured_inside_detached_while_batches_are_in_flight(tmp_path):
    """detached() is where the engine tells users to capture CUDA graphs. The batches captured just before may
    still be on their way to the writer process, and during a global-mode graph capture no other thread may
    synchronize with the device: detached() hands them over first."""
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(8, 64, seed=s)) for s in range(6)]
    layer = torch.nn.Linear(64, 64).cuda()
    static = torch.zeros(16, 64, device="cuda")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=128, pinned_slots=4)
    with reference_capture(model, [0], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            for batch in batches[:3]:
                model(**batch)
            with cap.detached():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    layer(static)  # warm-up on a side stream, as torch.cuda.graph's documentation does
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    layer(static)
            graph.replay()
            for batch in batches[3:]:
                model(**batch)
    assert_store_rows(cfg.output_dir, ref, batches)


def test_cuda_rows_exact_under_a_user_stream_with_growing_batches_in_bfloat16(tmp_path):
    """The model runs on a stream of the caller's; every batch is larger than the last, so the pinned slots
    are unregistered, reallocated and announced again; storage is bfloat16 (uint16 bits)."""
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(2 + 2 * s, 16 + 8 * s, seed=s)) for s in range(5)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=64, pinned_slots=2,
                        dtype="bfloat16")
    stream = torch.cuda.Stream()
    with reference_capture(model, [0], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg) as cap, torch.no_grad(), torch.cuda.stream(stream):
            for batch in batches:
                model(**batch)
            assert_slots_pinned(cap)  # regrown ones too
    masks = [b["attention_mask"].cpu() for b in batches]
    store = open_store(cfg.output_dir)
    for key in ref:
        bits = store[key][:]
        stored = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(stored, expected_rows(ref[key], masks, dtype=torch.bfloat16))


def test_detached_waits_until_every_batch_in_flight_is_handed_over(tmp_path, monkeypatch):
    """The handoff thread is held on a batch's event (a gate another thread opens 0.5 s later): detached()
    enters only once that batch has been sent, so the gate is open by then and nothing is left to wait on."""
    gate = threading.Event()

    class GatedEvent(torch.cuda.Event):
        def synchronize(self):
            gate.wait()
            super().synchronize()

    monkeypatch.setattr(engine.staging.torch.cuda, "Event", GatedEvent)
    model = tiny_model("gpt2").cuda()
    with CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0])) as cap, torch.no_grad():
        model(**cuda_batch(ragged_batch(2, 16)))
        threading.Timer(0.5, gate.set).start()
        with cap.detached():
            assert gate.is_set() and cap._writer._handoff.empty()


def test_gpu_annotations_for_a_model_on_the_cpu_are_refused(tmp_path):
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], annotations={"doc_id": "int64"})
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        cap.annotate(doc_id=torch.zeros(2, 6, dtype=torch.long, device="cuda"))
        with pytest.raises(engine.BatchError, match="annotation 'doc_id' is on cuda:0 but the model on cpu"):
            model(**ragged_batch(2, 6))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ids_on_another_gpu_than_the_model_are_refused(tmp_path):
    model = tiny_model("gpt2").to("cuda:1")
    batch = {key: value.to("cuda:0") for key, value in ragged_batch(2, 6).items()}
    batch["attention_mask"] = batch["attention_mask"].to("cuda:1")
    with CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0])), torch.no_grad():
        with pytest.raises(engine.BatchError, match="input_ids is on cuda:0 but the model on cuda:1"):
            model(**batch)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_two_gpus_is_refused_at_attach(tmp_path):
    model = tiny_model("gpt2").cuda(0)
    model.transformer.h[1].to("cuda:1")
    with pytest.raises(engine.HookPointError, match="cuda:0, cuda:1"):
        CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0]))


def test_cuda_early_stop_matches_full_forward(tmp_path):
    model = tiny_model("llama").cuda()
    batches = [cuda_batch(ragged_batch(4, 16, seed=s)) for s in range(5)]
    stores = {}
    for early in (False, True):
        cfg = CaptureConfig(tmp_path / f"{early}.zarr", layer_indices=[0], chunk_tokens=32, early_stop=early)
        with CaptureEngine(model, cfg), torch.no_grad():
            for batch in batches:
                model(**batch)
        stores[early] = open_store(cfg.output_dir)
    for key in ("layer_0/residual", "layer_0/mlp_hidden", "tokens/position"):
        np.testing.assert_array_equal(stores[True][key][:], stores[False][key][:])


def test_nccl_process_group_writes_a_parts_store(tmp_path):
    """distributed=True over nccl (one rank: the machine may have one GPU): the collectives of parts.py run on
    the GPU backend and the parts store holds exactly the model's rows."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = tiny_model("gpt2").cuda()
        batches = [cuda_batch(ragged_batch(4, 32, seed=s)) for s in range(6)]
        cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=64, distributed=True)
        with reference_capture(model, [0], list(cfg.points)) as ref:
            with CaptureEngine(model, cfg), torch.no_grad():
                for batch in batches:
                    model(**batch)
    finally:
        torch.distributed.destroy_process_group()
    store = open_store(cfg.output_dir)
    assert store.manifest.world_size == 1 and store.status == "complete" and len(store.parts) == 1
    assert_store_rows(cfg.output_dir, ref, batches)
