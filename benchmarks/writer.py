"""Writer throughput: the engine's pipeline (staging -> writer process -> zarr) vs raw writes of the same
bytes, in the same chunk-sized files, on the same disk, interleaved in one run; reported as ratios, for
durable stores (each chunk fsynced before its commit record, the default) and scratch ones (durable=False).
Two raw baselines: ndarray.tofile into the page cache, then one os.sync() (the issue's); and each file written
with O_DIRECT and fsynced on its own, which is the durability a durable store gives each chunk (on a virtual
disk the first swings several-fold from run to run with the host's writeback, the second much less).
Also what the commit records' CRC32C checksums cost (always on, so measured apart): seconds per GB of the
writer's own checksum function over chunk-sized blocks, and the share of each pipeline's time that is. And
what each pipeline run cost in CPU: seconds per GB in the capturing process (this one: the hooks' copies into
the shared slots) and in its writer process (compaction, statistics, checksums, the writes' system time), and
how many cores that kept busy on average: a ratio to raw writes below 1 with cores to spare points at the
pipeline's waits; with every core busy, at its CPU cost per byte.

    python benchmarks/writer.py --total-mb 1024 --repeats 3 --json out.json
    python benchmarks/writer.py --raw-only --total-mb 8192     # what the disk allows, for the GPU check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import CaptureConfig, CaptureEngine, open_store  # noqa: E402
from engine.format.chunks import crc32c  # noqa: E402
from engine.format.files import DIRECT_UNIT, page_aligned_empty  # noqa: E402

from synthetic import SyntheticModel, row_values  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 3072], help="widths of the captured points")
    p.add_argument("--dtype", default="float16", help="storage dtype (CaptureConfig.dtype); CPU per GB is "
                   "always per GB of float16 activations, so encodings compare")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--total-mb", type=float, default=1024, help="activation bytes per pipeline run")
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--num-writers", type=int, default=2)
    p.add_argument("--pinned-slots", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--no-sync", action="store_true",
                   help="do not count the final os.sync(): "
                        "measures page-cache speed, not sustained disk speed")
    p.add_argument("--raw-only", action="store_true", help="only the raw sequential write (the disk's speed)")
    p.add_argument("--durable", default="both", choices=["on", "off", "both"],
                   help="pipeline runs with CaptureConfig(durable=...): fsync per chunk, or not, or both")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


SYNC = True  # sustained throughput: a long capture outgrows the page cache, so each run ends on disk


def raw_tofile(root: Path, dims: list[int], n_chunks: int, chunk_tokens: int) -> float:
    """Seconds to write n_chunks chunk-sized float16 blocks per point with ndarray.tofile."""
    blocks = [np.full((chunk_tokens, dim), 1.5, dtype=np.float16) for dim in dims]
    start = time.perf_counter()
    for k in range(n_chunks):
        for i, block in enumerate(blocks):
            block.tofile(root / f"p{i}_{k}.bin")
    if SYNC:
        os.sync()
    return time.perf_counter() - start


def raw_durable(root: Path, dims: list[int], n_chunks: int, chunk_tokens: int) -> float:
    """Seconds to write the same files each with O_DIRECT (buffered where the filesystem or the file's length
    refuses it) and an fsync, from page-aligned blocks: no checksums, statistics, records or renames."""
    blocks = [page_aligned_empty((chunk_tokens, dim), np.float16) for dim in dims]
    for block in blocks:
        block.fill(1.5)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    start = time.perf_counter()
    for k in range(n_chunks):
        for i, block in enumerate(blocks):
            path = root / f"p{i}_{k}.bin"
            direct = getattr(os, "O_DIRECT", 0) if block.nbytes % DIRECT_UNIT == 0 else 0
            try:
                fd = os.open(path, flags | direct, 0o644)
            except OSError:
                fd = os.open(path, flags, 0o644)
            try:
                os.write(fd, block.data)
                os.fsync(fd)
            finally:
                os.close(fd)
    if SYNC:
        os.sync()
    return time.perf_counter() - start


def crc32c_seconds_per_gb(dims: list[int], chunk_tokens: int, repeats: int = 5) -> float:
    """Seconds per GB of the checksum the writer process computes for every chunk it commits
    (``engine.format.chunks.crc32c`` over one chunk-sized float16 block per point, as the writer calls it)."""
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((chunk_tokens, dim)).astype(np.float16) for dim in dims]
    start = time.perf_counter()
    for _ in range(repeats):
        for block in blocks:
            crc32c(block)
    return (time.perf_counter() - start) / (repeats * sum(block.nbytes for block in blocks)) * 1e9


class RunCost(NamedTuple):
    """One pipeline run: seconds end to end and in steady state (None: no batch after the warm-up chunks),
    and CPU seconds of the capturing process and of its writer process (a child, counted once it has
    exited), in all and in steady state (None likewise): after the warm-up chunks' flush (``warm_batches``),
    so without what a long job pays once."""

    seconds: float
    steady_seconds: float | None
    capture_cpu: float
    writer_cpu: float
    steady_capture_cpu: float | None = None
    steady_writer_cpu: float | None = None


def pipeline(root: Path, args, n_batches: int, durable: bool) -> RunCost:
    """Seconds end to end (engine start to close and sync, including a flush() once the warm-up chunks'
    batches are in), and in steady state: from that flush to the same end, for the batches after it; and
    the CPU both processes took."""
    names = {f"p{i}": dim for i, dim in enumerate(args.dims)}
    model = SyntheticModel(names, args.batch_size, args.seq_len)
    cfg = CaptureConfig(root / "w.zarr", points=[], extra_modules={name: f"points.{name}" for name in names},
                        chunk_tokens=args.chunk_tokens, num_writers=args.num_writers,
                        pinned_slots=args.pinned_slots, durable=durable, dtype=args.dtype)
    ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
    warm = warm_batches(args)
    cpu_before = cpu_at_flush = os.times()
    writer_cpu_at_flush = 0.0
    start = steady_start = time.perf_counter()
    with CaptureEngine(model, cfg) as engine, torch.no_grad():
        for done in range(1, n_batches + 1):
            model(input_ids=ids)
            if done == warm:
                engine.flush()
                steady_start = time.perf_counter()
                cpu_at_flush = os.times()
                writer_times = psutil.Process(engine.writer_pid).cpu_times()
                writer_cpu_at_flush = writer_times.user + writer_times.system
    if SYNC:
        os.sync()
    end = time.perf_counter()
    cpu_after = os.times()
    cpu = [after - before for after, before in zip(cpu_after, cpu_before)]
    steady_cpu = [after - before for after, before in zip(cpu_after, cpu_at_flush)]
    store = open_store(cfg.output_dir)
    rows = store.num_tokens
    assert rows == n_batches * args.batch_size * args.seq_len, "rows lost"
    check = store["extra/p0"][rows - 1000:]  # spot check the last rows' contents
    expected = row_values(rows, args.batch_size * args.seq_len)[rows - 1000:]
    assert np.allclose(check[:, -1], expected, rtol=1e-6, atol=0), "rows differ"  # 8-bit: decoded, not exact
    steady = n_batches > warm
    return RunCost(end - start, end - steady_start if steady else None,
                   capture_cpu=cpu[0] + cpu[1], writer_cpu=cpu[2] + cpu[3],
                   steady_capture_cpu=steady_cpu[0] + steady_cpu[1] if steady else None,
                   steady_writer_cpu=cpu[2] + cpu[3] - writer_cpu_at_flush if steady else None)


WARM_CHUNKS_BEYOND_WRITERS = 2


def warm_chunks(args) -> int:
    """Chunks a run fills before its steady state: the writer process's start and first chunk (slots
    mapped, arrays made), and its chunk buffers' first use. It keeps a set of chunk-sized buffers per chunk
    in flight (one filling, one committing per writer thread: 2 sets in a 2 GB run here, 3 at most), and the
    kernel zeroes each page on its first touch: 6% of the writer's CPU over a 2 GB run. With one warm-up
    chunk, a 512 MB run of the 30 x 576 shape had one batch of steady state, into a fresh buffer set, to
    carry the close: it read 1.6-1.7 s/GB where 3 GB read 0.74
    (benchmarks/results/cpu-2026-12-07-writer-cpu/)."""
    return args.num_writers + WARM_CHUNKS_BEYOND_WRITERS


def warm_batches(args) -> int:
    """Batches that fill the warm-up chunks."""
    return -(-warm_chunks(args) * args.chunk_tokens // (args.batch_size * args.seq_len))


def warm_up(root: Path, args) -> None:
    """One batch through the engine before any run is timed: the first engine of a process imports
    torch._dynamo (~1 s here), which a job capturing a transformers model has already imported with it."""
    root.mkdir(parents=True)
    pipeline(root, args, 1, durable=False)
    shutil.rmtree(root)


def report_against_raw_durable(result: dict, prefix: str, rates: list[float], raw: list[float]) -> None:
    """One pipeline's rates (end to end, or steady) against the raw O_DIRECT + fsync writes of their runs."""
    ratios = [p / r for p, r in zip(rates, raw)]
    result.update({f"{prefix}mb_per_s": rates, f"{prefix}ratios_to_raw_durable": ratios,
                   f"{prefix}ratio_to_raw_durable_median": statistics.median(ratios)})
    print(f"[writer]   {prefix.rstrip('_').replace('_', ' ')} MB/s: {', '.join(f'{x:.0f}' for x in rates)}; "
          f"to raw O_DIRECT + fsync: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}..{max(ratios):.3f})")


