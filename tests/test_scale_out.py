"""Scale out: torchrun processes (gloo on CPU) writing parts of one store, and stores on a real S3-compatible
server (moto's ThreadedMotoServer on 127.0.0.1), including kill -9 and resume against it."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.store.lock
from engine import ActivationDataset, CaptureConfig, CaptureEngine, open_store
from engine.cli.corpus import shares
from engine.cli.main import main as cli_main
from engine.errors import (
    CaptureError,
    ResumeMismatchError,
    StoreCorruptError,
    StoreLockedError,
    StorePathError,
)
from engine.format.layout import CommitRecord, commit_record_key
from engine.format.location import Location
from engine.read.reader import CommittedArray
from engine.store.lock import check_unlocked

from helpers import (
    assert_same_store,
    assert_statistics_match,
    cli,
    crash_and_resume,
    finish,
    hold_mid_run,
    launch,
    race_two_resumes,
    ragged_batch,
    run_job,
    served_rows,
    tiny_model,
    wait_for_stale_locks,
)

KEYS = ("layer_1/residual", "layer_1/mlp_hidden")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def capture_args(model_dir, corpus, out):
    return ["capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 1, "--seq-len", 24,
            "--batch-size", 1, "--chunk-tokens", 32, "--no-progress"]


def rows_by_token(store, key) -> dict[tuple[int, int], bytes]:
    """{(sequence, position): the row's bytes} of one array."""
    pairs = zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist())
    rows = store[key][:]
    table = {pair: rows[i].tobytes() for i, pair in enumerate(pairs)}
    assert len(table) == store.num_tokens, "no duplicate (sequence, position)"
    return table


def test_torchrun_parts_equal_a_single_process_run(model_dir, corpus, tmp_path):
    single, parts = tmp_path / "single.zarr", tmp_path / "parts.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each worker: the same float results
    subprocess.run([sys.executable, "-m", "engine", *map(str, capture_args(model_dir, corpus, single))],
                   check=True, capture_output=True, env=env, timeout=300)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "engine",
                           *map(str, capture_args(model_dir, corpus, parts))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[capture rank 0] done" in done.stdout and "[capture rank 1] done" in done.stdout

    reference, store = open_store(single), open_store(parts)
    manifest = store.manifest
    assert manifest.status == "complete" and manifest.world_size == 2
    assert [p.num_tokens > 0 for p in store.parts] == [True, True]
    assert manifest.committed_tokens == store.num_tokens == reference.num_tokens
    # Each process wrote only its own part; rank 0 only the root and parts/ group documents.
    assert sorted(os.listdir(parts)) == ["parts", "zarr.json"]
    assert sorted(os.listdir(parts / "parts")) == ["rank_00000", "rank_00001", "zarr.json"]  # locks gone
    sequences = [set(open_store(part.location)["tokens/sequence"][:].tolist()) for part in store.parts]
    assert not sequences[0] & sequences[1]

    for key in (*KEYS, "tokens/input_ids", "tokens/flags", "tokens/doc_id"):  # the must-show: as sets of rows
        assert rows_by_token(store, key) == rows_by_token(reference, key), key
    for key in KEYS:  # contiguous shares: the parts in rank order are the single run, row for row
        np.testing.assert_array_equal(store[key][:], reference[key][:])
        batches = ActivationDataset(parts, key, batch_size=8, shuffle=False, exclude=())
        np.testing.assert_array_equal(torch.cat(list(batches)).numpy(), reference[key][:].astype(np.float32))
        assert_statistics_match(parts, key, store[key].shape[1])
        assert manifest.statistics[key]["count"] == reference.manifest.statistics[key]["count"]
    report = cli("inspect", parts)
    assert "parts/rank_00001" in report and f"{store.num_tokens:,} committed" in report
    assert f"({store.num_tokens}, 64) float16" in read_with_dask(parts, KEYS[0])


