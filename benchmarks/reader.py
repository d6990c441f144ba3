"""Reader throughput and shuffle quality. Throughput: ActivationDataset's shuffled batches vs a raw random
read of the same bytes from a memmap (random row permutation, read batch by batch), interleaved in one run,
reported as a ratio. Mixing: distinct sequences per batch against uniform random batches of the same store
(the best any shuffle can do), for the default buffer and a larger one.

    python benchmarks/reader.py --rows 400000 --dim 768 --repeats 3 --json out.json
    python benchmarks/reader.py --rows 2000000 --dim 16 --seq-len 128 --repeats 1   # mixing at scale, cheaply
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ActivationDataset, CaptureConfig, CaptureEngine, open_store  # noqa: E402

from synthetic import SyntheticModel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--buffer-chunks", type=int, default=4, help="the default buffer")
    p.add_argument("--large-buffer-chunks", type=int, default=64, help="the larger buffer compared with it")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence of the synthetic store")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def build_store(root: Path, args) -> Path:
    batch, seq = 8, args.seq_len
    model = SyntheticModel({"x": args.dim}, batch, seq)
    cfg = CaptureConfig(root / "r.zarr", capture_residual=False, capture_mlp_hidden=False,
                        extra_modules={"x": "points.x"}, chunk_tokens=args.chunk_tokens)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    with CaptureEngine(model, cfg):
        for _ in range(-(-args.rows // (batch * seq))):
            model(input_ids=ids)
    return cfg.location.local


def time_dataset(ds: ActivationDataset, epoch: int) -> tuple[float, int]:
    """One epoch (a trainer builds the dataset once and iterates it many times)."""
    ds.set_epoch(epoch)
    start, nbytes = time.perf_counter(), 0
    for batch in ds:
        nbytes += batch.numel() * 2
    return time.perf_counter() - start, nbytes


def time_memmap(flat: Path, rows: int, args, epoch: int) -> tuple[float, int]:
    data = np.memmap(flat, dtype=np.float16, mode="r", shape=(rows, args.dim))
    order = np.random.default_rng(epoch).permutation(rows)
    start, nbytes = time.perf_counter(), 0
    for i in range(0, rows, args.batch_size):
        batch = torch.from_numpy(data[np.sort(order[i:i + args.batch_size])])
        nbytes += batch.numel() * 2
    return time.perf_counter() - start, nbytes


def measure_mixing(store: Path, args, buffer_chunks: int) -> dict:
    """Mean distinct sequences per whole batch: the dataset's batches, and uniform random batches (no
    replacement) of the same rows, as many of them."""
    data = ActivationDataset(store, ["tokens/sequence"], batch_size=args.batch_size, exclude=(),
                             drop_last=True, buffer_chunks=buffer_chunks)
    ours = [len(torch.unique(batch["tokens/sequence"])) for batch in data]
    sequences = open_store(store)["tokens/sequence"][:]
    rng = np.random.default_rng(0)
    uniform = [len(np.unique(rng.choice(sequences, args.batch_size, replace=False))) for _ in ours]
    return {"buffer_chunks": buffer_chunks, "distinct_sequences_per_batch": statistics.mean(ours),
            "uniform_distinct_sequences_per_batch": statistics.mean(uniform),
            "mixing_ratio": statistics.mean(ours) / statistics.mean(uniform)}


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="actcap_reader_"))
    buffers = (args.buffer_chunks, args.large_buffer_chunks)
    try:
        store = build_store(root, args)
        values = open_store(store)["extra/x"][:]
        rows = values.shape[0]
        flat = root / "flat.bin"
        values.tofile(flat)
        del values
        datasets = {n: ActivationDataset(store, "extra/x", batch_size=args.batch_size, exclude=(),
                                         dtype=torch.float16, buffer_chunks=n) for n in buffers}
        for ds in datasets.values():
            time_dataset(ds, 0)  # warm the page cache for both
        time_memmap(flat, rows, args, 0)
        ours, raw = {n: [] for n in buffers}, []
        for r in range(1, args.repeats + 1):
            for n, ds in datasets.items():
                seconds, nbytes = time_dataset(ds, r)
                ours[n].append(nbytes / seconds / 1e6)
            seconds, nbytes = time_memmap(flat, rows, args, r)
            raw.append(nbytes / seconds / 1e6)
        mixing = [measure_mixing(store, args, n) for n in buffers]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    chunk_mb = args.chunk_tokens * args.dim * 2 / 1e6
    for entry in mixing:
        n = entry["buffer_chunks"]
        entry.update(buffer_mb=(n + 1) * chunk_mb, dataset_mb_per_s=ours[n],
                     ratios=[o / r for o, r in zip(ours[n], raw)])
        entry["ratio_median"] = statistics.median(entry["ratios"])
    default = mixing[0]
    result = {"rows": rows, "dim": args.dim, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "chunk_tokens": args.chunk_tokens, "buffer_chunks": args.buffer_chunks,
              "dataset_mb_per_s": default["dataset_mb_per_s"], "memmap_random_mb_per_s": raw,
              "ratios": default["ratios"], "ratio_median": default["ratio_median"], "buffers": mixing}
    print(f"[reader] {rows} rows x {args.dim} float16, sequences of {args.seq_len}, batch {args.batch_size}, "
          f"chunks of {args.chunk_tokens}, page cache warm")
    print(f"[reader] raw random memmap MB/s: {', '.join(f'{x:.0f}' for x in raw)}")
    for entry in mixing:
        print(f"[reader] buffer_chunks {entry['buffer_chunks']} ({entry['buffer_mb']:.0f} MB): MB/s "
              f"{', '.join(f'{x:.0f}' for x in entry['dataset_mb_per_s'])}, "
              f"ratio median {entry['ratio_median']:.3f}; "
              f"distinct sequences per batch {entry['distinct_sequences_per_batch']:.1f} vs uniform "
              f"{entry['uniform_distinct_sequences_per_batch']:.1f} (mixing {entry['mixing_ratio']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
