"""Durable local files: the bytes on disk are exactly the data, whether they went with O_DIRECT or not."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from engine.format import files
from engine.format.files import DIRECT_UNIT, direct_length, page_aligned_empty, write_file_atomic

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


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _three_files(tmp_path: Path) -> list[tuple[Path, np.ndarray, int | None]]:
    rng = np.random.default_rng(7)
    files = []
    for i, path in enumerate([tmp_path / "a" / "c" / "0" / "0", tmp_path / "b" / "c" / "0",
                              tmp_path / "b" / "c" / "1"]):
        data = page_aligned_empty((DIRECT_UNIT + 100 * i,), np.uint8)
        data[:] = rng.integers(0, 256, data.shape, dtype=np.uint8)
        files.append((path, data, None))
    return files


def _shm_folder() -> Path:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    return Path(tempfile.mkdtemp(prefix="actcap-test-", dir="/dev/shm"))


@pytest.fixture(params=["tmp_path", "tmpfs", "tmpfs-syncfs"])
def folder(request, tmp_path, monkeypatch):
    """A test folder on the tests' filesystem (ext4 here: one syncfs per pass), on tmpfs (an fsync per file
    and folder), or on tmpfs taken for a syncfs filesystem (the syncfs path, whatever the tests' one is)."""
    if request.param == "tmp_path":
        yield tmp_path
        return
    if request.param == "tmpfs-syncfs":
        monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: True)
    shm = _shm_folder()
    try:
        yield shm
    finally:
        shutil.rmtree(shm)


def _whole_filesystem_sync(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)  # files.whole_filesystem_sync: the fixture may stand in for it
    try:
        return files.whole_filesystem_sync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("per_pass", [64, 2], ids=["one-pass", "two-passes"])
def test_several_files_are_synced_before_any_rename_and_their_folders_after(folder, monkeypatch, per_pass):
    """Durable order, per pass: every file's data on disk before the first rename, every rename and new folder
    entry after the last one (a power loss then keeps whole files or none). One syncfs covers a pass's files,
    and another its folders, where the filesystem's syncfs is as strong as an fsync of each."""
    monkeypatch.setattr(files, "FILES_PER_PASS", per_pass)
    whole = _whole_filesystem_sync(folder)
    events = []

    def recording(kind, real, named):
        def call(*args):
            events.append((kind, named(*args)))
            return real(*args)
        return call

    by_fd = lambda fd: os.readlink(f"/proc/self/fd/{fd}")  # noqa: E731
    monkeypatch.setattr(files.os, "fsync", recording("sync", os.fsync, by_fd))
    monkeypatch.setattr(files, "_syncfs", recording("syncfs", files._syncfs, by_fd))
    monkeypatch.setattr(files.os, "replace", recording("rename", os.replace, lambda _, dst: str(dst)))
    monkeypatch.setattr(files, "_write_new_file", recording("create", files._write_new_file,
                                                            lambda path, *_: str(path)))
    written = _three_files(folder)
    files.write_files_atomic(written, durable=True)
    monkeypatch.undo()
    for path, data, _ in written:
        np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint8), data)
    kinds = {kind for kind, _ in events}
    assert kinds == ({"syncfs", "rename", "create"} if whole else {"sync", "rename", "create"})
    events = [event for event in events if event[0] != "create"] if not whole else events
    passes = [written[start:start + per_pass] for start in range(0, len(written), per_pass)]
    for one_pass in passes:
        names = {str(path) for path, _, _ in one_pass}
        renames = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path in names]
        assert len(renames) == len(one_pass)
        if whole:
            last_create = max(i for i, (kind, _) in enumerate(events[:min(renames)]) if kind == "create")
            assert "syncfs" in {kind for kind, _ in events[last_create:min(renames)]}, \
                "a file renamed into place before a syncfs after its writing"
            assert any(kind == "syncfs" for kind, _ in events[max(renames):]), "renames never synced"
        else:
            data_syncs = [i for i, (kind, path) in enumerate(events)
                          if kind == "sync" and path.endswith(".partial") and
                          any(Path(path).name.startswith(f".{Path(name).name}.") and
                              Path(path).parent == Path(name).parent for name in names)]
            assert len(data_syncs) == len(one_pass)
            assert max(data_syncs) < min(renames), "a file renamed into place before every file was synced"
    if whole:
        return
    folder_syncs = {path: i for i, (kind, path) in enumerate(events)
                    if kind == "sync" and not path.endswith(".partial")}
    last_rename = max(i for i, (kind, _) in enumerate(events) if kind == "rename")
    new_entries = {folder, folder / "a", folder / "a" / "c", folder / "a" / "c" / "0", folder / "b",
                   folder / "b" / "c"}
    assert {str(entry) for entry in new_entries} <= set(folder_syncs), "a new entry's folder never synced"
    if per_pass >= len(written):
        assert min(folder_syncs.values()) > last_rename, "a folder synced before the renames it must hold"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux only")
