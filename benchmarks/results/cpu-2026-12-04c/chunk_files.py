"""What a durable chunk's file pattern costs the disk, without the pipeline: 30 chunks per variant, the
variants in a shuffled order in each of 10 rounds, each into an empty folder after os.sync(); MB/s of
activation rows (63 MB per chunk: gpt2-small residual + mlp_hidden widths, 8192 float16 rows).

  raw 2 files           the writer benchmark's raw baseline: each activation file O_DIRECT + fsync
  ours 2 files + rec    engine.files.write_files_atomic of the two activation files, then a commit record
  ours 6 files + rec    ... with the four token arrays' files too (what a chunk really writes)
  ours 6, small bytes   ... the token files written buffered (from bytes) instead of with O_DIRECT
  ours 6, syncs in parallel  ... each pass's fsyncs issued from 8 threads at once

    python benchmarks/results/cpu-2026-12-04c/chunk_files.py
"""
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import engine.files as F  # noqa: E402

ROWS, CHUNKS, ROUNDS = 8192, 30, 10
ACTIVATIONS = [F.page_aligned_empty((ROWS, dim), np.float16) for dim in (768, 3072)]
TOKENS = [F.page_aligned_empty((ROWS,), dtype) for dtype in (np.int32, np.int64, np.int32, np.uint8)]
for array in ACTIVATIONS + TOKENS:
    array.fill(1)
TOKEN_BYTES = [array.tobytes() for array in TOKENS]
NAMES = ["p0", "p1", "input_ids", "sequence", "position", "flags"]
POOL = concurrent.futures.ThreadPoolExecutor(8)


def chunk(root, k, arrays, write=F.write_files_atomic):
    write([(root / name / "c" / str(k), data, None) for name, data in zip(NAMES, arrays)], True)
    F.write_file_atomic(root / "records" / f"{k}.json", json.dumps({"chunk": k}).encode(), True)


def raw(root, k):
    for name, block in zip(NAMES, ACTIVATIONS):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT
        fd = os.open(root / name / "c" / f"raw{k}", flags, 0o644)
        try:
            os.write(fd, block.data)
            os.fsync(fd)
        finally:
            os.close(fd)


def parallel_syncs(files, durable):
    changed, partials, descriptors = set(), [], []
    for path, data, size in files:
        F._make_folders(path.parent, changed)
        partials.append(path.with_name(f".{path.name}.partial"))
        descriptors.append(F._write_new_file(partials[-1], data, size)[0])
    list(POOL.map(F.sync_to_disk, descriptors))
    for fd in descriptors:
        os.close(fd)
    for partial, (path, _, _) in zip(partials, files):
        os.replace(partial, path)
        changed.add(path.parent)
    list(POOL.map(F.fsync_folder, changed))


VARIANTS = {
    "raw 2 files": raw,
    "ours 2 files + rec": lambda root, k: chunk(root, k, ACTIVATIONS),
    "ours 6 files + rec": lambda root, k: chunk(root, k, ACTIVATIONS + TOKENS),
    "ours 6, small bytes": lambda root, k: chunk(root, k, ACTIVATIONS + TOKEN_BYTES),
    "ours 6, syncs in parallel": lambda root, k: chunk(root, k, ACTIVATIONS + TOKENS, parallel_syncs),
}


def main():
    base = Path(tempfile.mkdtemp(prefix="chunk_files_", dir=Path.cwd()))
    try:
        rates = {name: [] for name in VARIANTS}
        for _ in range(ROUNDS):
            order = list(VARIANTS)
            random.shuffle(order)
            for name in order:
                root = base / "run"
                for folder in NAMES + ["records"]:
                    F.make_folders(root / folder / "c", True)
                os.sync()
                start = time.perf_counter()
                for k in range(CHUNKS):
                    VARIANTS[name](root, k)
                seconds = time.perf_counter() - start
                rates[name].append(CHUNKS * sum(a.nbytes for a in ACTIVATIONS) / 1e6 / seconds)
                shutil.rmtree(root)  # the disk as empty for every variant
        for name, series in rates.items():
            print(f"{name:26s} median {statistics.median(series):5.0f} MB/s  "
                  f"({', '.join(f'{x:.0f}' for x in series)})")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
