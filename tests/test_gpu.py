"""The CUDA path: side-stream copies into pinned shared slots, event-synchronized handoff. Skipped without a
GPU (run with ``python -m pytest -m gpu`` on a CUDA machine; ``benchmarks/gpu_check.sh`` does)."""

from __future__ import annotations

import contextlib
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

    monkeypatch.setattr(engine.capture.staging.torch.cuda, "Event", GatedEvent)
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


# ---- races and shapes a GPU alone shows (issue #27): the reference hooks above copy to the host inside the
# forward, which synchronizes at every point; these do not

class _InPlaceAfterHook(torch.nn.Module):
    """A block whose hooked output the model overwrites in place right after the hook has run, as a model
    that reuses its buffers would: the store must keep what the hook saw."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.point = torch.nn.Identity()

    def forward(self, x):
        y = self.point(self.linear(x))
        y.mul_(-1)  # after the hook, before the copy stream has copied it
        return y


class _Tiny(torch.nn.Module):
    def __init__(self, width: int = 64, vocab: int = 100):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.block = _InPlaceAfterHook(width)

    def forward(self, input_ids, attention_mask=None):
        return self.block(self.embed(input_ids))


def _slow_copy_stream(cap: CaptureEngine, monkeypatch, cycles: int = 50_000_000) -> None:
    """Every batch's copies wait behind ``cycles`` of sleep on the copy stream (~20-50 ms)."""
    stager, original = cap._stager, cap._stager.finish

    def finish(slot):
        with torch.cuda.stream(stager._stream):
            torch.cuda._sleep(cycles)
        original(slot)

    monkeypatch.setattr(stager, "finish", finish)


def test_a_delayed_copy_stream_stores_what_the_hook_saw_though_the_model_overwrote_it(tmp_path, monkeypatch):
    model = _Tiny().cuda().eval()
    batches = [torch.randint(0, 100, (4, 32), device="cuda", generator=None) for _ in range(6)]
    expected = []
    with torch.no_grad():
        for ids in batches:
            expected.append(model.block.linear(model.embed(ids)).reshape(-1, 64).half().float().cpu())
    cfg = CaptureConfig(tmp_path / "s.zarr", points=[], extra_modules={"x": "block.point"}, chunk_tokens=64,
                        pinned_slots=2)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        _slow_copy_stream(cap, monkeypatch)
        for ids in batches:
            model(input_ids=ids)
    np.testing.assert_array_equal(open_store(cfg.output_dir)["extra/x"][:].astype(np.float32),
                                  torch.cat(expected).numpy())


def test_a_slow_sink_with_two_slots_and_growing_ragged_batches(tmp_path, monkeypatch):
    from fakes import use_sink  # the slow sink of the CPU tests, against the CUDA path

    use_sink(monkeypatch, "SlowSink")
    model = tiny_model("llama").cuda()
    batches = [cuda_batch(ragged_batch(2 + s, 8 + 4 * s, seed=s)) for s in range(8)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=32, pinned_slots=2)
    with reference_capture(model, [0, 1], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg) as cap, torch.no_grad():
            _slow_copy_stream(cap, monkeypatch)
            for batch in batches:
                model(**batch)
    assert_store_rows(cfg.output_dir, ref, batches)


def test_an_exception_with_copies_in_flight_then_more_batches_and_close(tmp_path, monkeypatch):
    """A forward that raises after staging one point, with the copy stream delayed, and early stop: the
    failed batch is stored nowhere, the later ones exactly."""
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(4, 16, seed=s)) for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], points=["residual"], chunk_tokens=16,
                        early_stop=True, pinned_slots=2)

    def fail(module, args, output):
        raise RuntimeError("a failure mid-forward (test)")

    with reference_capture(model, [0, 1], ["residual"]) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        _slow_copy_stream(cap, monkeypatch)
        model(**batches[0])
        handle = model.transformer.h[1].register_forward_hook(fail, prepend=True)
        with pytest.raises(RuntimeError, match="mid-forward"):
            model(**cuda_batch(ragged_batch(4, 16, seed=99)))
        handle.remove()
        for batch in batches[1:]:
            model(**batch)
    assert_store_rows(cfg.output_dir, ref, batches)


