"""Reader throughput, shuffle quality and memory, in ActivationDataset's default configuration.

Throughput: an epoch of ActivationDataset's shuffled batches against a raw read of the same bytes, interleaved
and repeated, as ratios. Page cache warm (default): the raw read is a random memmap read of the committed
rows from one flat file (a random row permutation, batch by batch). ``--cold``: before every timed epoch the
store's files and the baseline's are dropped from the page cache (POSIX_FADV_DONTNEED, no root needed), and
the raw read is a sequential read of the same chunk files. CPU times (the whole process, the read-ahead thread
included) are reported beside wall times: on a shared machine they move less.

Mixing: distinct sequences per batch, against uniform random batches of the same rows (the best any shuffle
can do); mixing = ours / uniform. Memory: the process's anonymous memory (RSS less file-backed pages: mapped
chunk files are page cache) at its peak during an epoch, less before it, the largest over every epoch (the
first included, when the allocator grows), against the buffer of the reader before windows (5 chunks).
``--s3``: the same store copied to a loopback S3 server (moto), read once: rate and mixing (its chunks are
read into memory, ``buffer_chunks`` per window).

Windows: ``--sweep BYTES ...`` (or ``--plot FILE``, which sweeps 1, 2, 4, ... chunks up to the whole store
when no sizes are given) measures mixing and MB/s of the dataset at each ``window_bytes``, the sizes
interleaved over ``--repeats`` passes; ``--plot`` draws them against the window size, one line per
``--seq-len`` (PNG; the numbers beside it as FILE.csv).

    python benchmarks/reader.py --seq-len 128 512 --repeats 3 --json out.json
    python benchmarks/reader.py --seq-len 512 --cold --repeats 3
    python benchmarks/reader.py --rows 100000 --s3 --repeats 1
    python benchmarks/reader.py --seq-len 128 512 --repeats 3 --plot windows.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ActivationDataset, open_store  # noqa: E402
from engine.read.dataset import WINDOW_BYTES  # noqa: E402
from engine.report import plots  # noqa: E402
from engine.report.document import write_csv  # noqa: E402

from synthetic import synthetic_store  # noqa: E402

KEY = "extra/x"
OLD_BUFFER_CHUNKS = 4  # the reader before windows mixed 4 chunks in a buffer of 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, nargs="+", default=[512],
                   help="tokens per sequence of the synthetic store; one store and run per length")
    p.add_argument("--window-bytes", type=int, default=WINDOW_BYTES, help="ActivationDataset's window_bytes")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of each reader, interleaved")
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache before each epoch")
    p.add_argument("--s3", action="store_true", help="also read the store from a loopback S3 server")
    p.add_argument("--dtype", default="float16",
                   help="the store's storage dtype (an 8-bit one is decoded per batch; the raw read stays a "
                        "float16 memmap of the same values); not with --cold or --s3")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", type=int, nargs="+", default=None, metavar="BYTES",
                   help="also measure mixing and MB/s at each of these window_bytes")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw mixing and MB/s against window_bytes "
                   "(PNG; numbers in FILE.csv); without --sweep, windows of 1, 2, 4, ... chunks to the whole "
                   "store")
    args = p.parse_args(argv)
    if args.dtype != "float16" and (args.cold or args.s3):
        p.error("--cold and --s3 read the chunk files as float16 rows: leave them out with --dtype")
    return args


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def drop_cached(paths: list[Path]) -> None:
    """Drop files from the page cache (clean pages only: the caller synced them)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def anonymous_bytes(process: psutil.Process) -> int:
    """Resident memory that is not file-backed (mapped chunk files are page cache, not the process's)."""
    info = process.memory_info()
    return info.rss - info.shared


class Epoch:
    """Times one pass: wall and process CPU seconds, bytes, and the peak anonymous memory above the start."""

    def __init__(self):
        self.process = psutil.Process()

    def __enter__(self):
        self.start_anon = self.peak_anon = anonymous_bytes(self.process)
        self.wall, self.cpu, self.nbytes = time.perf_counter(), time.process_time(), 0
        return self

    def batch(self, tensor: torch.Tensor) -> None:
        self.nbytes += tensor.numel() * tensor.element_size()
        self.peak_anon = max(self.peak_anon, anonymous_bytes(self.process))

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def dataset_epoch(ds: ActivationDataset, epoch: int) -> Epoch:
    """One epoch (a trainer builds the dataset once and iterates it many times)."""
    ds.set_epoch(epoch)
    with Epoch() as timed:
        for batch in ds:
            timed.batch(batch)
    return timed


