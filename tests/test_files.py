"""Durable local files: the bytes on disk are exactly the data, whether they went with O_DIRECT or not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine import files
from engine.files import DIRECT_UNIT, direct_length, page_aligned_empty, write_file_atomic

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux only")


def test_page_aligned_arrays_qualify_for_direct_writes():
    rows = page_aligned_empty((100, 96), np.float16)
    assert rows.shape == (100, 96) and rows.dtype == np.float16 and rows.ctypes.data % DIRECT_UNIT == 0
    if hasattr(os, "O_DIRECT"):
        assert direct_length(rows) == rows.nbytes // DIRECT_UNIT * DIRECT_UNIT > 0
    assert direct_length(rows[1:]) == 0, "a misaligned start"
    assert direct_length(rows[:, :10]) == 0, "not contiguous"
    assert direct_length(rows.tobytes()) == 0, "bytes are never aligned on purpose"


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("extra", [0, 100], ids=["whole-units", "with-tail"])
def test_written_file_holds_exactly_the_data(tmp_path, durable, extra):
    rng = np.random.default_rng(extra)
    data = page_aligned_empty((3 * DIRECT_UNIT + extra,), np.uint8)
    data[:] = rng.integers(0, 256, data.shape, dtype=np.uint8)
    size = 5 * DIRECT_UNIT
    path = tmp_path / "c" / "0" / "0"
    write_file_atomic(path, data, durable, size)
    stored = np.fromfile(path, dtype=np.uint8)
    assert stored.size == size
    np.testing.assert_array_equal(stored[:data.size], data)
    assert not stored[data.size:].any(), "the hole past the data reads as zeros"
    assert list(path.parent.iterdir()) == [path], "no temporary file left"


def test_a_file_on_tmpfs_holds_exactly_the_data(tmp_path):
    """tmpfs refuses O_DIRECT on older kernels and takes it on newer ones: either way, the same bytes."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    data = page_aligned_empty((2 * DIRECT_UNIT + 7,), np.uint8)
    data[:] = np.arange(data.size) % 251
    path = Path(f"/dev/shm/actcap-test-{os.getpid()}")
    try:
        write_file_atomic(path, data, durable=True)
        np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint8), data)
    finally:
        path.unlink(missing_ok=True)


@needs_o_direct
def test_a_refused_direct_write_leaves_the_rest_to_a_buffered_one(tmp_path):
    """The kernel refuses an O_DIRECT write from a misaligned buffer (EINVAL): nothing is written that way and
    the caller writes everything buffered."""
    data = page_aligned_empty((2 * DIRECT_UNIT + 1,), np.uint8)
    data[:] = 9
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert files._write_direct(fd, memoryview(data)[1:]) == 0
    finally:
        os.close(fd)
    assert os.path.getsize(tmp_path / "f") == 0
