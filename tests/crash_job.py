"""A capture job for crash and race tests: deterministic sequences, resumable. Run as a subprocess. Usage:
python crash_job.py STORE N_SEQUENCES [--resume | --overwrite] [--distributed] [--break-lock] [--hold PATH]
[--seed N] (--distributed: under torchrun, each rank captures its share of the sequences into its part of
STORE; --hold PATH: halfway through, flush, print "holding RANK" and wait until PATH exists, so a test can
race another job against this one mid-run on a machine of any speed; --seed: other sequences than the
default seed's, so that a test can tell two jobs' rows apart). STORE may be an s3:// URL (endpoint and
credentials from the environment; $ACTCAP_TEST_LEASE_S shortens the lock's lease, so that a test can break
a killed job's lock without waiting a minute).

Progress lines, which crash tests time their kills by (so a kill lands where the test meant it to, on a
machine of any speed): "ready RANK BATCHES WRITER_PID" once the engine is built (BATCHES: batches still to
run), "batch RANK I" after the I-th forward (from 1), "closing RANK" before close, "done RANK" after it.
After each progress line but "done" the job sleeps PACE_S, so a kill within PACE_S of a line lands before the
next step whatever the machine's speed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's engine, not the installed

import engine.store.lock  # noqa: E402
from engine import CaptureConfig, CaptureEngine  # noqa: E402
from engine.cli.corpus import shares  # noqa: E402

from helpers import PACE_S, VOCAB, tiny_model  # noqa: E402

BATCH, SEQ, CHUNK = 3, 12, 16


def sequences(count: int, seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SEQ + 1, (count,), generator=gen)
    return [torch.randint(3, VOCAB, (int(n),), generator=gen) for n in lengths]


def batch_of(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded batch: each row's activations do not depend on the others (causal model + mask)."""
    ids = torch.zeros(len(seqs), SEQ, dtype=torch.long)
    mask = torch.zeros(len(seqs), SEQ, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def say(*words) -> None:
    """One progress line in one write: torchrun's ranks share the test's pipe (and run unbuffered, where
    ``print`` writes each word on its own)."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def _hold(path: str | None, rank: int, cap: CaptureEngine) -> None:
    """Print "holding RANK" once every batch so far is in the writer process's chunks (its slots free
    again), then wait until ``path`` exists."""
    if path is None:
        return
    cap.flush()
    say("holding", rank)
    while not Path(path).exists():
        time.sleep(0.01)


def main(store: str, count: int, resume: bool, distributed: bool, overwrite: bool = False,
         break_lock: bool = False, hold: str | None = None, seed: int = 7) -> None:
    torch.set_num_threads(1)
    if "ACTCAP_TEST_LEASE_S" in os.environ:
        engine.store.lock.LEASE_S = float(os.environ["ACTCAP_TEST_LEASE_S"])
    model = tiny_model("gpt2")
    seqs = sequences(count, seed)
    first, stop = 0, count
    if distributed:
        torch.distributed.init_process_group("gloo")
        first, stop = shares([len(s) for s in seqs], torch.distributed.get_world_size())[
            torch.distributed.get_rank()]
    cfg = CaptureConfig(store, layer_indices=[0, 1], chunk_tokens=CHUNK, num_writers=2, pinned_slots=2,
                        resume=resume, overwrite=overwrite, break_lock=break_lock, distributed=distributed,
                        first_sequence=first)
    rank = torch.distributed.get_rank() if distributed else 0

    def progress(*words) -> None:
        say(*words)
        time.sleep(PACE_S)

    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        starts = range(first + cap.resume_sequences, stop, BATCH)
        progress("ready", rank, len(starts), cap.writer_pid)
        for number, start in enumerate(starts, 1):
            model(**batch_of(seqs[start:min(start + BATCH, stop)]))
            progress("batch", rank, number)
            if number == max(len(starts) // 2, 1):
                _hold(hold, rank, cap)
        progress("closing", rank)
    if distributed:
        torch.distributed.destroy_process_group()
    say("done", rank)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("count", type=int)
    for flag in ("--resume", "--overwrite", "--distributed", "--break-lock"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--hold")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    main(args.store, args.count, args.resume, args.distributed, args.overwrite, args.break_lock, args.hold,
         args.seed)
