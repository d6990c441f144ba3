"""Does the writer process's per-chunk CPU work run side by side in its threads? Times the statistics
(engine.statistics.chunk_summary, at several BLOCK_BYTES) and the CRC32C (google-crc32c, which zarr brings,
and the crc32c package) over two 50 MB float16 chunk arrays (8192 x 3072), both in one thread and in two
threads at once; and, for reference, the statistics in two processes at once (no GIL). Best of 5.

    python benchmarks/results/cpu-2026-12-04c/gil.py
"""
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import engine.statistics as S  # noqa: E402

ROWS, DIM, REPEATS = 8192, 3072, 4


def arrays():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((ROWS, DIM)).astype(np.float16) for _ in range(2)]


FLAGS = np.zeros(ROWS, np.uint8)


def statistics_work(x):
    for _ in range(REPEATS):
        S.chunk_summary(x, "float16", FLAGS)


def google_work(x):
    import google_crc32c
    data = x.view()
    data.flags.writeable = False
    for _ in range(REPEATS):
        google_crc32c.value(data)


def crc32c_work(x):
    import crc32c
    for _ in range(REPEATS):
        crc32c.crc32c(x)


def best(f, n=5):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def one_vs_two_threads(work, xs):
    alone = best(lambda: [work(x) for x in xs])

    def together():
        threads = [threading.Thread(target=work, args=(x,)) for x in xs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    both = best(together)
    per_chunk = 1e3 / (REPEATS * len(xs))
    return alone * per_chunk, both * per_chunk, alone / both


def in_process(block_bytes):
    S.BLOCK_BYTES = block_bytes
    x = arrays()[0]
    return best(lambda: statistics_work(x))


def main():
    xs = arrays()
    print("# per 50 MB chunk array, ms: one thread doing both arrays | two threads, one array each | speedup")
    for mib in (1, 2, 4, 8, 16):
        S.BLOCK_BYTES = mib << 20
        a, b, s = one_vs_two_threads(statistics_work, xs)
        print(f"statistics, BLOCK_BYTES {mib:2d} MiB: {a:5.1f} | {b:5.1f} | {s:.2f}")
    for name, work in (("google-crc32c", google_work), ("crc32c package", crc32c_work)):
        a, b, s = one_vs_two_threads(work, xs)
        print(f"CRC32C, {name:14s}: {a:5.1f} | {b:5.1f} | {s:.2f}")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for mib in (1, 4):
            alone = pool.apply(in_process, (mib << 20,))
            both = max(pool.map(in_process, [mib << 20] * 2))
            print(f"statistics, BLOCK_BYTES {mib:2d} MiB, two processes: "
                  f"alone {alone / REPEATS * 1e3:5.1f} ms per chunk array | "
                  f"both at once {both / REPEATS * 1e3:5.1f} each | speedup {2 * alone / both:.2f}")


if __name__ == "__main__":
    main()
