"""The CUDA path: side-stream copies into pinned slots, event-synchronized writers. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import CaptureConfig, CaptureEngine, open_store

from conftest import ragged_batch, tiny_model
from helpers import assert_statistics_match, expected_rows, reference_capture

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_cuda_rows_equal_model_activations(family, model_dtype, tmp_path):
    model = tiny_model(family, dtype=model_dtype).cuda()
    batches = [{k: v.cuda() for k, v in ragged_batch(8, 96, seed=s).items()} for s in range(40)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], capture_attn_out=True, chunk_tokens=256,
                        num_writers=4, pinned_slots=3)
    with reference_capture(model, [0, 1], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            for batch in batches:
                model(**batch)
    masks = [b["attention_mask"].cpu() for b in batches]
    store = open_store(cfg.output_dir)
    for key in ref:
        np.testing.assert_array_equal(store[key][:].astype(np.float32), expected_rows(ref[key], masks))
    assert all(t.is_pinned() for slot in cap._pool.slots for t in slot._points.values())
    assert cap._stager.device_statistics  # computed by the hooks on the GPU
    for key in ref:
        assert_statistics_match(cfg.output_dir, key, store[key].shape[1])


def test_hooks_never_synchronize_the_device(tmp_path):
    model = tiny_model("gpt2").cuda()
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=64, pinned_slots=2)
    batch = {k: v.cuda() for k, v in ragged_batch(4, 32, seed=0).items()}
    with reference_capture(model, [0, 1], list(cfg.points)) as ref, torch.no_grad():
        model(**batch)
    cap = CaptureEngine(model, cfg)
    outputs = {point.key: ref[point.key][0].cuda() for point in cap.points}
    cap._on_forward(model, (), batch)  # warm-up: allocates pinned slots (allocation may synchronize)
    for point in cap.points:
        cap._on_point(point, outputs[point.key])
    cap.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        for _ in range(3):
            cap._on_forward(model, (), batch)
            for point in cap.points:
                cap._on_point(point, outputs[point.key])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cap.close()
    mask = batch["attention_mask"].cpu()
    for point in cap.points:
        np.testing.assert_array_equal(open_store(cfg.output_dir)[point.key][:].astype(np.float32),
                                      expected_rows(ref[point.key] * 4, [mask] * 4))


def test_cuda_early_stop_matches_full_forward(tmp_path):
    model = tiny_model("llama").cuda()
    batches = [{k: v.cuda() for k, v in ragged_batch(4, 16, seed=s).items()} for s in range(5)]
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
    """distributed=True over nccl (one rank: this machine has one GPU): the collectives of parts.py run on
    the GPU backend and the parts store holds exactly the model's rows."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = tiny_model("gpt2").cuda()
        batches = [{k: v.cuda() for k, v in ragged_batch(4, 32, seed=s).items()} for s in range(6)]
        cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=64, distributed=True)
        with reference_capture(model, [0], list(cfg.points)) as ref:
            with CaptureEngine(model, cfg), torch.no_grad():
                for batch in batches:
                    model(**batch)
    finally:
        torch.distributed.destroy_process_group()
    store = open_store(cfg.output_dir)
    assert store.manifest["world_size"] == 1 and store.status == "complete" and len(store.parts) == 1
    masks = [b["attention_mask"].cpu() for b in batches]
    for key in ref:
        np.testing.assert_array_equal(store[key][:].astype(np.float32), expected_rows(ref[key], masks))
