"""SAELens interop: the activation scaling its trainer uses, and export of a store to the cached-activations
layout its ``use_cached_activations=True`` loader reads.

That layout is a Hugging Face ``datasets`` folder as ``Dataset.save_to_disk`` writes it (what SAELens'
``CacheActivationsRunner`` writes): arrow files ``data-{i:05d}-of-{n:05d}.arrow``, ``dataset_info.json`` and
``state.json``. Each row is one window of ``context_size`` tokens: a column named by the hook's
TransformerLens name holding an ``Array2D((context_size, d_in))``, and ``token_ids`` (``context_size`` int32).
SAELens reads rows in order, so the export writes them already shuffled. Needs ``datasets`` (SAELens
depends on it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import torch

from engine.errors import ConfigError, StoreExistsError, StoreFormatError
from engine.format.encoding import encoding_of
from engine.format.layout import EXCLUDED_BY_DEFAULT
from engine.read.dataset import ActivationDataset
from engine.read.reader import CaptureStore, open_store

# Arrow has no bfloat16: a bfloat16 store is exported as one of these, chosen by the caller.
EXPORT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
WRITE_BYTES = 64 << 20  # activations per ActivationDataset batch, written as one arrow record batch
SHARD_BYTES = 500 << 20  # per arrow file, as save_to_disk's default


def scaling_factor(store: str | os.PathLike | CaptureStore, key: str) -> float | None:
    """SAELens' ``expected_average_only_in`` factor, ``sqrt(d_in) / mean ||x||``, from the store's statistics.

    Set it as ``trainer.activation_scaler.scaling_factor`` before ``SAETrainer.fit()``: SAELens then skips its
    own estimate (``n_batches_for_norm_estimate`` batches) and folds this factor into the SAE at the end.

    Returns: the factor, or None when the store's statistics have no ``mean_norm`` (stores from before it was
    recorded, or captured with ``statistics=False``): leave the scaler unset and SAELens estimates it.
    """
    opened = store if isinstance(store, CaptureStore) else open_store(store)
    mean_norm = opened.manifest.statistics.get(key, {}).get("mean_norm")
    return math.sqrt(opened[key].shape[1]) / mean_norm if mean_norm else None


@dataclasses.dataclass(frozen=True)
class SaelensExport:
    """What ``export_saelens`` wrote.

    Attributes:
        path: the dataset folder (``cached_activations_path``).
        hook_name: the activations' column (SAELens' ``hook_name``).
        context_size, d_in, dtype: each row's shape and dtype (SAELens' ``context_size``, ``d_in``).
        rows: windows written; ``rows * context_size`` tokens.
        dropped_tokens: tokens left over after the last whole window (fewer than ``context_size``).
    """

    path: Path
    hook_name: str
    context_size: int
    d_in: int
    dtype: str
    rows: int
    dropped_tokens: int


def export_saelens(store: str | os.PathLike | CaptureStore, out: str | os.PathLike, key: str,
                   context_size: int, hook_name: str | None = None, dtype: str | None = None, seed: int = 0,
                   buffer_chunks: int = 64, exclude: Sequence[str] = EXCLUDED_BY_DEFAULT,
                   storage_options: dict | None = None) -> SaelensExport:
    """Write one array of a store as a SAELens cached-activations dataset, rows shuffled.

    Rows come from ``ActivationDataset(shuffle=True)``, shuffled like uniform samples of each window of the
    store (all of an uncompressed local store up to 4 GiB; ``benchmarks/reader.py`` measures how well it
    mixes), packed into rows of ``context_size`` tokens; SAELens' own mixing buffer then mixes again while
    training. Its rows hold unrelated tokens, which SAELens does not mind: it flattens them to
    ``(tokens, d_in)``.

    Args:
        store: path, URL or open store.
        out: a new local folder (an existing one must be empty); written beside as ``.{name}.partial`` first.
        key: the array, e.g. ``layer_6/residual``.
        context_size: tokens per row (SAELens' ``context_size``).
        hook_name: the column's name; default the manifest's TransformerLens name of ``key``.
        dtype: ``float16`` or ``float32``; default the store's (an 8-bit store's values are decoded: float32).
            A bfloat16 store needs one (arrow has no bfloat16): ``float32`` is exact, ``float16`` halves the
            size but makes values beyond ±65504 inf.
        seed: the shuffle's seed.
        buffer_chunks: chunks of a compressed or remote store read into memory per shuffle window (64 chunks
            of 8192 tokens x 768 float16 are 0.8 GB); an uncompressed local store's chunks are mapped instead.
        exclude: flags whose tokens are left out (default as ``ActivationDataset``: attention sinks and
            outliers).
        storage_options: fsspec options when ``store`` is a URL.

    Returns: a SaelensExport describing the folder.
    """
    if importlib.util.find_spec("datasets") is None:
        raise ImportError("the SAELens export writes with the `datasets` package: "
                          "pip install 'actcap-engine[saelens]'")
    opened = store if isinstance(store, CaptureStore) else open_store(store, storage_options)
    if context_size <= 0:
        raise ConfigError(f"context_size must be positive, got {context_size}")
    column = _column_name(opened, key, hook_name)
    dtype = _export_dtype(opened.manifest.dtype, dtype)
    out = Path(out)
    _check_new_folder(out)
    windows_per_batch = max(1, WRITE_BYTES // (context_size * _row_bytes(opened, key, dtype)))
    data = ActivationDataset(opened, key, batch_size=context_size * windows_per_batch, shuffle=True,
                             seed=seed, buffer_chunks=buffer_chunks, exclude=exclude,
                             dtype=EXPORT_DTYPES[dtype], return_tokens=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        rows, dropped = _write_shards(data, partial, column, context_size, dtype)
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return SaelensExport(out, column, context_size, data.dim, dtype, rows, dropped)


def _column_name(store: CaptureStore, key: str, hook_name: str | None) -> str:
    if hook_name:
        return hook_name
    name = store.manifest.arrays.get(key, {}).get("tl_name")
    if not name:
        raise ConfigError(f"{key} has no TransformerLens hook name in the manifest (extra modules have "
                          "none): name the column with hook_name= / --hook-name (SAELens' hook_name)")
    return name


def _export_dtype(stored: str, requested: str | None) -> str:
    """The dtype written: the one asked for, else the store's (an 8-bit store's decoded values: float32)."""
    chosen = requested or ("float32" if encoding_of(stored) is not None else stored)
    if chosen == "bfloat16":
        raise ConfigError("this store is bfloat16 and arrow has no bfloat16: export with dtype='float32' / "
                          "--dtype float32 (exact, twice the size) or 'float16' (beyond ±65504: inf)")
    if chosen not in EXPORT_DTYPES:
        raise ConfigError(f"dtype {chosen!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    return chosen


def _row_bytes(store: CaptureStore, key: str, dtype: str) -> int:
    return store[key].shape[1] * EXPORT_DTYPES[dtype].itemsize


def _check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreExistsError(f"{out} exists and is not an empty folder: choose a new folder for the export")


def _write_shards(data: ActivationDataset, folder: Path, column: str, context_size: int,
                  dtype: str) -> tuple[int, int]:
    """Write the dataset's batches as windows into arrow files, then the ``datasets`` metadata beside them.
    Returns (windows written, tokens dropped)."""
    from datasets import Array2D, Features, Value, load_from_disk
    from datasets import Sequence as ArrowSequence

    features = Features({column: Array2D((context_size, data.dim), dtype),
                         "token_ids": ArrowSequence(Value("int32"), length=context_size)})
    shards, rows, dropped = _write_windows(data, folder, features, column, context_size)
    _write_metadata(folder, shards, features)
    if len(load_from_disk(str(folder))) != rows:  # the folder loads as a dataset of every window written
        raise StoreFormatError(f"the export in {folder} does not load back its {rows} rows")
    return rows, dropped


def _write_windows(data: ActivationDataset, folder: Path, features, column: str,
                   context_size: int) -> tuple[list[Path], int, int]:
    """Arrow files of about SHARD_BYTES. Returns (their paths, windows written, tokens dropped)."""
    from datasets.arrow_writer import ArrowWriter

    shards, writer, shard_bytes, rows, dropped = [], None, 0, 0, 0
    for values, ids in data:
        whole = values.shape[0] // context_size
        dropped += values.shape[0] - whole * context_size
        if not whole:
            continue
        if writer is None or shard_bytes >= SHARD_BYTES:
            if writer is not None:
                writer.finalize()
                writer.close()
            shards.append(folder / f"shard-{len(shards):05d}.arrow")
            writer, shard_bytes = ArrowWriter(features=features, path=str(shards[-1])), 0
        windows = values[:whole * context_size].reshape(whole, context_size, data.dim)
        token_ids = ids[:whole * context_size].reshape(whole, context_size)
        writer.write_batch({column: windows.numpy(), "token_ids": token_ids.numpy()})
        shard_bytes += windows.numel() * windows.element_size()
        rows += whole
    if writer is None:
        raise ConfigError(f"{data.path} has fewer than context_size={context_size} tokens to export")
    writer.finalize()
    writer.close()
    return shards, rows, dropped


def _write_metadata(folder: Path, shards: list[Path], features) -> None:
    """Name the arrow files and write dataset_info.json and state.json as ``Dataset.save_to_disk`` does (and
    SAELens' ``CacheActivationsRunner`` when it merges its shards)."""
    from datasets import DatasetInfo

    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        os.replace(shard, folder / name)
    DatasetInfo(features=features).write_to_directory(str(folder))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name} for name in names], "_fingerprint": uuid.uuid4().hex,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}, indent=2, sort_keys=True))
