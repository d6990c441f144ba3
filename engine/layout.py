"""Every on-disk name and layout rule of a capture store, in one place.

A store is one zarr v3 group:

  zarr.json                         group; attributes["manifest"] is the manifest (see README)
  layer_{i}/{point}                 (n_tokens, dim) activations, one array per captured point
  extra/{name}                      (n_tokens, dim) user-named module outputs
  tokens/input_ids|sequence|position|flags   (n_tokens,) per-token metadata; row r of every array is one token
  commits/                          group; one child group per committed chunk:
  commits/chunk_{k:012d}/zarr.json  its attributes are the chunk's commit record (written last, one PUT)

All arrays share the row chunking ``chunk_tokens``: chunk k is rows [k*chunk_tokens, (k+1)*chunk_tokens).

A multi-process store (one process per GPU, ``CaptureConfig(distributed=True)``) is a root group whose
manifest lists its parts; each part is a complete store as above, written by one rank only:

  zarr.json                         root group; manifest with "parts" (written by rank 0 only)
  parts/zarr.json                   group (rank 0)
  parts/rank_{r:05d}/...            rank r's store: its own manifest, arrays and commit records

Rows of the whole store are the parts' committed rows in rank order.
"""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "actcap"
FORMAT_VERSION = 1
MANIFEST_ATTR = "manifest"
COMMITS_GROUP = "commits"
PARTS_GROUP = "parts"

# Per-token metadata arrays and their on-disk dtypes.
TOKEN_ARRAYS: dict[str, np.dtype] = {
    "tokens/input_ids": np.dtype("int32"),
    "tokens/sequence": np.dtype("int64"),
    "tokens/position": np.dtype("int32"),
    "tokens/flags": np.dtype("uint8"),
}

ANNOTATION_DTYPES = ("int32", "int64")


def token_arrays(annotations: dict[str, str]) -> dict[str, np.dtype]:
    """Per-token arrays of a store: the fixed ones plus ``tokens/<name>`` for each annotation."""
    return {**TOKEN_ARRAYS, **{f"tokens/{name}": np.dtype(dtype) for name, dtype in annotations.items()}}


# Bits of tokens/flags.
FLAG_BOS = 1       # token id is the model's BOS id
FLAG_SPECIAL = 2   # token id is one of the model's special ids (bos / eos / pad / tokenizer specials)
FLAG_FIRST = 4     # first stored token of its sequence
FLAG_LAST = 8      # last stored token of its sequence
FLAG_BITS = {"bos": FLAG_BOS, "special": FLAG_SPECIAL, "first": FLAG_FIRST, "last": FLAG_LAST}

# Manifest status values.
STATUS_OPEN = "open"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

# Storage dtypes: name -> zarr dtype on disk. bfloat16 has no zarr dtype: its raw bits are stored as uint16
# and the array attribute "encoding" says so (view the numpy uint16 data as torch.bfloat16 to decode).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("float16"),
    "float32": np.dtype("float32"),
    "bfloat16": np.dtype("uint16"),
}
BFLOAT16_ENCODING = "bfloat16-bits-in-uint16"


def array_key(layer: int, point: str) -> str:
    """Array path of a canonical hook point."""
    return f"layer_{layer}/{point}"


def extra_array_key(name: str) -> str:
    """Array path of a user-named module."""
    return f"extra/{name}"


def commit_group_path(chunk_index: int) -> str:
    """Group path whose attributes are the commit record of one chunk."""
    return f"{COMMITS_GROUP}/chunk_{chunk_index:012d}"


def commit_record_key(chunk_index: int) -> str:
    """Store key of one chunk's commit record (a zarr v3 group metadata document)."""
    return commit_group_path(chunk_index) + "/zarr.json"


def chunk_index_of(commit_name: str) -> int | None:
    """Chunk index from a child name of the commits group, or None for anything else (zarr.json, temp files)."""
    if not commit_name.startswith("chunk_"):
        return None
    digits = commit_name[len("chunk_"):]
    return int(digits) if digits.isdigit() else None


def part_path(rank: int) -> str:
    """Path of one rank's part in a multi-process store."""
    return f"{PARTS_GROUP}/rank_{rank:05d}"