@pytest.mark.slow
def test_torchrun_int8_parts_decode_like_a_single_process_int8_run(model_dir, corpus, tmp_path):
    """An 8-bit multi-process store: each part's codes and scales are its own, and the parts read as one
    (decoded, verified, through the dataset) equal a single process's int8 run."""
    single, parts = tmp_path / "single.zarr", tmp_path / "parts.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    int8 = ["--dtype", "int8"]
    subprocess.run([sys.executable, "-m", "engine", *map(str, capture_args(model_dir, corpus, single)),
                    *int8], check=True, capture_output=True, env=env, timeout=300)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "engine",
                           *map(str, capture_args(model_dir, corpus, parts)), *int8],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reference, store = open_store(single, verify=True), open_store(parts, verify=True)
    assert store.manifest.format_version == 3 and [p.num_tokens > 0 for p in store.parts] == [True, True]
    for key in KEYS:
        np.testing.assert_array_equal(store[key].codes[:], reference[key].codes[:])
        np.testing.assert_array_equal(store[key][:], reference[key][:])
        batches = ActivationDataset(parts, key, batch_size=8, shuffle=False, exclude=())
        np.testing.assert_array_equal(torch.cat(list(batches)).numpy(), reference[key][:])
        assert_statistics_match(parts, key, store[key].shape[1])


def read_with_dask(store, key) -> str:
    """examples/read_with_dask.py: dask and zarr alone, no engine code."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "read_with_dask.py"), str(store), key],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shares_are_contiguous_balanced_and_deterministic():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6]
    for parts in (1, 2, 3, 4, 12):
        cuts = shares(lengths, parts)
        assert cuts == shares(list(lengths), parts) and len(cuts) == parts
        assert cuts[0][0] == 0 and cuts[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    tokens = [sum(lengths[a:b]) for a, b in shares(lengths, 2)]
    assert abs(tokens[0] - tokens[1]) <= max(lengths)


@pytest.fixture
def process_group_of_one():
    """A real gloo process group with one process (what distributed=True needs), torn down after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_a_store_is_resumed_with_the_same_number_of_processes(tmp_path, process_group_of_one):
    model = tiny_model("gpt2")
    parted = CaptureConfig(tmp_path / "parted.zarr", layer_indices=[0], chunk_tokens=8, distributed=True)
    plain = CaptureConfig(tmp_path / "plain.zarr", layer_indices=[0], chunk_tokens=8)
    for cfg in (parted, plain):
        with CaptureEngine(model, cfg), torch.no_grad():
            model(**ragged_batch(3, 7))
    assert open_store(parted.output_dir).manifest.world_size == 1
    with pytest.raises(ResumeMismatchError, match="world_size .*the store has 1, this run has None"):
        CaptureEngine(model, dataclasses.replace(parted, distributed=False, resume=True))
    with pytest.raises(ResumeMismatchError, match="written by 1 process"):
        CaptureEngine(model, dataclasses.replace(plain, distributed=True, resume=True))


def test_each_part_is_checked_like_a_store(tmp_path, process_group_of_one):
    """Per part: a missing chunk is never read as zeros; a lost commit record of a complete part raises."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(tmp_path / "parted.zarr", layer_indices=[0], chunk_tokens=8, distributed=True)
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 9))
    part = Path(cfg.output_dir) / "parts" / "rank_00000"
    (part / "layer_0" / "residual" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreCorruptError, match="layer_0/residual chunk 1 .*parts/rank_00000/layer_0"):
        open_store(cfg.output_dir)["layer_0/residual"][:]
    with pytest.raises(StoreCorruptError, match="layer_0/residual chunk 1"):
        open_store(cfg.output_dir, verify=True)
    (part / commit_record_key(1)).unlink()
    with pytest.raises(StoreCorruptError, match="rank_00000 is complete .*chunk_000000000001"):
        open_store(cfg.output_dir)


@pytest.mark.parametrize("mode", ["hooks", pytest.param("resume", marks=pytest.mark.slow)])
def test_a_rank_that_cannot_start_stops_every_rank(mode, tmp_path):
    """No rank waits in a collective for one that gave up: rank 1 fails its setup (a bad layer before the
    store is prepared, or a resume mismatch on its part after), and both ranks fail with a message naming
    it."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2",
                           str(Path(__file__).resolve().parent / "setup_failure_job.py"),
                           str(tmp_path / "s.zarr"), mode], capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "rank 0 failed: CaptureError: capture could not start on every rank" in done.stdout, done.stdout
    assert "rank 1: " + ("HookPointError" if mode == "hooks" else "ResumeMismatchError") in done.stdout
    assert f"rank 1 failed: {'HookPointError' if mode == 'hooks' else 'ResumeMismatchError'}" in done.stdout
    assert "captured" not in done.stdout
    if mode == "resume":  # no rank touched its part: each still holds exactly the first run's rows, complete
        store = open_store(tmp_path / "s.zarr")
        for rank, part in enumerate(store.parts):
            assert part.num_tokens == int(ragged_batch(3, 7, seed=rank)["attention_mask"].sum())
            assert part.group.attrs["manifest"]["status"] == "complete"


