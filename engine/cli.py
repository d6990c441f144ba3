"""Command line: ``python -m engine models | capture | inspect | align | export``."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

from .registry import find_model, list_models

_ANNOTATIONS = {"doc_id": "int64", "char_start": "int32", "char_end": "int32"}


def _models(args: argparse.Namespace) -> int:
    header = ("name", "arch", "layers", "hidden", "mlp", "probe", "hf_repo_id")
    rows = [(s.name, s.architecture, str(s.num_layers), str(s.hidden_dim), str(s.mlp_dim),
             str(s.default_probe_layer), s.hf_repo_id) for s in list_models()]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _widths(config) -> tuple[int, int]:
    """(d_model, d_mlp) from a transformers config, for the size estimate."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return hidden, mlp


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


def _capture(args: argparse.Namespace) -> int:
    import torch

    from .capture import CaptureEngine
    from .config import CaptureConfig
    from .corpus import collate, read_documents, rows, shares
    from .loading import load_model, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, device = _join_process_group(device)
    tag = f"[capture rank {rank}]" if world_size > 1 else "[capture]"
    model = load_model(args.model, device=device, dtype=args.model_dtype, weights=args.weights)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if not getattr(tokenizer, "is_fast", False):
        print("error: character offsets need a fast tokenizer (tokenizers library)", file=sys.stderr)
        return 2
    spec = find_model(args.model)
    layers = args.layers or [spec.default_probe_layer if spec else model.config.num_hidden_layers // 2]
    cfg = CaptureConfig(args.out, layer_indices=layers, capture_residual="residual" in args.hooks,
                        capture_mlp_hidden="mlp_hidden" in args.hooks, capture_mlp_out="mlp_out" in args.hooks,
                        capture_attn_out="attn_out" in args.hooks, dtype=args.dtype,
                        chunk_tokens=args.chunk_tokens, num_writers=args.num_writers,
                        pinned_slots=args.pinned_slots, resume=args.resume, overwrite=args.overwrite,
                        early_stop=not args.no_early_stop, model_name=args.model, annotations=_ANNOTATIONS,
                        statistics=not args.no_statistics, distributed=world_size > 1)

    def corpus():
        taken = 0
        for row in rows(read_documents(args.data, args.text_field), tokenizer, args.seq_len, args.pack):
            if args.max_tokens is not None and taken + len(row.ids) > args.max_tokens:
                return
            taken += len(row.ids)
            yield row

    lengths = [len(row.ids) for row in corpus()]
    first, stop = shares(lengths, world_size)[rank]  # this process's rows; sequence numbers stay global
    cfg = dataclasses.replace(cfg, first_sequence=first)
    total = sum(lengths[first:stop])
    hidden, mlp = _widths(model.config)
    row_bytes = len(layers) * sum(mlp if h == "mlp_hidden" else hidden for h in args.hooks) * (
        4 if args.dtype == "float32" else 2) + 17 + 16
    print(f"{tag} {args.model} layers {layers} {args.hooks} -> {args.out}: {total:,} tokens "
          f"(sequences {first:,}..{stop - 1:,}), expected store size {total * row_bytes / 1e9:.3f} GB")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    started = time.perf_counter()
    try:
        with CaptureEngine(model, cfg, tokenizer=tokenizer) as cap, torch.no_grad():
            stream = itertools.islice(corpus(), first, stop)
            skipped = [row for _, row in zip(range(cap.resume_sequences), stream)]
            if len(skipped) < cap.resume_sequences:
                print(f"error: the store holds {cap.resume_sequences} sequences but this corpus has only "
                      f"{len(skipped)} with these options: resume with the same --data, --seq-len, --pack and "
                      "--max-tokens", file=sys.stderr)
                return 2
            done = sum(len(row.ids) for row in skipped)
            if cap.resume_sequences:
                print(f"{tag} resuming after {cap.resume_sequences} sequences ({done:,} tokens)")
            progress = _progress(total, done, args.no_progress or rank > 0)
            while batch := [row for _, row in zip(range(args.batch_size), stream)]:
                inputs, annotations = collate(batch, pad_id)
                cap.annotate(**annotations)
                model(**{k: v.to(device) for k, v in inputs.items()})
                s = cap.stats
                progress.update(sum(len(row.ids) for row in batch))
                progress.set_postfix_str(f"{s.bytes_written / 1e9:.2f} GB, queue {s.queue_depth}, "
                                         f"stall {100 * s.stall_seconds / max(s.elapsed_seconds, 1e-9):.1f}%")
            progress.close()
    except KeyboardInterrupt:
        print(f"{tag} interrupted: committed chunks are kept; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    s = cap.stats
    elapsed = time.perf_counter() - started
    print(f"{tag} done: {s.tokens:,} tokens in {elapsed:.1f} s ({s.tokens_staged / elapsed:,.0f} tokens/s "
          f"through the model), {s.bytes_written / 1e9:.3f} GB written, stalled {s.stall_seconds:.2f} s, "
          f"queue high-water {s.queue_high_water}")
    return 0


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, disabled: bool):
    if disabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True)