@pytest.mark.parametrize("mode", ["bfloat16 model", "autocast"])
def test_bfloat16_and_autocast_rows_equal_the_model_s(mode, tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16 if mode == "bfloat16 model" else torch.float32).cuda()
    batches = [cuda_batch(ragged_batch(4, 24, seed=s)) for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], chunk_tokens=32, dtype="float32")
    context = (torch.autocast("cuda", dtype=torch.bfloat16) if mode == "autocast"
               else contextlib.nullcontext())
    with reference_capture(model, [1], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg), torch.no_grad(), context:
            for batch in batches:
                model(**batch)
    masks = [b["attention_mask"].cpu() for b in batches]
    store = open_store(cfg.output_dir)
    for key in ref:
        np.testing.assert_array_equal(store[key][:], expected_rows(ref[key], masks, dtype=torch.float32))


class _Strided(torch.nn.Module):
    """Outputs that are not contiguous: a transpose and an expanded (stride 0) tensor."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # puts the model on its device for the engine
        self.transposed = torch.nn.Identity()
        self.expanded = torch.nn.Identity()

    def forward(self, input_ids, attention_mask=None):
        batch, seq = input_ids.shape
        base = input_ids.float()[..., None] * torch.arange(1, 9, device=input_ids.device)
        self.transposed(base.transpose(0, 1).contiguous().transpose(0, 1))  # (batch, seq, 8), strided
        self.expanded(input_ids.float()[..., None].expand(batch, seq, 16))


def test_non_contiguous_and_expanded_outputs_are_stored_as_their_values(tmp_path):
    model = _Strided().cuda()
    ids = torch.randint(0, 50, (3, 10), device="cuda")
    cfg = CaptureConfig(tmp_path / "s.zarr", points=[], chunk_tokens=8,
                        extra_modules={"t": "transposed", "e": "expanded"})
    with CaptureEngine(model, cfg), torch.no_grad():
        model(input_ids=ids)
    store = open_store(cfg.output_dir)
    flat = ids.reshape(-1).float().cpu()
    np.testing.assert_array_equal(store["extra/t"][:], (flat[:, None] * torch.arange(1, 9)).half().numpy())
    np.testing.assert_array_equal(store["extra/e"][:], flat[:, None].expand(-1, 16).half().numpy())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_with_the_engine_made_first(mode, tmp_path):
    torch._dynamo.reset()
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(4, 16, seed=s)) for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=16)
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    with CaptureEngine(model, cfg), torch.no_grad():
        compiled = torch.compile(model, mode=mode)
        for batch in batches:
            compiled(**batch)
    masks = [b["attention_mask"].cpu() for b in batches]
    store = open_store(cfg.output_dir)
    for key in ref:  # compiled kernels round differently: close, not equal
        np.testing.assert_allclose(store[key][:].astype(np.float32), expected_rows(ref[key], masks),
                                   atol=2e-2, rtol=2e-2)


def test_generate_on_cuda_stores_each_sequence_as_one_plain_forward(tmp_path):
    from test_kvcache import assert_sequences_match_plain_forwards, generated_sequences, prompts

    model = tiny_model("llama").cuda()
    ids, mask = prompts(3, 6, padded=True)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], points=["residual"], chunk_tokens=8)
    with torch.no_grad(), CaptureEngine(model, cfg):
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    sequences = generated_sequences(out.cpu(), mask)
    assert_sequences_match_plain_forwards(model.cpu(), open_store(cfg.output_dir), dict(enumerate(sequences)))


def test_a_registration_the_driver_refuses_warns_and_the_next_forward_runs(tmp_path, monkeypatch):
    """A real cudaHostRegister failure (the memory registered already: cudaErrorHostMemoryAlreadyRegistered)
    leaves CUDA's last error set; the engine must consume it, or the next kernel launch raises it as its own.
    The slot stays unpinned (a warning) and the batch is stored."""
    original = engine.capture.staging.SharedBuffer._pin

    def register_first(buffer, device):
        pointer = buffer.bytes.data_ptr()
        assert int(torch.cuda.cudart().cudaHostRegister(pointer, buffer.nbytes, 1)) == 0
        try:
            return original(buffer, device)  # refused: registered already
        finally:
            torch.cuda.cudart().cudaHostUnregister(pointer)

    monkeypatch.setattr(engine.capture.staging.SharedBuffer, "_pin", register_first)
    model = tiny_model("gpt2").cuda()
    batch = cuda_batch(ragged_batch(2, 8))
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, pinned_slots=1)
    with pytest.warns(RuntimeWarning, match="not pinned"):
        with reference_capture(model, [0], list(cfg.points)) as ref:
            with CaptureEngine(model, cfg), torch.no_grad():
                model(**batch)
                torch.zeros(4, device="cuda").add_(1)  # a kernel launch: raises a stale error
                model(**batch)
    assert_store_rows(cfg.output_dir, ref, [batch, batch])


def test_a_multi_gigabyte_slot(tmp_path):
    """A batch whose slot buffer passes 2 GiB (2**30 float16 elements per point)."""
    width, tokens = 8192, 2 ** 17  # 2 GiB of float16 per slot
    rows = torch.arange(tokens, device="cuda", dtype=torch.float16).reshape(1, tokens, 1).expand(1, tokens,
                                                                                              width)

    class Emit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.x = torch.nn.Identity()

        def forward(self, input_ids, attention_mask=None):
            self.x(rows)

    model = Emit().cuda()
    cfg = CaptureConfig(tmp_path / "s.zarr", points=[], extra_modules={"x": "x"}, chunk_tokens=2 ** 15,
                        pinned_slots=1, statistics=False)
    with CaptureEngine(model, cfg) as cap:
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device="cuda"))
        assert cap.stats.slot_bytes > 2 ** 31
    store = open_store(cfg.output_dir)
    assert store.num_tokens == tokens
    np.testing.assert_array_equal(store["extra/x"][tokens - 3:, :4], rows[0, tokens - 3:, :4].cpu().numpy())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_while_the_first_is_current(tmp_path):
    torch.cuda.set_device(0)
    model = tiny_model("gpt2").to("cuda:1")
    batches = [{key: value.to("cuda:1") for key, value in ragged_batch(4, 16, seed=s).items()}
               for s in range(4)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=16)
    with reference_capture(model, [0], list(cfg.points)) as ref:
        with CaptureEngine(model, cfg), torch.no_grad():
            for batch in batches:
                model(**batch)
    assert_store_rows(cfg.output_dir, ref, batches)


def test_kernels_and_runtime_calls_per_batch(tmp_path):
    """What one hooked forward adds on the device, counted by the profiler: per point one cast kernel and one
    device-to-host copy, per batch one stack (ids and mask) and its copy; no synchronization."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("gpt2").cuda()
    batch = cuda_batch(ragged_batch(4, 32))
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=64)

    def counts(run) -> tuple[int, int, int]:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof, torch.no_grad():
            run()
            torch.cuda.synchronize()
        names = [event.name for event in prof.events()]
        return (sum("DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name
                    for name in names),
                sum(name in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for name in names),
                sum(name == "cudaEventSynchronize" for name in names))

    base = counts(lambda: model(**batch))
    with CaptureEngine(model, cfg) as cap:
        model(**batch)  # slots sized and announced
        cap.flush()
        hooked = counts(lambda: model(**batch))
    copies = hooked[0] - base[0]
    assert copies == 1 + len(cap.points), hooked
    assert hooked[1] == base[1], "the hooks synchronized the device"