def test_rows_across_parts_read_like_one_array():
    import zarr

    data = np.arange(100 * 3).reshape(100, 3)
    pieces, cuts = [], [0, 37, 37, 80, 100]
    for start, stop in zip(cuts, cuts[1:]):  # arrays longer than their committed rows, one part empty
        array = zarr.create_array(zarr.storage.MemoryStore(), shape=(stop - start + 5, 3), chunks=(8, 3),
                                  dtype=data.dtype)
        array[: stop - start] = data[start:stop]
        chunks = [CommitRecord(index, row, min(row + 8, stop - start), {}, "int64", 0, 0, 1, 1, {}, 0.0)
                  for index, row in enumerate(range(0, stop - start, 8))]
        pieces.append((array, chunks))
    rows = CommittedArray(pieces)
    bounds = [None, -120, -1, 0, 5, 37, 38, 80, 99, 100, 150]
    for start, stop, step in itertools.product(bounds, bounds, [None, 2, 7, -1, -3]):
        np.testing.assert_array_equal(rows[start:stop:step], data[start:stop:step])
        np.testing.assert_array_equal(rows[start:stop:step, 1], data[start:stop:step, 1])
    for row in (-100, -1, 0, 36, 37, 80, 99):
        np.testing.assert_array_equal(rows[row], data[row])


def test_a_bucket_root_is_refused():
    for url in ("s3://bucket", "s3://bucket/", "gs://b"):
        with pytest.raises(StorePathError, match="bucket's root"):
            CaptureConfig(url, layer_indices=[0])


def test_distributed_needs_a_process_group(tmp_path):
    with pytest.raises(Exception, match="init_process_group"):
        CaptureEngine(tiny_model("gpt2"),
                      CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], distributed=True))


