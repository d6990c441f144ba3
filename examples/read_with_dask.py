"""Read a capture store with dask and zarr alone (no engine code): the on-disk contract in practice.

    python examples/read_with_dask.py /tmp/gpt2_acts.zarr layer_6/residual
"""

import sys

import dask.array as da
import zarr

path, key = sys.argv[1], sys.argv[2]
group = zarr.open_group(path, mode="r")
manifest = group.attrs["manifest"]
print("status", manifest["status"], "committed tokens", manifest["committed_tokens"])
acts = da.from_zarr(path, component=key)[: manifest["committed_tokens"]]  # trust committed rows only
flags = da.from_zarr(path, component="tokens/flags")[: manifest["committed_tokens"]]
not_bos = (flags & manifest["flag_bits"]["bos"]) == 0
print(key, acts.shape, acts.dtype, "chunks", acts.chunksize)
print("mean norm (BOS excluded):", float(da.linalg.norm(acts[not_bos.compute()].astype("float32"), axis=1).mean()))