def _size(store) -> str:
    if store.location.local is None:
        return "(object store)"
    return f"{sum(f.stat().st_size for f in store.location.local.rglob('*') if f.is_file()) / 1e6:.1f} MB"


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .layout import FLAG_LAST, MANIFEST_ATTR
    from .reader import open_store
    from .store import find_resume_point

    store = open_store(args.store)
    m = store.manifest
    sequences = int(np.count_nonzero(store["tokens/flags"][:] & FLAG_LAST))
    print(f"store      {store.path}")
    print(f"status     {store.status}   format {m['format']} v{m['format_version']}")
    print(f"model      {m['model']['name']} ({m['model']['architecture']})   tokenizer {m.get('tokenizer')}")
    print(f"tokens     {store.num_tokens:,} committed in {len(store.chunks)} chunks of {m['chunk_tokens']}   "
          f"sequences stored {sequences:,} (fed {m.get('sequences', 0):,})")
    print(f"on disk    {_size(store)}   dtype {m['dtype']}   compressor {m['compressor']}")
    for entry, part in zip(m.get("parts", []), store.parts):
        print(f"  part {entry['path']:22s} {entry['status']:9s} {part.num_tokens:,} tokens from sequence "
              f"{entry.get('first_sequence', 0):,}")
    for key in store.keys():
        array = store[key]
        info = m["arrays"].get(key, {})
        line = f"  {key:28s} {str(array.shape):18s} {array.dtype}"
        if info:
            overflow = sum(c["stats"][key]["fp16_overflow"] for c in store.chunks)
            nonfinite = sum(c["stats"][key]["nonfinite"] for c in store.chunks)
            line += f"  {info['tl_name'] or info['module_path']}  nonfinite {nonfinite} fp16_overflow {overflow}"
            stats = m.get("statistics", {}).get(key)
            if stats and stats.get("count") and stats.get("norm_scaling_factor") is not None:
                line += (f"  mean_sq_norm {stats['mean_squared_norm']:.4g} max_norm {stats['max_norm']:.4g} "
                         f"norm_scale {stats['norm_scaling_factor']:.4g}")
        print(line)
    if store.status != "complete":
        for part in store.parts:
            name = "" if len(store.parts) == 1 else f"{part.location.url.rsplit('/', 1)[-1]}: "
            if part.group is None:
                print(f"resume     {name}not started")
                continue
            manifest = dict(part.group.attrs[MANIFEST_ATTR])
            point = find_resume_point(part.group, part.chunks, manifest)
            done = max(point.sequences - manifest.get("first_sequence", 0), 0) if point.rows else 0
            print(f"resume     {name}--resume continues after {done:,} sequences ({point.rows:,} rows kept, "
                  f"{point.committed_rows - point.rows} rows of a cut sequence dropped)")
    return 0


def _add_token_array(location, key: str, values, attributes: dict) -> None:
    """Write a per-token int32 array (None: only list it, in a multi-process store's top manifest)."""
    import zarr

    from .layout import MANIFEST_ATTR

    group = zarr.open_group(location.zarr_store(), mode="r+")
    manifest = dict(group.attrs[MANIFEST_ATTR])
    if values is not None:
        array = group.create_array(key, shape=values.shape, chunks=(manifest["chunk_tokens"],), dtype="int32",
                                   fill_value=-1, compressors=None, overwrite=True, attributes=attributes)
        array[:] = values
    manifest["token_arrays"] = {**manifest["token_arrays"], key: "int32"}
    group.update_attributes({MANIFEST_ATTR: manifest})


