"""Falsification gate: hooked vs unhooked forward throughput, memory, backpressure.

    python benchmarks/overhead.py --model gpt2 --batch-size 4 --seq-len 512 --num-batches 5

Unhooked (A) and hooked (B) rounds are interleaved ABBA so drift cancels; every round synchronizes the
device before reading the clock. Rounds run in steady state: each is max(--num-batches, enough forwards for
--min-round-s seconds of the unhooked forward), so a round streams many chunks and the one it leaves in
flight is a small part of it. A hooked round is timed twice: when its last forward returns (steady: the
capture's cost while streaming) and after ``flush()`` (end to end: a writer that lags cannot hide behind
the queue). Overheads are medians of the per-pair time ratios; the gate decides on the end-to-end one.
Beside them, the forward thread's CPU per forward (``time.thread_time``, the median over every forward of
the timed rounds), unhooked and hooked: their difference is what the hooks cost the thread that launches the
model, in CPU time rather than wall-clock time (with OMP_NUM_THREADS=1 that thread does all of a CPU
forward's work; on a GPU it launches the kernels).

``--baseline truncated`` (with ``--early-stop``) compares against the same model stopped after the last
hooked layer without capture: what job mode (early stop) costs against the cheapest forward that could
produce those activations. ``--bare-model`` runs the base model without its LM head (a heavy head hides the
capture's cost).

Gate: overhead < --max-overhead (50%), GPU memory overhead < 10% of the device, > 1000 tokens/s. The
tokens/s threshold is defined for a GPU: on a CPU it is reported but not gated. Exit status 0 = gate passed,
1 = gate failed.

``--plot FILE``: every forward's latency in the timed rounds over time, unhooked and hooked, each hooked
round's flush marked (PNG; the numbers beside it as FILE.csv). Each forward's end is read without a sync
between forwards (on CUDA an event recorded after it), so the rounds run as they do without --plot: a
median hides a stall every N batches, the plot shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engine import CaptureConfig, CaptureEngine, get_model, load_model, random_model  # noqa: E402
from engine.capture.hookpoints import CANONICAL_POINTS, layer_modules  # noqa: E402
from engine.report import plots  # noqa: E402
from engine.report.document import write_csv  # noqa: E402

GATE_MAX_OVERHEAD_PERCENT = 50.0
GATE_MAX_GPU_MEMORY_FRACTION = 0.10
GATE_MIN_TOKENS_PER_S = 1000.0
TARGET_GPU_OVERHEAD_PERCENT = 3.0
TARGET_CPU_RATIO = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="registry name or local folder (default gpt2)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to capture (default: the probe layer)")
    p.add_argument("--hooks", nargs="+", default=["residual", "mlp_hidden"],
                   choices=list(CANONICAL_POINTS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-batches", type=int, default=5, help="forward passes per round (at least)")
    p.add_argument("--min-round-s", type=float, default=2.0,
                   help="rounds are at least this long (in unhooked forward time): steady state")
    p.add_argument("--bare-model", action="store_true", help="the base model without its LM head")
    p.add_argument("--baseline", default="full", choices=["full", "truncated"],
                   help="unhooked rounds run the full forward, or stop after the last hooked layer")
    p.add_argument("--repeats", type=int, default=5,
                   help="pairs of rounds, alternating which goes first (ABBA)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cuda (an error where CUDA is missing), cpu, or auto (cuda when there is one)")
    p.add_argument("--padded", type=float, default=0.0, metavar="SHARE",
                   help="share of each batch's tokens that are padding (right-padded rows of random lengths, "
                        "mask 0): the writer's compaction of kept rows is timed too")
    p.add_argument("--model-dtype", default=None,
                   help="weights dtype (default float32 on CPU, float16 on CUDA)")
    p.add_argument("--dtype", default="float16", help="storage dtype")
    p.add_argument("--output-dir", default=None, help="store folder (default: a temporary folder)")
    p.add_argument("--weights", default="auto", choices=["auto", "random"])
    p.add_argument("--sink", default="zarr", choices=["zarr", "null"])
    p.add_argument("--early-stop", action="store_true",
                   help="hooked passes stop after the last hooked layer; "
                        "compared with the full unhooked pass")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="architecture overrides, e.g. n_layer=4 n_embd=256 (implies random weights)")
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--num-writers", type=int, default=2)
    p.add_argument("--pinned-slots", type=int, default=4)
    p.add_argument("--no-statistics", action="store_true", help="skip the manifest's running statistics")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--max-overhead", type=float, default=GATE_MAX_OVERHEAD_PERCENT)
    p.add_argument("--json", default=None, help="write the result summary here")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="draw each forward's latency over the timed rounds (PNG; numbers in FILE.csv)")
    return p.parse_args(argv)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return out


def evaluate_gate(result: dict, max_overhead: float = GATE_MAX_OVERHEAD_PERCENT) -> dict:
    """Gate checks: name -> {value, threshold, passed, gated}. Pure, so tests can drive it."""
    on_gpu = result["device_type"] == "cuda"
    checks = {
        "overhead_percent": {"value": result["overhead_percent"], "threshold": f"< {max_overhead}",
                             "passed": result["overhead_percent"] < max_overhead, "gated": True},
        "tokens_per_s": {"value": result["hooked_tokens_per_s"], "threshold": f"> {GATE_MIN_TOKENS_PER_S}",
                         "passed": result["hooked_tokens_per_s"] > GATE_MIN_TOKENS_PER_S, "gated": on_gpu},
    }
    if on_gpu:
        limit = GATE_MAX_GPU_MEMORY_FRACTION * result["gpu_total_memory_gb"]
        checks["gpu_memory_overhead_gb"] = {"value": result["gpu_memory_overhead_gb"],
                                            "threshold": f"< {limit:.2f}",
                                            "passed": result["gpu_memory_overhead_gb"] < limit, "gated": True}
    return checks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Round(NamedTuple):
    """One round's clock readings (``time.perf_counter`` seconds): its start, the end of each forward, the end
    of its last forward with the device synchronized, and the end of its flush (= that for an unhooked
    round); and the CPU seconds the forward thread spent in each forward (``time.thread_time``: what the
    hooks cost the thread that launches the model, in CPU time rather than wall-clock time)."""

    start: float
    forward_ends: list[float]
    steady_end: float
    end: float
    forward_cpu: list[float]

    @property
    def steady(self) -> float:
        """Seconds until the last forward returned: the capture's cost while streaming."""
        return self.steady_end - self.start

    @property
    def end_to_end(self) -> float:
        """Seconds until the round's batches were written: a writer that lags cannot hide behind the queue."""
        return self.end - self.start


