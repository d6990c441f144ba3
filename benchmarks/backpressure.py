"""Backpressure: a sink throttled to --sink-mb-s behind a producer paced at --produce-mb-s.

Shows that the producer stalls by the expected fraction of its run (1 - sink/produce when the sink is slower,
less the share the slots and chunk buffers absorb; 0 when it is faster), that host memory stays within the
slot + chunk budget, and that no row is lost.

    python benchmarks/backpressure.py --produce-mb-s 200 --sink-mb-s 50 --plot bp.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine.format.layout  # noqa: E402
import engine.format.statistics  # noqa: E402
from engine import CaptureConfig, CaptureEngine, open_store  # noqa: E402
from engine.store.sink import ZarrSink  # noqa: E402

from synthetic import SyntheticModel, row_values  # noqa: E402

SINK_MB_S_ENV = "ACTCAP_BENCH_SINK_MB_S"


class ThrottledSink(ZarrSink):
    """The one fake: a ZarrSink whose chunk writes take at least bytes / $ACTCAP_BENCH_SINK_MB_S seconds in
    total (it runs in the writer process, which reads the rate from the environment it inherits)."""

    _lock = threading.Lock()
    _next_free = 0.0

    def write_chunk(self, chunk_index, arrays, make_record):
        nbytes = sum(a.nbytes for a in arrays.values())
        rate = float(os.environ[SINK_MB_S_ENV]) * 1e6
        with ThrottledSink._lock:  # one shared "disk": writes queue behind each other at the throttled rate
            start = max(time.perf_counter(), ThrottledSink._next_free)
            ThrottledSink._next_free = start + nbytes / rate
            wait = ThrottledSink._next_free - time.perf_counter()
        time.sleep(max(0.0, wait))
        super().write_chunk(chunk_index, arrays, make_record)


MEMORY_EVERY = 10  # batches between memory samples


def _memory(processes: list[psutil.Process]) -> int:
    """Proportional set size of the processes together: pages they share (the slots) count once."""
    return sum(process.memory_full_info().pss for process in processes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--produce-mb-s", type=float, default=200.0)
    p.add_argument("--sink-mb-s", type=float, default=50.0, help="0 = unthrottled")
    p.add_argument("--dims", type=int, nargs="+", default=[768, 3072])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-batches", type=int, default=100)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--num-writers", type=int, default=2)
    p.add_argument("--pinned-slots", type=int, default=2)
    p.add_argument("--plot", default=None, help="PNG of queue depth and MB/s over time (needs matplotlib)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _warm_up(model, cfg: CaptureConfig, ids: torch.Tensor) -> None:
    """One short capture into a scratch store beside ``cfg``'s."""
    scratch = dataclasses.replace(cfg, output_dir=Path(cfg.output_dir).with_name("warm-up.zarr"))
    with CaptureEngine(model, scratch):
        model(input_ids=ids)


