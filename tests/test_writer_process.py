"""The writer process's lifecycle, with real processes: its failures and its death reach the caller, and it
never outlives the engine or the process that started it."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import engine
import engine.writer.server
from engine import CaptureConfig, CaptureEngine, open_store
from engine.store.sink import NullSink, ZarrSink
from engine.writer.server import sink_class

from fakes import GATE_ENV, SlowSink
from helpers import expected_rows, ragged_batch, reference_capture, tiny_model


def _kill_writer(cap: CaptureEngine) -> None:
    """SIGKILL the writer process and wait until it is dead (a zombie: its parent, the engine, reaps it)."""
    os.kill(cap.writer_pid, signal.SIGKILL)
    process = psutil.Process(cap.writer_pid)
    deadline = time.monotonic() + 10
    while process.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("next_call", ["forward", "flush", "close"])
def test_a_killed_writer_process_is_reported_at_the_next_call(next_call, tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(4, 8, seed=s) for s in range(6)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        cap = CaptureEngine(model, cfg)
        for batch in batches:
            model(**batch)
        cap.flush()
        committed = cap.stats.tokens
        _kill_writer(cap)
        call = {"forward": lambda: model(**batches[0]), "flush": cap.flush, "close": cap.close}[next_call]
        deadline = time.monotonic() + 1.0  # the promise: reported within a second
        with pytest.raises(engine.CaptureError, match="writer process .* died .*signal 9"):
            while time.monotonic() < deadline:
                call()
        cap.close()  # the failure was delivered once; close finishes quietly
    assert not model._forward_pre_hooks and not model._forward_hooks, "hooks are gone"
    store = open_store(cfg.output_dir)
    assert store.status == "failed" and store.num_tokens == committed > 0
    masks = [b["attention_mask"] for b in batches]
    for key in ("layer_0/residual", "layer_0/mlp_hidden"):
        np.testing.assert_array_equal(store[key][:].astype(np.float32),
                                      expected_rows(ref[key][:len(batches)], masks)[:committed])
    lock = tmp_path / "s.zarr.lock"
    CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8,
                                       resume=True)).close()  # the lock was released
    assert not lock.exists(), "and its file removed by the resume's close"


def test_nothing_is_left_running_after_close(tmp_path):
    model = tiny_model("gpt2")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)) as cap, \
            torch.no_grad():
        model(**ragged_batch(2, 6))
        assert psutil.pid_exists(cap.writer_pid)
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert after <= before and not psutil.pid_exists(cap.writer_pid)


def test_a_writer_that_cannot_open_the_store_fails_the_run(tmp_path, monkeypatch):
    """An error raised while the writer process starts (here: its sink cannot be imported) reaches the caller
    with its traceback, and the store says failed."""
    monkeypatch.setitem(CaptureEngine.sink_factory, "zarr", "engine.store.sink:NoSuchSink")
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    with pytest.raises(engine.CaptureError, match="NoSuchSink"):
        with CaptureEngine(model, cfg), torch.no_grad():
            for seed in range(20):
                model(**ragged_batch(2, 6, seed=seed))
    assert open_store(cfg.output_dir).status == "failed"
    assert not (tmp_path / "s.zarr.reserve").exists()


@pytest.mark.parametrize(("path", "why"), [
    ("engine.store.sink.ZarrSink", "is not 'module:Class'"),
    ("engine.store.no_such_module:ZarrSink", "cannot be imported"),
    ("engine.store.sink:NoSuchSink", "has no class NoSuchSink"),
    ("engine.store.sink:_FLAGS", "has no class _FLAGS"),
    ("collections:OrderedDict", "lacks open, point_arrays, all_arrays, create_point_arrays, write_chunk"),
])
def test_a_sink_that_is_no_sink_class_is_refused_by_name(path, why):
    with pytest.raises(engine.ConfigError, match=why):
        sink_class(path)


def test_the_sinks_a_spec_may_name_are_sinks():
    assert sink_class("engine.store.sink:ZarrSink") is ZarrSink
    assert sink_class("engine.store.sink:NullSink") is NullSink
    assert sink_class("fakes:SlowSink") is SlowSink  # a test's own, a ZarrSink with its methods


def test_a_writer_that_cannot_start_answers_a_close_sent_with_its_spec(tmp_path, monkeypatch):
    """Issue 32: an engine closed as soon as it is built (``with CaptureEngine(...): pass``) puts the close in
    the writer process's first read, beside the spec. A writer process that then failed to start dropped
    everything read with the spec and waited for a close that had come already: close() never returned."""
    monkeypatch.setitem(CaptureEngine.sink_factory, "zarr", "engine.store.sink:NoSuchSink")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    outcome: list[BaseException] = []

    def build_and_close() -> None:
        try:
            with CaptureEngine(tiny_model("gpt2"), cfg):
                pass
        except BaseException as error:
            outcome.append(error)

    closing = threading.Thread(target=build_and_close, daemon=True)
    closing.start()
    closing.join(timeout=120)  # a hang guard, not a timing: it returns in about a second
    assert not closing.is_alive(), "close() never returned"
    assert isinstance(outcome[0], engine.CaptureError) and "NoSuchSink" in str(outcome[0]), outcome
    assert open_store(cfg.output_dir).status == "failed"


def test_a_forked_child_does_not_hold_the_store_lock(tmp_path):
    """DataLoader workers are forked: they must not keep the parent's store locked (or its channel open)."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    read, write = os.pipe()
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(2, 6))
        child = os.fork()
        if child == 0:  # the forked child waits until the parent has closed and relocked, then exits
            os.close(write)
            os.read(read, 1)
            os._exit(0)
    try:
        with CaptureEngine(model, dataclasses.replace(cfg, resume=True)), torch.no_grad():
            model(**ragged_batch(2, 6, seed=1))
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
    assert open_store(cfg.output_dir).status == "complete"


