"""Reader throughput: ActivationDataset's shuffled batches vs a raw random read of the same bytes from a
memmap (random row permutation, read batch by batch), interleaved in one run; reported as a ratio.

    python benchmarks/reader.py --rows 400000 --dim 768 --repeats 3 --json out.json
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

from engine import ActivationDataset, CaptureConfig, CaptureEngine  # noqa: E402
from synthetic import SyntheticModel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--buffer-chunks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def build_store(root: Path, args) -> Path:
    batch, seq = 8, 512
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


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="actcap_reader_"))
    try:
        store = build_store(root, args)
        import zarr

        values = zarr.open_group(str(store), mode="r")["extra/x"][:]
        rows = values.shape[0]
        flat = root / "flat.bin"
        values.tofile(flat)
        del values
        ds = ActivationDataset(store, "extra/x", batch_size=args.batch_size, exclude=(), dtype=torch.float16,
                               buffer_chunks=args.buffer_chunks)
        time_dataset(ds, 0)  # warm the page cache for both
        time_memmap(flat, rows, args, 0)
        ours, raw = [], []
        for r in range(1, args.repeats + 1):
            seconds, nbytes = time_dataset(ds, r)
            ours.append(nbytes / seconds / 1e6)
            seconds, nbytes = time_memmap(flat, rows, args, r)
            raw.append(nbytes / seconds / 1e6)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [o / r for o, r in zip(ours, raw)]
    result = {"rows": rows, "dim": args.dim, "batch_size": args.batch_size, "chunk_tokens": args.chunk_tokens,
              "buffer_chunks": args.buffer_chunks, "dataset_mb_per_s": ours, "memmap_random_mb_per_s": raw,
              "ratios": ratios, "ratio_median": statistics.median(ratios)}
    print(f"[reader] {rows} rows x {args.dim} float16, batch {args.batch_size}, page cache warm")
    print(f"[reader] ActivationDataset MB/s:  {', '.join(f'{x:.0f}' for x in ours)}")
    print(f"[reader] raw random memmap MB/s: {', '.join(f'{x:.0f}' for x in raw)}")
    print(f"[reader] ratio: median {result['ratio_median']:.3f} (range {min(ratios):.3f}..{max(ratios):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
