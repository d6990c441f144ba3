"""PASS or FAIL for each GPU target, from the JSON files ``gpu_check.sh`` writes (one line per target, with
the numbers it is judged on); exit status 1 when a target fails or its run is missing, 0 when all passed.

    python benchmarks/gpu_targets.py benchmarks/results/gpu-<date>

Targets (issue #27; benchmarks/README.md): gpt2 4x512 overhead <= 5% with the null sink and <= 10% with the
zarr sink; 32x512 with the zarr sink >= 0.9 of what the disk allows (the raw sequential write of the same
chunk files); GPU memory overhead <= 2% of the device in every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

MAX_OVERHEAD_PERCENT = {"b4_null": 5.0, "b4_zarr": 10.0}
MIN_DISK_SHARE = 0.9  # b32_zarr's store rate / the raw write's
MAX_GPU_MEMORY_SHARE = 0.02


class Verdict(NamedTuple):
    target: str
    passed: bool
    detail: str


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdicts(folder: Path) -> list[Verdict]:
    """Every target's verdict from the runs in ``folder`` (a missing run fails its target)."""
    out = []
    for name, limit in MAX_OVERHEAD_PERCENT.items():
        run = _load(folder, name)
        if run is None:
            out.append(Verdict(f"{name} overhead <= {limit:g}%", False, f"no {name}.json"))
            continue
        overhead = run["overhead_percent"]
        out.append(Verdict(f"{name} overhead <= {limit:g}%", overhead <= limit,
                           f"{overhead:.1f}% (steady {run['steady_overhead_percent']:.1f}%, spread "
                           f"{run['ratio_spread']})"))
    out.append(_disk_share(_load(folder, "b32_zarr"), _load(folder, "raw_disk")))
    for path in sorted(folder.glob("b*.json")):
        run = json.loads(path.read_text())
        if run.get("gpu_total_memory_gb"):
            share = run["gpu_memory_overhead_gb"] / run["gpu_total_memory_gb"]
            detail = f"{run['gpu_memory_overhead_gb']:.2f} of {run['gpu_total_memory_gb']:.0f} GiB"
            out.append(Verdict(f"{path.stem} GPU memory overhead <= {MAX_GPU_MEMORY_SHARE:.0%}",
                               share <= MAX_GPU_MEMORY_SHARE, detail))
    return out


def _disk_share(run: dict | None, raw: dict | None) -> Verdict:
    target = f"b32_zarr store rate >= {MIN_DISK_SHARE} of the raw write"
    if run is None or raw is None:
        return Verdict(target, False, "no b32_zarr.json or raw_disk.json")
    raw_mb_per_s = max(raw["raw_durable_mb_per_s"])
    share = run["hooked_mb_per_s"] / raw_mb_per_s
    return Verdict(target, share >= MIN_DISK_SHARE,
                   f"{run['hooked_mb_per_s']:.0f} of {raw_mb_per_s:.0f} MB/s ({share:.2f})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python benchmarks/gpu_targets.py RESULTS_FOLDER (what gpu_check.sh wrote)",
              file=sys.stderr)
        return 2
    results = verdicts(Path(argv[0]))
    for verdict in results:
        print(f"{'PASS' if verdict.passed else 'FAIL'}  {verdict.target}: {verdict.detail}")
    return 0 if all(verdict.passed for verdict in results) else 1


if __name__ == "__main__":
    sys.exit(main())
