"""The commands that read or extend a store: ``inspect``, ``report``, ``align`` and ``export``. Each imports
what it reads a store with when it runs, so that parsing their options stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from engine.cli.arguments import HelpFormatter, positive_int
from engine.cli.output import closed_pipe_is_fine, size_text
from engine.errors import ConfigError, StoreCorruptError
from engine.format.encoding import encoding_of, relative_rms_error
from engine.format.layout import EXCLUDED_BY_DEFAULT, FLAG_LAST, FORMAT_NAME, MANIFEST_ATTR


def add_parsers(commands, common: argparse.ArgumentParser) -> None:
    """The ``inspect``, ``report``, ``align`` and ``export`` commands."""
    ins = commands.add_parser("inspect", parents=[common], formatter_class=HelpFormatter,
                              help="describe a store (exit status 1 when a committed chunk is damaged)")
    ins.add_argument("store", help="the store's folder or URL")
    ins.add_argument("--verify", action="store_true", help="also verify every committed chunk's CRC32C "
                     "(reads the whole store; sizes are always checked)")
    ins.set_defaults(run=closed_pipe_is_fine(_inspect))
    _add_report_parser(commands, common)
    ali = commands.add_parser("align", parents=[common], formatter_class=HelpFormatter,
                              help="join span labels to tokens: writes tokens/label")
    ali.add_argument("store", help="the store's folder or URL")
    ali.add_argument("alignment", help='jsonl of {"doc_id": int, "spans": [[char_start, char_end, "label"]]}')
    ali.set_defaults(run=_align)
    _add_export_parser(commands, common)


def _add_report_parser(commands, common: argparse.ArgumentParser) -> None:
    rep = commands.add_parser("report", parents=[common], formatter_class=HelpFormatter,
                              help="draw a store: norms by position, their histogram, drift, the capture's "
                              "tokens/s and stalls (PNG + CSV, an HTML page)")
    rep.add_argument("store", help="the store's folder or URL")
    rep.add_argument("--out", default=None, help="the report's folder (default: the store's name + -report)")
    rep.add_argument("--sample", type=positive_int, default=None, metavar="CHUNKS",
                     help="read at most this many committed chunks, evenly spaced (default: all)")
    rep.set_defaults(run=_report)


def _add_export_parser(commands, common: argparse.ArgumentParser) -> None:
    exp = commands.add_parser("export", parents=[common], formatter_class=HelpFormatter,
                              help="write an array as another tool's dataset (SAELens' cache)")
    exp.add_argument("store", help="the store's folder or URL")
    exp.add_argument("--to", required=True, choices=["saelens"], help="format (saelens: a datasets folder)")
    exp.add_argument("out", help="a new folder")
    exp.add_argument("--key", required=True, help="the array, e.g. layer_6/residual")
    exp.add_argument("--context-size", type=positive_int, required=True,
                     help="tokens per row (SAELens' context_size)")
    exp.add_argument("--hook-name", default=None, help="column name (default: the TransformerLens hook name)")
    exp.add_argument("--dtype", default=None, choices=["float16", "float32"],
                     help="default: the store's (a bfloat16 store needs one: arrow has no bfloat16; an "
                          "8-bit store's decoded values: float32)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    exp.add_argument("--buffer-chunks", type=positive_int, default=64,
                     help="chunks of a compressed or remote store read into memory per shuffle window "
                          "(an uncompressed local store's are mapped instead)")
    exp.add_argument("--exclude", nargs="*", default=list(EXCLUDED_BY_DEFAULT),
                     help="flags whose tokens are left out")
    exp.set_defaults(run=_export)


def _inspect(args: argparse.Namespace) -> int:
    """Describe a store; exit status 1 (and no description) when a committed chunk is damaged."""
    from engine.format.chunks import DAMAGE_FIX
    from engine.read.reader import open_store

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


def _allocated(store) -> str:
    """Disk space the store takes: allocated blocks as ``du`` counts them (a sparse file's holes are free)."""
    root = store.location.local
    if root is None:
        return "(object store)"
    nbytes = sum(os.lstat(path).st_blocks * 512 for path in (root, *root.rglob("*")))
    return f"{size_text(nbytes)} ({nbytes:,} bytes allocated)"


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
    from engine.read.reader import DecodedArray

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
    from engine.store.resume import find_resume_point

    for part in store.parts:
        name = "" if len(store.parts) == 1 else f"{part.location.url.rsplit('/', 1)[-1]}: "
        if part.group is None:
            print(f"resume     {name}not started")
            continue
        resume_point = find_resume_point(part.group, part.chunks, part.manifest)
        done = max(resume_point.sequences - part.manifest.first_sequence, 0) if resume_point.rows else 0
        print(f"resume     {name}--resume continues after {done:,} sequences ({resume_point.rows:,} rows "
              f"kept, {resume_point.committed_rows - resume_point.rows} rows of a cut sequence dropped)")


def _align(args: argparse.Namespace) -> int:
    """Label a store's tokens, holding its lock (a capture running into it, or another align, is refused:
    either would rewrite the manifest from its own copy and lose the other's arrays)."""
    from engine.format.location import Location
    from engine.read.reader import open_store
    from engine.store.lock import acquire

    open_store(args.store)  # no store there: its error, before the lock makes folders or a lock file
    lock = acquire(Location.of(args.store))
    try:
        return _label_tokens(args)
    finally:
        if lock is not None:
            lock.release()


def _label_tokens(args: argparse.Namespace) -> int:
    from engine.read.reader import open_store

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


def _add_token_array(location, key: str, values, attributes: dict) -> None:
    """Write a per-token int32 array (None: only list it, in a multi-process store's top manifest)."""
    from engine.store.access import manifest_of, open_group

    group = open_group(location, mode="r+")
    manifest = manifest_of(group)
    if values is not None:
        array = group.create_array(key, shape=values.shape, chunks=(manifest.chunk_tokens,), dtype="int32",
                                   fill_value=-1, compressors=None, overwrite=True, attributes=attributes)
        array[:] = values
    labelled = dataclasses.replace(manifest, token_arrays={**manifest.token_arrays, key: "int32"})
    group.update_attributes({MANIFEST_ATTR: labelled.to_json()})


def _report(args: argparse.Namespace) -> int:
    from engine.report.document import (
        write_report,  # matplotlib is an extra: only this command needs it
    )

    name = os.path.basename(os.path.normpath(args.store)).removesuffix(".zarr")
    for line in write_report(args.store, args.out or f"{name}-report", sample=args.sample).describe():
        print(f"[report] {line}")
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
