"""Crash-consistent resume (real kill -9 of a real capture process), faults, and bad input."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import engine
from engine import CaptureConfig, CaptureEngine, open_store

from crash_job import BATCH, CHUNK, batch_of, sequences
from fakes import use_sink
from helpers import (
    JOB,
    N_SEQUENCES,
    assert_same_store,
    assert_store_rows,
    crash_and_resume,
    finish,
    hold_mid_run,
    launch,
    race_two_resumes,
    ragged_batch,
    reference_capture,
    run_job,
    tiny_model,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_job(store, resume=False)
    return open_store(store)


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_kill_9_then_resume_equals_uninterrupted_run(trial, tmp_path, reference):
    store = crash_and_resume(tmp_path / "s.zarr", random.Random(trial), kills=1 + trial % 2)
    assert_same_store(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2, 45))
def test_kill_9_many_trials(trial, tmp_path, reference):
    store = crash_and_resume(tmp_path / "s.zarr", random.Random(trial), kills=1 + trial % 3)
    assert_same_store(store, reference)


@pytest.mark.parametrize("trial", range(1))
def test_capturing_process_killed_alone_its_writer_exits_and_resume_is_exact(trial, tmp_path, reference):
    """kill -9 of the capturing process only: its writer process exits by itself (run_job checks it), and a
    resume started at once continues the store exactly."""
    store = crash_and_resume(tmp_path / "s.zarr", random.Random(100 + trial), kills=1, orphan=True)
    assert_same_store(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 10))
def test_capturing_process_killed_alone_many_trials(trial, tmp_path, reference):
    store = crash_and_resume(tmp_path / "s.zarr", random.Random(100 + trial), kills=1, orphan=True)
    assert_same_store(store, reference)


def test_sigint_finishes_commits_and_resumes(tmp_path, reference):
    store = tmp_path / "s.zarr"
    args = [sys.executable, str(JOB), str(store), str(N_SEQUENCES)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    # mid-run, whatever the machine's speed: 5 of 30 batches (several chunks committed), so the 25 left
    # leave 1.25 s of PACE_S for the signal to land, even when this process waits behind other work
    for _ in range(5):
        assert proc.stdout.readline().startswith("batch")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "resume=True" in err, err
    interrupted = open_store(store)
    assert interrupted.status == "failed" and interrupted.num_tokens % 16 == 0
    run_job(store, resume=True)
    assert_same_store(open_store(store), reference)


def small_cfg(path, **kwargs):
    return CaptureConfig(path, **{"layer_indices": [0], "chunk_tokens": 8, **kwargs})


def test_resume_with_a_different_config_names_each_mismatch(tmp_path):
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr")
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 10))
    before = open_store(cfg.output_dir).manifest
    changed = dataclasses.replace(cfg, resume=True, layer_indices=(1,), dtype="float32", chunk_tokens=4)
    with pytest.raises(engine.ResumeMismatchError) as info:
        CaptureEngine(model, changed)
    for field in ("layers", "dtype", "chunk_tokens", "hooked modules"):
        assert field in str(info.value)
    with pytest.raises(engine.ResumeMismatchError, match="model"):
        CaptureEngine(tiny_model("llama"), dataclasses.replace(cfg, resume=True))
    assert open_store(cfg.output_dir).manifest == before, "nothing was written"


def test_resume_of_a_complete_store_appends(tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(4, 9, seed=s) for s in range(4)]
    whole = small_cfg(tmp_path / "whole.zarr")
    with CaptureEngine(model, whole), torch.no_grad():
        for batch in batches:
            model(**batch)
    split = small_cfg(tmp_path / "split.zarr")
    for part, resume in ((batches[:2], False), (batches[2:], True)):
        with CaptureEngine(model, dataclasses.replace(split, resume=resume)) as cap, torch.no_grad():
            assert cap.resume_sequences == (8 if resume else 0)
            for batch in part:
                model(**batch)
    a, b = open_store(whole.output_dir), open_store(split.output_dir)
    for key in ("layer_0/residual", "tokens/sequence", "tokens/position", "tokens/flags"):
        np.testing.assert_array_equal(a[key][:], b[key][:])
    assert b.num_tokens == a.num_tokens and len(b.manifest.resumes) == 1


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 640 KiB tmpfs (needs root, as CI has); else None."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        yield None
        return
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_cleanly_and_keeps_committed_chunks(tmp_path, small_filesystem, monkeypatch):
    if small_filesystem is None:
        use_sink(monkeypatch, "FullDiskSink")
    root = small_filesystem or tmp_path
    model = tiny_model("gpt2")
    cfg = small_cfg(root / "s.zarr", chunk_tokens=128, pinned_slots=2)
    cap = CaptureEngine(model, cfg)
    started = time.perf_counter()
    with pytest.raises(engine.CaptureError) as info, torch.no_grad():
        for seed in range(400):
            model(**ragged_batch(4, 32, seed=seed))
        cap.close()
    assert time.perf_counter() - started < 120
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == 28, repr(cause)
    cap.close()
    assert not model._forward_pre_hooks and not model._forward_hooks
    store = open_store(cfg.output_dir)
    assert store.status == "failed" and store.num_tokens > 0 and store.num_tokens % 128 == 0
    assert np.isfinite(store["layer_0/residual"][:].astype(np.float32)).all()
    assert not list(Path(cfg.output_dir).rglob("*.partial")), "temp files are cleaned up"


def _assert_failed_and_clean(store: Path) -> None:
    """A run that stopped while its store was written: the store says failed; no reserve, no temp file."""
    assert open_store(store).status == "failed"
    assert not store.with_name(store.name + ".reserve").exists(), "the reserve is gone"
    assert not [path for path in store.parent.rglob("*") if ".partial" in path.name], "no temp file is left"


CREATE_UNDER_LIMIT = """
import sys
from helpers import tiny_model
from engine import CaptureConfig, CaptureEngine
try:
    CaptureEngine(tiny_model("gpt2"), CaptureConfig(sys.argv[1], layer_indices=[0]))
