"""Command line: ``python -m engine models | capture | inspect | report | align | export``.

A user error (a bad option, a missing or unreadable corpus, a bad record, options the model cannot take, a
store in the way) prints one line ``error: ...`` to stderr and exits with status 2; ``--debug`` shows the
traceback instead. ``capture`` checks everything it can before it loads the model: the corpus (a local one is
read whole, counting its sequences), the model's config (positions, layers, hook points and extra modules, on
a weightless copy), the tokenizer and the output store.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from engine.capture.config import CaptureConfig
from engine.capture.engine import CaptureEngine
from engine.capture.hookpoints import (
    CANONICAL_POINTS,
    family_of,
    layer_modules,
    measure_widths,
    resolve_hook_points,
)
from engine.cli.corpus import (
    Corpus,
    SequenceCounts,
    TokenSequence,
    collate,
    open_corpus,
    sequences,
    shares,
    take_tokens,
)
from engine.errors import (
    CaptureClosedError,
    CaptureError,
    ConfigError,
    CorpusError,
    EngineError,
    HookPointError,
    StoreCorruptError,
    StoreExistsError,
)
from engine.format.chunks import DAMAGE_FIX
from engine.format.encoding import encoding_of, relative_rms_error
from engine.format.layout import (
    EXCLUDED_BY_DEFAULT,
    FLAG_LAST,
    FORMAT_NAME,
    MANIFEST_ATTR,
    STORAGE_DTYPES,
    stored_row_bytes,
    token_arrays,
)
from engine.format.location import Location
from engine.models.loading import architecture_config, load_model, load_tokenizer, meta_model
from engine.models.registry import find_model, list_models
from engine.read.reader import DecodedArray, StorePart, open_store
from engine.store.access import manifest_of, open_group
from engine.store.lifecycle import check_location
from engine.store.lock import acquire, check_unlocked
from engine.store.resume import find_resume_point

_ANNOTATIONS = {"doc_id": "int64", "char_start": "int32", "char_end": "int32"}
_BLOCK_BYTES = 4096  # filesystem block: what a file's last partial block costs on disk


def _models(args: argparse.Namespace) -> int:
    if args.points is not None:
        return _hook_points(args.points)
    _print_table(("name", "arch", "layers", "hidden", "mlp", "probe", "hf_repo_id"),
                 [(s.name, s.architecture, str(s.num_layers), str(s.hidden_dim), str(s.mlp_dim),
                   str(s.default_probe_layer), s.hf_repo_id) for s in list_models()])
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _hook_points(name_or_path: str) -> int:
    """Print every canonical hook point of a model, per layer, from its architecture config alone."""
    model = meta_model(architecture_config(name_or_path))
    layers = range(len(layer_modules(model)))
    points, missing = [], {}
    for point in CANONICAL_POINTS:
        try:
            resolve_hook_points(model, [0], [point], {})
            points.append(point)
        except HookPointError as error:
            missing[point] = str(error)
    hook_points = resolve_hook_points(model, layers, points, {})
    widths = measure_widths(model, hook_points)
    print(f"{name_or_path}: {family_of(model)}, {len(layers)} layers, {len(points)} points per layer "
          "(from the config on the meta device: no weights read)")
    _print_table(("layer", "point", "width", "module (input or output)", "tl_name"),
                 [(str(hp.layer), hp.point, str(widths[hp.key]), f"{hp.module_path} ({hp.capture})",
                   hp.tl_name) for hp in hook_points])
    for point, reason in missing.items():
        print(f"{point}: not available: {reason}")
    return 0


# ---- capture: checks before the model loads ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    """A capture job whose options were all checked before the model loads.

    Attributes:
        corpus: the documents.
        config: the capture configuration (``first_sequence`` is set per rank later).
        tokenizer: the model's fast tokenizer.
        row_bytes: bytes per token of every array of the store, by key.
        sequences: a fresh pass over the job's input sequences (``--max-tokens`` applied).
        lengths: every sequence's length (the counting pass), or None for a streamed corpus in one process.
        counts: totals of the counting pass, or None when there was none.
    """

    corpus: Corpus
    config: CaptureConfig
    tokenizer: Any
    row_bytes: dict[str, int]
    sequences: Callable[[], Iterator[TokenSequence]]
    lengths: list[int] | None
    counts: SequenceCounts | None


def _plan(args: argparse.Namespace, world_size: int, tag: str) -> _Job:
    """Check the job's options, cheapest first, and count its sequences; nothing is loaded but configs, the
    tokenizer and the corpus."""
    corpus = open_corpus(args.data, args.text_field, args.split)
    if world_size > 1 and corpus.streamed and args.max_tokens is None:
        raise ConfigError(f"{corpus.description} has no known length to share among {world_size} processes: "
                          "pass --max-tokens (every process then reads that many tokens' rows of the stream "
                          "to compute its share), or save the dataset locally")
    resume = _continues_a_store(args)
    model_config = architecture_config(args.model)
    _check_seq_len(args.seq_len, model_config)
    config = _capture_config(args, model_config, world_size, resume)
    row_bytes = _row_bytes(_point_widths(model_config, config), config.dtype)
    tokenizer = _tokenizer(args)

    def job_sequences() -> Iterator[TokenSequence]:
        return take_tokens(sequences(corpus.documents(), tokenizer, args.seq_len, args.pack), args.max_tokens)

    print(f"{tag} data: {corpus.description}" if args.data is not None else
          f"{tag} no --data given: capturing {corpus.description}; pass --data for your own corpus")
    if corpus.streamed and world_size == 1:
        return _Job(corpus, config, tokenizer, row_bytes, job_sequences, None, None)
    counts, lengths = _count_sequences(job_sequences())
    if not lengths:
        first = next(sequences(corpus.documents(), tokenizer, args.seq_len, args.pack), None)
        if first is None:
            raise CorpusError(f"{corpus.description} holds no text: nothing to capture")
        raise ConfigError(f"--max-tokens {args.max_tokens} is less than the first row's {len(first.ids)} "
                          "tokens: nothing to capture; raise --max-tokens")
    if resume:
        _check_resume_fits(args.out, lengths, world_size)
    return _Job(corpus, config, tokenizer, row_bytes, job_sequences, lengths, counts)


def _count_sequences(stream: Iterator[TokenSequence]) -> tuple[SequenceCounts, list[int]]:
    """The counting pass: totals, and every sequence's length (what torchrun shares are cut from)."""
    counts, lengths = SequenceCounts(), []
    for sequence in stream:
        counts.add(sequence)
        lengths.append(len(sequence.ids))
    return counts, lengths


