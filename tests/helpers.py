"""Test helpers (imported as ``from helpers import ...``; conftest.py holds only fixtures): tiny random-weight
models of every supported family (2 layers, d_model 64), ragged batches and documents; an independent
reference capture to compare stored rows against, and float64 statistics; crash-test jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import ActivationDataset, StoreLockedError, get_model, open_store, random_model
from engine.capture.hookpoints import resolve_hook_points
from engine.format.layout import FLAG_BOS, FLAG_FIRST, part_path
from engine.format.location import Location
from engine.store.lock import check_unlocked

# Registry model per family, and the overrides that shrink it. mlp widths differ from 4*d_model on purpose,
# so a test can tell d_mlp from d_model.
TINY = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_inner=160, n_positions=128, vocab_size=256,
                          bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("pythia-1.4b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=160, vocab_size=256, max_position_embeddings=128,
                                     bos_token_id=1, eos_token_id=2)),
    "llama": ("llama-3-8b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=160, vocab_size=256,
                                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
    "gemma": ("gemma-2b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=16, intermediate_size=160, vocab_size=256,
                               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "phi": ("phi-2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                          vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
}
FAMILIES = tuple(TINY)
D_MODEL, D_MLP, N_LAYERS, VOCAB = 64, 160, 2, 256


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **config_overrides) -> torch.nn.Module:
    """A tiny random model of ``family``; ``config_overrides`` change its config further (e.g. a variant)."""
    name, overrides = TINY[family]
    return random_model(get_model(name), dtype=dtype, seed=seed, **{**overrides, **config_overrides}).eval()


def ragged_batch(batch: int, seq: int, seed: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids + attention_mask with different lengths per row (one row fully padded when batch > 3)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    if batch > 3:
        lengths[3] = 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids[:, 0] = torch.where(mask[:, 0] == 1, 1, ids[:, 0])  # a BOS where row 0 is a real token
    return {"input_ids": ids, "attention_mask": mask}


def tiny_store(path, forwards: int = 40, **config):
    """A store of a tiny gpt2's ``layer_1/residual`` over ``forwards`` ragged batches of 8 x 32 (chunks of 64
    rows); ``config`` adds CaptureConfig fields. Returns ``path``."""
    from engine import CaptureConfig, CaptureEngine

    model = tiny_model("gpt2")
    cfg = CaptureConfig(path, layer_indices=[1], capture_mlp_hidden=False, chunk_tokens=64, **config)
    with CaptureEngine(model, cfg), torch.no_grad():
        for seed in range(forwards):
            model(**ragged_batch(8, 32, seed=seed))
    return path


WORDS = ("the cat sat on a mat while two dogs ran past the old barn and seven birds sang loudly "
         "in morning light over green hills").split()


def documents(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(count)]


def served_rows(store, key: str, epoch: int, **options) -> list[tuple[int, int, int, bytes]]:
    """Every row an epoch of ActivationDataset serves, as sorted (sequence, position, token id, row bytes):
    the epoch's rows as a multiset, each with the tokens it was served with."""
    keys = [key, "tokens/sequence", "tokens/position"]
    data = ActivationDataset(store, keys, return_tokens=True, **options)
    data.set_epoch(epoch)
    return sorted((int(sequence), int(position), int(token), row.tobytes()) for batch, ids in data
                  for sequence, position, token, row in zip(batch[keys[1]], batch[keys[2]], ids,
                                                            batch[key].numpy()))


def hook_all(hook_points, record) -> list:
    """Each point's own hook (``HookPoint.attach``), outside the engine: ``record(key, tensor)`` gets what
    each point captures. Returns the handles to remove."""
    return [hp.attach(functools.partial(record, hp.key)) for hp in hook_points]