def test_close_raises_a_death_that_the_close_message_found(tmp_path, monkeypatch):
    """Regression: when sending the close message was what found the writer process dead, close() counted
    the error as delivered and returned quietly (the [close] case above failed whenever the send did)."""
    model = tiny_model("gpt2")
    cap = CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8))
    with torch.no_grad():
        model(**ragged_batch(3, 7))
    cap.flush()
    _kill_writer(cap)

    def broken_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cap._writer._channel, "send", broken_pipe)
    with pytest.raises(engine.CaptureError, match="writer process .* died .*signal 9"):
        cap.close()
    assert open_store(tmp_path / "s.zarr").status == "failed"


def test_batches_after_the_writer_process_went_idle_are_written(tmp_path):
    """After a pause longer than its polling back-off the writer process waits on the socket, and the next
    batch (and then close) must still wake it."""
    model = tiny_model("gpt2")
    batches = [ragged_batch(2, 8, seed=s) for s in range(3)]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=4)
    pause = 4 * engine.writer.server.CHANNEL_POLL_MAX_S + 0.1
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        with CaptureEngine(model, cfg) as cap:
            for batch in batches:
                time.sleep(pause)
                model(**batch)
            time.sleep(pause)
            cap.flush()
            time.sleep(pause)
    store = open_store(cfg.output_dir)
    masks = [b["attention_mask"] for b in batches]
    assert store.status == "complete"
    np.testing.assert_array_equal(store["layer_0/residual"][:].astype(np.float32),
                                  expected_rows(ref["layer_0/residual"][:len(batches)], masks))


_CLOSING_JOB = """
import sys
import torch
sys.path.insert(0, {tests!r})
from engine import CaptureConfig, CaptureEngine
from helpers import ragged_batch, tiny_model
CaptureEngine.sink_factory["zarr"] = "fakes:GatedSink"
model = tiny_model("gpt2")
cap = CaptureEngine(model, CaptureConfig({store!r}, layer_indices=[0], chunk_tokens=4, num_writers=1))
with torch.no_grad():
    for seed in range(3):  # fewer batches than slots: the forwards never wait on the stuck writer
        model(**ragged_batch(2, 8, seed=seed))
print("closing", cap.writer_pid, flush=True)
cap.close()
"""


def test_a_writer_process_draining_at_close_exits_when_the_capturing_process_dies(tmp_path):
    """kill -9 lands while close() waits for the writer process to drain (here a chunk write that never
    ends): the writer process must still exit by itself within a second, not finish the drain into a store
    that a resume may be repairing."""
    script = _CLOSING_JOB.format(tests=str(Path(__file__).parent), store=str(tmp_path / "s.zarr"))
    env = {**os.environ, GATE_ENV: str(tmp_path / "gate")}  # never opened
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, start_new_session=True)
    line = job.stdout.readline()
    assert line.startswith("closing"), job.stderr.read()
    writer = psutil.Process(int(line.split()[1]))
    time.sleep(0.5)  # the close message is in: the writer process is draining, its thread at the gate
    assert writer.is_running() and writer.status() != psutil.STATUS_ZOMBIE
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=10)
    job.stdout.close()
    job.stderr.close()
    deadline = time.monotonic() + 1.5  # the promise is a second; half a second more for a loaded machine
    while not _exited(writer):
        if time.monotonic() > deadline:
            writer.kill()
            pytest.fail("the writer process kept draining after the capturing process died")
        time.sleep(0.02)


