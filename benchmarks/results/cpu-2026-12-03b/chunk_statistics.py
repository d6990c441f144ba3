"""Writer-process CPU of one chunk's statistics (chunk_summary: commit-record min/max/non-finite counts and
moments), before (numpy's float16 cast, 05193d4) and after (the bit-arithmetic decoder), for the small passive
benchmark's arrays: 4096 rows x 1024 (mlp_hidden) and x 256 (residual), float16. Median of 7 of 10 calls."""
import importlib.util, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import engine.statistics as after  # noqa: E402

old_source = subprocess.run(["git", "show", "05193d4:engine/statistics.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout.replace("from .layout", "from engine.layout")
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(old_source)
spec = importlib.util.spec_from_file_location("statistics_before", f.name)
before = sys.modules["statistics_before"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

rng = np.random.default_rng(0)
flags = np.where(np.arange(4096) % 128 == 0, 1, 0).astype(np.uint8)
for dim in (1024, 256):
    rows = (rng.standard_normal((4096, dim)) * 3).astype(np.float16)
    times = {}
    for name, module in (("before", before), ("after", after)):
        runs = []
        for _ in range(10):
            start = time.perf_counter()
            module.chunk_summary(rows, "float16", flags)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(sorted(runs)[:7]) * 1000
    print(f"4096 x {dim} float16: before {times['before']:.2f} ms, after {times['after']:.2f} ms "
          f"({times['before'] / times['after']:.1f}x)")