# ---- object storage ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# Crash jobs' lock lease here: a killed job's lock is broken after a second or two, not a minute.
LEASE_S = 1.5
HOLDER_LEASE_S = 4.0  # a killed holder's: long enough for a check right after the kill to fall within it


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A new bucket; endpoint and credentials in the usual environment variables (subprocesses inherit them,
    and crash jobs take their lock lease from ACTCAP_TEST_LEASE_S)."""
    import s3fs

    for name, value in (("AWS_ENDPOINT_URL", s3_endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("ACTCAP_TEST_LEASE_S", str(LEASE_S))):
        monkeypatch.setenv(name, value)
    name = f"actcap-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def test_capture_into_s3_reads_back_with_the_dataset_and_dask(bucket, tmp_path):
    import dask.array as da

    model = tiny_model("llama")
    batches = [ragged_batch(5, 10, seed=seed) for seed in range(6)]
    stores = {}
    for name, where in (("local", tmp_path / "s.zarr"), ("s3", f"{bucket}/runs/s.zarr")):
        cfg = CaptureConfig(where, layer_indices=[1], chunk_tokens=16, num_writers=3)
        with CaptureEngine(model, cfg), torch.no_grad():
            for batch in batches:
                model(**batch)
        stores[name] = open_store(where)
    local, remote = stores["local"], stores["s3"]
    assert remote.status == "complete" and remote.num_tokens == local.num_tokens > 0
    for key in (*KEYS, "tokens/sequence", "tokens/position", "tokens/flags"):
        np.testing.assert_array_equal(remote[key][:], local[key][:])
    assert_statistics_match(f"{bucket}/runs/s.zarr", KEYS[0], 64)

    dataset = ActivationDataset(f"{bucket}/runs/s.zarr", KEYS[0], batch_size=7, exclude=())
    expected = np.sort(local[KEYS[0]][:].astype(np.float32), axis=0)
    np.testing.assert_array_equal(np.sort(torch.cat(list(dataset)).numpy(), axis=0), expected)
    for start in ("fork", "spawn"):  # forked workers after the parent read: they must not reuse its handles
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             multiprocessing_context=start, timeout=120)
        np.testing.assert_array_equal(np.sort(torch.cat(list(loader)).numpy(), axis=0), expected,
                                      err_msg=start)

    committed = remote.manifest.committed_tokens  # dask reads the zarr arrays alone, no engine code
    acts = da.from_zarr(f"{bucket}/runs/s.zarr", component=KEYS[0])[:committed]
    np.testing.assert_array_equal(acts.compute(), local[KEYS[0]][:])
    assert f"({committed}, 64) float16" in read_with_dask(f"{bucket}/runs/s.zarr", KEYS[0])


def test_a_store_read_from_s3_serves_the_rows_it_serves_from_disk(bucket, tmp_path):
    """On disk the chunks are mapped, from the bucket they are read into memory (windows of buffer_chunks):
    one reading design, the same rows each epoch, each with its tokens."""
    import s3fs

    model = tiny_model("llama")
    local = tmp_path / "s.zarr"
    with CaptureEngine(model, CaptureConfig(local, layer_indices=[1], chunk_tokens=16)), torch.no_grad():
        for seed in range(6):
            model(**ragged_batch(5, 10, seed=seed))
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(local), f"{bucket}/s.zarr", recursive=True)
    for epoch in range(2):
        on_disk = served_rows(local, KEYS[0], epoch, batch_size=7, buffer_chunks=2)
        assert len(on_disk) > 100 and on_disk == served_rows(f"{bucket}/s.zarr", KEYS[0], epoch, batch_size=7,
                                                               buffer_chunks=2)


def test_s3_overwrite_and_exists_checks(bucket):
    import s3fs

    neighbour = f"{bucket}/s.zarr2/keep.txt"  # shares the prefix's leading characters: must survive overwrite
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(neighbour, b"keep")
    model = tiny_model("gpt2")
    cfg = CaptureConfig(f"{bucket}/s.zarr", layer_indices=[0], chunk_tokens=8)
    for kwargs in ({}, {"overwrite": True}):
        with CaptureEngine(model, dataclasses.replace(cfg, **kwargs)), torch.no_grad():
            model(**ragged_batch(3, 7))
    with pytest.raises(Exception, match="already exists"):
        CaptureEngine(model, cfg)
    assert open_store(cfg.output_dir).num_tokens == open_store(cfg.output_dir).manifest.committed_tokens > 0
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat(neighbour) == b"keep"


SEQUENCES = 60  # 20 batches: kills are timed by the jobs' progress lines, so a short job is enough


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_job(store, resume=False, count=SEQUENCES)
    return open_store(store)


@pytest.mark.slow
def test_kill_9_then_resume_against_s3(bucket, reference):
    store = crash_and_resume(f"{bucket}/s.zarr", random.Random(3), kills=2, count=SEQUENCES)
    assert_same_store(store, reference)


@pytest.mark.slow
def test_torchrun_kill_9_then_resume_per_rank(tmp_path, reference):
    store = crash_and_resume(tmp_path / "parts.zarr", random.Random(5), kills=1, ranks=2, count=SEQUENCES)
    assert store.manifest.world_size == 2 and all(p.num_tokens for p in store.parts)
    assert_same_store(store, reference)  # tokens equal, activations within float16 rounding, no duplicates


@pytest.mark.slow
def test_torchrun_kill_9_then_resume_per_rank_against_s3(bucket, reference):
    store = crash_and_resume(f"{bucket}/parts.zarr", random.Random(5), kills=1, ranks=2, count=SEQUENCES)
    assert store.manifest.world_size == 2 and all(p.num_tokens for p in store.parts)
    assert_same_store(store, reference)  # tokens equal, activations within float16 rounding, no duplicates


@pytest.mark.slow
def test_torchrun_a_second_job_is_refused(tmp_path, reference):
    """A torchrun job started over a running one (here with --overwrite): its rank 0 cannot lock the root, so
    every rank stops before any part is touched; the running job's store ends exactly right."""
    store, hold = tmp_path / "parts.zarr", tmp_path / "go"
    winner = hold_mid_run(store, hold, ranks=2, count=SEQUENCES)
    loser = launch(store, resume=False, ranks=2, count=SEQUENCES, flags=("--overwrite",))
    _, err = loser.communicate(timeout=300)
    finish(winner, hold)
    assert loser.returncode != 0 and "StoreLockedError" in err and "is being written by pid" in err, err
    assert_same_store(open_store(store), reference)