def _check_seq_len(seq_len: int, model_config) -> None:
    for name in ("max_position_embeddings", "n_positions"):
        positions = getattr(model_config, name, None)
        if isinstance(positions, int) and seq_len > positions:
            raise ConfigError(f"--seq-len {seq_len} exceeds the model's {positions} positions: pass "
                              f"--seq-len {positions} or less")


def _capture_config(args: argparse.Namespace, model_config, world_size: int, resume: bool) -> CaptureConfig:
    spec = find_model(args.model)
    layers = args.layers if args.layers is not None else [
        spec.default_probe_layer if spec else model_config.num_hidden_layers // 2]
    return CaptureConfig(args.out, layer_indices=layers, points=list(args.hooks),
                         extra_modules=_extra_modules(args), dtype=args.dtype, chunk_tokens=args.chunk_tokens,
                         num_writers=args.num_writers, pinned_slots=args.pinned_slots, resume=resume,
                         overwrite=args.overwrite, early_stop=not args.no_early_stop, model_name=args.model,
                         annotations=_ANNOTATIONS, statistics=not args.no_statistics,
                         distributed=world_size > 1, break_lock=args.break_lock,
                         outlier_norm_ratio=args.outlier_norm_ratio)


def _extra_modules(args: argparse.Namespace) -> dict[str, str]:
    names = [name for name, _ in args.extra_modules]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--extra-modules names {', '.join(repeated)} more than once: give each module its "
                          "own name")
    return dict(args.extra_modules)