def _exited(process: psutil.Process) -> bool:
    """Gone, or a zombie: an orphan's exit status waits for an init process that may reap it late."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("closed", ["", ">&-", "2>&-"], ids=["open", "stdout-closed", "stderr-closed"])
def test_the_writer_process_exits_with_its_code_and_its_output_flushed(closed):
    """The writer process skips the interpreter's teardown at exit: its status and what it printed still
    come out, and a closed output descriptor cannot stop the exit."""
    script = "import engine.writer.server as w; print('last words'); w._exit_now(3)"
    done = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -c "{script}" {closed}'],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert ("last words" in done.stdout) == (closed != ">&-")
    assert "Traceback" not in done.stderr


class _CopyEvent:
    """Stands in for a batch's CUDA event (no device here): its ``synchronize`` returns, raises the device's
    error, or waits until the test releases it (a copy that never finishes)."""

    def __init__(self, behaviour: str, released: threading.Event):
        self.behaviour, self.released = behaviour, released

    def synchronize(self):
        if self.behaviour == "fail":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test)")
        if self.behaviour == "hang":
            self.released.wait()


def _use_cuda_handoff(cap: CaptureEngine, behaviours: list[str], released: threading.Event, monkeypatch):
    """Give ``cap`` the CUDA path's handoff thread, on CPU: batch i's event behaves as ``behaviours[i]``
    (``_CopyEvent``), and drain and close wait 1 s for a copy, not 30."""
    monkeypatch.setattr(engine.capture.handoff, "_EXIT_WAIT_S", 1.0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    writer = cap._writer
    writer._handoff = queue.SimpleQueue()
    writer._thread = threading.Thread(target=writer._forward_batches, args=("cuda:0",), daemon=True)
    writer._thread.start()
    events = iter(behaviours)
    monkeypatch.setattr(cap._stager, "finish",
                        lambda slot: setattr(slot, "event", _CopyEvent(next(events), released)))


def test_backpressure_on_a_hung_device_fails_the_run_instead_of_waiting_for_ever(tmp_path, monkeypatch):
    """The CUDA path on CPU: every slot in use and the oldest batch's copies never finish (a hung device).
    The forward waiting for a free slot raises once the handoff thread has waited _EXIT_WAIT_S (1 s here) on
    those copies; before, only drain and close applied that rule and backpressure waited for ever."""
    released = threading.Event()
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, pinned_slots=2)
    cap = CaptureEngine(model, cfg)
    _use_cuda_handoff(cap, ["hang"] * 4, released, monkeypatch)
    try:
        with pytest.raises(engine.CaptureError, match="HandoffStuck"), torch.no_grad():
            for seed in range(4):
                model(**ragged_batch(3, 8, seed=seed), use_cache=False)
    finally:
        released.set()
        cap.close()
    assert open_store(cfg.output_dir).status == "failed"


@pytest.mark.parametrize("third_batch", ["lands", "fail", "hang"])
def test_the_cuda_handoff_thread_at_close(third_batch, tmp_path, monkeypatch):
    """The CUDA path's handoff thread, on CPU: batches go through it (their events stood in for), and close
    lets it send what it holds before the close message. When its wait on the third batch's copies fails, or
    never returns (given up after _EXIT_WAIT_S), that batch never reached the writer process: the store must
    end failed with the first two batches, close must raise why, and a stuck copy's slots stay mapped."""
    released = threading.Event()
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, pinned_slots=4)
    cap = CaptureEngine(model, cfg)
    writer = cap._writer
    _use_cuda_handoff(cap, ["lands", "lands", third_batch], released, monkeypatch)
    # without a KV cache each batch's sequences end with it, so its full chunks commit at once
    batches = [{**ragged_batch(3, 8, seed=s), "use_cache": False} for s in range(3)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        if third_batch == "fail":
            writer._thread.join(timeout=10)  # it failed before close: close must still say the run failed
        if third_batch == "lands":
            cap.close()
        else:
            with pytest.raises(engine.CaptureError, match="RuntimeError|HandoffStuck"):
                cap.close()
    finally:
        released.set()
    store = open_store(cfg.output_dir)
    sent = sum(int(b["attention_mask"].sum()) for b in (batches if third_batch == "lands" else batches[:2]))
    if third_batch == "lands":
        assert store.status == "complete" and store.num_tokens == sent
    else:  # a failed run keeps whole chunks only
        assert store.status == "failed" and store.num_tokens == sent // 8 * 8 > 0
    assert not psutil.pid_exists(cap.writer_pid)
    assert any(slot.buffers for slot in cap._pool.slots) == (third_batch == "hang")


@pytest.mark.parametrize("last_batch", ["fail", "hang"])
def test_detached_refuses_when_a_batch_in_flight_cannot_be_handed_over(last_batch, tmp_path, monkeypatch):
    """detached() promises that no engine thread synchronizes with the device inside its block. When the
    handoff thread's wait on a batch's copies fails, or is still waiting after _EXIT_WAIT_S, that promise
    cannot be kept: detached() must raise why before running the block, and the store must end failed."""
    released = threading.Event()
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, pinned_slots=4)
    cap = CaptureEngine(model, cfg)
    _use_cuda_handoff(cap, ["lands", last_batch], released, monkeypatch)
    ran_block = False
    try:
        with torch.no_grad():
            for seed in range(2):
                model(**ragged_batch(3, 8, seed=seed))
        why = "RuntimeError" if last_batch == "fail" else "HandoffStuck"
        with pytest.raises(engine.CaptureError, match=why):
            with cap.detached():
                ran_block = True
        cap.close()  # the error was raised once: close ends the run without raising it again
    finally:
        released.set()
    assert not ran_block
    assert open_store(cfg.output_dir).status == "failed"
    assert not psutil.pid_exists(cap.writer_pid)