# ---- the object-storage lock ------------------------------------------------------------------------------

HOLDER = """
import sys, time
import engine.store.lock
from engine.format.location import Location
engine.store.lock.LEASE_S = float(sys.argv[2])
engine.store.lock.acquire(Location.of(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def killed_holder(url: str) -> int:
    """A process that takes the store's lock and is killed -9 with it; returns its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(HOLDER_LEASE_S)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        alive = rf"pid {holder.pid} .*\(lease {HOLDER_LEASE_S:.0f} s\): one writer per store"
        with pytest.raises(StoreLockedError, match=alive):
            check_unlocked(Location.of(url), break_lock=True)  # alive: never broken, even when asked
    finally:
        holder.kill()
        holder.wait()
    return holder.pid


def test_s3_lock_refuses_a_second_writer_and_is_broken_only_after_its_lease(bucket):
    import s3fs

    url = f"{bucket}/s.zarr"
    model = tiny_model("gpt2")
    cfg = CaptureConfig(url, layer_indices=[0], chunk_tokens=8)
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 7))
    before = open_store(url).manifest
    pid = killed_holder(url)
    for kwargs in ({"overwrite": True}, {"resume": True}, {"resume": True, "break_lock": True}):
        with pytest.raises(StoreLockedError, match=rf"pid {pid} on .* since .*heartbeat was \d+ s ago"):
            CaptureEngine(model, dataclasses.replace(cfg, **kwargs))  # killed, but within its lease
    assert open_store(url).manifest == before, "the refused overwrite deleted nothing"
    wait_for_stale_locks(url)
    with pytest.raises(StoreLockedError, match=rf"pid {pid} .*seems gone.*pass break_lock=True"):
        CaptureEngine(model, dataclasses.replace(cfg, resume=True))
    with CaptureEngine(model, dataclasses.replace(cfg, resume=True, break_lock=True)), torch.no_grad():
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} "):
            check_unlocked(Location.of(url), break_lock=True)
        model(**ragged_batch(3, 7, seed=1))
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(f"{url}.lock"), "released at close"
    store = open_store(url)
    tokens = sum(int(ragged_batch(3, 7, seed=seed)["attention_mask"].sum()) for seed in (0, 1))
    assert store.status == "complete" and store.num_tokens == tokens


def _objects(url: str) -> dict[str, str]:
    """Every object under a store's prefix, by key, with its ETag (a rewrite with other bytes changes it)."""
    import s3fs

    return {path: info["ETag"] for path, info in
            s3fs.S3FileSystem(skip_instance_cache=True).find(url, detail=True).items()}


def _read_until(job: subprocess.Popen, start: str) -> str:
    """The job's next progress line that starts with ``start``."""
    for line in job.stdout:
        if line.startswith(start):
            return line
    raise AssertionError(f"the job ended before {start!r}: {job.wait()} {job.stderr.read()}")