def report_cpu(result: dict, kind: str, costs: list[RunCost], nbytes: int, nbytes_steady: int) -> None:
    """CPU seconds per GB of each process, in all and in steady state, and the cores kept busy, over one
    pipeline's runs (medians)."""
    gigabytes = nbytes / 1e9
    capture = statistics.median(cost.capture_cpu / gigabytes for cost in costs)
    writer = statistics.median(cost.writer_cpu / gigabytes for cost in costs)
    busy = statistics.median((cost.capture_cpu + cost.writer_cpu) / cost.seconds for cost in costs)
    result.update({f"{kind}_capture_cpu_s_per_gb": capture, f"{kind}_writer_cpu_s_per_gb": writer,
                   f"{kind}_cores_busy": busy})
    print(f"[writer]   {kind} CPU per GB: capturing process {capture:.2f} s, writer process {writer:.2f} s; "
          f"{busy:.2f} of {os.cpu_count()} cores busy (medians)")
    steady = [cost for cost in costs if cost.steady_writer_cpu is not None]
    if steady:
        capture = statistics.median(cost.steady_capture_cpu / nbytes_steady * 1e9 for cost in steady)
        writer = statistics.median(cost.steady_writer_cpu / nbytes_steady * 1e9 for cost in steady)
        result.update({f"{kind}_steady_capture_cpu_s_per_gb": capture,
                       f"{kind}_steady_writer_cpu_s_per_gb": writer})
        print(f"[writer]   {kind} CPU per GB in steady state (after {result['warm_chunks']} warm-up chunks: "
              f"no process start, chunk buffers in use): capturing process {capture:.2f} s, writer process "
              f"{writer:.2f} s (medians)")
    else:
        print(f"[writer]   {kind}: no steady state: the run ends within its {result['warm_chunks']} warm-up "
              f"chunks: give --total-mb {result['steady_needs_mb']:.0f} or more")