def memmap_epoch(flat: Path, rows: int, args, epoch: int) -> Epoch:
    """The warm baseline: a random permutation of the rows, read batch by batch from one memmap. Drawing the
    permutation is timed, as the dataset's is."""
    data = np.memmap(flat, dtype=np.float16, mode="r", shape=(rows, args.dim))
    with Epoch() as timed:
        order = np.random.default_rng(epoch).permutation(rows)
        for i in range(0, rows, args.batch_size):
            timed.batch(torch.from_numpy(data[np.sort(order[i:i + args.batch_size])]))
    return timed


def sequential_epoch(chunk_files: list[Path], chunk_bytes: int) -> Epoch:
    """The cold baseline: each chunk file read in order into one reused buffer."""
    buffer = bytearray(chunk_bytes)
    with Epoch() as timed:
        for path in chunk_files:
            with open(path, "rb", buffering=0) as f:
                while got := f.readinto(buffer):
                    timed.nbytes += got
    return timed


def mixing(store: str | Path, args, rate: bool = False, window_bytes: int | None = None, **options) -> dict:
    """Mean distinct sequences per whole batch of the default reader of ``KEY`` (its window holds the same
    chunks as when reading ``KEY`` alone, a little fewer), and of uniform random batches (no replacement) of
    the same rows, as many of them. ``rate``: also the MB/s of that pass (its reading only: the distinct
    sequences are counted after the clock stops). ``window_bytes``: the dataset's
    (default ``--window-bytes``)."""
    data = ActivationDataset(store, [KEY, "tokens/sequence"], batch_size=args.batch_size, exclude=(),
                             drop_last=True, window_bytes=window_bytes or args.window_bytes, **options)
    started = time.perf_counter()
    sequences_of = [batch["tokens/sequence"] for batch in data]  # counted after the clock: the rate is reads
    seconds = time.perf_counter() - started
    ours = [len(torch.unique(batch)) for batch in sequences_of]
    sequences = open_store(store, options.get("storage_options"))["tokens/sequence"][:]
    rng = np.random.default_rng(0)
    uniform = [len(np.unique(rng.choice(sequences, args.batch_size, replace=False))) for _ in ours]
    result = {"distinct_sequences_per_batch": statistics.mean(ours),
              "uniform_distinct_sequences_per_batch": statistics.mean(uniform),
              "mixing": statistics.mean(ours) / statistics.mean(uniform), "batches": len(ours)}
    if rate:
        result["mb_per_s"] = len(ours) * args.batch_size * (args.dim * 2 + 8) / seconds / 1e6
    return result


def timed_runs(store: Path, root: Path, args) -> dict:
    """Interleaved epochs of the dataset and the raw read; ratios pair each dataset epoch with the raw one
    after it."""
    ds = ActivationDataset(store, KEY, batch_size=args.batch_size, exclude=(), dtype=torch.float16,
                           window_bytes=args.window_bytes)
    chunk_files = sorted(files_under(store / KEY / "c"))
    rows = open_store(store).num_tokens
    flat = root / "flat.bin"
    open_store(store)[KEY][:].astype(np.float16).tofile(flat)  # an 8-bit store's decoded values
    os.sync()  # clean pages: what the cold runs drop
    # The flat file stays cached as its writing left it (large folios, the baseline's best case); the chunk
    # files leave the cache that reading them here filled, to be read by the dataset as it reads them.
    drop_cached(files_under(store))
    chunk_bytes = args.chunk_tokens * args.dim * 2
    raw = (lambda epoch: sequential_epoch(chunk_files, chunk_bytes)) if args.cold else (
        lambda epoch: memmap_epoch(flat, rows, args, epoch))
    ours, theirs = [dataset_epoch(ds, 0)], []  # warms the page cache and the allocator (memory counts it)
    raw(0)
    for epoch in range(1, args.repeats + 1):
        for runs, run in ((ours, lambda: dataset_epoch(ds, epoch)), (theirs, lambda: raw(epoch))):
            if args.cold:
                drop_cached(files_under(store) + [flat])
            runs.append(run())
    timed = ours[1:]
    return {"rows": rows, "dataset_mb_per_s": [e.nbytes / e.wall / 1e6 for e in timed],
            "raw_mb_per_s": [e.nbytes / e.wall / 1e6 for e in theirs],
            "ratios": [t.wall / o.wall * o.nbytes / t.nbytes for o, t in zip(timed, theirs)],
            "cpu_ratios": [t.cpu / o.cpu * o.nbytes / t.nbytes for o, t in zip(timed, theirs)],
            "dataset_cpu_s": [e.cpu for e in timed], "raw_cpu_s": [e.cpu for e in theirs],
            "peak_anonymous_mb": max(e.peak_anon - e.start_anon for e in ours) / 1e6}


