"""Run under torchrun with 2 ranks: rank 1's capture cannot start; every rank must fail, none may hang.
Usage: setup_failure_job.py STORE hooks|resume
  hooks:  rank 1 names a layer the model lacks (fails before the store is prepared);
  resume: a first run completes, then rank 1 resumes with a different first_sequence (fails on its part,
          after rank 0 prepared the root)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's engine, not the installed

from engine import CaptureConfig, CaptureEngine  # noqa: E402

from helpers import ragged_batch, tiny_model  # noqa: E402


def main(store: str, mode: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = tiny_model("gpt2")
    cfg = CaptureConfig(store, layer_indices=[0], chunk_tokens=8, distributed=True, first_sequence=10 * rank)
    if mode == "hooks" and rank == 1:
        cfg = dataclasses.replace(cfg, layer_indices=[99])
    if mode == "resume":
        with CaptureEngine(model, cfg), torch.no_grad():
            model(**ragged_batch(3, 7, seed=rank))
        cfg = dataclasses.replace(cfg, resume=True, first_sequence=cfg.first_sequence + rank)
    try:
        with CaptureEngine(model, cfg), torch.no_grad():
            model(**ragged_batch(3, 7, seed=5))
    except Exception as exc:
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    finally:
        torch.distributed.destroy_process_group()
    print(f"rank {rank} captured", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