def test_syncfs_is_used_only_where_it_is_as_strong_as_fsync(tmp_path):
    """ext4, XFS and btrfs on Linux 5.17 or later (syncfs reports their errors there); tmpfs and anything
    unknown (FUSE, NFS...) get an fsync per file. The answer matches the filesystem type stat names."""
    release = tuple(int(n) for n in os.uname().release.split("-")[0].split(".")[:2])
    kind = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True).stdout
    expected = release >= (5, 17) and int(kind, 16) in (0xEF53, 0x58465342, 0x9123683E)
    assert _whole_filesystem_sync(tmp_path) == expected
    if os.path.isdir("/dev/shm"):
        assert not _whole_filesystem_sync(Path("/dev/shm"))


def test_a_failing_syncfs_is_an_error_that_names_it():
    with pytest.raises(OSError, match="syncfs") as raised:
        files._syncfs(-1)  # the kernel refuses it, as it would report a failed writeback
    assert raised.value.errno == errno.EBADF


def _recorded_durable_pass(monkeypatch, written) -> list[tuple[str, str]]:
    events = []

    def recording(kind, real):
        def call(fd):
            events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd)
        return call

    monkeypatch.setattr(files.os, "fsync", recording("sync", os.fsync))
    monkeypatch.setattr(files, "_syncfs", recording("syncfs", files._syncfs))
    files.write_files_atomic(written, durable=True)
    monkeypatch.undo()
    for path, data, _ in written:
        np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint8), data)
    return events


def test_a_pass_over_two_filesystems_syncs_each_its_own_way(tmp_path, monkeypatch):
    """Files of one pass on a syncfs filesystem and on tmpfs: the tmpfs file gets its own fsync, the others
    one syncfs (or an fsync each, where the tests' filesystem does not take syncfs)."""
    shm = _shm_folder()
    try:
        if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("the tests' folder is on /dev/shm's filesystem")
        written = _three_files(tmp_path)
        written[1] = (shm / "c" / "0", written[1][1], None)
        whole = _whole_filesystem_sync(tmp_path)
        events = _recorded_durable_pass(monkeypatch, written)
        shm_syncs = [path for kind, path in events if kind == "sync" and path.startswith(str(shm))]
        assert len([path for path in shm_syncs if path.endswith(".partial")]) == 1, events  # and its folders
        assert sum(kind == "syncfs" for kind, _ in events) == (2 if whole else 0), events
    finally:
        shutil.rmtree(shm)


def test_a_syncfs_that_fails_falls_back_to_an_fsync_of_each_file(tmp_path, monkeypatch):
    """syncfs reports any file's writeback error on its filesystem, another program's too: the pass's own
    files are then asked one by one, and only their own error fails the pass."""
    monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: True)

    def failing(fd):
        raise OSError(errno.EIO, "syncfs: Input/output error (test)")

    monkeypatch.setattr(files, "_syncfs", failing)
    written = _three_files(tmp_path)
    events = _recorded_durable_pass(monkeypatch, written)
    synced = [Path(path) for kind, path in events if kind == "sync" and path.endswith(".partial")]
    assert sorted(path.parent for path in synced) == sorted(path.parent for path, _, _ in written), events


def test_a_filesystem_gone_read_only_fails_the_pass(tmp_path, monkeypatch):
    """A filesystem remounted read-only after an error (ext4 errors=remount-ro) answers syncfs with 0 and
    writes nothing: the pass raises instead of calling its files durable."""
    monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: True)
    real_fstatvfs = os.fstatvfs

    class ReadOnly:
        def __init__(self, fd):
            self.f_flag = real_fstatvfs(fd).f_flag | os.ST_RDONLY

    monkeypatch.setattr(files.os, "fstatvfs", ReadOnly)
    with pytest.raises(OSError) as raised:
        files.write_files_atomic(_three_files(tmp_path), durable=True)
    assert raised.value.errno == errno.EROFS
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "a file renamed into place"


def test_a_failure_among_several_files_leaves_no_file_and_no_descriptor(tmp_path, monkeypatch):
    written = _three_files(tmp_path)
    real_write = os.write
    calls = []

    def failing_second_file(fd, payload):
        calls.append(fd)
        if len(set(calls)) == 2:
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real_write(fd, payload)

    before = _open_descriptors()
    monkeypatch.setattr(files.os, "write", failing_second_file)
    with pytest.raises(OSError) as raised:
        files.write_files_atomic(written, durable=True)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert _open_descriptors() == before, "a descriptor left open"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "a temp or final file left behind"


