"""Compact storage encodings judged by the SAEs they train (issue 28): for each storage encoding (float32,
float16, bfloat16, and the 8-bit ``int8`` and ``float8_e4m3`` of ``engine.format.encoding``), the same SAE
trained from the training rows as that encoding stores and decodes them, evaluated on the same float32
held-out rows.

    python benchmarks/storage_encodings.py --store-dir ~/.cache/actcap/bench-encodings --json out.json

The stores are ``training.py``'s (the same corpus, split, capture command and cache), captured in float32:
the truth every encoding is measured against. Each encoding's training rows are the float32 rows cast and
cast back (float16, bfloat16) or encoded as the capture hook encodes them
(``engine.capture.encoder.encode_rows``) and decoded as readers decode them (``Encoding.decode`` of the slot
rows' codes and scales), in blocks of ``--block-rows``. Per encoding it reports:

  - bytes per token stored (the codes and the row's float32 scale for the 8-bit ones), and that over
    float16's;
  - the relative RMS error of the decoded rows against the float32 ones (over rows whose float32 values are
    all finite; the 8-bit ones also from the error sums ``encode_rows`` writes into each slot row's header);
  - the CPU cost, in the hook, of filling one capture batch's slot (``--capture-batch-size`` x ``--seq-len``
    rows): ``slot.copy_(batch)`` (a copy for float32, a cast for float16 and bfloat16) or
    ``slot.copy_(encode_rows(batch, encoding))``, interleaved, the median of ``--encode-repeats``;
  - the SAE trained on its rows (``training.train_arm``: the same seed, steps and uniformly shuffled batch
    order for every encoding) on the float32 held-out rows: FVU, L0, dead latents, and its FVU over float16's.

Every arm is normalized the same way, from the float32 training store: its manifest statistics (the default)
or, with ``--normalization rows``, its rows in memory. So the arms differ only in the rows they train on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine.capture.encoder import available, encode_rows  # noqa: E402
from engine.format.encoding import ENCODINGS, relative_rms_error, squared_error_and_norm  # noqa: E402
from engine.read.sae import Normalization  # noqa: E402

import training  # noqa: E402

PLAIN = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = (*PLAIN, *ENCODINGS)
REFERENCE = "float16"
TARGET_FVU_RATIO, TARGET_BYTES_RATIO = 1.01, 0.52
TARGET = (f"an 8-bit encoding within {TARGET_FVU_RATIO - 1:.0%} (relative) of {REFERENCE}'s FVU with dead "
          f"latents no higher, at <= {TARGET_BYTES_RATIO} of {REFERENCE}'s bytes per token")


def parse_args(argv=None) -> argparse.Namespace:
    p = training.build_parser(__doc__, storage_dtype=False)
    encodings = p.add_argument_group("the encodings")
    encodings.add_argument("--encodings", nargs="+", default=list(NAMES), choices=NAMES,
                           help=f"those compared ({REFERENCE}, the reference, among them)")
    encodings.add_argument("--block-rows", type=int, default=16384,
                           help="rows encoded and decoded at a time (bounds the memory it takes)")
    encodings.add_argument("--encode-repeats", type=int, default=20,
                           help="timed fills of one capture batch's slot per encoding")
    args = p.parse_args(argv)
    if REFERENCE not in args.encodings:
        p.error(f"--encodings: {REFERENCE} is the reference every ratio is taken to; add it")
    missing = [name for name in args.encodings if name in ENCODINGS and not available(ENCODINGS[name])]
    if missing:
        p.error(f"--encodings: this torch ({torch.__version__}) cannot produce {', '.join(missing)}")
    args.dtype = "float32"  # the stores hold the captured truth
    return args


# ---- what an encoding stores, and what it gives back --------------------------------------------------


def bytes_per_token(name: str, dim: int) -> int:
    """Stored bytes of one row: the values, or the codes and the row's float32 scale."""
    if name in PLAIN:
        return PLAIN[name].itemsize * dim
    return ENCODINGS[name].code_dtype.itemsize * dim + 4


def decoded_rows(rows: torch.Tensor, name: str, block_rows: int) -> tuple[torch.Tensor, float | None]:
    """``rows`` (n, dim) float32 as ``name`` stores and decodes them, and for the 8-bit encodings the relative
    RMS error from the error norms ``encode_rows`` writes into the slot rows, as the writer sums them (None
    for the plain dtypes)."""
    if name in PLAIN:
        return rows.to(PLAIN[name]).float(), None
    encoding, dim = ENCODINGS[name], rows.shape[1]
    out, sums = torch.empty_like(rows), np.zeros(2)
    for start in range(0, rows.shape[0], block_rows):
        slots = encode_rows(rows[start:start + block_rows], encoding).numpy()
        codes, scales, errors = encoding.split_slot_rows(slots, dim)
        encoding.decode(codes, scales, out[start:start + block_rows].numpy())
        sums += squared_error_and_norm(errors, scales).sum(axis=0)
    return out, relative_rms_error(*sums)


