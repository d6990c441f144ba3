"""CPU per 4096-row batch (768 float16) gathered from a window of 401,408 rows held as K chunks: one np.take
per chunk present in the batch, against one np.take over a single array (what engine/window.py makes of a
window). In memory, so page faults do not count. Run: python benchmarks/results/cpu-2026-12-07/gather_calls.py
"""

import os
import time

import numpy as np

D, BS, ROWS = 768, 4096, 401_408


def per_chunk(chunks, chunk_rows, order):
    for i in range(0, ROWS, BS):
        picks = np.sort(order[i:i + BS])
        out = np.empty((len(picks), D), np.float16)
        chunk, local = np.divmod(picks, chunk_rows)
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(picks)]):
            np.take(chunks[chunk[a]], local[a:b], axis=0, out=out[a:b], mode="clip")


def one_take(whole, order):
    for i in range(0, ROWS, BS):
        picks = order[i:i + BS]
        np.take(whole, picks, axis=0, out=np.empty((len(picks), D), np.float16), mode="clip")


print(f"load average {os.getloadavg()}")
order = np.random.default_rng(1).permutation(ROWS)
whole = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float16)
for k in (1, 49, 325):
    chunk_rows = -(-ROWS // k)
    chunks = [whole[s:s + chunk_rows] for s in range(0, ROWS, chunk_rows)]
    for _ in range(2):
        for name, run in (("per chunk", lambda: per_chunk(chunks, chunk_rows, order)),
                          ("one take", lambda: one_take(whole, order))):
            start = time.process_time()
            run()
            cpu = time.process_time() - start
            print(f"{k:4d} chunks  {name:9s}  {cpu / (ROWS / BS) * 1e6:5.0f} us CPU per batch")