def _continues_a_store(args: argparse.Namespace) -> bool:
    """Whether this run resumes the store at --out. Checked before any process of a torchrun job has joined
    (so before any could create a store): every process sees the same state."""
    location = Location.of(args.out)
    exists = check_location(location, overwrite=False, resume=True)  # changes nothing
    check_unlocked(location, args.break_lock)  # a store being written is refused before anything else
    if args.resume and not exists:
        raise ConfigError(f"--resume: there is no capture store at {args.out}: check the path, or pass "
                          "--resume-or-start to start a new store when there is none")
    if exists and not (args.resume or args.resume_or_start or args.overwrite):
        raise StoreExistsError(f"a capture store already exists at {args.out}: pass --resume to continue it "
                               "or --overwrite to replace it")
    return exists and (args.resume or args.resume_or_start)


def _check_resume_fits(out: str, lengths: list[int], world_size: int) -> None:
    """Refuse, before the store is touched, a resume whose sequences end before what the store (this
    process's part) already holds: that run could only stop at once, after repairing the store for
    nothing."""
    store = open_store(out)
    if len(store.parts) != world_size:
        return  # CaptureEngine names this mismatch
    rank = int(os.environ.get("RANK", "0"))
    first, stop = shares(lengths, world_size)[rank]
    held = _resume_sequences(store.parts[rank])
    if held > stop:
        where = f"its part for rank {rank} holds" if world_size > 1 else "it holds"
        raise ConfigError(f"--resume: {where} {held - first:,} sequences but this job has only "
                          f"{stop - first:,} with these options: resume with the --data, --seq-len, "
                          "--pack/--no-pack and --max-tokens it was captured with (nothing was changed in "
                          f"{out})")


def _resume_sequences(part: StorePart) -> int:
    """Where a resume of ``part`` continues (a global sequence index), as ``CaptureEngine`` will find it."""
    if part.group is None:
        return 0
    resume_point = find_resume_point(part.group, part.chunks, part.manifest)
    return resume_point.sequences if resume_point.committed_rows else 0


def _point_widths(model_config, config: CaptureConfig) -> dict[str, int]:
    """Width of every activation array, from a weightless copy of the model on the meta device: resolving its
    hook points checks the architecture, layers and module paths as CaptureEngine will, and a forward pass of
    shapes only gives each point's width (an extra module's included)."""
    skeleton = meta_model(model_config)
    return measure_widths(skeleton, resolve_hook_points(skeleton, config.layer_indices, config.points,
                                                        config.extra_modules))


def _row_bytes(widths: dict[str, int], dtype: str) -> dict[str, int]:
    return {**{key: stored_row_bytes(dtype, width) for key, width in widths.items()},
            **{key: dt.itemsize for key, dt in token_arrays(_ANNOTATIONS).items()}}


def _tokenizer(args: argparse.Namespace):
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


# ---- capture: the run --------------------------------------------------------------------------------------


def _join_process_group(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) joins the default process
    group (nccl on GPUs, gloo on CPU) and takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world_size, device