def test_a_pass_holds_at_most_files_per_pass_descriptors(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "FILES_PER_PASS", 3)
    real_write_new_file = files._write_new_file
    peak = []

    def counting(*args):
        result = real_write_new_file(*args)
        peak.append(_open_descriptors())
        return result

    monkeypatch.setattr(files, "_write_new_file", counting)
    data = page_aligned_empty((DIRECT_UNIT,), np.uint8)
    data[:] = 5
    before = _open_descriptors()
    files.write_files_atomic([(tmp_path / "c" / str(i), data, None) for i in range(10)], durable=True)
    assert max(peak) - before <= 3 + 2 and _open_descriptors() == before  # its files, its 2 sync witnesses
    assert all((tmp_path / "c" / str(i)).read_bytes() == data.tobytes() for i in range(10))


def test_the_chunk_paths_of_files_zarr_wrote_reach_up_to_their_chunk_folders(tmp_path):
    """zarr writes a compressed chunk as a temp file renamed over, maybe in a new ``c/<i>`` folder: each
    array's file and each folder that may have got an entry, each once."""
    import zarr

    from engine.store import sink
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    arrays = [group.create_array(name, shape=(8, *row_shape), chunks=(4, *row_shape), dtype="f2",
                                 compressors=zarr.codecs.ZstdCodec())
              for name, row_shape in (("x", (4,)), ("t", ()))]
    x, t = tmp_path / "s.zarr" / "x" / "c", tmp_path / "s.zarr" / "t" / "c"
    assert sink._chunk_paths(arrays, 1) == [x / "1" / "0", x / "1", x, t / "1", t]


def _recording_syncs(monkeypatch) -> list[tuple[str, str, int]]:
    """(kind, what its descriptor names, the descriptor) of each fsync and syncfs from now on (they still
    run)."""
    events, real_fsync, real_syncfs = [], os.fsync, files._syncfs

    def recording(kind, real):
        def call(fd):
            events.append((kind, os.readlink(f"/proc/self/fd/{fd}"), fd))
            return real(fd)
        return call

    monkeypatch.setattr(files.os, "fsync", recording("fsync", real_fsync))
    monkeypatch.setattr(files, "_syncfs", recording("syncfs", real_syncfs))
    return events


def test_sync_paths_syncs_the_whole_filesystem_only_through_a_witness(folder, monkeypatch):
    """syncfs reports only the failures since its descriptor was opened: it runs on the witness (opened
    before the writes), once for all the paths; without a witness every path gets an fsync of its own."""
    paths = [folder / "a", folder / "b", folder]
    for path in paths[:2]:
        path.write_bytes(b"rows")
    whole = _whole_filesystem_sync(folder)
    with files.sync_witness(folder) as witness:
        events = _recording_syncs(monkeypatch)
        files.sync_paths(paths, [witness])
        assert events == ([("syncfs", str(folder), witness)] if whole else
                          [("fsync", str(p), fd) for p, (_, _, fd) in zip(paths, events)])
        events.clear()
        files.sync_paths(paths, [])
        assert [(kind, path) for kind, path, _ in events] == [("fsync", str(p)) for p in paths]


def _opened_before(events, fd_event_index: int, first_write: int) -> bool:
    """Whether the descriptor of ``events[fd_event_index]`` was opened (an ``open`` event naming its path,
    the last such before it) before ``events[first_write]``."""
    _, path, _ = events[fd_event_index]
    opened = [i for i, event in enumerate(events[:fd_event_index]) if event[:2] == ("open", path)]
    return bool(opened) and opened[-1] < first_write


def _noting(events, kind, real, name=lambda path, *_, **__: str(path)):
    def call(*args, **kwargs):
        events.append((kind, name(*args, **kwargs), None))
        return real(*args, **kwargs)
    return call


def _record_writes(monkeypatch, events) -> None:
    """Add ``open``, ``write`` (file writes, folders made, zarr array writes and resizes) to ``events``."""
    import zarr

    monkeypatch.setattr(files.os, "open", _noting(events, "open", files.os.open))
    monkeypatch.setattr(files.os, "mkdir", _noting(events, "write", files.os.mkdir))
    monkeypatch.setattr(files, "_write_new_file", _noting(events, "write", files._write_new_file))
    monkeypatch.setattr(zarr.Array, "__setitem__",
                        _noting(events, "write", zarr.Array.__setitem__, lambda *_: "zarr"))
    monkeypatch.setattr(zarr.Array, "resize",
                        _noting(events, "write", zarr.Array.resize, lambda *_, **__: "resize"))


