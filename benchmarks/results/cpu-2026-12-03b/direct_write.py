"""CPU of writing one durable chunk of the small passive benchmark (4096 rows: 1024- and 256-wide float16,
four 8-byte token arrays: 10.5 MB in six files) with engine.files.write_file_atomic: from page-aligned buffers
(O_DIRECT) vs from ordinary ones (buffered write, fsync, page-cache drop). 8 alternating rounds of 30 chunks;
thread CPU and wall time per chunk."""
import statistics, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from engine.files import direct_length, page_aligned_empty, write_file_atomic  # noqa: E402

shapes = [((4096, 1024), np.float16), ((4096, 256), np.float16)] + [((4096,), np.int64)] * 4
kinds = {"direct": [page_aligned_empty(s, d) for s, d in shapes],
         "buffered": [np.empty(s, d)[1:] for s, d in ((((s[0] + 1,) + s[1:]), d) for s, d in shapes)]}
for arrays in kinds.values():
    for a in arrays:
        a[...] = 1
assert all(direct_length(a) for a in kinds["direct"]) and not any(direct_length(a) for a in kinds["buffered"])
results = {kind: {"cpu": [], "wall": []} for kind in kinds}
with tempfile.TemporaryDirectory(dir=Path.home()) as root:
    for r in range(8):
        for kind, arrays in kinds.items():
            cpu, wall = time.thread_time(), time.perf_counter()
            for c in range(30):
                for i, a in enumerate(arrays):
                    write_file_atomic(Path(root) / kind / str(i) / f"{r}.{c}", a, durable=True)
            results[kind]["cpu"].append((time.thread_time() - cpu) / 30 * 1000)
            results[kind]["wall"].append((time.perf_counter() - wall) / 30 * 1000)
for kind, r in results.items():
    print(f"{kind}: cpu ms/chunk median {statistics.median(r['cpu']):.2f} ({min(r['cpu']):.2f}..{max(r['cpu']):.2f}), "
          f"wall ms/chunk median {statistics.median(r['wall']):.2f} ({min(r['wall']):.2f}..{max(r['wall']):.2f})")
