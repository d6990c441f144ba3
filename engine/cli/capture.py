"""``python -m engine capture``: check a job, cheapest first, then load the model and capture.

The checks come in three steps, each before anything slower than itself:

1. the arguments and the filesystem, before torch or transformers is imported: option values, the model's
   name, the output location (it can be written, no store in the way, none being written, ``--resume`` has
   a store to continue) and the corpus (there, readable, of a known kind);
2. the model's config, without its weights: ``--seq-len`` against its positions, layers and hook points on a
   weightless copy (the meta device), whether the staging slots for the largest batch fit in host memory,
   the tokenizer, and for a resume whether the store was captured with these options
   (``engine.capture.manifest.resume_mismatches`` decides, as it does for the engine);
3. the corpus read once, counting its sequences (a bad record names its file and line), and for a resume
   whether this job reaches as far as the store already holds.

Only then do the weights load. Ctrl-C during the run keeps the committed chunks and says how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from engine.capture.points import CANONICAL_POINTS
from engine.cli.arguments import HelpFormatter, layer_index, module_entry, positive_int, ratio_or_none
from engine.cli.corpus import (
    ANNOTATIONS,
    Corpus,
    SequenceCounts,
    TokenSequence,
    collate,
    open_corpus,
    sequences,
    shares,
    take_tokens,
)
from engine.cli.output import size_text
from engine.errors import (
    ConfigError,
    CorpusError,
    EngineError,
    ResumeMismatchError,
)
from engine.format.layout import STATUS_COMPLETE, STORAGE_DTYPES, stored_row_bytes, token_arrays
from engine.models.registry import find_model, get_model

if TYPE_CHECKING:
    import torch

    from engine.capture.config import CaptureConfig
    from engine.capture.engine import CaptureEngine, CaptureStats
    from engine.format.layout import Manifest
    from engine.read.reader import StorePart

_BLOCK_BYTES = 4096  # filesystem block: what a file's last partial block costs on disk
_EXAMPLES = """examples:
  python -m engine capture --model smollm2-135m --data corpus.jsonl --layers 15 --out acts.zarr
  python -m engine capture --model gpt2 --data hf:NeelNanda/pile-10k --max-tokens 2000000 \\
      --layers 3 6 9 --hooks residual mlp_out --dtype int8 --out s3://bucket/pile.zarr
  python -m engine capture --model ./my-model --layers 6 --out acts.zarr --resume  # after Ctrl-C
