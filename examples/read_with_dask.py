"""Read a capture store with dask and zarr alone (no engine code): the on-disk contract in practice.

    python examples/read_with_dask.py acts.zarr layer_15/residual     # the README's first capture
    python examples/read_with_dask.py s3://bucket/acts.zarr layer_15/residual

The second reads the same capture written with ``--out s3://bucket/acts.zarr`` (AWS_* variables set).

A store written by several processes (torchrun) lists its parts in the manifest; each part is a store of its
own, and the whole store is the parts' committed rows in rank order. The manifest's row counts are exact once
the store is complete; while it is written, or after a crash, they lag the commit records: read such a store
with engine.open_store, which trusts the commit records.
"""

import sys

import dask.array as da
import zarr

path, key = sys.argv[1], sys.argv[2]
manifest = zarr.open_group(path, mode="r").attrs["manifest"]
print("status", manifest["status"], "committed tokens", manifest["committed_tokens"])
if manifest["status"] != "complete":
    print("warning: not complete: the row counts below may lag the commit records (use engine.open_store)")
parts = manifest.get("parts") or [{"path": "", "committed_tokens": manifest["committed_tokens"]}]


def load(name: str) -> da.Array:
    """One array over every part, committed rows only."""
    pieces = [da.from_zarr(path, component=f"{part['path']}/{name}".lstrip("/"))[: part["committed_tokens"]]
              for part in parts if part["committed_tokens"]]
    if not pieces:
        sys.exit("no committed rows yet")
    return da.concatenate(pieces)


acts, flags = load(key), load("tokens/flags")
not_bos = (flags & manifest["flag_bits"]["bos"]) == 0
print(key, acts.shape, acts.dtype, "chunks", acts.chunksize, "parts", len(parts))
print("mean norm (BOS excluded):",
      float(da.linalg.norm(acts[not_bos.compute()].astype("float32"), axis=1).mean()))