def test_gpu_memory_comes_back_to_its_baseline_after_flush(tmp_path):
    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(8, 64, seed=s)) for s in range(6)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=128, pinned_slots=3)
    with torch.no_grad():
        model(**batches[0])
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
        cap.flush()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == baseline, "snapshots outlived their slots"


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_8_bit_encodings_encode_on_the_device_and_equal_the_cpu_s_encoding(dtype, tmp_path):
    """The hook encodes on the GPU (a quarter of float32's bytes are copied); the stored codes and scales
    decode to the model's values within the encoding's bound, and equal a CPU capture's to one code step."""
    from test_encodings import reference_encoding

    model = tiny_model("gpt2").cuda()
    batches = [cuda_batch(ragged_batch(8, 64, seed=s)) for s in range(8)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[1], capture_mlp_hidden=False, chunk_tokens=128,
                        dtype=dtype, pinned_slots=2)
    with reference_capture(model, [1], ["residual"]) as ref, CaptureEngine(model, cfg) as cap, \
            torch.no_grad():
        for batch in batches:
            model(**batch)
        assert_slots_pinned(cap)
    truth = expected_rows(ref["layer_1/residual"], [b["attention_mask"].cpu() for b in batches],
                          dtype=torch.float32)
    stored = open_store(cfg.output_dir, verify=True)["layer_1/residual"]
    decoded, scales = reference_encoding(truth, dtype)
    np.testing.assert_allclose(stored.scales[:], scales, rtol=1e-6)
    step = scales if dtype == "int8" else np.abs(truth) / 8 + scales * 2.0 ** -9
    assert (np.abs(stored[:] - decoded) <= step * 1.0001 + 1e-7).all()