except OSError as error:
    print(type(error).__name__, error.errno, error)
"""


def test_a_file_size_limit_at_store_creation_ends_failed_and_leaves_nothing_behind(tmp_path):
    """Issue 32: ``ulimit -f 32`` (32 KiB files) lets the store's documents be written but not its 128 KiB
    reserve. Before: a raw OSError 27 from the constructor, the store left ``open`` and a partial reserve
    beside it."""
    store, root = tmp_path / "s.zarr", Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", "-c", f'ulimit -f 32 && exec "{sys.executable}" -c "$0" "$1"',
                           CREATE_UNDER_LIMIT, str(store)], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root / "tests")})
    report = done.stdout + done.stderr
    assert done.stdout.startswith("StorePathError 27 ") and "the store says failed" in done.stdout, report
    _assert_failed_and_clean(store)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 64 KiB tmpfs: room for a store's documents, not for its reserve (needs root); else skip."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_store_creation_ends_failed_and_leaves_nothing_behind(tiny_filesystem):
    """Issue 32: the disk fills while the store is created (its reserve). Before: a raw OSError 28, status
    ``open`` and a partial reserve, whose cleanup was registered only after the store was made."""
    store = tiny_filesystem / "s.zarr"
    with pytest.raises(engine.StorePathError, match="No space left on device; the store says failed") as info:
        CaptureEngine(tiny_model("gpt2"), small_cfg(store))
    assert info.value.errno == 28
    _assert_failed_and_clean(store)


def raise_in_layer_1(model):
    """A forward that fails after layer 0 was staged (its slot is still the forward's): once."""
    def fail_once(module, args, output):
        handle.remove()
        raise RuntimeError("the model failed mid-forward")
    handle = model.transformer.h[1].register_forward_hook(fail_once)


def test_a_device_error_at_close_still_closes_the_writer_and_frees_the_store(tmp_path, monkeypatch):
    """On CUDA, releasing the slot of a forward that failed waits on its copies, and after a device error
    (a sticky CUDA error) that wait raises too. Close must still end the writer process with the run failed,
    free the slots and the lock, then raise. The device error is stood in for by the release raising it."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=8)
    cap = CaptureEngine(model, cfg)
    with torch.no_grad():
        for seed in range(4):
            model(**ragged_batch(4, 8, seed=seed))
        cap.flush()
        raise_in_layer_1(model)
        with pytest.raises(RuntimeError, match="mid-forward"):
            model(**ragged_batch(4, 8, seed=9))

    def device_error(where):
        def fail():
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({where})")
        return fail

    monkeypatch.setattr(cap, "_abandon_current", device_error("releasing the slot"))
    monkeypatch.setattr(cap._stager, "synchronize", device_error("synchronize"))  # sticky: it raises again
    with pytest.raises(RuntimeError, match=r"illegal memory access .*\(releasing the slot\)") as info:
        cap.close()
    assert any("(synchronize)" in note for note in info.value.__notes__), "the later error is noted, not lost"
    cap.close()  # closed: does not raise again
    assert not psutil.pid_exists(cap.writer_pid)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(slot.buffers for slot in cap._pool.slots), "the slots were released"
    store = open_store(cfg.output_dir)
    assert store.status == "failed" and store.num_tokens > 0
    CaptureEngine(model, small_cfg(tmp_path / "s.zarr", chunk_tokens=8, resume=True)).close()  # lock free


@pytest.mark.parametrize("fail_at", ["first batch", "growth"])
def test_host_memory_that_cannot_be_pinned_loses_one_batch_not_the_slot(fail_at, tmp_path, monkeypatch):
    """Making a slot buffer can fail (no shared memory left; pinning that the driver refuses only warns and
    leaves the buffer unpinned), stood in for here by making a buffer fail midway through a slot's
    allocation: the forward raises, the slot is left empty (its old buffers went first, so that it never
    holds two sets of pinned memory) and comes back, and the next batches, which allocate it again, are
    captured exactly, numbered as if the lost batch had never been fed."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=8, pinned_slots=2)
    kept = [ragged_batch(3, 8, seed=s) for s in range(1, 4)]
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        for batch in kept:
            model(**batch)
    countdown, original = [0], engine.capture.staging.SharedBuffer

    def flaky(nbytes, pin_device):
        countdown[0] -= 1
        if countdown[0] == 0:
            raise RuntimeError("cudaHostRegister of shared memory failed (test)")
        return original(nbytes, pin_device)

    monkeypatch.setattr(engine.capture.staging, "SharedBuffer", flaky)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        if fail_at == "growth":
            model(**kept[0])
            countdown[0] = 2  # the second of the three new buffers fails
            with pytest.raises(RuntimeError, match="cudaHostRegister"):
                model(**ragged_batch(6, 8, seed=9))  # larger than the slots: one must grow
        else:
            countdown[0] = 5  # a first batch makes its slot's 3 buffers, then sizes the other slot
            with pytest.raises(RuntimeError, match="cudaHostRegister"):
                model(**ragged_batch(3, 8, seed=0))
        for batch in kept[1 if fail_at == "growth" else 0:]:
            model(**batch)
        cap.flush()
        assert cap._pool.free_count == 2, "every slot came back"
    store = open_store(cfg.output_dir)
    assert list(np.unique(store["tokens/sequence"][:])) == list(range(9)), "the lost batch left a gap"
    assert store.manifest.sequences == 9
    assert_store_rows(cfg.output_dir, ref, kept)


def test_slots_that_would_not_fit_in_host_memory_are_refused_before_anything_is_allocated(tmp_path,
                                                                                          monkeypatch):
    """Staging slots are pinned on CUDA: more than the host can give is an out-of-memory kill, not an error.
    A batch whose slots would take more than half of the memory available is refused (BatchError) before any
    slot grows, and counts as never fed."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=8, pinned_slots=2)
    batches = [ragged_batch(3, 8, seed=s) for s in range(2)]
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**batches[0])
        held = cap._pool.nbytes
        monkeypatch.setattr(engine.capture.staging, "available_host_memory", lambda: 64 << 10)
        with pytest.raises(engine.BatchError, match="lower CaptureConfig.pinned_slots or the batch size"):
            model(**ragged_batch(64, 8, seed=9))  # larger than the slots: they would grow
        assert cap._pool.nbytes == held, "no slot grew"
        model(**batches[1])  # a batch the slots hold needs nothing more
    store = open_store(cfg.output_dir)
    assert store.manifest.sequences == 6 and list(np.unique(store["tokens/sequence"][:])) == list(range(6))
    assert_store_rows(cfg.output_dir, ref, batches)


def test_a_forward_that_raises_midway_stores_nothing_of_its_batch_and_a_retry_leaves_no_gap(tmp_path):
    """A forward that raises between two hooked points (an out-of-memory error, say): nothing of its batch
    is stored, its slot comes back, and the same batch fed again is numbered where it would have been. A
    last forward that fails just before close is not counted in the manifest's sequences either."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=8, pinned_slots=2)
    batches = [ragged_batch(3, 8, seed=s) for s in range(3)]
    with reference_capture(model, [0, 1], list(cfg.points)) as ref, torch.no_grad():
        for batch in batches:
            model(**batch)
    failures = [1]

    def out_of_memory(module, args):
        if failures[0]:
            failures[0] -= 1
            raise torch.OutOfMemoryError("out of memory (test)")

    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        model(**batches[0])
        handle = model.transformer.h[1].register_forward_pre_hook(out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            model(**batches[1])  # layer 0 is staged, layer 1 never runs
        handle.remove()
        for batch in batches[1:]:
            model(**batch)
        assert cap.resume_sequences == 0 and cap.stats.batches == 3
        failures[0] = 1
        model.transformer.h[1].register_forward_pre_hook(out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            model(**batches[0])  # its slot is still out when close begins
    store = open_store(cfg.output_dir)
    assert list(np.unique(store["tokens/sequence"][:])) == list(range(9))
    assert store.manifest.sequences == 9
    assert_store_rows(cfg.output_dir, ref, batches)


@pytest.mark.parametrize("make_cfg, error, match", [
    (lambda p: small_cfg(p, layer_indices=[5]), engine.HookPointError, r"valid indices are 0\.\.1"),
    (lambda p: CaptureConfig(p, capture_residual=False, capture_mlp_hidden=False,
                             extra_modules={"x": "transformer.nope"}),
     engine.HookPointError, "no module at path"),
])
def test_bad_hook_points_fail_before_anything_is_written(make_cfg, error, match, tmp_path):
    with pytest.raises(error, match=match):
        CaptureEngine(tiny_model("gpt2"), make_cfg(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def test_a_model_on_the_meta_device_is_refused_before_its_store_is_created(tmp_path):
    """Issue 32. Before: the store was created, then the first forward raised a raw NotImplementedError."""
    from engine.models.loading import meta_model

    with pytest.raises(engine.HookPointError, match="meta device.*load_model"):
        CaptureEngine(meta_model(tiny_model("gpt2").config), small_cfg(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def test_output_path_problems(tmp_path):
    model = tiny_model("gpt2")
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(engine.StorePathError, match="is a file"):
        CaptureEngine(model, small_cfg(a_file))
    with pytest.raises(engine.StorePathError, match="is a file, not a folder"):
        CaptureEngine(model, small_cfg(a_file / "s.zarr"))
    assert a_file.read_text() == "keep me"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(engine.StoreExistsError, match="not a capture store"):
        CaptureEngine(model, small_cfg(other, overwrite=True))
    assert (other / "x.txt").read_text() == "mine", "overwrite never deletes a folder that is not a store"


def test_read_only_location(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (needs root)")
    try:
        with pytest.raises(engine.StorePathError, match="(?i)read-only"):
            CaptureEngine(tiny_model("gpt2"), small_cfg(mount / "s.zarr"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_sequence_longer_than_positions_is_refused(tmp_path):
    model = tiny_model("gpt2")  # 128 positions
    cfg = small_cfg(tmp_path / "s.zarr")
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        with pytest.raises(engine.BatchError, match="exceeds the model's 128 positions"):
            model(input_ids=torch.ones(1, 129, dtype=torch.long))
        model(**ragged_batch(2, 6))
    assert cap.stats.batches == 1 and open_store(cfg.output_dir).manifest.sequences == 2


def test_no_mask_keeps_every_token_and_empty_batches_store_nothing(tmp_path):
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr")
    with CaptureEngine(model, cfg), torch.no_grad():
        model(input_ids=torch.ones(2, 5, dtype=torch.long))
        try:
            model(input_ids=torch.ones(0, 5, dtype=torch.long))  # empty batch: stages nothing
        except RuntimeError:
            pass  # some transformers versions cannot run an empty batch at all; capture must go on
        all_pad = ragged_batch(2, 5)
        all_pad["attention_mask"].zero_()
        model(**all_pad)
    store = open_store(cfg.output_dir)
    assert store.num_tokens == 10 and store.status == "complete"
    np.testing.assert_array_equal(store["tokens/position"][:], np.tile(np.arange(5), 2))


def test_an_empty_batch_whose_forward_raises_is_not_counted_as_fed(tmp_path):
    """Issue 32: a batch that is not stored is not counted, an empty one too. Before: a (4, 0) batch whose
    forward raised took sequence numbers 0-3 anyway, and a resume would have skipped four sequences."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr")

    def fail(module, args):
        raise RuntimeError("out of memory (test)")

    with CaptureEngine(model, cfg), torch.no_grad():
        handle = model.transformer.h[0].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError):  # gpt2 cannot reshape an empty batch; where it can, the hook fails
            model(input_ids=torch.ones(4, 0, dtype=torch.long))
        handle.remove()
        model(**ragged_batch(2, 6))
    store = open_store(cfg.output_dir)
    assert np.unique(store["tokens/sequence"][:]).tolist() == [0, 1] and store.manifest.sequences == 2


def test_a_with_block_nested_on_the_same_engine_keeps_capturing(tmp_path):
    """Issue 32. Before: the inner block's exit closed the engine, and the outer block's later batches were
    silently not captured."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr")
    batches = [ragged_batch(2, 6, seed=seed) for seed in range(3)]
    with reference_capture(model, [0], list(cfg.points)) as ref, torch.no_grad():
        with CaptureEngine(model, cfg) as cap:
            model(**batches[0])
            with cap:
                model(**batches[1])
            assert not cap.closed
            model(**batches[2])
    assert cap.closed and open_store(cfg.output_dir).status == "complete"
    assert_store_rows(cfg.output_dir, ref, batches)


def test_nonfinite_values_are_counted_and_warned_once(tmp_path):
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e7)  # residuals far beyond float16's 65504
    cfg = small_cfg(tmp_path / "s.zarr")
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        with CaptureEngine(model, cfg), torch.no_grad():
            for seed in range(3):
                model(**ragged_batch(2, 8, seed=seed))
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    store = open_store(cfg.output_dir)
    stats = [c.stats["layer_0/residual"] for c in store.chunks]
    assert all(s.fp16_overflow > 0 and s.nonfinite >= s.fp16_overflow for s in stats)
    overflows = np.isinf(store["layer_0/residual"][:].astype(np.float32)).sum()
    assert overflows == sum(s.fp16_overflow for s in stats)


def test_use_after_close_is_an_error(tmp_path):
    cap = CaptureEngine(tiny_model("gpt2"), small_cfg(tmp_path / "s.zarr"))
    cap.close()
    cap.close()
    with pytest.raises(engine.CaptureClosedError):
        cap.flush()  # issue 32: was a raw OSError EBADF from the closed channel
    with pytest.raises(engine.CaptureClosedError):
        with cap:
            pass
    with pytest.raises(engine.CaptureClosedError):
        with cap.detached():
            pass


def test_a_store_reached_through_a_symbolic_link_has_its_lock(tmp_path, reference):
    """Issue 32: the lock file was ``<path>.lock`` of the path as given, so ``alias.zarr -> s.zarr`` had a
    lock of its own, and a resume through the alias wrote into the store while another job did. The lock is
    the resolved path's: the second writer is refused and the running job's store ends exactly right."""
    store, hold, alias = tmp_path / "s.zarr", tmp_path / "go", tmp_path / "alias.zarr"
    alias.symlink_to(store.name)
    holder = hold_mid_run(store, hold)
    try:
        with pytest.raises(engine.StoreLockedError, match=f"is being written by pid {holder.pid} "):
            CaptureEngine(tiny_model("gpt2"), small_cfg(alias, layer_indices=[0, 1], chunk_tokens=CHUNK,
                                                        resume=True))
    finally:
        finish(holder, hold)
    assert_same_store(open_store(store), reference)


def test_overwrite_through_a_symbolic_link_replaces_the_store_it_points_to(tmp_path):
    """Issue 32. Before: a raw 'Cannot call rmtree on a symbolic link'."""
    model = tiny_model("gpt2")
    store, alias = tmp_path / "s.zarr", tmp_path / "alias.zarr"
    alias.symlink_to(store)
    for path, seeds, options in ((store, (0, 1), {}), (alias, (2,), {"overwrite": True})):
        with CaptureEngine(model, small_cfg(path, **options)), torch.no_grad():
            for seed in seeds:
                model(**ragged_batch(2, 6, seed=seed))
    assert alias.is_symlink() and open_store(alias).status == "complete"
    assert open_store(store).num_tokens == int(ragged_batch(2, 6, seed=2)["attention_mask"].sum())


def test_resume_after_a_crash_between_array_creations(tmp_path):
    """kill -9 can land while the first batch creates the arrays (a window of seconds on object storage):
    nothing is committed yet and some arrays are missing. Resume starts over instead of refusing the
    widths."""
    model = tiny_model("gpt2")
    # The first batches fill no chunk: nothing commits.
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=1024)
    crashed = CaptureEngine(model, cfg)
    with torch.no_grad():
        model(**ragged_batch(3, 7, seed=0))
    crashed.flush()
    # The capturing process "dies" here: its writer process sees the channel close and exits without
    # publishing anything, and the lock goes with them.
    crashed._hooks.remove()
    crashed._writer.abort()
    crashed._destination.release()
    shutil.rmtree(tmp_path / "s.zarr" / "layer_0" / "mlp_hidden")
    stores = {}
    for name, resume in (("resumed", True), ("fresh", False)):
        path = tmp_path / "s.zarr" if resume else tmp_path / "fresh.zarr"
        with CaptureEngine(model, dataclasses.replace(cfg, output_dir=path, resume=resume)) as cap, \
                torch.no_grad():
            assert cap.resume_sequences == 0
            for seed in range(3):
                model(**ragged_batch(3, 7, seed=seed))
        stores[name] = open_store(path)
    assert stores["resumed"].status == "complete"
    for key in ("layer_0/residual", "layer_0/mlp_hidden", "tokens/sequence"):
        np.testing.assert_array_equal(stores["resumed"][key][:], stores["fresh"][key][:])


def test_resume_when_no_committed_sequence_has_ended(tmp_path):
    """A crash after whole chunks of a first, still unfinished sequence were committed: no row can be kept
    (its sequence would be cut), so the resume starts over, arrays included, and equals a fresh run."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=8)
    long_sequence = {"input_ids": torch.arange(3, 23).view(1, 20)}
    crashed = CaptureEngine(model, cfg)
    with torch.no_grad():
        model(**long_sequence)
    crashed.flush()
    assert crashed.stats.tokens == 16, "two whole chunks of the unfinished sequence were committed"
    crashed._hooks.remove()  # the capturing process "dies": no close
    crashed._writer.abort()
    crashed._destination.release()
    stores = {}
    for name, path, resume in (("resumed", tmp_path / "s.zarr", True), ("fresh", tmp_path / "f.zarr", False)):
        with CaptureEngine(model, dataclasses.replace(cfg, output_dir=path, resume=resume)) as cap, \
                torch.no_grad():
            assert cap.resume_sequences == 0
            model(**long_sequence)
        stores[name] = open_store(path)
    assert stores["resumed"].status == "complete" and stores["resumed"].num_tokens == 20
    for key in ("layer_0/residual", "tokens/position", "tokens/flags"):
        np.testing.assert_array_equal(stores["resumed"][key][:], stores["fresh"][key][:])


# ---- one writer per store: races between real processes ---------------------------------------------------
# The winner holds halfway through its run (``--hold``) until the loser has ended, so every race below happens
# while the winner is writing, on a machine of any speed.

def _cli_capture(model_dir, corpus, store, *options) -> subprocess.CompletedProcess:
    command = ["capture", "--model", model_dir, "--data", corpus, "--out", store, "--layers", 1,
               "--seq-len", 24, "--no-progress", *options]
    return subprocess.run([sys.executable, "-m", "engine", *map(str, command)], capture_output=True,
                          text=True, timeout=300)


def _cli_align(store, alignment) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "align", str(store), str(alignment)],
                          capture_output=True, text=True, timeout=300)


def _engine_job(store, *flags) -> subprocess.CompletedProcess:
    proc = launch(store, resume=False, flags=flags)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# What a second writer runs against a store being written: the command line, and the engine (crash_job.py).
SECOND_WRITERS = {
    "overwrite": (lambda model_dir, corpus, store: _cli_capture(model_dir, corpus, store, "--overwrite"),
                  lambda model_dir, corpus, store: _engine_job(store, "--overwrite")),
    "resume": (lambda model_dir, corpus, store: _cli_capture(model_dir, corpus, store, "--resume",
                                                             "--max-tokens", "100"),
               lambda model_dir, corpus, store: _engine_job(store, "--resume")),
    # align adds tokens/label and rewrites the manifest: racing a capture, one of the two would lose its part
    "align": (lambda model_dir, corpus, store: _cli_align(store, corpus),) * 2,
}


def assert_refused(done: subprocess.CompletedProcess, winner_pid: int, cli: bool) -> None:
    """The loser failed with StoreLockedError naming the winner: on the command line as one line, status 2."""
    if cli:
        assert done.returncode == 2 and done.stderr.startswith("error: "), done
        assert done.stderr.count("\n") == 1, done.stderr
    else:
        assert done.returncode != 0 and "StoreLockedError" in done.stderr, done.stderr
    assert f"is being written by pid {winner_pid} on " in done.stderr, done.stderr


def race_a_running_capture(race, trial, tmp_path, reference, model_dir, corpus):
    store, hold = tmp_path / "s.zarr", tmp_path / "go"
    winner = hold_mid_run(store, hold)
    done = SECOND_WRITERS[race][trial % 2](model_dir, corpus, store)  # the command line, then the engine
    finish(winner, hold)
    assert_refused(done, winner.pid, cli=trial % 2 == 0)
    assert_same_store(open_store(store), reference)  # exactly the winner's rows: nothing of it was touched
    assert sorted(os.listdir(tmp_path)) == ["go", "s.zarr"], "the loser left nothing behind"


@pytest.mark.parametrize("race, trial", [("overwrite", 0), pytest.param("resume", 1, marks=pytest.mark.slow),
                                         ("align", 0)])  # CLI, engine, CLI
def test_a_second_writer_is_refused_while_a_capture_runs(race, trial, tmp_path, reference, model_dir, corpus):
    """``capture & sleep; capture --overwrite`` deleted the running capture's store (which still ended
    ``complete``, with zero rows); ``... capture --resume --max-tokens N`` appended over it."""
    race_a_running_capture(race, trial, tmp_path, reference, model_dir, corpus)


@pytest.mark.slow
@pytest.mark.parametrize("race", ["overwrite", "resume"])
@pytest.mark.parametrize("trial", range(10))
def test_a_second_writer_is_refused_many_trials(race, trial, tmp_path, reference, model_dir, corpus):
    race_a_running_capture(race, trial, tmp_path, reference, model_dir, corpus)


@pytest.mark.parametrize("trial", range(1))
def test_two_resumes_at_once_on_a_killed_store(trial, tmp_path, reference):
    race_two_resumes(tmp_path / "s.zarr", tmp_path / "go", random.Random(200 + trial), reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 10))
def test_two_resumes_at_once_many_trials(trial, tmp_path, reference):
    race_two_resumes(tmp_path / "s.zarr", tmp_path / "go", random.Random(200 + trial), reference)


# ---- status tells the truth --------------------------------------------------------------------------------

def _feed(model, seqs, start: int) -> None:
    with torch.no_grad():
        for first in range(start, len(seqs), BATCH):
            model(**batch_of(seqs[first:first + BATCH]))


class _Stop(Exception):
    """What the driver raises to stop a run early (a rejected resume, an error)."""


@pytest.mark.filterwarnings("ignore:capture interrupted")
@pytest.mark.parametrize("stop, fed", [(_Stop, 0), (RuntimeError, 2), (KeyboardInterrupt, 2)])
def test_a_resume_that_stops_early_is_never_complete_and_leaves_nothing_behind(stop, fed, tmp_path,
                                                                             reference):
    """A resume rejected by its driver before any batch, one stopped by an error, one by Ctrl-C: the store
    says ``failed`` (never ``complete``), no reserve or temp file is left, and the next resume ends
    exactly."""
    model = tiny_model("gpt2")
    seqs = sequences(N_SEQUENCES)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], chunk_tokens=CHUNK, num_writers=2,
                        pinned_slots=2)
    with CaptureEngine(model, cfg):
        _feed(model, seqs[:40], 0)
    with pytest.raises(stop):
        with CaptureEngine(model, dataclasses.replace(cfg, resume=True)) as cap:
            _feed(model, seqs[:cap.resume_sequences + fed * BATCH], cap.resume_sequences)
            raise stop("the run stops here")
    assert open_store(cfg.output_dir).status == "failed"
    assert os.listdir(tmp_path) == ["s.zarr"] and not list(tmp_path.rglob("*.partial"))
    with CaptureEngine(model, dataclasses.replace(cfg, resume=True)) as cap:
        _feed(model, seqs, cap.resume_sequences)
    assert_same_store(open_store(cfg.output_dir), reference)


def test_a_resume_that_cannot_start_leaves_the_store_as_it_was(tmp_path):
    """A resume refused at construction (here: the model has another engine) changes nothing of a complete
    store: before, the store was repaired first and left ``open``, its last chunk uncommitted."""
    model = tiny_model("gpt2")
    cfg = small_cfg(tmp_path / "s.zarr", chunk_tokens=4)
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 7))
    before = open_store(cfg.output_dir)
    with CaptureEngine(model, small_cfg(tmp_path / "other.zarr")):
        with pytest.raises(engine.HookPointError, match="already has a CaptureEngine"):
            CaptureEngine(model, dataclasses.replace(cfg, resume=True))
    after = open_store(cfg.output_dir)
    assert after.manifest == before.manifest and after.chunks == before.chunks
    assert not (tmp_path / "s.zarr.reserve").exists()