def run(args) -> dict:
    dims = {f"p{i}": d for i, d in enumerate(args.dims)}
    batch_tokens = args.batch_size * args.seq_len
    batch_bytes = batch_tokens * 2 * sum(args.dims)
    model = SyntheticModel(dims, args.batch_size, args.seq_len, batch_bytes / (args.produce_mb_s * 1e6))
    if args.sink_mb_s > 0:
        os.environ[SINK_MB_S_ENV] = str(args.sink_mb_s)
        CaptureEngine.sink_factory = {**CaptureEngine.sink_factory, "zarr": "backpressure:ThrottledSink"}
    tmp = tempfile.TemporaryDirectory(prefix="actcap_bp_")
    cfg = CaptureConfig(Path(tmp.name) / "bp.zarr", capture_residual=False, capture_mlp_hidden=False,
                        extra_modules={n: f"points.{n}" for n in dims}, chunk_tokens=args.chunk_tokens,
                        num_writers=args.num_writers, pinned_slots=args.pinned_slots)
    ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
    process = psutil.Process()
    _warm_up(model, cfg, ids)  # imports and allocator arenas of a first run are not capture memory
    before = _memory([process])
    with CaptureEngine(model, cfg) as cap:
        cap.flush()  # the writer process is up: its interpreter and imports are not capture memory
        processes = [process, psutil.Process(cap.writer_pid)]
        writer_idle = _memory(processes[1:])
        timeline, peak = [], _memory(processes)
        start = time.perf_counter()
        for index in range(args.num_batches):
            model(input_ids=ids)
            s = cap.stats
            timeline.append((time.perf_counter() - start, s.queue_depth, s.bytes_committed))
            if index % MEMORY_EVERY == 0:  # reading both processes' page maps takes longer than a batch
                peak = max(peak, _memory(processes))
        peak = max(peak, _memory(processes))
        producing = time.perf_counter() - start  # stalls can only happen while the producer runs
        slot_bytes = cap.stats.slot_bytes  # leaving the block releases the slots
    elapsed = time.perf_counter() - start
    stats = cap.stats
    store = open_store(cfg.output_dir)
    rows = store.num_tokens
    lost = args.num_batches * batch_tokens - rows
    values_ok = bool(np.array_equal(store["extra/p0"][:][:, 0], row_values(rows, batch_tokens)))
    tmp.cleanup()
    token_bytes = sum(dtype.itemsize for dtype in engine.format.layout.token_arrays(cfg.annotations).values())
    chunk_bytes = args.chunk_tokens * (2 * sum(args.dims) + token_bytes)
    open_chunks = args.num_writers + 1 + -(-args.pinned_slots * batch_tokens // args.chunk_tokens)
    # shared slots + the writer process's chunk buffers + per-writer float32 statistics blocks (block + row
    # norms) + zarr's copy of the partial last chunk
    budget = (slot_bytes + chunk_bytes * (open_chunks + 1)
              + args.num_writers * 2 * engine.format.statistics.BLOCK_BYTES)
    expected = max(0.0, 1 - args.sink_mb_s / args.produce_mb_s) if args.sink_mb_s > 0 else 0.0
    return {"produce_mb_s": args.produce_mb_s, "sink_mb_s": args.sink_mb_s, "elapsed_s": elapsed,
            "producing_s": producing,
            "stall_seconds": stats.stall_seconds, "stall_fraction": stats.stall_seconds / producing,
            "expected_stall_fraction": expected, "queue_high_water": stats.queue_high_water,
            "rows_expected": args.num_batches * batch_tokens, "rows_stored": rows, "rows_lost": lost,
            "values_ok": values_ok, "host_memory_delta_mb": (peak - before - writer_idle) / 2**20,
            "memory_budget_mb": budget / 2**20, "timeline": timeline}


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[backpressure] matplotlib not installed: no plot")
        return
    t, depth, written = map(np.array, zip(*result["timeline"]))
    rate = np.gradient(written / 1e6, t) if len(t) > 1 else np.zeros_like(t)
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    a.step(t, depth, where="post")
    a.set_ylabel("queue depth")
    b.plot(t, rate)
    b.set_ylabel("MB/s committed")
    b.set_xlabel("seconds")
    fig.suptitle(f"produce {result['produce_mb_s']} MB/s, sink {result['sink_mb_s']} MB/s")
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"[backpressure] produce {args.produce_mb_s} MB/s into a sink of "
          f"{args.sink_mb_s or 'unthrottled'} MB/s, {args.num_batches} batches")
    print(f"[backpressure] stalled {result['stall_seconds']:.2f}s of {result['producing_s']:.2f}s "
          f"producing = {result['stall_fraction']:.2f} (expected {result['expected_stall_fraction']:.2f}), "
          f"queue high-water {result['queue_high_water']}")
    print(f"[backpressure] host memory delta {result['host_memory_delta_mb']:.1f} MB (PSS of both processes, "
          f"shared slots once; the idle writer process left out), budget {result['memory_budget_mb']:.1f} MB "
          "(slots + chunk buffers + statistics blocks)")
    print(f"[backpressure] rows stored {result['rows_stored']} of {result['rows_expected']}, lost "
          f"{result['rows_lost']}, values {'ok' if result['values_ok'] else 'WRONG'}")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    return 0 if result["rows_lost"] == 0 and result["values_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
