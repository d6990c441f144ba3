"""Cold reads of a 614 MB store's 49 chunk files (401,408 rows x 768 float16): one sequential read() of each
file into a 16 MiB buffer, against AddressRange.populate through MADV_HUGEPAGE mappings (ActivationDataset's
read-ahead) with 1, 2 and 4 files read at once, each in order. The files are dropped from the page cache
(POSIX_FADV_DONTNEED) before each. Run from the repository root:
    python benchmarks/results/cpu-2026-12-07/read_ahead_streams.py
"""

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[2])]
from engine.window import POPULATE_STEP, AddressRange  # noqa: E402
from synthetic import synthetic_store  # noqa: E402

ROWS, DIM, CHUNK = 401_408, 768, 8192
CHUNK_BYTES = CHUNK * DIM * 2


def drop(files):
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def sequential(files):
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def populate(files, streams):
    window = AddressRange(len(files) * CHUNK_BYTES)
    for slot, path in enumerate(files):
        fd = os.open(path, os.O_RDONLY)
        window.map_file(slot * CHUNK_BYTES, CHUNK_BYTES, fd)
        os.close(fd)

    def read(slots):
        for slot in slots:
            for start in range(0, CHUNK_BYTES, POPULATE_STEP):
                window.populate(slot * CHUNK_BYTES + start, min(POPULATE_STEP, CHUNK_BYTES - start))

    threads = [threading.Thread(target=read, args=(range(i, len(files), streams),)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window.close()


root = Path(tempfile.mkdtemp())
store = synthetic_store(root / "s.zarr", DIM, 8, 512, ROWS // 4096, CHUNK)
files = sorted((store / "extra/x/c").glob("*/0"), key=lambda p: int(p.parent.name))
print(f"load average {os.getloadavg()}, {len(files)} chunk files")
for _ in range(3):
    rates = []
    for name, run in (("sequential read()", sequential), ("populate x1", lambda f: populate(f, 1)),
                      ("populate x2", lambda f: populate(f, 2)), ("populate x4", lambda f: populate(f, 4))):
        drop(files)
        start = time.perf_counter()
        run(files)
        rates.append(f"{name} {len(files) * CHUNK_BYTES / (time.perf_counter() - start) / 1e6:5.0f} MB/s")
    print("; ".join(rates), flush=True)