@pytest.mark.parametrize("heartbeat", ["beats", "stopped"])
def test_s3_a_run_whose_lock_was_broken_writes_nothing_more(heartbeat, bucket, monkeypatch):
    """Should another process break a live run's lock (its heartbeat stalled past the lease), nothing more is
    written there, not even ``failed``: the run's next heartbeat finds out (its writer process is stopped and
    the next forward raises), and before it does, every write of the writer process proves the lease first.
    Issue 32, "stopped": a heartbeat that never beats, as in a stopped process; before, chunks and commit
    records went on being written."""
    import s3fs

    monkeypatch.setattr(engine.store.lock, "LEASE_S", 1.5)
    if heartbeat == "stopped":
        monkeypatch.setattr(engine.store.lock.ObjectLock, "_beat", lambda lock: None)
    url = f"{bucket}/s.zarr"
    model = tiny_model("gpt2")
    cap = CaptureEngine(model, CaptureConfig(url, layer_indices=[0], chunk_tokens=8))
    breaker = {"pid": 4242, "host": "elsewhere", "since": "2026-01-01T00:00:00+00:00", "command": "capture"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with torch.no_grad():
        model(**ragged_batch(3, 7))
        cap.flush()
        fs.pipe(f"{url}.lock", json.dumps(breaker).encode())  # what a breaker's conditional PUT leaves
        taken_over = _objects(url)
        time.sleep(0.2)  # past the writer's last proof (it proves at most once per lease / 10)
        deadline = time.monotonic() + 30
        with pytest.raises(CaptureError, match="lost its lock to pid 4242 on elsewhere"):
            while time.monotonic() < deadline:
                model(**ragged_batch(3, 7, seed=1))
                time.sleep(0.05)
    cap.close()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert _objects(url) == taken_over, "written after the lock was broken"
    assert json.loads(fs.cat(f"{url}.lock")) == breaker, "the breaker's lock is left alone"


@pytest.mark.slow
def test_s3_a_stopped_writer_whose_lock_was_broken_writes_nothing(bucket, tmp_path):
    """Issue 32, with real processes: job A is stopped (SIGSTOP) with two batches handed to its writer
    process; its lock passes its lease and job B takes the store over (--break-lock) and captures other
    sequences to the end. Then A's writer process alone is woken (its capturing process, whose heartbeat
    would notice the loss, stays stopped): it proves its lease before writing, finds the lock gone, and
    writes nothing; A then fails. Before: A's writer wrote its chunk and commit record over B's, and B's
    store failed verification."""
    url, hold, count = f"{bucket}/s.zarr", tmp_path / "go", 30
    job = launch(url, resume=False, count=count, flags=("--hold", hold))
    writer = int(_read_until(job, "ready").split()[3])
    _read_until(job, "holding")  # flushed: both slots are free
    try:
        os.kill(writer, signal.SIGSTOP)
        hold.touch()
        for _ in range(2):  # the two batches wait in the stopped writer process's two slots
            _read_until(job, "batch")
        os.kill(job.pid, signal.SIGSTOP)
        run_job(url, resume=True, count=count, flags=(*wait_for_stale_locks(url), "--seed", 8))
        taken_over = _objects(url)
        os.kill(writer, signal.SIGCONT)
        deadline = time.monotonic() + 3  # a write comes at once (before the fix it did); none must come
        while time.monotonic() < deadline and _objects(url) == taken_over:
            time.sleep(0.1)
    finally:
        for pid in (writer, job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0 and "lost its lock" in err, err
    assert _objects(url) == taken_over, "the stopped job wrote into the store it had lost"
    assert open_store(url).status == "complete"


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_s3_break_lock_on_the_command_line(bucket, model_dir, corpus, capsys):
    url = f"{bucket}/cli.zarr"
    args = [*capture_args(model_dir, corpus, url), "--max-tokens", 100]
    assert run_cli(capsys, *args)[0] == 0
    pid = killed_holder(url)
    code, err = run_cli(capsys, *args, "--resume", "--break-lock")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"pid {pid} " in err and "a lock is broken only after its lease" in err, err
    wait_for_stale_locks(url)
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "seems gone" in err and "--break-lock" in err, err
    assert run_cli(capsys, *args, "--resume", "--break-lock")[0] == 0
    assert open_store(url).status == "complete"


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_s3_two_resumes_break_a_killed_jobs_lock_at_once(trial, bucket, tmp_path, reference):
    """Both resumes break the stale lock with a conditional PUT on its ETag: one wins, the other is
    refused."""
    race_two_resumes(f"{bucket}/s.zarr", tmp_path / "go", random.Random(300 + trial), reference,
                     count=SEQUENCES)