def decoding_error(rows: torch.Tensor, decoded: torch.Tensor, block_rows: int) -> dict:
    """sqrt(sum |decoded - row|^2 / sum |row|^2) over the rows whose float32 values are all finite (in
    float64), how many rows that leaves out, and how many of those rows decode to a non-finite value."""
    error = norm = 0.0
    left_out = non_finite = 0
    for start in range(0, rows.shape[0], block_rows):
        truth, values = rows[start:start + block_rows].double(), decoded[start:start + block_rows].double()
        finite = torch.isfinite(truth).all(dim=1)
        truth, values = truth[finite], values[finite]
        error += (values - truth).square().sum().item()
        norm += truth.square().sum().item()
        left_out += int((~finite).sum())
        non_finite += int((~torch.isfinite(values).all(dim=1)).sum())
    return {"relative_rms_error": relative_rms_error(error, norm), "rows_left_out_non_finite": left_out,
            "rows_decoded_non_finite": non_finite}


# ---- the hook's cost --------------------------------------------------------------------------------------


def capture_batch(rows: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """One capture batch (batch, seq, dim) of real rows (repeated when the store holds fewer)."""
    count = args.capture_batch_size * args.seq_len
    return rows[torch.arange(count) % rows.shape[0]].reshape(args.capture_batch_size, args.seq_len, -1)


def slot_fill(name: str, batch: torch.Tensor) -> Callable[[], object]:
    """What the hook does on the CPU with one batch for ``name``: fill a slot of the stored dtype or the slot
    rows (with torch's ``copy_``; the hook copies rows already in the slot's dtype with numpy's memcpy)."""
    if name in PLAIN:
        slot = torch.empty(batch.shape, dtype=PLAIN[name])
        return lambda: slot.copy_(batch)
    encoding = ENCODINGS[name]
    slot = torch.empty((*batch.shape[:-1], encoding.slot_row_bytes(batch.shape[-1])), dtype=torch.uint8)
    return lambda: slot.copy_(encode_rows(batch, encoding))


def fill_timings(batch: torch.Tensor, names: list[str], repeats: int) -> dict[str, dict]:
    """Milliseconds per batch for each encoding: interleaved (one of each per round, so load that comes and
    goes falls on all), after two rounds untimed; median, min and max of ``repeats`` rounds."""
    fills = {name: slot_fill(name, batch) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 2):
        for name, fill in fills.items():
            start = time.perf_counter()
            fill()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "repeats": len(ms)}
            for name, ms in times.items()}


# ---- the arms ---------------------------------------------------------------------------------------------


def train_encoding(name: str, rows: torch.Tensor, held_out: torch.Tensor, norm: Normalization,
                   steps: int, args: argparse.Namespace) -> dict:
    """The rows as ``name`` gives them back, and the SAE trained on them (evaluated on ``held_out``)."""
    decoded, header_error = decoded_rows(rows, name, args.block_rows)
    error = decoding_error(rows, decoded, args.block_rows)
    print(f"[{name}] relative RMS error {error['relative_rms_error']:.3e}", flush=True)
    batches = training.uniform_batches(decoded, args.batch_size, args.seed)
    config = training.sae_config(args, rows.shape[1])
    trained = training.train_arm(name, batches, config, norm, steps, held_out, args)
    return {"bytes_per_token": bytes_per_token(name, rows.shape[1]), **error,
            "header_relative_rms_error": header_error, **trained}


def add_ratios(arms: dict[str, dict]) -> None:
    """Each arm against the reference's: bytes, FVU, L0, encode time (ratios), dead latents (difference)."""
    reference = arms[REFERENCE]
    for arm in arms.values():
        arm["bytes_vs_float16"] = arm["bytes_per_token"] / reference["bytes_per_token"]
        arm["fvu_vs_float16"] = arm["fvu"] / reference["fvu"]
        arm["l0_vs_float16"] = arm["l0"] / reference["l0"]
        arm["dead_vs_float16"] = arm["dead_latents"] - reference["dead_latents"]
        arm["encode_vs_float16"] = (arm["encode_ms_per_batch"]["median"]
                                    / reference["encode_ms_per_batch"]["median"])