@contextlib.contextmanager
def reference_capture(model, layers, points, extra_modules=None):
    """Record every point's full (batch, seq, dim) tensor per forward, with plain hooks of our own."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = hook_all(resolve_hook_points(model, layers, points, extra_modules or {}),
                       lambda key, t: records.setdefault(key, []).append(t.detach().float().cpu().clone()))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def expected_rows(tensors: list[torch.Tensor], masks: list[torch.Tensor], dtype=torch.float16) -> np.ndarray:
    """Non-pad rows of each batch, in order, cast like the engine casts them."""
    rows = [t[m.bool()] for t, m in zip(tensors, masks)]
    return torch.cat(rows).to(dtype).float().numpy()


def assert_store_rows(path, ref, batches):
    """Every point's stored rows are the reference forwards' non-pad rows, in order."""
    masks = [b["attention_mask"].cpu() for b in batches]
    store = open_store(path)
    for key in ref:
        np.testing.assert_array_equal(store[key][:].astype(np.float32), expected_rows(ref[key], masks),
                                      err_msg=key)


def assert_statistics_match(path, key, dim):
    """The manifest's statistics equal float64 numpy over the stored rows, attention sinks left out."""
    store = open_store(path)
    stats = store.manifest.statistics[key]
    sink = (store["tokens/flags"][:] & (FLAG_BOS | FLAG_FIRST)) != 0
    rows = store[key][:].astype(np.float64)[~sink]
    norms = np.linalg.norm(rows, axis=1)
    assert stats["count"] == len(rows) and stats["sink_rows"] == sink.sum() > 0 and stats["nonfinite"] == 0
    scale = np.abs(rows).max()  # float32 within small blocks, float64 across: ~1e-6 relative to the data
    np.testing.assert_allclose(stats["mean"], rows.mean(0), rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(stats["mean_squared_norm"], (norms ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["mean_norm"], norms.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["max_norm"], norms.max(), rtol=1e-6)
    np.testing.assert_allclose(stats["norm_scaling_factor"], np.sqrt(dim / (norms ** 2).mean()), rtol=1e-6)


def assert_png(path) -> None:
    """A valid, small, non-blank PNG picture: its signature and header, a size a page shows as it is, and
    pixels that are not all one colour once decoded."""
    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 400 < width < 1200 and 200 < height < 1200 and 5_000 < len(data) < 200_000, (path, width, height)
    assert matplotlib.image.imread(path).std() > 0.05, f"{path} is blank"


def hide_matplotlib(folder: Path) -> dict[str, str]:
    """The environment of a child process in which ``import matplotlib`` fails (a package of that name first
    on its path), as where the plot extra is not installed."""
    (folder / "matplotlib").mkdir(parents=True)
    (folder / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


JOB = Path(__file__).resolve().parent / "crash_job.py"
N_SEQUENCES = 90
PACE_S = 0.05  # crash_job.py's pause after each progress line: a kill within it lands before the next step


@dataclasses.dataclass(frozen=True)
class Kill:
    """Where a crash test kills a job, chosen from the job's own progress lines (see crash_job.py): after the
    line at ``fraction`` of the way from "ready" (0) to "closing" (1), plus ``delay`` seconds (less than the
    job's pause after each line, so the kill lands before its next step on any machine). ``orphan``: kill
    only the capturing process, not its writer process (which must then exit by itself)."""

    fraction: float
    delay: float
    orphan: bool = False

    @classmethod
    def random(cls, rng, orphan: bool = False) -> "Kill":
        # A third of the kills at "ready" (the first batch: array creation), a sixth at "closing".
        fraction = rng.choice([0.0, 0.0, rng.random(), rng.random(), rng.random(), 1.0])
        return cls(fraction, rng.uniform(0.0, 0.8 * PACE_S), orphan)

    def line(self, batches: int) -> int:
        """Progress lines to read before the kill: 1 is "ready", 2 the first batch,
        ``batches + 2`` "closing"."""
        return 1 + round(self.fraction * (batches + 1))


def launch(store, resume: bool, ranks: int = 1, count: int = N_SEQUENCES, flags=()) -> subprocess.Popen:
    """Start crash_job.py (under torchrun when ``ranks`` > 1) with more of its ``flags``; stdout and stderr
    are pipes."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    args = [*launcher, str(JOB), str(store), str(count)] + (["--resume"] if resume else []) + (
        ["--distributed"] if ranks > 1 else []) + [str(flag) for flag in flags]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_job(store, resume: bool, kill: Kill | None = None, ranks: int = 1, count: int = N_SEQUENCES,
            flags=()) -> list[str]:
    """Run crash_job.py (under torchrun, one process per rank, when ``ranks`` > 1); returns rank 0's progress
    lines read. With ``kill``, SIGKILL the job at that point: every process of it (launcher, ranks and their
    writer processes), or with ``kill.orphan`` the capturing process alone, whose writer process must then
    exit by itself."""
    proc = launch(store, resume, ranks, count, flags)
    if kill is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out.splitlines()
    lines, target = [], None
    while target is None or len(lines) < target:
        line = proc.stdout.readline()
        assert line, f"the job ended before the kill point: {lines} {proc.stderr.read()}"
        if line.split()[1:2] != ["0"]:
            continue  # follow rank 0
        lines.append(line)
        if line.startswith("ready"):
            target = kill.line(int(line.split()[2]))
    time.sleep(kill.delay)
    _kill_job(proc, kill.orphan)
    return lines


def _kill_job(proc: subprocess.Popen, orphan: bool) -> None:
    """SIGKILL every process of a job at once: the launcher and every descendant (torchrun starts each rank
    in a session of its own, and the engine its writer processes too, so no process group holds them all).
    With ``orphan``, the writer processes are spared and must exit by themselves."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    writers = [p for p in family if "engine.writer" in " ".join(p.cmdline())]
    for process in family:
        if not (orphan and process in writers):
            _sigkill(process.pid)
    proc.wait(timeout=60)
    assert all(_exits(writer.pid, timeout=5) for writer in writers), "a writer process outlived its parent"


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exits(pid: int, timeout: float) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


ARRAYS = ["layer_0/residual", "layer_0/mlp_hidden", "layer_1/residual", "layer_1/mlp_hidden"]
TOKENS = ["tokens/input_ids", "tokens/sequence", "tokens/position", "tokens/flags"]


def assert_same_store(store, reference):
    assert store.status == "complete"
    for key in TOKENS:
        np.testing.assert_array_equal(store[key][:], reference[key][:], err_msg=key)
    for key in ARRAYS:
        np.testing.assert_allclose(store[key][:].astype(np.float32), reference[key][:].astype(np.float32),
                                   rtol=1e-3, atol=1e-3, err_msg=key)
    pairs = set(zip(store["tokens/sequence"][:].tolist(), store["tokens/position"][:].tolist()))
    assert len(pairs) == store.num_tokens, "no duplicate (sequence, position)"


def crash_and_resume(store, rng, kills: int, ranks: int = 1, count: int = N_SEQUENCES, orphan: bool = False):
    """Kill -9 the job ``kills`` times at points chosen from its progress, resuming each time, then let it
    finish. A kill before "closing" must find the store open; one at "closing" may land before or after the
    manifest is published. On object storage each resume waits for the killed job's locks to pass their
    lease and breaks them (``--break-lock``)."""
    flags = ()
    for attempt in range(kills):
        kill = Kill.random(rng, orphan)
        lines = run_job(store, resume=attempt > 0, kill=kill, ranks=ranks, count=count, flags=flags)
        status = open_store(store).status
        assert status == "open" or (lines[-1].startswith("closing") and status == "complete"), (kill, status)
        flags = wait_for_stale_locks(store, ranks)
    run_job(store, resume=True, ranks=ranks, count=count, flags=flags)
    return open_store(store)


def wait_for_stale_locks(store, ranks: int = 1, timeout: float = 120.0) -> tuple[str, ...]:
    """A store on object storage whose writer was killed: wait until its locks (the root's and, under
    torchrun, each part's) have passed their lease, and return the flag that breaks them. A local store
    needs neither: the kernel released its locks with the processes."""
    location = Location.of(str(store))
    if location.local is not None:
        return ()
    locations = [location] + ([location.child(part_path(rank)) for rank in range(ranks)] if ranks > 1 else [])
    deadline = time.monotonic() + timeout
    for where in locations:
        while True:
            try:
                check_unlocked(where, break_lock=True)  # raises while the lock is within its lease
                break
            except StoreLockedError:
                assert time.monotonic() < deadline, f"the lock of {where} never went stale"
                time.sleep(0.2)
    return ("--break-lock",)


def hold_mid_run(store, hold: Path, ranks: int = 1, count: int = N_SEQUENCES) -> subprocess.Popen:
    """Start a job that holds halfway through (its lock taken, chunks committed) until ``hold`` exists."""
    proc = launch(store, False, ranks, count, flags=("--hold", hold))
    for line in proc.stdout:
        if line.startswith("holding 0"):
            return proc
    raise AssertionError(f"the job ended before holding: {proc.wait()} {proc.stderr.read()}")


def finish(proc: subprocess.Popen, hold: Path) -> None:
    """Let a holding job go on, and check it ends well."""
    hold.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def race_two_resumes(store, hold: Path, rng, reference, count: int = N_SEQUENCES) -> None:
    """Kill -9 a job, then start two resumes at once: exactly one takes the store, the other is refused
    (StoreLockedError) and changes nothing; the winner's store equals an uninterrupted run. On object storage
    both wait for the killed job's lock to pass its lease and break it: one break wins."""
    run_job(store, resume=False, kill=Kill.random(rng), count=count)
    flags = ("--hold", hold, *wait_for_stale_locks(store))
    jobs = [launch(store, resume=True, count=count, flags=flags) for _ in range(2)]
    deadline = time.monotonic() + 300
    while all(job.poll() is None for job in jobs):
        assert time.monotonic() < deadline, "neither resume ended: both hold the store"
        time.sleep(0.05)
    loser, = (job for job in jobs if job.poll() is not None)
    winner, = (job for job in jobs if job is not loser)
    _, err = loser.communicate()
    assert loser.returncode != 0 and "StoreLockedError" in err, err
    finish(winner, hold)
    assert_same_store(open_store(store), reference)
