"""A capture job for the follow test: captures the first half of its sequences, waits until the file GATE
exists (the test creates it once its reader has had a batch from the store being written), then the rest.
Usage: python follow_job.py STORE GATE N_SEQUENCES"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's engine, not the installed

from engine import CaptureConfig, CaptureEngine  # noqa: E402

from crash_job import BATCH, CHUNK, batch_of, sequences  # noqa: E402
from helpers import tiny_model  # noqa: E402


def main(store: str, gate: Path, count: int) -> None:
    torch.set_num_threads(1)
    model = tiny_model("gpt2")
    seqs = sequences(count)
    cfg = CaptureConfig(store, layer_indices=[0, 1], chunk_tokens=CHUNK, num_writers=2, pinned_slots=2)
    with CaptureEngine(model, cfg), torch.no_grad():
        for start in range(0, count, BATCH):
            while start >= count // 2 and not gate.exists():
                time.sleep(0.05)
            model(**batch_of(seqs[start:start + BATCH]))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
