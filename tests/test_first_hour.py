"""What a new user meets in the first hour outside the command line: no lock file left beside a finished
store (and still one writer per store), capture stats that do not read like lost tokens, and a converted
model cache whose files all have the same mode."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys

import pytest
import torch

from engine import CaptureConfig, CaptureEngine, StoreLockedError, open_store
from engine.format.location import Location
from engine.models import loading
from engine.store.lock import acquire, lock_path

from helpers import ragged_batch, tiny_model

# ---- the local lock file goes with its last holder ---------------------------------------------------------


@pytest.mark.parametrize("ends", ["complete", "failed"])
def test_no_lock_file_stays_beside_a_finished_store(tmp_path, ends):
    model = tiny_model("gpt2")
    config = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8)
    stops = pytest.raises(RuntimeError) if ends == "failed" else contextlib.nullcontext()
    with stops, CaptureEngine(model, config), torch.no_grad():
        model(**ragged_batch(3, 7))
        if ends == "failed":
            raise RuntimeError("the run stops here")
    assert open_store(config.output_dir).status == ends
    assert os.listdir(tmp_path) == ["s.zarr"]
    with CaptureEngine(model, CaptureConfig(config.output_dir, layer_indices=[0], chunk_tokens=8,
                                            resume=True)), torch.no_grad():
        model(**ragged_batch(3, 7, seed=1))
    assert os.listdir(tmp_path) == ["s.zarr"], "a resume reuses no stale file and leaves none"


# Each racer takes and gives up the store's lock ``rounds`` times; while it holds the lock it creates the
# marker file exclusively, so a second holder at the same moment finds the marker there. Its flock calls are
# slowed by a random pause: that widens the window between a racer's open and its lock, where another racer's
# release unlinks the file.
RACER = r"""
import fcntl, os, random, sys, time
from engine.errors import StoreLockedError
from engine.format.location import Location
from engine.store.lock import acquire

store, marker, start, rounds, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
real_flock = fcntl.flock


def slowed_flock(fd, operation):
    time.sleep(rng.random() * 0.002)
    real_flock(fd, operation)


fcntl.flock = slowed_flock
while not os.path.exists(start):
    time.sleep(0.001)
held = 0
for _ in range(rounds):
    try:
        lock = acquire(Location.of(store))
    except StoreLockedError:
        continue
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        sys.exit("two processes held the lock at once")
    time.sleep(rng.random() * 0.002)
    os.unlink(marker)
    lock.release()
    held += 1
print(held)
"""


def test_racing_processes_never_hold_one_store_at_once(tmp_path):
    """Three processes lock and release one store in a loop, every release unlinking the lock file: a lock
    on a file that another process had already removed would let two of them in at once."""
    store, marker, start = tmp_path / "s.zarr", tmp_path / "holder", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(store), str(marker), str(start), "150",
                                str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for seed in range(3)]
    start.touch()
    results = [racer.communicate(timeout=300) for racer in racers]
    for racer, (out, err) in zip(racers, results):
        assert racer.returncode == 0, err
        assert int(out) > 0, "each racer held the lock at some point"
    assert not lock_path(Location.of(store)).exists(), "the last release removed the file"


HOLDER = r"""
import sys
from engine.format.location import Location
from engine.store.lock import acquire

lock = acquire(Location.of(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_holder_killed_with_sigkill_frees_the_lock(tmp_path):
    store = Location.of(tmp_path / "s.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StoreLockedError, match=f"is being written by pid {holder.pid} "):
            acquire(store)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(store).exists(), "kill -9 leaves the file"
    acquire(store).release()
    assert not lock_path(store).exists(), "and the next holder removes it"


def test_a_descriptor_handed_to_another_process_keeps_the_lock_and_its_file(tmp_path):
    """As the writer process holds the capturing process's descriptor: releasing one copy while the other
    process lives must neither free the store nor remove the file under that process's lock."""
    store = Location.of(tmp_path / "s.zarr")
    lock = acquire(store)
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              pass_fds=(lock.fd,))
    try:
        lock.release()
        assert lock_path(store).exists()
        with pytest.raises(StoreLockedError, match=f"is being written by pid {os.getpid()} "):
            acquire(store)
    finally:
        writer.stdin.close()
        writer.wait()
    acquire(store).release()
    assert not lock_path(store).exists()


def test_a_forked_child_leaves_its_parents_lock_file(tmp_path):
    store = Location.of(tmp_path / "s.zarr")
    lock = acquire(store)
    try:
        child = os.fork()
        if child == 0:  # the fork hook closed the inherited descriptor: exit without Python's clean-up
            os._exit(0)
        os.waitpid(child, 0)
        assert lock_path(store).exists()
        with pytest.raises(StoreLockedError):
            acquire(store)
    finally:
        lock.release()
    assert not lock_path(store).exists()


# ---- capture stats -----------------------------------------------------------------------------------------


def test_capture_stats_count_padding_as_staged_positions_not_as_lost_tokens(tmp_path):
    model = tiny_model("gpt2")
    batches = [ragged_batch(4, 8, seed=seed) for seed in range(3)]
    with CaptureEngine(model, CaptureConfig(tmp_path / "s.zarr", layer_indices=[0])) as cap, \
            torch.no_grad():
        for batch in batches:
            model(**batch)
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    stats = cap.stats
    assert real < stats.tokens_staged == 3 * 4 * 8 and stats.tokens_committed == real
    assert str(stats).startswith(f"{real} tokens committed (3 batches staged: 96 positions counting padding, "
                                 "which is never stored), ")


# ---- the converted model's cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_converted_model_folder_has_one_mode_for_every_file(model_dir, tmp_path, umask):
    """safetensors creates model.safetensors with mode 0600; the cache's other files follow the umask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    previous = os.umask(umask)
    try:
        loading._save_folder(model, tokenizer, tmp_path / "converted")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "converted").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert os.listdir(tmp_path) == ["converted"]


def test_a_lock_whose_path_keeps_naming_another_file_fails_instead_of_spinning(tmp_path, monkeypatch):
    """A filesystem whose stat and fstat disagree (some overlay or FUSE mounts) would make every locker retry
    forever; it fails with a clear error once the orphan grace has passed."""
    from engine.errors import StorePathError
    from engine.store import lock

    monkeypatch.setattr(lock, "ORPHAN_GRACE_S", 0.2)
    monkeypatch.setattr(lock, "_names", lambda path, fd: False)
    with pytest.raises(StorePathError, match="keeps naming another file than the one locked"):
        acquire(Location.of(tmp_path / "s.zarr"))


def test_align_on_a_missing_store_changes_nothing(tmp_path):
    from engine.cli.main import main

    alignment = tmp_path / "al.jsonl"
    alignment.write_text('{"doc_id": 0, "spans": []}\n')
    assert main(["align", str(tmp_path / "missing" / "s.zarr"), str(alignment)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["al.jsonl"], "no folder and no lock file were made"