def _captured_sink(tmp_path, compressor):
    """A durable ZarrSink on a store a tiny capture made (two chunks of 8 rows at least)."""
    import torch

    import engine
    from engine.format.location import Location
    from engine.store.sink import ZarrSink

    from helpers import ragged_batch, tiny_model

    model = tiny_model("gpt2")
    cfg = engine.CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], chunk_tokens=8, compressor=compressor)
    with engine.CaptureEngine(model, cfg), torch.no_grad():
        model(**ragged_batch(3, 8))
    return ZarrSink(Location.of(cfg.output_dir), 8, compressor, durable=True)


@pytest.mark.parametrize("compressor", ["zstd", None])
def test_a_durable_chunk_is_synced_through_witnesses_opened_before_its_first_write(tmp_path, monkeypatch,
                                                                                   compressor):
    """Whether the sink writes a chunk's files itself or zarr does (compressed): each syncfs that vouches for
    them runs on a descriptor opened before the chunk's first write (a folder made counts), after its last,
    and no descriptor serves two syncfs (each reports a failure once)."""
    sink = _captured_sink(tmp_path, compressor)
    rows = {key: np.ascontiguousarray(array[:8]) for key, array in sink.all_arrays().items()}
    sink._ensure_capacity(6 * 8)
    monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: True)  # the syncfs path on any filesystem
    events = _recording_syncs(monkeypatch)
    _record_writes(monkeypatch, events)
    try:
        flags_final = concurrent.futures.Future()
        flags_final.set_result(None)
        written = sink._write_all_rows(5, rows, flags_final)
    finally:
        monkeypatch.undo()
        sink._io.shutdown()
    assert set(written) == set(rows)
    writes = [i for i, event in enumerate(events) if event[0] == "write"]
    syncfs = [i for i, event in enumerate(events) if event[0] == "syncfs"]
    assert writes and len(syncfs) == (1 if compressor else 2), events
    assert all(i > max(writes) for i in syncfs)
    assert all(_opened_before(events, i, min(writes)) for i in syncfs), "a syncfs witness opened too late"
    assert len({events[i][2] for i in syncfs}) == len(syncfs), "one descriptor served two syncfs"


@pytest.mark.parametrize("whole", [True, False], ids=["syncfs", "fsync-each"])
def test_a_durable_store_grown_for_a_chunk_has_its_array_documents_on_disk_first(tmp_path, monkeypatch,
                                                                                 whole):
    """Growing the arrays rewrites each array's zarr.json (a file renamed over): on disk before the chunk
    that needs the new shape can commit, through a witness opened before the first rewrite or with an
    fsync of each document."""
    sink = _captured_sink(tmp_path, None)
    monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: whole)
    events = _recording_syncs(monkeypatch)
    _record_writes(monkeypatch, events)
    try:
        sink._ensure_capacity(1000 * 8)
    finally:
        monkeypatch.undo()
        sink._io.shutdown()
    writes = [i for i, event in enumerate(events) if event[:2] == ("write", "resize")]
    assert len(writes) == len(sink.all_arrays())
    if whole:
        syncfs = [i for i, event in enumerate(events) if event[0] == "syncfs"]
        assert len(syncfs) == 1 and syncfs[0] > max(writes) and _opened_before(events, syncfs[0], min(writes))
    else:
        synced = {path for kind, path, _ in events if kind == "fsync"}
        documents = {str(tmp_path / "s.zarr" / key / "zarr.json") for key in sink.all_arrays()}
        assert documents <= synced


def test_a_multi_process_stores_root_document_is_on_disk_when_written(tmp_path, monkeypatch):
    """The root and parts-group documents of a multi-process store are what opens it: synced when written,
    whatever the run's durability."""
    from engine.format.location import Location
    from engine.store.access import put_document

    monkeypatch.setattr(files, "whole_filesystem_sync", lambda fd: False)
    events = _recording_syncs(monkeypatch)
    put_document(Location.of(tmp_path / "s.zarr"), "parts/zarr.json", {"zarr_format": 3})
    monkeypatch.undo()
    assert (tmp_path / "s.zarr" / "parts" / "zarr.json").read_bytes() == b'{"zarr_format": 3}'
    synced = [path for kind, path, _ in events if kind == "fsync"]
    assert any(path.endswith(".partial") for path in synced), "the document's data was never synced"
    assert {str(tmp_path / "s.zarr" / "parts"), str(tmp_path / "s.zarr"), str(tmp_path)} <= set(synced)
