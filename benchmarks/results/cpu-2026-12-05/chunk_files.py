"""A durable chunk's file pattern with an fsync per file and folder, against one syncfs per pass, without the
pipeline: ../cpu-2026-12-04c/chunk_files.py's harness (30 chunks per variant, variants shuffled in each of 10
rounds, each into an empty folder after os.sync(); MB/s of activation rows, 63 MB per chunk) with these
variants:

  raw 2 files           the writer benchmark's raw baseline: each activation file O_DIRECT + fsync
  fsync each            engine.files.write_files_atomic of the chunk's 6 files, then its commit record, with
                        an fsync of every file and changed folder (whole_filesystem_sync forced off)
  fdatasync each        the same with fdatasync for the files' data
  syncfs per pass       the same as the engine does it on ext4 / XFS / btrfs: one syncfs for a pass's files,
                        one for its folders

    python benchmarks/results/cpu-2026-12-05/chunk_files.py
"""
import importlib.util
import os
from pathlib import Path

EARLIER = Path(__file__).resolve().parents[1] / "cpu-2026-12-04c" / "chunk_files.py"
spec = importlib.util.spec_from_file_location("chunk_files_2026_12_04c", EARLIER)
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
F = harness.F
ENGINE_CHOICE = F.whole_filesystem_sync


def with_sync(whole: bool, data_sync=os.fsync):
    def variant(root, k):
        F.whole_filesystem_sync = ENGINE_CHOICE if whole else (lambda fd: False)
        original, F.os.fsync = F.os.fsync, data_sync
        try:
            harness.chunk(root, k, harness.ACTIVATIONS + harness.TOKENS)
        finally:
            F.os.fsync, F.whole_filesystem_sync = original, ENGINE_CHOICE
    return variant


if __name__ == "__main__":
    fd = os.open(Path.cwd(), os.O_RDONLY)
    print(f"# syncfs taken on this filesystem: {ENGINE_CHOICE(fd)}")
    os.close(fd)
    harness.VARIANTS = {"raw 2 files": harness.raw, "fsync each": with_sync(False),
                        "fdatasync each": with_sync(False, os.fdatasync), "syncfs per pass": with_sync(True)}
    harness.main()