def _capture(args: argparse.Namespace) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[capture rank {os.environ.get('RANK', '0')}]" if world_size > 1 else "[capture]"
    job = _plan(args, world_size, tag)  # every process checks before any joins (and so before any writes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, device = _join_process_group(device)
    try:
        return _run(args, job, rank, world_size, device, tag)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, job: _Job, rank: int, world_size: int, device: str, tag: str) -> int:
    first, stop = (0, None) if job.lengths is None else shares(job.lengths, world_size)[rank]
    # this process's sequences, numbered globally
    config = dataclasses.replace(job.config, first_sequence=first)
    model = load_model(args.model, device=device, dtype=args.model_dtype, weights=args.weights,
                       allow_download=args.allow_download)
    total = _print_plan(args, job, first, stop, tag)
    started = time.perf_counter()
    try:
        with CaptureEngine(model, config, tokenizer=job.tokenizer) as cap, torch.no_grad():
            stream = itertools.islice(job.sequences(), first, stop)
            done = _skip(stream, cap.resume_sequences)
            if cap.resume_sequences:
                print(f"{tag} resuming after {done.sequences:,} sequences ({done.tokens:,} tokens)")
            progress = _progress(total, done.tokens, args.no_progress or rank > 0)
            fed = _feed(model, cap, stream, job.tokenizer, args.batch_size, device, progress)
    except KeyboardInterrupt:
        print(f"{tag} interrupted: committed chunks are kept; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    s = cap.stats
    elapsed = time.perf_counter() - started
    print(f"{tag} done: {fed.tokens:,} tokens stored by this run in {elapsed:.1f} s "
          f"({fed.tokens / elapsed:,.0f} tokens/s stored; pad tokens not counted), the store holds "
          f"{s.tokens_committed:,}; {_size(s.bytes_committed)} written, stalled {s.stall_seconds:.2f} s, "
          f"queue high-water {s.queue_high_water}")
    if not args.pack:
        print(f"{tag} {_cut_report(fed, args.seq_len)}")
    return 0


def _feed(model: torch.nn.Module, cap: CaptureEngine, stream: Iterator[TokenSequence], tokenizer: Any,
          batch_size: int, device: str, progress) -> SequenceCounts:
    """Run the model over the sequences, ``batch_size`` at a time; returns what was fed (real tokens, no
    pads)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fed = SequenceCounts()
    while batch := list(itertools.islice(stream, batch_size)):
        inputs, annotations = collate(batch, pad_id)
        cap.annotate(**annotations)
        model(**{key: value.to(device) for key, value in inputs.items()})
        for sequence in batch:
            fed.add(sequence)
        s = cap.stats
        progress.update(sum(len(sequence.ids) for sequence in batch))
        progress.set_postfix_str(f"{s.bytes_committed / 1e9:.2f} GB, queue {s.queue_depth}, "
                                 f"stall {100 * s.stall_seconds / max(s.elapsed_seconds, 1e-9):.1f}%")
    progress.close()
    return fed


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


def _print_plan(args: argparse.Namespace, job: _Job, first: int, stop: int | None, tag: str) -> int | None:
    """Print what the job will store and its expected size on disk; returns its tokens (None: unknown)."""
    config = job.config
    points = [*config.points, *(f"extra/{name}" for name in config.extra_modules)]
    packing = (f"rows packed into {args.seq_len}-token windows (each document after a BOS/EOS separator)"
               if args.pack else f"one document per row, cut at --seq-len {args.seq_len}")
    print(f"{tag} {args.model} layers {list(config.layer_indices)} {points} -> {args.out}; {packing}")
    per_token = sum(job.row_bytes.values())
    if job.lengths is None:
        bound = (f"at most {args.max_tokens:,} tokens, at most "
                 f"{_size(_expected_store_bytes(args.max_tokens, job.row_bytes, config.chunk_tokens))}"
                 if args.max_tokens is not None else "no total until it ends (--max-tokens bounds it)")
        print(f"{tag} a streamed corpus is not counted first: {bound}; {per_token:,} bytes per token")
        return args.max_tokens
    tokens = sum(job.lengths[first:stop])
    size = _expected_store_bytes(tokens, job.row_bytes, config.chunk_tokens)
    print(f"{tag} {tokens:,} tokens in {stop - first:,} rows (sequences {first:,}..{stop - 1:,}), expected "
          f"store size {_size(size)} on disk ({size:,} bytes: {per_token:,} per token plus chunk metadata)")
    if not args.pack:
        print(f"{tag} {_cut_report(job.counts, args.seq_len)}")
    return tokens


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


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"


def _cut_report(counts: SequenceCounts, seq_len: int) -> str:
    """What --no-pack cut off: documents longer than --seq-len lose their tail."""
    if not counts.cut_documents:
        return f"--no-pack: no document was longer than --seq-len {seq_len}"
    total = counts.tokens + counts.dropped_tokens
    share = 100 * counts.dropped_tokens / total
    return (f"--no-pack: {counts.cut_documents:,} of {counts.sequences:,} documents were cut at --seq-len "
            f"{seq_len}, dropping {counts.dropped_tokens:,} of {total:,} tokens ({share:.1f}%); packing (the "
            "default) keeps every token")


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress(total: int | None, initial: int, disabled: bool):
    if disabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True)


# ---- inspect, align ----------------------------------------------------------------------------------------


def _allocated(store) -> str:
    """Disk space the store takes: allocated blocks as ``du`` counts them (a sparse file's holes are free)."""
    root = store.location.local
    if root is None:
        return "(object store)"
    nbytes = sum(os.lstat(path).st_blocks * 512 for path in (root, *root.rglob("*")))
    return f"{_size(nbytes)} ({nbytes:,} bytes allocated)"


def _inspect(args: argparse.Namespace) -> int:
    """Describe a store; exit status 1 (and no description) when a committed chunk is damaged."""
    try:
        store = open_store(args.store)
        problems = store.check(checksums=args.verify)
    except StoreCorruptError as error:  # a complete store whose commit records do not cover its rows
        problems = list(error.problems)
    if problems:
        print(f"damaged    {args.store}: {len(problems)} committed chunk(s) cannot be trusted:")
        for line in problems:
            print(f"  {line}")
        print(f"fix        {DAMAGE_FIX}")
        return 1
    _print_summary(store, args.verify)
    _print_arrays(store)
    if store.status != "complete":
        _print_resume_points(store)
    return 0


def _print_summary(store, verified: bool) -> None:
    m = store.manifest
    sequences = int(np.count_nonzero(store["tokens/flags"][:] & FLAG_LAST))
    print(f"store      {store.path}")
    print(f"status     {store.status}   format {FORMAT_NAME} v{m.format_version}")
    print(f"model      {m.model.get('name')} ({m.model.get('architecture')})   tokenizer {m.tokenizer}")
    print(f"tokens     {store.num_tokens:,} committed in {len(store.chunks)} chunks of {m.chunk_tokens}   "
          f"sequences stored {sequences:,} (fed {m.sequences:,})")
    print(f"on disk    {_allocated(store)}   dtype {m.dtype}   compressor {m.compressor}")
    checked = "sizes and CRC32C checksums" if verified else "sizes (--verify: checksums too)"
    unverifiable = (f"; {store.unverifiable_chunks} chunks written in format version 1 have no checksums"
                    if verified and store.unverifiable_chunks else "")
    print(f"integrity  {checked} of every committed chunk ok{unverifiable}")
    for entry, part in zip(m.parts or [], store.parts):
        print(f"  part {entry['path']:22s} {entry['status']:9s} {part.num_tokens:,} tokens from sequence "
              f"{entry.get('first_sequence', 0):,}")


def _print_arrays(store) -> None:
    m = store.manifest
    for key in store.keys():
        array = store[key]
        info = m.arrays.get(key, {})
        stored = array.codes.dtype if isinstance(array, DecodedArray) else array.dtype  # on disk, not decoded
        line = f"  {key:28s} {str(array.shape):18s} {stored}"
        if info:
            overflow = sum(c.stats[key].fp16_overflow for c in store.chunks)
            nonfinite = sum(c.stats[key].nonfinite for c in store.chunks)
            line += (f"  {info['tl_name'] or info['module_path']}  nonfinite {nonfinite} "
                     f"fp16_overflow {overflow}{_encoding_error(store, key)}")
            stats = m.statistics.get(key) or {}
            if "outlier_rows" in stats:
                line += f"  outliers {stats['outlier_rows']} (left out of the statistics and of reads)"
            if stats.get("count") and stats.get("norm_scaling_factor") is not None:
                line += (f"  mean_sq_norm {stats['mean_squared_norm']:.4g} max_norm {stats['max_norm']:.4g} "
                         f"norm_scale {stats['norm_scaling_factor']:.4g}")
        print(line)


def _encoding_error(store, key: str) -> str:
    """An 8-bit store's encoding and the relative RMS error of its decoded values (from the commit
    records); empty for other stores."""
    encoding = encoding_of(store.manifest.dtype)
    if encoding is None:
        return ""
    squared_error = sum(chunk.stats[key].squared_error or 0.0 for chunk in store.chunks)
    squared_norm = sum(chunk.stats[key].squared_norm or 0.0 for chunk in store.chunks)
    error = relative_rms_error(squared_error, squared_norm)
    return f"  {encoding.name}: relative RMS error " + ("n/a" if error is None else f"{error:.4f}")


def _print_resume_points(store) -> None:
    for part in store.parts:
        name = "" if len(store.parts) == 1 else f"{part.location.url.rsplit('/', 1)[-1]}: "
        if part.group is None:
            print(f"resume     {name}not started")
            continue
        resume_point = find_resume_point(part.group, part.chunks, part.manifest)
        done = max(resume_point.sequences - part.manifest.first_sequence, 0) if resume_point.rows else 0
        print(f"resume     {name}--resume continues after {done:,} sequences ({resume_point.rows:,} rows "
              f"kept, {resume_point.committed_rows - resume_point.rows} rows of a cut sequence dropped)")


def _add_token_array(location, key: str, values, attributes: dict) -> None:
    """Write a per-token int32 array (None: only list it, in a multi-process store's top manifest)."""
    group = open_group(location, mode="r+")
    manifest = manifest_of(group)
    if values is not None:
        array = group.create_array(key, shape=values.shape, chunks=(manifest.chunk_tokens,), dtype="int32",
                                   fill_value=-1, compressors=None, overwrite=True, attributes=attributes)
        array[:] = values
    labelled = dataclasses.replace(manifest, token_arrays={**manifest.token_arrays, key: "int32"})
    group.update_attributes({MANIFEST_ATTR: labelled.to_json()})


def _align(args: argparse.Namespace) -> int:
    """Label a store's tokens, holding its lock (a capture running into it, or another align, is refused:
    either would rewrite the manifest from its own copy and lose the other's arrays)."""
    lock = acquire(Location.of(args.store))
    try:
        return _label_tokens(args)
    finally:
        if lock is not None:
            lock.release()


def _label_tokens(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    if "tokens/doc_id" not in store.keys():
        raise ConfigError("this store has no tokens/doc_id (capture it with `python -m engine capture`)")
    spans: dict[int, list] = {}
    labels: dict[str, int] = {}
    with open(args.alignment, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                spans[int(record["doc_id"])] = sorted(record["spans"])
                for _, _, label in record["spans"]:
                    labels.setdefault(label, len(labels))
    doc_id = store["tokens/doc_id"][:]
    start, end = store["tokens/char_start"][:], store["tokens/char_end"][:]
    out = np.full(store.num_tokens, -1, dtype=np.int32)
    order = np.argsort(doc_id, kind="stable")  # one sort, then each aligned document is a slice
    sorted_ids = doc_id[order]
    for doc, doc_spans in spans.items():
        rows = order[np.searchsorted(sorted_ids, doc, "left"):np.searchsorted(sorted_ids, doc, "right")]
        rows = rows[end[rows] > start[rows]]  # special tokens cover no character
        for s, e, label in doc_spans:
            hit = rows[(start[rows] >= s) & (start[rows] < e)]  # the span holding the token's 1st character
            out[hit] = labels[label]
    attributes = {"labels": list(labels), "source": os.path.basename(args.alignment),
                  "rule": "label of the span covering the token's first character"}
    offset = 0
    for part in store.parts:  # each part gets the labels of its own rows
        if part.group is not None:
            _add_token_array(part.location, "tokens/label", out[offset:offset + part.num_tokens], attributes)
        offset += part.num_tokens
    if len(store.parts) > 1:
        _add_token_array(store.location, "tokens/label", None, attributes)
    print(f"[align] {int((out >= 0).sum()):,} of {len(out):,} tokens labelled with {len(labels)} labels "
          f"-> tokens/label")
    return 0


def _export(args: argparse.Namespace) -> int:
    from engine.read.saelens import export_saelens

    done = export_saelens(args.store, args.out, args.key, args.context_size, hook_name=args.hook_name,
                          dtype=args.dtype, seed=args.seed, buffer_chunks=args.buffer_chunks,
                          exclude=args.exclude)
    print(f"[export] {done.rows:,} rows of {done.context_size} tokens x {done.d_in} {done.dtype} -> "
          f"{done.path} (column {done.hook_name!r}; {done.dropped_tokens} tokens after the last whole row "
          "left out)")
    print(f"[export] SAELens: use_cached_activations=True, cached_activations_path={str(done.path)!r}, "
          f"hook_name={done.hook_name!r}, context_size={done.context_size}, d_in={done.d_in}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from engine.report.document import (
        write_report,  # matplotlib is an extra: only this command needs it
    )

    name = os.path.basename(os.path.normpath(args.store)).removesuffix(".zarr")
    for line in write_report(args.store, args.out or f"{name}-report", sample=args.sample).describe():
        print(f"[report] {line}")
    return 0


def _add_report_parser(commands, common: argparse.ArgumentParser) -> None:
    rep = commands.add_parser("report", parents=[common], help="draw a store: norms by position, their "
                              "histogram, drift, the capture's tokens/s and stalls (PNG + CSV, an HTML page)")
    rep.add_argument("store")
    rep.add_argument("--out", default=None, help="the report's folder (default: the store's name + -report)")
    rep.add_argument("--sample", type=_positive_int, default=None, metavar="CHUNKS",
                     help="read at most this many committed chunks, evenly spaced (default: all)")
    rep.set_defaults(run=_report)


def _add_export_parser(commands, common: argparse.ArgumentParser) -> None:
    exp = commands.add_parser("export", parents=[common],
                              help="write an array as another tool's dataset (SAELens' cache)")
    exp.add_argument("store")
    exp.add_argument("--to", required=True, choices=["saelens"], help="format (saelens: a datasets folder)")
    exp.add_argument("out", help="a new folder")
    exp.add_argument("--key", required=True, help="the array, e.g. layer_6/residual")
    exp.add_argument("--context-size", type=_positive_int, required=True,
                     help="tokens per row (SAELens' context_size)")
    exp.add_argument("--hook-name", default=None, help="column name (default: the TransformerLens hook name)")
    exp.add_argument("--dtype", default=None, choices=["float16", "float32"],
                     help="default: the store's (a bfloat16 store needs one: arrow has no bfloat16; an "
                          "8-bit store's decoded values: float32)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    exp.add_argument("--buffer-chunks", type=_positive_int, default=64,
                     help="chunks of a compressed or remote store read into memory per shuffle window "
                          "(an uncompressed local store's are mapped instead)")
    exp.add_argument("--exclude", nargs="*", default=list(EXCLUDED_BY_DEFAULT),
                     help="flags whose tokens are left out")
    exp.set_defaults(run=_export)


# ---- parser and entry point --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``error: ...`` (exit status 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type of sizes: 0 or less would capture nothing (or, packing, never end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _ratio_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 1 or 'none', got {text!r}") from None


def _module_entry(text: str) -> tuple[str, str]:
    """argparse type of --extra-modules: ``name=module.path``."""
    name, equals, path = text.partition("=")
    if not (equals and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: write name=module.path, e.g. "
                                         "q=model.layers.0.self_attn.q_proj")
    return name, path


def _closed_pipe_is_fine(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """For commands that only print: a reader that stops early (``inspect STORE | head``) ends the command
    quietly with status 0, as Unix tools do, instead of a BrokenPipeError traceback."""

    @functools.wraps(run)
    def quiet(args: argparse.Namespace) -> int:
        try:
            code = run(args)
            sys.stdout.flush()  # inside the try: a closed pipe shows on this flush
            return code
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail as well.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return quiet


def _add_capture_parser(commands, common: argparse.ArgumentParser) -> None:
    cap = commands.add_parser("capture", parents=[common],
                              help="capture layers of a model over a corpus into a store")
    cap.add_argument("--model", required=True, help="registry name or local model folder")
    cap.add_argument("--data", default=None, help="FILE.txt|.jsonl|.parquet, a folder (of .parquet files, or "
                     "saved by datasets), a glob, or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed; "
                     "offline: the local hub cache). Default: Python's own documentation (a few hundred "
                     "thousand tokens)")
    cap.add_argument("--split", default="train", help="split of a dataset (hf: or a saved DatasetDict)")
    cap.add_argument("--text-field", default="text", help="jsonl / parquet / dataset field holding the text")
    cap.add_argument("--out", required=True, help="store folder or object-store URL (s3://bucket/prefix)")
    cap.add_argument("--layers", type=int, nargs="+", help="default: the model's probe layer")
    cap.add_argument("--hooks", nargs="*", default=["residual", "mlp_hidden"], choices=list(CANONICAL_POINTS),
                     help="canonical points per layer (none: only --extra-modules; `models --points MODEL` "
                     "lists a model's)")
    cap.add_argument("--extra-modules", nargs="+", type=_module_entry, default=[], metavar="NAME=MODULE.PATH",
                     help="also capture these modules' outputs, at extra/NAME (paths as in "
                     "model.named_modules())")
    cap.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per row")
    cap.add_argument("--batch-size", type=_positive_int, default=8)
    cap.add_argument("--max-tokens", type=_positive_int, default=None,
                     help="stop before the row that would pass this (needed for hf: data under torchrun)")
    cap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                     help="join documents, each after the tokenizer's BOS (else EOS) token, into full "
                     "--seq-len windows (default); --no-pack: one document per row, cut at --seq-len (the "
                     "job reports what was cut)")
    cap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    cap.add_argument("--device", default=None)
    cap.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES),
                     help="storage dtype; int8 and float8_e4m3 store 8-bit codes with a float32 scale per "
                          "row (half of float16's bytes; what it costs the SAE: docs/format.md)")
    cap.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="weights dtype (default: the checkpoint's)")
    cap.add_argument("--weights", default="required", choices=["auto", "random", "required"])
    cap.add_argument("--allow-download", action="store_true",
                     help="let the model and tokenizer come from the Hugging Face Hub (default: local only)")
    cap.add_argument("--chunk-tokens", type=_positive_int, default=8192)
    cap.add_argument("--outlier-norm-ratio", type=_ratio_or_none, default=10.0, metavar="RATIO",
                     help="flag rows whose norm exceeds RATIO times their neighbours' median as outliers "
                          "(left out of the statistics and of reads by default); 'none' flags none")
    cap.add_argument("--num-writers", type=_positive_int, default=2)
    cap.add_argument("--pinned-slots", type=_positive_int, default=4)
    store = cap.add_mutually_exclusive_group()
    store.add_argument("--resume", action="store_true", help="continue the interrupted store at --out "
                       "exactly (an error when there is none)")
    store.add_argument("--resume-or-start", action="store_true", help="continue the store at --out if there "
                       "is one, else start it (for jobs that are requeued)")
    store.add_argument("--overwrite", action="store_true", help="replace the store at --out")
    cap.add_argument("--break-lock", action="store_true", help="take over an object-store (s3://) store "
                     "whose writer was killed: its lock's heartbeat is older than the lease (60 s). Never "
                     "needed for a local folder")
    cap.add_argument("--no-early-stop", action="store_true", help="run the whole model (default: stop after "
                     "the last hooked layer; later layers and the LM head never run)")
    cap.add_argument("--no-progress", action="store_true")
    cap.add_argument("--no-statistics", action="store_true", help="skip the manifest's running statistics")
    cap.set_defaults(run=_capture)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``python -m engine``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = _Parser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{models,capture,inspect,report,align,export}")
    models = commands.add_parser("models", parents=[common], help="list the model registry, or one model's "
                                 "hook points")
    models.add_argument("--points", metavar="NAME", help="registry name or local model folder: print its "
                        "hook points per layer (module, width, TransformerLens name) from its config alone")
    models.set_defaults(run=_closed_pipe_is_fine(_models))
    _add_capture_parser(commands, common)
    ins = commands.add_parser("inspect", parents=[common], help="describe a store (exit status 1 when a "
                              "committed chunk is damaged)")
    ins.add_argument("store")
    ins.add_argument("--verify", action="store_true", help="also verify every committed chunk's CRC32C "
                     "(reads the whole store; sizes are always checked)")
    ins.set_defaults(run=_closed_pipe_is_fine(_inspect))
    _add_report_parser(commands, common)
    ali = commands.add_parser("align", parents=[common],
                              help="join span labels to tokens: writes tokens/label")
    ali.add_argument("store")
    ali.add_argument("alignment", help='jsonl of {"doc_id": int, "spans": [[char_start, char_end, "label"]]}')
    ali.set_defaults(run=_align)
    _add_export_parser(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user error, printed as one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CaptureError, CaptureClosedError):  # failures of a run, not of its options: the traceback helps
        raise
    except EngineError as error:
        if args.debug:
            raise
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