@contextlib.contextmanager
def loopback_s3():
    """A moto S3 server on 127.0.0.1 and a fresh bucket; yields (bucket URL, storage_options)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        bucket = f"actcap-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(bucket)
        yield f"s3://{bucket}", options
    finally:
        server.stop()


def s3_run(store: Path, args) -> dict:
    import s3fs

    with loopback_s3() as (bucket, options):
        s3fs.S3FileSystem(skip_instance_cache=True, **options).put(str(store), f"{bucket}/r.zarr",
                                                                   recursive=True)
        return mixing(f"{bucket}/r.zarr", args, rate=True, storage_options=options)


def chunk_bytes(args) -> int:
    """Bytes of one chunk of the arrays the mixing pass reads (``KEY`` and ``tokens/sequence``): the unit a
    window is counted in."""
    return args.chunk_tokens * (args.dim * 2 + 8)


def window_sizes(args, rows: int) -> list[int]:
    """``--sweep``, or 1, 2, 4, ... chunks up to a window holding the whole store."""
    if args.sweep:
        return sorted(args.sweep)
    chunks = -(-rows // args.chunk_tokens)
    return [chunk_bytes(args) * (1 << k) for k in range(max(chunks - 1, 1).bit_length() + 1)]


def window_sweep(store: Path, args, rows: int) -> list[dict]:
    """Mixing and MB/s of the dataset at each window size, the sizes interleaved over ``--repeats`` passes
    (after a warm-up pass that brings the chunk files into the page cache). Batches stay float16, as in the
    throughput epochs: the rate is the reader's, not a conversion's."""
    sizes = window_sizes(args, rows)
    mixing(store, args, window_bytes=sizes[-1])
    passes: dict[int, list[dict]] = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            passes[size].append(mixing(store, args, rate=True, window_bytes=size, dtype=torch.float16))
    return [{"window_bytes": size, "chunks_per_window": size / chunk_bytes(args), **runs[0],
             "mb_per_s": [run["mb_per_s"] for run in runs],
             "mb_per_s_median": statistics.median(run["mb_per_s"] for run in runs)}
            for size, runs in passes.items()]


def sweep_table(runs: list[dict]) -> dict[str, np.ndarray]:
    """What the plot draws, a row per (sequence length, window size)."""
    rows = [(run["seq_len"], point["window_bytes"], point["chunks_per_window"], point["mixing"],
             point["distinct_sequences_per_batch"], point["uniform_distinct_sequences_per_batch"],
             point["mb_per_s_median"], min(point["mb_per_s"]), max(point["mb_per_s"]))
            for run in runs for point in run["sweep"]]
    names = ("seq_len", "window_bytes", "chunks_per_window", "mixing", "distinct_sequences_per_batch",
             "uniform_distinct_sequences_per_batch", "mb_per_s_median", "mb_per_s_min", "mb_per_s_max")
    return {name: np.array(column) for name, column in zip(names, zip(*rows))}


def plot(runs: list[dict], args, path: Path) -> None:
    """Mixing (top) and MB/s (bottom, median and range of the passes) against the window's size in chunks, a
    line per sequence length; FILE.csv beside it."""
    table = sweep_table(runs)
    write_csv(path.with_suffix(".csv"), table)
    title = (f"ActivationDataset windows: {runs[0]['rows']:,} rows x {args.dim} float16, chunks of "
             f"{args.chunk_tokens:,}, batches of {args.batch_size:,}")
    fig, (mix, rate) = plots.figure(2, title)
    for i, seq_len in enumerate(np.unique(table["seq_len"])):
        at = table["seq_len"] == seq_len
        x, color = table["chunks_per_window"][at], f"C{i}"
        mix.plot(x, table["mixing"][at], color=color, marker="o", ms=3, label=f"sequences of {seq_len}")
        low, high = table["mb_per_s_min"][at], table["mb_per_s_max"][at]
        median = table["mb_per_s_median"][at]
        rate.errorbar(x, median, yerr=[median - low, high - median], color=color, marker="o", ms=3,
                      capsize=2, label=f"sequences of {seq_len}")
    mix.axhline(1.0, color=plots.LIMIT, ls="--", lw=0.8, label="uniform random batches")
    mix.set_ylabel("mixing (distinct sequences\nper batch / uniform)")
    mix.set_ylim(0, 1.1)
    rate.set_ylabel("MB/s read (median, range)")
    rate.set_ylim(bottom=0)
    rate.set_xscale("log", base=2)
    rate.xaxis.set_major_formatter("{x:g}")
    rate.set_xlabel(f"chunks per window (window_bytes / {chunk_bytes(args):,} bytes: a chunk of the arrays "
                    "read)")
    plots.legend(mix, below=False)
    plots.legend(rate, below=False)
    plots.save(fig, path)


def run_one(args, seq_len: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="actcap_reader_"))
    try:
        batch = 8
        store = synthetic_store(root / "r.zarr", args.dim, batch, seq_len, -(-args.rows // (batch * seq_len)),
                                args.chunk_tokens, args.dtype)
        result = {"seq_len": seq_len, **timed_runs(store, root, args), "mixing": mixing(store, args)}
        if args.sweep or args.plot:
            result["sweep"] = window_sweep(store, args, result["rows"])
        if args.s3:
            result["s3"] = s3_run(store, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name in ("ratios", "cpu_ratios"):
        result[f"{name[:-1]}_median"] = statistics.median(result[name])
    return result


def mixing_line(mix: dict) -> str:
    return (f"mixing {mix['mixing']:.3f}: {mix['distinct_sequences_per_batch']:.1f} distinct sequences per "
            f"batch vs uniform {mix['uniform_distinct_sequences_per_batch']:.1f}")


def report(result: dict, args) -> None:
    old_mb = (OLD_BUFFER_CHUNKS + 1) * args.chunk_tokens * args.dim * 2 / 1e6
    raw = "sequential read" if args.cold else "random memmap read"
    print(f"[reader] {result['rows']} rows x {args.dim} float16, sequences of {result['seq_len']}, batch "
          f"{args.batch_size}, chunks of {args.chunk_tokens}, page cache {'cold' if args.cold else 'warm'}")
    print(f"[reader] dataset MB/s {', '.join(f'{x:.0f}' for x in result['dataset_mb_per_s'])}; raw {raw} "
          f"MB/s {', '.join(f'{x:.0f}' for x in result['raw_mb_per_s'])}")
    print(f"[reader] ratio median {result['ratio_median']:.3f} "
          f"({', '.join(f'{x:.3f}' for x in result['ratios'])}); CPU-time ratio median "
          f"{result['cpu_ratio_median']:.3f}")
    print(f"[reader] {mixing_line(result['mixing'])}")
    print(f"[reader] peak anonymous memory +{result['peak_anonymous_mb']:.1f} MB (the 4-chunk buffer before "
          f"windows: {old_mb:.0f} MB)")
    for point in result.get("sweep", []):
        print(f"[reader] window_bytes {point['window_bytes']:,} ({point['chunks_per_window']:.3g} chunks): "
              f"{mixing_line(point)}, {point['mb_per_s_median']:.0f} MB/s (median of "
              f"{len(point['mb_per_s'])})")
    if "s3" in result:
        s3 = result["s3"]
        print(f"[reader] s3 (loopback moto): {s3['mb_per_s']:.0f} MB/s, {mixing_line(s3)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plots.exit_unless_available()  # before the stores are captured
    runs = []
    for seq_len in args.seq_len:
        runs.append(run_one(args, seq_len))
        report(runs[-1], args)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        old_mb = (OLD_BUFFER_CHUNKS + 1) * args.chunk_tokens * args.dim * 2 / 1e6
        Path(args.json).write_text(json.dumps({**config, "old_buffer_mb": old_mb, "runs": runs}, indent=2))
    if args.plot:
        plot(runs, args, Path(args.plot))
        print(f"[plot] {args.plot}, numbers in {Path(args.plot).with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