def main(argv=None) -> int:
    global SYNC
    args = parse_args(argv)
    SYNC = not args.no_sync
    row_bytes = 2 * sum(args.dims)
    batch_tokens = args.batch_size * args.seq_len
    n_batches = max(1, int(args.total_mb * 1e6 / row_bytes / batch_tokens))
    n_chunks = max(1, n_batches * batch_tokens // args.chunk_tokens)
    nbytes_pipeline = n_batches * batch_tokens * row_bytes
    nbytes_steady = max(0, n_batches - warm_batches(args)) * batch_tokens * row_bytes
    nbytes_raw = n_chunks * args.chunk_tokens * row_bytes
    raws = ["raw", "raw_durable"]
    kinds = raws if args.raw_only else raws + {"on": ["durable"], "off": ["scratch"],
                                               "both": ["durable", "scratch"]}[args.durable]
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    steady_rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    costs: dict[str, list[RunCost]] = {kind: [] for kind in kinds}
    base = Path(args.output_dir or tempfile.mkdtemp(prefix="actcap_writer_"))
    try:
        if not args.raw_only:
            warm_up(base / "warm_up", args)
        for r in range(args.repeats):
            for kind in kinds:
                root = base / f"{kind}{r}"
                root.mkdir(parents=True)
                os.sync()  # start each run with no dirty pages left by the previous one
                if kind in raws:
                    write = raw_tofile if kind == "raw" else raw_durable
                    seconds = write(root, args.dims, n_chunks, args.chunk_tokens)
                    rates[kind].append(nbytes_raw / seconds / 1e6)
                else:
                    cost = pipeline(root, args, n_batches, durable=kind == "durable")
                    costs[kind].append(cost)
                    rates[kind].append(nbytes_pipeline / cost.seconds / 1e6)
                    if cost.steady_seconds is not None:
                        steady_rates[kind].append(nbytes_steady / cost.steady_seconds / 1e6)
                shutil.rmtree(root)
    finally:
        if args.output_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    result = {"synced_to_disk": SYNC, "dims": args.dims, "dtype": args.dtype, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "chunk_tokens": args.chunk_tokens, "num_writers": args.num_writers,
              "mb_per_run": nbytes_pipeline / 1e6, "warm_chunks": warm_chunks(args),
              "warm_up_mb": warm_batches(args) * batch_tokens * row_bytes / 1e6,
              "steady_needs_mb": math.ceil((warm_batches(args) + 1) * batch_tokens * row_bytes / 1e6),
              "steady_mb_per_run": nbytes_steady / 1e6, "raw_tofile_mb_per_s": rates["raw"],
              "raw_durable_mb_per_s": rates["raw_durable"],
              "crc32c_seconds_per_gb": crc32c_seconds_per_gb(args.dims, args.chunk_tokens)}
    print(f"[writer] {nbytes_pipeline / 1e6:.0f} MB per run, {args.repeats} interleaved runs each, "
          f"{'ending with os.sync()' if SYNC else 'page cache only (--no-sync)'}")
    print(f"[writer] raw tofile MB/s: {', '.join(f'{x:.0f}' for x in rates['raw'])}")
    print(f"[writer] raw O_DIRECT + fsync per file MB/s: "
          f"{', '.join(f'{x:.0f}' for x in rates['raw_durable'])}")
    pipelines = kinds[len(raws):]
    for kind in pipelines:
        ratios = [p / r for p, r in zip(rates[kind], rates["raw"])]
        result.update({f"{kind}_mb_per_s": rates[kind], f"{kind}_ratios": ratios,
                       f"{kind}_ratio_median": statistics.median(ratios)})
        print(f"[writer] pipeline ({kind}) MB/s: {', '.join(f'{x:.0f}' for x in rates[kind])}; "
              f"ratio to raw: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}..{max(ratios):.3f})")
        for label, series in (("", rates[kind]), ("steady_", steady_rates[kind])):
            if series:
                report_against_raw_durable(result, f"{kind}_{label}", series, rates["raw_durable"])
        report_cpu(result, kind, costs[kind], nbytes_pipeline, nbytes_steady)
        # Checksums run in the writer threads (never in the capturing process): seconds of CRC32C per second
        # of writing at this pipeline's median rate, an upper bound on their share of its time.
        crc_share = result["crc32c_seconds_per_gb"] * statistics.median(rates[kind]) / 1e3
        result[f"{kind}_crc32c_share"] = crc_share
    print(f"[writer] CRC32C checksums: {result['crc32c_seconds_per_gb']:.3f} s per GB"
          + "".join(f", at most {100 * result[f'{kind}_crc32c_share']:.1f}% of the {kind} pipeline's time"
                    for kind in pipelines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