"""


def add_parser(commands, common: argparse.ArgumentParser) -> None:
    cap = commands.add_parser("capture", parents=[common], formatter_class=HelpFormatter, epilog=_EXAMPLES,
                              help="capture layers of a model over a corpus into a store",
                              description="Capture layers of a model over a corpus into a store.\nEvery "
                              "option is checked before the model's weights load.")
    cap.add_argument("--model", required=True, help="registry name (python -m engine models) or local model "
                     "folder")
    cap.add_argument("--data", default=None, help="FILE.txt|.jsonl|.parquet, a folder (of .parquet files, or "
                     "saved by datasets), a glob, or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed; "
                     "offline: the local hub cache). Default: Python's own documentation (a few hundred "
                     "thousand tokens)")
    cap.add_argument("--split", default="train", help="split of a dataset (hf: or a saved DatasetDict)")
    cap.add_argument("--text-field", default="text", help="jsonl / parquet / dataset field holding the text")
    cap.add_argument("--out", required=True, help="store folder or object-store URL (s3://bucket/prefix)")
    cap.add_argument("--layers", type=layer_index, nargs="+", metavar="LAYER",
                     help="layer indices, from 0 (default: the model's probe layer)")
    cap.add_argument("--hooks", nargs="*", default=["residual", "mlp_hidden"], choices=list(CANONICAL_POINTS),
                     help="canonical points per layer (none: only --extra-modules; `models --points MODEL` "
                     "lists a model's)")
    cap.add_argument("--extra-modules", nargs="+", type=module_entry, default=[], metavar="NAME=MODULE.PATH",
                     help="also capture these modules' outputs, at extra/NAME (paths as in "
                     "model.named_modules())")
    cap.add_argument("--seq-len", type=positive_int, default=512, help="tokens per row")
    cap.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")
    cap.add_argument("--max-tokens", type=positive_int, default=None,
                     help="stop before the row that would pass this (default: the whole corpus; needed for "
                     "hf: data under torchrun)")
    cap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                     help="join documents, each after the tokenizer's BOS (else EOS) token, into full "
                     "--seq-len windows (default); --no-pack: one document per row, cut at --seq-len (the "
                     "job reports what was cut)")
    cap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    cap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    cap.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES),
                     help="storage dtype; int8 and float8_e4m3 store 8-bit codes with a float32 scale per "
                          "row (half of float16's bytes; what it costs the SAE: docs/format.md)")
    cap.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="weights dtype (default: the checkpoint's)")
    cap.add_argument("--weights", default="required", choices=["auto", "random", "required"],
                     help="required: fail without local weights; auto: random weights, with a warning, when "
                     "none are found; random: always random (activations meaningless, timings valid)")
    cap.add_argument("--allow-download", action="store_true",
                     help="let the model and tokenizer come from the Hugging Face Hub (default: local only)")
    cap.add_argument("--chunk-tokens", type=positive_int, default=8192, help="rows per chunk and per commit")
    cap.add_argument("--outlier-norm-ratio", type=ratio_or_none, default=10.0, metavar="RATIO",
                     help="flag rows whose norm exceeds RATIO times their neighbours' median as outliers "
                          "(the statistics and reads leave them out unless asked); 'none' flags none")
    cap.add_argument("--num-writers", type=positive_int, default=2, help="writer threads (in the writer "
                     "process)")
    cap.add_argument("--pinned-slots", type=positive_int, default=4, help="host staging slots, each holding "
                     "one batch of every point; the forward waits while all are in use")
    cap.add_argument("--resume", action="store_true", help="continue the interrupted store at --out exactly "
                     "(an error when there is none); --overwrite and --resume-or-start are then ignored, so "
                     "that the first command plus --resume always continues its store")
    store = cap.add_mutually_exclusive_group()
    store.add_argument("--resume-or-start", action="store_true", help="continue the store at --out if there "
                       "is one, else start it (for jobs that are requeued)")
    store.add_argument("--overwrite", action="store_true", help="replace the store at --out")
    cap.add_argument("--break-lock", action="store_true", help="take over an object-store (s3://) store "
                     "whose writer was killed: its lock's heartbeat is older than the lease (60 s). Never "
                     "needed for a local folder")
    cap.add_argument("--no-early-stop", action="store_true", help="run the whole model (default: stop after "
                     "the last hooked layer; later layers and the LM head never run)")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.add_argument("--no-statistics", action="store_true", help="skip the manifest's running statistics")
    cap.set_defaults(run=run_capture)


def run_capture(args: argparse.Namespace) -> int:
    """The capture command: plan the job (every check), then run it; returns the exit status."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[capture rank {_rank()}]" if world_size > 1 else "[capture]"
    job = _plan(args, world_size, tag)  # every process checks before any joins (and so before any writes)
    if world_size == 1 and job.nothing_left:
        print(_nothing_left(tag, args.out, job.stop - job.first, sum(job.lengths[job.first:job.stop])))
        return 0
    _print_plan(args, job, tag)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, device = _join_process_group(device)
    try:
        return _run(args, job, device, tag, quiet=args.no_progress or rank > 0)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def _rank() -> int:
    """This process's rank under torchrun (0 alone): known before the process group is joined."""
    return int(os.environ.get("RANK", "0"))