def _align(args: argparse.Namespace) -> int:
    import numpy as np

    from .reader import open_store

    store = open_store(args.store)
    if "tokens/doc_id" not in store.keys():
        print("error: this store has no tokens/doc_id (capture it with `python -m engine capture`)",
              file=sys.stderr)
        return 2
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
    from .errors import EngineError
    from .saelens import export_saelens

    try:
        done = export_saelens(args.store, args.out, args.key, args.context_size, hook_name=args.hook_name,
                              dtype=args.dtype, seed=args.seed, buffer_chunks=args.buffer_chunks,
                              exclude=args.exclude)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[export] {done.rows:,} rows of {done.context_size} tokens x {done.d_in} {done.dtype} -> "
          f"{done.path} (column {done.hook_name!r}; {done.dropped_tokens} tokens after the last whole row "
          "left out)")
    print(f"[export] SAELens: use_cached_activations=True, cached_activations_path={str(done.path)!r}, "
          f"hook_name={done.hook_name!r}, context_size={done.context_size}, d_in={done.d_in}")
    return 0


def _add_export_parser(commands) -> None:
    exp = commands.add_parser("export", help="write an array as another tool's dataset (SAELens' cache)")
    exp.add_argument("store")
    exp.add_argument("--to", required=True, choices=["saelens"], help="format (saelens: a datasets folder)")
    exp.add_argument("out", help="a new folder")
    exp.add_argument("--key", required=True, help="the array, e.g. layer_6/residual")
    exp.add_argument("--context-size", type=int, required=True, help="tokens per row (SAELens' context_size)")
    exp.add_argument("--hook-name", default=None, help="column name (default: the TransformerLens hook name)")
    exp.add_argument("--dtype", default=None, choices=["float16", "float32"],
                     help="default: the store's (a bfloat16 store needs one: arrow has no bfloat16)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    exp.add_argument("--buffer-chunks", type=int, default=64, help="chunks mixed together while shuffling")
    exp.add_argument("--exclude", nargs="*", default=["bos", "first"], help="flags whose tokens are left out")
    exp.set_defaults(run=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the model registry").set_defaults(run=_models)

    cap = commands.add_parser("capture", help="capture layers of a model over a corpus into a store")
    cap.add_argument("--model", required=True, help="registry name or local model folder")
    cap.add_argument("--data", required=True, help=".txt, .jsonl or a saved datasets folder")
    cap.add_argument("--out", required=True, help="store folder or object-store URL (s3://bucket/prefix)")
    cap.add_argument("--layers", type=int, nargs="+", help="default: the model's probe layer")
    cap.add_argument("--hooks", nargs="+", default=["residual", "mlp_hidden"],
                     choices=["residual", "mlp_hidden", "mlp_out", "attn_out"])
    cap.add_argument("--seq-len", type=int, default=512)
    cap.add_argument("--batch-size", type=int, default=8)
    cap.add_argument("--max-tokens", type=int, default=None, help="stop before the row that would pass this")
    cap.add_argument("--pack", action="store_true", help="concatenate documents into full windows")
    cap.add_argument("--text-field", default="text", help="jsonl / dataset field holding the text")
    cap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    cap.add_argument("--device", default=None)
    cap.add_argument("--dtype", default="float16", help="storage dtype: float16, float32, bfloat16")
    cap.add_argument("--model-dtype", default=None, help="weights dtype (default: the checkpoint's)")
    cap.add_argument("--weights", default="required", choices=["auto", "random", "required"])
    cap.add_argument("--chunk-tokens", type=int, default=8192)
    cap.add_argument("--num-writers", type=int, default=2)
    cap.add_argument("--pinned-slots", type=int, default=4)
    cap.add_argument("--resume", action="store_true", help="continue an interrupted store exactly")
    cap.add_argument("--overwrite", action="store_true")
    cap.add_argument("--no-early-stop", action="store_true", help="run the whole model (default: stop after "
                     "the last hooked layer; later layers and the LM head never run)")
    cap.add_argument("--no-progress", action="store_true")
    cap.add_argument("--no-statistics", action="store_true", help="skip the manifest's running statistics")
    cap.set_defaults(run=_capture)

    ins = commands.add_parser("inspect", help="describe a store")
    ins.add_argument("store")
    ins.set_defaults(run=_inspect)

    ali = commands.add_parser("align", help="join span labels to tokens: writes tokens/label")
    ali.add_argument("store")
    ali.add_argument("alignment", help='jsonl of {"doc_id": int, "spans": [[char_start, char_end, "label"]]}')
    ali.set_defaults(run=_align)

    _add_export_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