class _ForwardClock:
    """When each forward of a round ended, without synchronizing the device between forwards (that would
    change what is measured): on CUDA an event recorded on the stream after each forward, read once the
    round has synchronized; on a CPU the clock itself."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.marks: list = []
        if self.cuda:
            self.first = torch.cuda.Event(enable_timing=True)
            self.first.record()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def ends(self) -> list[float]:
        """Each forward's end (after the round synchronized the device)."""
        if not self.cuda:
            return self.marks
        return [self.start + self.first.elapsed_time(event) / 1e3 for event in self.marks]


def _round(model, batch, n: int, device, engine=None) -> Round:
    """Run and time ``n`` forwards (device synchronized before the first clock read and after the last),
    then ``engine.flush()`` for a hooked round."""
    _sync(device)
    clock = _ForwardClock(device)
    cpu = [time.thread_time()]
    with torch.no_grad():
        for _ in range(n):
            model(**batch)
            clock.mark()
            cpu.append(time.thread_time())
        _sync(device)
        steady_end = time.perf_counter()
        if engine is not None:
            engine.flush()
    return Round(clock.start, clock.ends(), steady_end, time.perf_counter(), list(np.diff(cpu)))


class _Truncate(Exception):
    pass


@contextlib.contextmanager
def truncated(model: torch.nn.Module, layer: int):
    """The unhooked model stopped after block ``layer``: the cheapest forward that computes its activations
    (the baseline of early stop). The root forward returns None, as with the engine's early stop."""
    def stop(module, args, output):
        raise _Truncate

    handle = layer_modules(model)[layer].register_forward_hook(stop)
    original, instance = model.forward, model.__dict__.get("forward")

    def forward(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except _Truncate:
            return None

    model.forward = forward
    try:
        yield
    finally:
        handle.remove()
        if instance is None:
            del model.forward
        else:
            model.forward = instance


def _load(args: argparse.Namespace, device: torch.device,
          model_dtype: torch.dtype) -> tuple[torch.nn.Module, bool]:
    overrides = _overrides(args.config)
    if overrides:
        model = random_model(get_model(args.model), dtype=model_dtype, **overrides).to(device).eval()
        return model, True
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(args.model, device=device, dtype=model_dtype,
                           weights="random" if args.weights == "random" else "auto")
    return model, args.weights == "random" or any("RANDOM" in str(w.message) for w in caught)


def _timeline(rounds: list[tuple[str, Round]]) -> list[dict]:
    """The timed rounds in order, read in seconds since the first began (the result's ``rounds``)."""
    origin = rounds[0][1].start
    return [{"kind": kind, "start": r.start - origin, "steady_end": r.steady_end - origin,
             "end": r.end - origin, "forward_ends": [end - origin for end in r.forward_ends]}
            for kind, r in rounds]


def latency_table(rounds: list[dict]) -> dict[str, np.ndarray]:
    """What the plot draws: per forward its round, kind, end (seconds) and latency (ms: since the forward
    before it, or the round's start); per hooked round a ``flush`` row, its flush's end and length."""
    rows = []
    for index, entry in enumerate(rounds):
        ends = np.array(entry["forward_ends"])
        latency = np.diff(ends, prepend=entry["start"]) * 1e3
        rows += [(index, entry["kind"], i, end, ms) for i, (end, ms) in enumerate(zip(ends, latency))]
        if entry["kind"] == "hooked":
            rows.append((index, "flush", len(ends), entry["end"], (entry["end"] - entry["steady_end"]) * 1e3))
    names = ("round", "kind", "forward", "seconds", "latency_ms")
    return {name: np.array(column) for name, column in zip(names, zip(*rows))}


def plot(result: dict, path: Path) -> None:
    """Each forward's latency over the timed rounds, unhooked and hooked, flushes shaded; FILE.csv beside."""
    table = latency_table(result["rounds"])
    write_csv(path.with_suffix(".csv"), table)
    title = (f"{result['model']} {result['batch_size']}x{result['seq_len']} on {result['device_type']}, sink "
             f"{result['sink']}: overhead {result['overhead_percent']:.1f}% end to end, "
             f"{result['steady_overhead_percent']:.1f}% steady")
    fig, (ax,) = plots.figure(title=title)
    for kind, color in (("unhooked", plots.ALL), ("hooked", plots.SINK)):
        mine = table["kind"] == kind
        for index in np.unique(table["round"][mine]):
            at = mine & (table["round"] == index)
            ax.plot(table["seconds"][at], table["latency_ms"][at], color=color, marker=".", ms=3, lw=0.8,
                    label=kind if index == table["round"][mine][0] else None)
        ax.axhline(np.median(table["latency_ms"][mine]), color=color, ls="--", lw=0.8,
                   label=f"median, {kind}")
    flushes = [entry for entry in result["rounds"] if entry["kind"] == "hooked"]
    for i, entry in enumerate(flushes):
        ax.axvspan(entry["steady_end"], entry["end"], color=plots.OUTLIER, alpha=0.25, lw=0,
                   label=None if i else "flush: the writer finishing a hooked round")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the first timed round (each round after a warm-up pass: steady state)")
    ax.set_ylabel("forward latency (ms)")
    plots.legend(ax)
    plots.save(fig, path)


def _median_ratio(hooked: list[float], base: list[float]) -> tuple[float, list[float]]:
    ratios = [h / b for h, b in zip(hooked, base)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}): a GPU measurement never falls back to the CPU")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def padded_mask(batch_size: int, seq_len: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """An attention mask whose rows keep a random length, about ``1 - share`` of the tokens in all (right
    padding), every row at least one token."""
    if share <= 0:
        return torch.ones(batch_size, seq_len, dtype=torch.long)
    kept = torch.rand(batch_size, generator=generator) * 2 * (1 - share)
    lengths = (kept.clamp(max=1.0) * seq_len).long().clamp(min=1)
    return (torch.arange(seq_len)[None, :] < lengths[:, None]).long()


def run(args: argparse.Namespace) -> dict:
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline == "truncated" and not args.early_stop:
        raise SystemExit("error: --baseline truncated compares early stop with a truncated forward: "
                         "add --early-stop")
    model_dtype = getattr(torch, args.model_dtype or ("float16" if device.type == "cuda" else "float32"))
    print(f"[validate] Loading {args.model} on {device} ({model_dtype})")
    model, random_weights = _load(args, device, model_dtype)
    if args.bare_model:
        model = model.base_model  # the transformer without its LM head
    if random_weights:
        print("[validate] RANDOM WEIGHTS: activations are meaningless, timings are valid")
    n_layers = model.config.num_hidden_layers
    layers = args.layers if args.layers is not None else [min(get_model(args.model).default_probe_layer,
                                                              n_layers - 1)]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(device),
             "attention_mask": padded_mask(args.batch_size, args.seq_len, args.padded, gen).to(device)}
    baseline = functools.partial(truncated, model, max(layers)) if args.baseline == "truncated" \
        else contextlib.nullcontext

    print("[baseline] Warming up model (1 forward pass)...")
    with baseline():
        _round(model, batch, 1, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        one = _round(model, batch, 3, device).steady / 3
    base_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    n = max(args.num_batches, math.ceil(args.min_round_s / one))
    tokens_per_round = args.batch_size * args.seq_len * n
    print(f"[validate] Testing with batch_size={args.batch_size}, seq_len={args.seq_len}, "
          f"batches per round={n} (at least {args.num_batches} and {args.min_round_s}s), "
          f"repeats={args.repeats}, layers={layers}, hooks={args.hooks}, sink={args.sink}, "
          f"early_stop={args.early_stop}, "
          f"baseline={args.baseline}, bare_model={args.bare_model}")
    process = psutil.Process()
    rss_before = process.memory_info().rss

    tmp = tempfile.TemporaryDirectory(prefix="actcap_overhead_") if args.output_dir is None else None
    store = Path(args.output_dir or tmp.name) / "overhead.zarr"
    cfg = CaptureConfig(store, layer_indices=layers, points=args.hooks, dtype=args.dtype,
                        chunk_tokens=args.chunk_tokens, num_writers=args.num_writers,
                        pinned_slots=args.pinned_slots, overwrite=True, sink=args.sink,
                        early_stop=args.early_stop, model_name=args.model,
                        statistics=not args.no_statistics)
    print(f"[hooks] Attaching capture hooks to layers {layers}...")
    engine = CaptureEngine(model, cfg)
    try:
        print("[hooks] Warming up model with hooks (1 forward pass)...")
        _round(model, batch, 1, device, engine)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base_times, hooked_times, rss_peak = [], [], rss_before
        print("[baseline] Measuring latency without hooks / [hooks] with hooks, interleaved (ABBA)...")
        rounds = []
        for repeat in range(args.repeats):
            # ABBA: each kind goes first as often, so the writeback of a hooked round landing in the round
            # after it weighs on both kinds alike
            for hooked in ((False, True) if repeat % 2 == 0 else (True, False)):
                if hooked:
                    rounds.append(("hooked", _round(model, batch, n, device, engine)))
                else:
                    with engine.detached(), baseline():
                        rounds.append(("unhooked", _round(model, batch, n, device)))
            rss_peak = max(rss_peak, process.memory_info().rss)
        hooked_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        slot_bytes = engine.stats.slot_bytes  # close() releases the slots
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    stats = engine.stats

    base_times = [measured.steady for kind, measured in rounds if kind == "unhooked"]
    hooked_times = [measured for kind, measured in rounds if kind == "hooked"]
    steady, steady_spread = _median_ratio([h.steady for h in hooked_times], base_times)
    end_to_end, spread = _median_ratio([h.end_to_end for h in hooked_times], base_times)
    base_s = statistics.median(base_times) / n
    # medians over every forward of the timed rounds: a slow forward now and then moves them little
    base_cpu_us = statistics.median(c for kind, r in rounds if kind == "unhooked" for c in r.forward_cpu)
    hooked_cpu_us = statistics.median(c for h in hooked_times for c in h.forward_cpu)
    base_cpu_us, hooked_cpu_us = base_cpu_us * 1e6, hooked_cpu_us * 1e6
    hooked_s = statistics.median(h.end_to_end for h in hooked_times) / n
    result = {
        "model": args.model, "random_weights": random_weights, "config_overrides": _overrides(args.config),
        "bare_model": args.bare_model, "baseline": args.baseline,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "device_type": device.type, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "model_dtype": str(model_dtype).replace("torch.", ""), "storage_dtype": args.dtype,
        "layer_indices": layers, "hooks": args.hooks, "sink": args.sink, "early_stop": args.early_stop,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "num_batches": args.num_batches,
        "batches_per_round": n, "min_round_s": args.min_round_s,
        "repeats": args.repeats, "chunk_tokens": args.chunk_tokens, "num_writers": args.num_writers,
        "pinned_slots": args.pinned_slots,
        "baseline_s_per_batch": base_s, "hooked_s_per_batch": hooked_s,
        # the forward thread's CPU per forward (median): hooked minus unhooked is what the hooks cost it
        "baseline_thread_cpu_us_per_batch": base_cpu_us, "hooked_thread_cpu_us_per_batch": hooked_cpu_us,
        "hooks_thread_cpu_us_per_batch": hooked_cpu_us - base_cpu_us,
        "baseline_tokens_per_s": tokens_per_round / statistics.median(base_times),
        "hooked_tokens_per_s": tokens_per_round / statistics.median(h.end_to_end for h in hooked_times),
        "padded_share": args.padded,
        "overhead_percent": (end_to_end - 1) * 100,
        "steady_overhead_percent": (steady - 1) * 100,
        "hooked_to_baseline_ratio": 1 / end_to_end,
        "steady_hooked_to_baseline_ratio": 1 / steady,
        "ratio_spread": spread, "steady_ratio_spread": steady_spread,
        "baseline_round_s": base_times, "hooked_round_s": [h.end_to_end for h in hooked_times],
        "hooked_steady_round_s": [h.steady for h in hooked_times],
        "rounds": _timeline(rounds),
        "peak_gpu_memory_gb": hooked_peak / 2**30 if device.type == "cuda" else None,
        "gpu_memory_overhead_gb": (hooked_peak - base_peak) / 2**30 if device.type == "cuda" else None,
        "gpu_total_memory_gb": (torch.cuda.get_device_properties(device).total_memory / 2**30
                                if device.type == "cuda" else None),
        "host_rss_delta_mb": (rss_peak - rss_before) / 2**20, "slot_mb": slot_bytes / 2**20,
        "stall_seconds": stats.stall_seconds, "queue_high_water": stats.queue_high_water,
        "tokens_written": stats.tokens_committed, "bytes_written": stats.bytes_committed,
        # the store's bytes per second of hooked time (rounds and flushes; the warm-up's rows are few)
        "hooked_mb_per_s": stats.bytes_committed / 1e6 / sum(h.end_to_end for h in hooked_times),
    }
    checks = evaluate_gate(result, args.max_overhead)
    result["gate"] = checks
    result["gate_passed"] = all(c["passed"] for c in checks.values() if c["gated"])
    target = TARGET_GPU_OVERHEAD_PERCENT if device.type == "cuda" else (1 / TARGET_CPU_RATIO - 1) * 100
    result["target_overhead_percent"] = target
    result["target_met"] = result["overhead_percent"] <= target
    return result


def report(result: dict) -> None:
    print(f"  Baseline: {result['baseline_s_per_batch']:.4f}s/batch, "
          f"{result['baseline_tokens_per_s']:.0f} tokens/s")
    print(f"  With hooks: {result['hooked_s_per_batch']:.4f}s/batch, "
          f"{result['hooked_tokens_per_s']:.0f} tokens/s")
    lo, hi = result["ratio_spread"]
    print(f"  Overhead: {result['overhead_percent']:.1f}% slowdown end to end "
          f"(per-pair ratios {lo:.3f}..{hi:.3f}; "
          f"hooked/baseline rate {result['hooked_to_baseline_ratio']:.3f})")
    lo, hi = result["steady_ratio_spread"]
    print(f"  Steady: {result['steady_overhead_percent']:.1f}% while streaming "
          f"(per-pair ratios {lo:.3f}..{hi:.3f}; "
          f"rate {result['steady_hooked_to_baseline_ratio']:.3f}), "
          f"{result['batches_per_round']} batches per round")
    print(f"  Forward thread CPU per forward (median): {result['baseline_thread_cpu_us_per_batch']:.0f} us "
          f"unhooked, {result['hooked_thread_cpu_us_per_batch']:.0f} us hooked: the hooks cost it "
          f"{result['hooks_thread_cpu_us_per_batch']:.0f} us")
    print()
    if result["peak_gpu_memory_gb"] is not None:
        print(f"[memory] Peak GPU memory: {result['peak_gpu_memory_gb']:.2f} GB "
              f"(capture overhead {result['gpu_memory_overhead_gb']:.3f} GB)")
    print(f"[memory] Host RSS delta: {result['host_rss_delta_mb']:.1f} MB "
          f"(staging slots {result['slot_mb']:.1f} MB)")
    print(f"[memory] Backpressure: stalled {result['stall_seconds']:.3f}s, queue high-water "
          f"{result['queue_high_water']}")
    print()
    print("[result] Validation summary:")
    for key in ("model", "device", "layer_indices", "hooks", "sink", "early_stop", "baseline", "bare_model",
                "batch_size", "seq_len", "batches_per_round", "repeats", "baseline_s_per_batch",
                "baseline_tokens_per_s", "hooked_s_per_batch", "hooked_tokens_per_s", "overhead_percent",
                "steady_overhead_percent", "peak_gpu_memory_gb", "host_rss_delta_mb", "stall_seconds",
                "queue_high_water"):
        value = result[key]
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    for name, check in result["gate"].items():
        if check["gated"]:
            print(f"[gate] {name} {check['value']:.4g} {check['threshold']}: "
                  f"{'PASS' if check['passed'] else 'FAIL'}")
        else:
            print(f"[gate] {name} {check['value']:.4g}: reported, not gated "
                  f"(the {check['threshold']} threshold is defined for a GPU)")
    print(f"[gate] target overhead <= {result['target_overhead_percent']:.2f}%: "
          f"{'met' if result['target_met'] else 'NOT met'}")
    print(f"[gate] {'PASSED' if result['gate_passed'] else 'FAILED'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plots.exit_unless_available()  # before the model loads
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, Path(args.plot))
        print(f"[plot] {args.plot}, numbers in {Path(args.plot).with_suffix('.csv')}")
    return 0 if result["gate_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
