"""Page faults and CPU of gathering every row of a 614 MB store (401,408 rows x 768 float16, 49 chunk files
of 8192 rows) in random order from its chunk files mapped into one AddressRange (engine/window.py), after the
page cache was filled (a) by read() of each file, (b) by AddressRange.populate through the MADV_HUGEPAGE
mapping (what ActivationDataset's read-ahead does). Run from the repository root:
    python benchmarks/results/cpu-2026-12-07/page_faults.py
"""

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def read_all(files):
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def mapped(files) -> AddressRange:
    window = AddressRange(len(files) * CHUNK_BYTES)
    for slot, path in enumerate(files):
        fd = os.open(path, os.O_RDONLY)
        window.map_file(slot * CHUNK_BYTES, CHUNK_BYTES, fd)
        os.close(fd)
    return window


def populate(files):
    window = mapped(files)
    for start in range(0, len(files) * CHUNK_BYTES, POPULATE_STEP):
        window.populate(start, POPULATE_STEP)
    window.close()


def gather(files):
    window = mapped(files)
    rows = window.array(np.dtype(np.float16), (DIM,))
    order = np.random.default_rng(0).permutation(ROWS)
    for i in range(0, ROWS, 4096):
        np.take(rows, order[i:i + 4096], axis=0, mode="clip")
    window.close()


def measure(what, run, files):
    before, cpu, wall = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    run(files)
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{what:45s} wall {1e3 * wall:6.0f} ms  CPU {1e3 * cpu:5.0f} ms  minor faults "
          f"{after.ru_minflt - before.ru_minflt:6d}  major {after.ru_majflt - before.ru_majflt}")


root = Path(tempfile.mkdtemp())
store = synthetic_store(root / "s.zarr", DIM, 8, 512, ROWS // 4096, CHUNK)
files = sorted((store / "extra/x/c").glob("*/0"), key=lambda p: int(p.parent.name))
print(f"load average {os.getloadavg()}, {len(files)} chunk files")
for fill, run in (("read()", read_all), ("populate (MADV_HUGEPAGE)", populate)):
    for _ in range(2):
        drop(files)
        measure(f"fill the page cache by {fill}", run, files)
        for _ in range(3):
            measure(f"  gather all rows, cache filled by {fill}", gather, files)