# ---- checks and plan, before the weights load --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    """A capture job whose options were all checked before the model loads.

    Attributes:
        corpus: the documents.
        config: the capture configuration, ``first_sequence`` this process's first.
        tokenizer: the model's fast tokenizer.
        row_bytes: bytes per token of every array of the store, by key.
        sequences: a fresh pass over the job's input sequences (``--max-tokens`` applied).
        lengths: every sequence's length (the counting pass), or None for a streamed corpus in one process.
        counts: totals of the counting pass, or None when there was none.
        first, stop: this process's share of the sequences, ``[first, stop)`` (stop None: to the end).
        resumes_at: the sequence a resume continues from (``first`` when nothing is stored yet).
        complete: the store to resume says it is complete.
    """

    corpus: Corpus
    config: CaptureConfig
    tokenizer: Any
    row_bytes: dict[str, int]
    sequences: Callable[[], Iterator[TokenSequence]]
    lengths: list[int] | None
    counts: SequenceCounts | None
    first: int
    stop: int | None
    resumes_at: int
    complete: bool

    @property
    def nothing_left(self) -> bool:
        """The store is complete and holds every sequence of this job: there is nothing to capture."""
        return self.complete and self.stop is not None and self.resumes_at == self.stop


def _plan(args: argparse.Namespace, world_size: int, tag: str) -> _Job:
    """Check the job's options in the order of the module docstring and count its sequences; nothing is
    loaded but configs, the tokenizer and the corpus."""
    extra_modules = _extra_modules(args)
    _check_model_name(args.model)
    resume = _continues_a_store(args)
    corpus = open_corpus(args.data, args.text_field, args.split)
    if world_size > 1 and corpus.streamed and args.max_tokens is None:
        raise ConfigError(f"{corpus.description} has no known length to share among {world_size} processes: "
                          "pass --max-tokens (every process then reads that many tokens' rows of the stream "
                          "to compute its share), or save the dataset locally")
    from engine.capture.hookpoints import measure_widths, resolve_hook_points
    from engine.capture.manifest import build_manifest

    skeleton = _weightless_model(args.model, args.seq_len)
    config = _capture_config(args, skeleton.config, extra_modules, world_size, resume)
    points = resolve_hook_points(skeleton, config.layer_indices, config.points, config.extra_modules)
    widths = measure_widths(skeleton, points)
    _check_slot_memory(args, config, widths)
    row_bytes = _row_bytes(widths, config.dtype)
    tokenizer = _tokenizer(args)

    def job_sequences() -> Iterator[TokenSequence]:
        return take_tokens(sequences(corpus.documents(), tokenizer, args.seq_len, args.pack), args.max_tokens)

    print(f"{tag} data: {corpus.description}" if args.data is not None else
          f"{tag} no --data given: capturing {corpus.description}; pass --data for your own corpus")
    counted = not (corpus.streamed and world_size == 1)  # a stream's length is unknown until its end
    counts, lengths = _counted(args, corpus, tokenizer, job_sequences()) if counted else (None, None)
    first, stop = (0, None) if lengths is None else shares(lengths, world_size)[_rank()]
    config = dataclasses.replace(config, first_sequence=first)
    resumes_at, complete = first, False
    if resume:
        resumes_at, complete = _check_resume(args.out, build_manifest(skeleton, config, points, tokenizer),
                                             first, stop, world_size)
    return _Job(corpus, config, tokenizer, row_bytes, job_sequences, lengths, counts, first, stop, resumes_at,
                complete)


def _check_slot_memory(args: argparse.Namespace, config: CaptureConfig, widths: dict[str, int]) -> None:
    """The staging slots' memory check of the first forward (``max_batch_tokens``), before the weights load:
    a job whose largest batch cannot be staged fails in seconds, not once the model has loaded."""
    from engine.capture.staging import SLOT_MEMORY_SHARE, slot_memory_shortfall, slot_row_bytes

    assert config.max_batch_tokens is not None, "the command line plans its largest batch"
    row_bytes = slot_row_bytes(config.dtype, tuple(config.annotations), widths)
    shortfall = slot_memory_shortfall(config.pinned_slots, config.max_batch_tokens, row_bytes)
    if shortfall is not None:
        needed, available = shortfall
        raise ConfigError(f"{config.pinned_slots} staging slots (--pinned-slots) of --batch-size "
                          f"{args.batch_size} x --seq-len {args.seq_len} tokens need {needed / 1e9:,.2f} GB "
                          f"of host memory ({row_bytes:,} bytes per token), more than "
                          f"{SLOT_MEMORY_SHARE:.0%} of the {available / 1e9:,.2f} GB available: lower "
                          "--pinned-slots, --batch-size or --seq-len")


def _extra_modules(args: argparse.Namespace) -> dict[str, str]:
    names = [name for name, _ in args.extra_modules]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--extra-modules names {', '.join(repeated)} more than once: give each module its "
                          "own name")
    return dict(args.extra_modules)


def _check_model_name(name: str) -> None:
    """A --model that is neither a path nor a registry name fails here, before transformers is imported (a
    path is read later, with its config)."""
    if not Path(name).expanduser().exists():
        get_model(name)


def _continues_a_store(args: argparse.Namespace) -> bool:
    """Whether this run resumes the store at --out; refuses, changing nothing, an --out that cannot be
    written, a store in the way or being written, and --resume without a store. Checked before any process of
    a torchrun job has joined (so before any could create a store): every process sees the same state."""
    from engine.format.location import Location
    from engine.store.lifecycle import check_location
    from engine.store.lock import check_unlocked

    location = Location.of(args.out)
    check_unlocked(location, args.break_lock)  # a store being written is refused before anything else
    resume = args.resume or args.resume_or_start
    exists = check_location(location, overwrite=args.overwrite, resume=resume)  # changes nothing
    if args.resume and not exists:
        raise ConfigError(f"--resume: there is no capture store at {args.out}: check the path, or pass "
                          "--resume-or-start to start a new store when there is none")
    return exists and resume


def _weightless_model(name: str, seq_len: int) -> torch.nn.Module:
    """The model's architecture on the meta device (no weights are read), once --seq-len is known to fit its
    positions."""
    from engine.models.loading import architecture_config, max_positions, meta_model

    model_config = architecture_config(name)
    positions = max_positions(model_config)
    if positions is not None and seq_len > positions:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {positions} positions: pass "
                          f"--seq-len {positions} or less")
    return meta_model(model_config)


def _capture_config(args: argparse.Namespace, model_config, extra_modules: dict[str, str], world_size: int,
                    resume: bool) -> CaptureConfig:
    from engine.capture.config import CaptureConfig

    spec = find_model(args.model)
    layers = args.layers if args.layers is not None else [
        spec.default_probe_layer if spec else model_config.num_hidden_layers // 2]
    return CaptureConfig(args.out, layer_indices=layers, points=list(args.hooks), extra_modules=extra_modules,
                         dtype=args.dtype, chunk_tokens=args.chunk_tokens, num_writers=args.num_writers,
                         pinned_slots=args.pinned_slots, max_batch_tokens=args.batch_size * args.seq_len,
                         resume=resume,
                         overwrite=args.overwrite and not args.resume, early_stop=not args.no_early_stop,
                         model_name=args.model, annotations=ANNOTATIONS, statistics=not args.no_statistics,
                         distributed=world_size > 1, break_lock=args.break_lock,
                         outlier_norm_ratio=args.outlier_norm_ratio)


def _row_bytes(widths: dict[str, int], dtype: str) -> dict[str, int]:
    return {**{key: stored_row_bytes(dtype, width) for key, width in widths.items()},
            **{key: dt.itemsize for key, dt in token_arrays(ANNOTATIONS).items()}}


def _tokenizer(args: argparse.Namespace):
    from engine.models.loading import load_tokenizer

    source = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(source, allow_download=args.allow_download)
    except EngineError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a tokenizer from {source} ({error}): pass --tokenizer with a folder "
                          "holding one") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer of {source} is not a fast one: character offsets need the "
                          "tokenizers library's; pass --tokenizer with a folder holding a tokenizer.json")
    return tokenizer


def _counted(args: argparse.Namespace, corpus: Corpus, tokenizer,
             stream: Iterator[TokenSequence]) -> tuple[SequenceCounts, list[int]]:
    """The counting pass: totals, and every sequence's length (what torchrun shares are cut from); a job
    with no sequence at all is refused."""
    counts, lengths = SequenceCounts(), []
    for sequence in stream:
        counts.add(sequence)
        lengths.append(len(sequence.ids))
    if not lengths:
        first = next(sequences(corpus.documents(), tokenizer, args.seq_len, args.pack), None)
        if first is None:
            raise CorpusError(f"{corpus.description} holds no text: nothing to capture")
        raise ConfigError(f"--max-tokens {args.max_tokens} is less than the first row's {len(first.ids)} "
                          "tokens: nothing to capture; raise --max-tokens")
    return counts, lengths


def _check_resume(out: str, manifest: Manifest, first: int, stop: int | None,
                  world_size: int) -> tuple[int, bool]:
    """Refuse, before the weights load and before the store is touched, a resume the store cannot take: one
    captured with other options (``resume_mismatches`` names each), or one whose sequences end before what
    the store (this process's part) already holds (that run could only stop at once, after repairing the
    store for nothing). Returns the sequence the resume continues from and whether the store is complete."""
    from engine.capture.manifest import resume_mismatches
    from engine.read.reader import open_store

    store = open_store(out)
    if world_size > 1 and len(store.parts) != world_size:
        return first, False  # CaptureEngine names this mismatch (one process: the manifests' world_size)
    part = store.parts[_rank()]
    stored = store.manifest if world_size == 1 else part.manifest
    if stored is None:  # this rank's part was never created
        return first, False
    mismatches = resume_mismatches(stored, manifest)
    if mismatches:
        raise ResumeMismatchError(f"--resume: {out} was captured with other options "
                                  f"({'; '.join(mismatches)}): resume with the options it was captured with "
                                  "(inspect shows them), or replace it: --overwrite without --resume")
    held = _resume_sequences(part)
    if stop is not None and held > stop:
        rank = _rank()
        where = f"its part for rank {rank} holds" if world_size > 1 else "it holds"
        raise ConfigError(f"--resume: {where} {held - first:,} sequences but this job has only "
                          f"{stop - first:,} with these options: resume with the --data, --seq-len, "
                          "--pack/--no-pack and --max-tokens it was captured with (nothing was changed in "
                          f"{out})")
    return max(held, first), stored.status == STATUS_COMPLETE


def _resume_sequences(part: StorePart) -> int:
    """Where a resume of ``part`` continues (a global sequence index), as ``CaptureEngine`` will find it."""
    from engine.store.resume import find_resume_point

    if part.group is None:
        return 0
    resume_point = find_resume_point(part.group, part.chunks, part.manifest)
    return resume_point.sequences if resume_point.committed_rows else 0


def _print_plan(args: argparse.Namespace, job: _Job, tag: str) -> None:
    """Print what the job will store and its expected size on disk (on a resume: what is left to capture)."""
    config = job.config
    points = [*config.points, *(f"extra/{name}" for name in config.extra_modules)]
    packing = (f"rows packed into {args.seq_len}-token windows (each document after a BOS/EOS separator)"
               if args.pack else f"one document per row, cut at --seq-len {args.seq_len}")
    print(f"{tag} {args.model} layers {list(config.layer_indices)} {points} -> {args.out}; {packing}")
    per_token = sum(job.row_bytes.values())
    if job.lengths is None:
        bound = (f"at most {args.max_tokens:,} tokens, at most "
                 f"{size_text(_expected_store_bytes(args.max_tokens, job.row_bytes, config.chunk_tokens))}"
                 if args.max_tokens is not None else "no total until it ends (--max-tokens bounds it)")
        print(f"{tag} a streamed corpus is not counted first: {bound}; {per_token:,} bytes per token")
        return
    rows, tokens = job.stop - job.first, sum(job.lengths[job.first:job.stop])
    size = _expected_store_bytes(tokens, job.row_bytes, config.chunk_tokens)
    expected = (f"expected store size {size_text(size)} on disk ({size:,} bytes: {per_token:,} per token "
                "plus chunk metadata)")
    held = job.resumes_at - job.first
    if held:
        left = sum(job.lengths[job.resumes_at:job.stop])
        print(f"{tag} resuming: {left:,} tokens in {rows - held:,} rows left to capture (sequences "
              f"{job.resumes_at:,}..{job.stop - 1:,}; the store holds the first {held:,} of {rows:,}), "
              f"{expected} when done")
    else:
        print(f"{tag} {tokens:,} tokens in {rows:,} rows (sequences {job.first:,}..{job.stop - 1:,}), "
              f"{expected}")
    if not args.pack:
        print(f"{tag} {_cut_report(job.counts, args.seq_len)}")


def _expected_store_bytes(tokens: int, row_bytes: dict[str, int], chunk_tokens: int) -> int:
    """What a store of ``tokens`` rows takes on disk: each array's chunk files in whole filesystem blocks
    (the last, partial chunk's file holds only its rows' blocks: it is sparse), plus per chunk its commit
    record and the folders zarr makes (one for the record, one per chunk of each 2-D array), plus each
    array's and each group's metadata document and folders."""
    whole, tail = divmod(tokens, chunk_tokens)
    data = sum(whole * _blocks(chunk_tokens * width) + _blocks(tail * width) for width in row_bytes.values())
    chunks = whole + (tail > 0)
    activation_arrays = sum(not key.startswith("tokens/") for key in row_bytes)
    per_chunk = (2 + activation_arrays) * _BLOCK_BYTES
    per_array = 3 * _BLOCK_BYTES  # zarr.json, the array's folder, its chunk folder
    groups = len({key.split("/")[0] for key in row_bytes}) + 2  # layer_i, extra, tokens; commits; the root
    return data + chunks * per_chunk + len(row_bytes) * per_array + groups * 2 * _BLOCK_BYTES


def _blocks(nbytes: int) -> int:
    return -(-nbytes // _BLOCK_BYTES) * _BLOCK_BYTES


def _cut_report(counts: SequenceCounts, seq_len: int) -> str:
    """What --no-pack cut off: documents longer than --seq-len lose their tail."""
    if not counts.cut_documents:
        return f"--no-pack: no document was longer than --seq-len {seq_len}"
    total = counts.tokens + counts.dropped_tokens
    share = 100 * counts.dropped_tokens / total
    return (f"--no-pack: {counts.cut_documents:,} of {counts.sequences:,} documents were cut at --seq-len "
            f"{seq_len}, dropping {counts.dropped_tokens:,} of {total:,} tokens ({share:.1f}%); packing (the "
            "default) keeps every token")


def _nothing_left(tag: str, out: str, sequences: int, tokens: int) -> str:
    return (f"{tag} done: {out} already held all {sequences:,} sequences of this job ({tokens:,} tokens): "
            "nothing was captured")


# ---- the run -----------------------------------------------------------------------------------------------


def _join_process_group(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) joins the default process
    group (nccl on GPUs, gloo on CPU) and takes the GPU of its LOCAL_RANK."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world_size, device


def _run(args: argparse.Namespace, job: _Job, device: str, tag: str, quiet: bool) -> int:
    import torch

    from engine.capture.engine import CaptureEngine
    from engine.models.loading import load_model

    model = load_model(args.model, device=device, dtype=args.model_dtype, weights=args.weights,
                       allow_download=args.allow_download)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # The engine's own advice on Ctrl-C names the Python API; this command prints its own line below.
        warnings.filterwarnings("ignore", message="capture interrupted", category=UserWarning)
        try:
            with CaptureEngine(model, job.config, tokenizer=job.tokenizer) as cap, torch.no_grad():
                stream = itertools.islice(job.sequences(), job.first, job.stop)
                done = _skip(stream, cap.resume_sequences)
                if cap.resume_sequences:
                    print(f"{tag} resuming after {done.sequences:,} sequences ({done.tokens:,} tokens)")
                total = args.max_tokens if job.lengths is None else sum(job.lengths[job.first:job.stop])
                fed = _feed(model, cap, stream, job, args.batch_size, device,
                            _progress(total, done.tokens, quiet))
        except KeyboardInterrupt:
            print(f"{tag} interrupted: committed chunks are kept; to continue, run the same command with "
                  "--resume", file=sys.stderr)
            return 130
    if not fed.sequences and done.sequences:
        print(_nothing_left(tag, args.out, done.sequences, done.tokens))
        return 0
    _print_summary(tag, fed, cap.stats, time.perf_counter() - started)
    if not args.pack:
        print(f"{tag} {_cut_report(fed, args.seq_len)}")
    return 0


def _print_summary(tag: str, fed: SequenceCounts, stats: CaptureStats, elapsed: float) -> None:
    print(f"{tag} done: {fed.tokens:,} tokens stored by this run in {elapsed:.1f} s "
          f"({fed.tokens / elapsed:,.0f} tokens/s stored; pad tokens are never stored), the store holds "
          f"{stats.tokens_committed:,}; {size_text(stats.bytes_committed)} committed by this run, stalled "
          f"{stats.stall_seconds:.2f} s, queue high-water {stats.queue_high_water}")


def _progress(total: int | None, initial: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True, disable=quiet)


def _feed(model: torch.nn.Module, cap: CaptureEngine, stream: Iterator[TokenSequence], job: _Job,
          batch_size: int, device: str, progress) -> SequenceCounts:
    """Run the model over the sequences, ``batch_size`` at a time; returns what was fed (real tokens, no
    pads). The progress bar shows the bytes staged for the writer (this run's rows) and those committed."""
    tokenizer = job.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    row_bytes = sum(job.row_bytes.values())
    fed = SequenceCounts()
    with progress:
        while batch := list(itertools.islice(stream, batch_size)):
            inputs, annotations = collate(batch, pad_id)
            cap.annotate(**annotations)
            model(**{key: value.to(device) for key, value in inputs.items()})
            for sequence in batch:
                fed.add(sequence)
            progress.set_postfix_str(_progress_text(cap.stats, fed.tokens * row_bytes), refresh=False)
            progress.update(sum(len(sequence.ids) for sequence in batch))  # draws the bar and the postfix
    return fed


def _progress_text(stats: CaptureStats, staged_bytes: int) -> str:
    stall = 100 * stats.stall_seconds / max(stats.elapsed_seconds, 1e-9)
    return (f"{size_text(staged_bytes)} staged, {size_text(stats.bytes_committed)} committed, "
            f"queue {stats.queue_depth}, stall {stall:.1f}%")


def _skip(stream: Iterator[TokenSequence], count: int) -> SequenceCounts:
    """Read past the ``count`` sequences a resumed store already holds (without keeping them)."""
    skipped = SequenceCounts()
    for sequence in itertools.islice(stream, count):
        skipped.add(sequence)
    if skipped.sequences < count:
        raise ConfigError(f"the store holds {count:,} sequences but this corpus has only "
                          f"{skipped.sequences:,} with these options: resume with the same --data, "
                          "--seq-len, --pack/--no-pack and --max-tokens")
    return skipped
