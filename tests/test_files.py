"""Durable local files: the bytes on disk are exactly the data, whether they went with O_DIRECT or not."""

from __future__ import annotations

import errno
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


def takes_o_direct(folder: Path) -> bool:
    """Whether files in ``folder`` can be opened with O_DIRECT (the filesystem's answer, asked directly)."""
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (folder / ".probe").unlink()
    return True


@needs_o_direct
def test_aligned_rows_are_written_with_o_direct_where_the_filesystem_takes_it(tmp_path):
    data = page_aligned_empty((3 * DIRECT_UNIT + 5,), np.uint8)
    data[:] = 3
    direct = write_file_atomic(tmp_path / "f", data, durable=True)
    assert direct == (3 * DIRECT_UNIT if takes_o_direct(tmp_path) else 0)
    assert write_file_atomic(tmp_path / "g", data, durable=False) == direct, "scratch rows skip the cache too"
    assert write_file_atomic(tmp_path / "h", data[1:], durable=True) == 0, "misaligned rows stay buffered"


def test_an_empty_array_writes_an_empty_file(tmp_path):
    write_file_atomic(tmp_path / "f", page_aligned_empty((0, 8), np.float16), durable=True, size=64)
    assert (tmp_path / "f").read_bytes() == bytes(64)


def _refusing(monkeypatch, where: str, error: int, short_after: int | None = None) -> None:
    """A filesystem without O_DIRECT, which cannot be made here: ``where`` = "open" refuses the flag at open,
    "write" accepts it there and refuses the writes with ``error`` (``short_after``: the first write writes
    only that many bytes instead)."""
    real_open, real_write = os.open, os.write
    calls = []

    def fake_open(path, flags, *args):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(error, "O_DIRECT refused")
        return real_open(path, flags, *args)

    def fake_write(fd, payload):
        if where == "write" and files.fcntl.fcntl(fd, files.fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(len(payload))
            if short_after is None or len(calls) > 1:
                raise OSError(error, "O_DIRECT write refused")
            return real_write(fd, payload[:short_after])
        return real_write(fd, payload)

    monkeypatch.setattr(files.os, "open", fake_open)
    monkeypatch.setattr(files.os, "write", fake_write)


@needs_o_direct
@pytest.mark.parametrize("where, error, short_after", [
    ("open", errno.EINVAL, None), ("open", errno.EOPNOTSUPP, None), ("write", errno.EINVAL, None),
    ("write", errno.EINVAL, DIRECT_UNIT), ("write", errno.EINVAL, DIRECT_UNIT + 512)],
    ids=["open-einval", "open-eopnotsupp", "write-einval", "short-whole-unit", "short-part-unit"])
def test_a_filesystem_refusing_o_direct_gets_the_same_bytes_buffered(tmp_path, monkeypatch, where, error,
                                                                    short_after):
    if where == "write" and not takes_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT: its open refuses it already")
    data = page_aligned_empty((4 * DIRECT_UNIT + 9,), np.uint8)
    data[:] = np.arange(data.size) % 241
    _refusing(monkeypatch, where, error, short_after)
    direct = write_file_atomic(tmp_path / "f", data, durable=True, size=5 * DIRECT_UNIT)
    assert direct == (short_after or 0)
    stored = np.fromfile(tmp_path / "f", dtype=np.uint8)
    np.testing.assert_array_equal(stored[:data.size], data)
    assert stored.size == 5 * DIRECT_UNIT and not stored[data.size:].any()


@needs_o_direct
def test_other_write_errors_are_raised_and_leave_no_file(tmp_path, monkeypatch):
    if not takes_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    data = page_aligned_empty((2 * DIRECT_UNIT,), np.uint8)
    _refusing(monkeypatch, "write", errno.ENOSPC)
    with pytest.raises(OSError) as raised:
        write_file_atomic(tmp_path / "f", data, durable=True)
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