def verdict(arms: dict[str, dict]) -> dict:
    """The issue's target: met by an 8-bit arm within the FVU ratio, dead latents no higher, at the bytes
    ratio; the best 8-bit arm is the lowest FVU among those meeting it, else among all of them."""
    eight_bit = [name for name in arms if name in ENCODINGS]
    meeting = [name for name in eight_bit if arms[name]["fvu_vs_float16"] <= TARGET_FVU_RATIO
               and arms[name]["dead_vs_float16"] <= 0
               and arms[name]["bytes_vs_float16"] <= TARGET_BYTES_RATIO]
    best = min(meeting or eight_bit, key=lambda name: arms[name]["fvu_vs_float16"], default=None)
    if best is None:
        detail = "no 8-bit encoding was run"
    else:
        arm = arms[best]
        detail = (f"{best}: FVU {arm['fvu_vs_float16']:.4f}x {REFERENCE}'s, dead latents "
                  f"{arm['dead_latents']} against {arms[REFERENCE]['dead_latents']}, "
                  f"{arm['bytes_vs_float16']:.3f} of its bytes")
    met = bool(meeting)
    return {"met": met, "meeting": meeting, "best": best,
            "line": f"{TARGET}: {'met' if met else 'NOT met'} (best: {detail})"}


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def run(args: argparse.Namespace, stores: dict[str, Path]) -> dict:
    key = f"layer_{args.layer}/{args.hook}"
    rows = training.read_rows(stores["train"], key, args)
    held_out = training.read_rows(stores["eval"], key, args)
    norm = training.normalization(args, stores["train"], key, rows)
    steps = args.steps or rows.shape[0] // args.batch_size
    batch = capture_batch(rows, args)
    print(f"[encodings] {rows.shape[0]:,} float32 training rows, {held_out.shape[0]:,} held out; {steps} "
          f"steps of {args.batch_size} per encoding; normalization of every arm from the float32 "
          f"{norm.source}: scale {norm.scaling_factor:.4f}; timing slot fills of {tuple(batch.shape)} on "
          f"{torch.get_num_threads()} torch threads", flush=True)
    timings = fill_timings(batch, args.encodings, args.encode_repeats)
    arms = {name: {**train_encoding(name, rows, held_out, norm, steps, args),
                   "encode_ms_per_batch": timings[name]} for name in args.encodings}
    add_ratios(arms)
    return {
        "command": args.command, "git_commit": args.git_commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "args": vars(args),
        "stores": {split: str(path) for split, path in stores.items()}, "key": key,
        "storage_dtype": "float32", "dim": rows.shape[1], "train_rows": rows.shape[0],
        "eval_rows": held_out.shape[0],
        "exclude": "dataset default" if args.exclude is None else args.exclude,
        "normalization": {"source": f"float32 {norm.source}", "scaling_factor": norm.scaling_factor,
                          "same_for_every_arm": True},
        "batch_size": args.batch_size, "steps": steps, "passes": steps * args.batch_size / rows.shape[0],
        "sae": dataclasses.asdict(training.sae_config(args, rows.shape[1])),
        "encode_batch_shape": list(batch.shape), "arms": arms, "target": verdict(arms),
    }


def report(result: dict) -> None:
    print(f"[result] {result['key']}, {result['train_rows']:,} training rows ({result['dim']} wide), "
          f"{result['steps']} steps of {result['batch_size']}, evaluated on {result['eval_rows']:,} float32 "
          f"held-out rows; encode: ms to fill one {'x'.join(map(str, result['encode_batch_shape']))} slot on "
          f"this CPU ({result['machine']}, {result['torch_threads']} torch threads), median")
    print(f"{'encoding':<13}{'bytes/tok':>10}{'vs f16':>8}{'rel RMS err':>13}{'FVU':>9}{'vs f16':>8}"
          f"{'L0':>7}{'dead':>6}{'encode ms':>11}{'vs f16':>8}")
    for name, arm in result["arms"].items():
        print(f"{name:<13}{arm['bytes_per_token']:>10}{arm['bytes_vs_float16']:>8.3f}"
              f"{arm['relative_rms_error']:>13.3e}{arm['fvu']:>9.4f}{arm['fvu_vs_float16']:>8.4f}"
              f"{arm['l0']:>7.1f}{arm['dead_latents']:>6}{arm['encode_ms_per_batch']['median']:>11.2f}"
              f"{arm['encode_vs_float16']:>8.2f}")
    print(f"[target] {result['target']['line']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/storage_encodings.py",
                               *(sys.argv[1:] if argv is None else argv)])
    args.git_commit = training.git_commit()  # the code that runs, read before the run
    root = (Path(args.store_dir).expanduser() if args.store_dir
            else Path(tempfile.mkdtemp(prefix="actcap_encodings_")))
    try:
        result = run(args, training.prepare_stores(args, root))
    finally:
        if not args.store_dir:
            shutil.rmtree(root, ignore_errors=True)
    report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
