"""Edge fakes: sinks the writer process builds instead of ZarrSink, to force slowness and failures that a real
disk cannot be made to show on demand. They run in the writer process (a separate interpreter), so they are
configured by environment variables set before the engine starts; select one with ``use_sink``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.store.sink import ZarrSink

GATE_ENV = "ACTCAP_TEST_GATE"


def use_sink(monkeypatch, name: str) -> None:
    """Make every CaptureEngine of the test write through ``fakes.<name>``."""
    from engine import CaptureEngine

    monkeypatch.setitem(CaptureEngine.sink_factory, "zarr", f"fakes:{name}")


class SlowSink(ZarrSink):
    """A disk slower than the model."""

    def write_chunk(self, chunk_index, arrays, make_record):
        time.sleep(0.05)
        super().write_chunk(chunk_index, arrays, make_record)


class GatedSink(ZarrSink):
    """Chunk writes from the third on wait until the file named by $ACTCAP_TEST_GATE exists."""

    def write_chunk(self, chunk_index, arrays, make_record):
        gate = Path(os.environ[GATE_ENV])
        deadline = time.monotonic() + 30
        while chunk_index >= 2 and not gate.exists():
            assert time.monotonic() < deadline, "the test never opened the gate"
            time.sleep(0.01)
        super().write_chunk(chunk_index, arrays, make_record)


class FailingSink(ZarrSink):
    """The disk fails on the second chunk."""

    def write_chunk(self, chunk_index, arrays, make_record):
        if chunk_index == 1:
            raise OSError(28, "No space left on device (test)")
        super().write_chunk(chunk_index, arrays, make_record)


class RowWriteFailingSink(ZarrSink):
    """The disk fails while the second chunk's rows are written (on the sink's I/O thread)."""

    def _write_all_rows(self, chunk_index, arrays, flags_final):
        if chunk_index == 1:
            raise OSError(28, "No space left on device (test)")
        return super()._write_all_rows(chunk_index, arrays, flags_final)


class DiskAndStatisticsFailingSink(RowWriteFailingSink):
    """The second chunk's statistics fail while its rows fail to be written: the disk's error is the one
    raised, the other rides along as its context."""

    def write_chunk(self, chunk_index, arrays, make_record):
        def failing_record():
            if chunk_index == 1:
                raise ValueError("statistics failed (test)")
            return make_record()

        super().write_chunk(chunk_index, arrays, failing_record)


class FullDiskSink(ZarrSink):
    """The disk fills on the third chunk (when no small filesystem can be mounted)."""

    def write_chunk(self, chunk_index, arrays, make_record):
        if chunk_index >= 2:
            raise OSError(28, "No space left on device")
        super().write_chunk(chunk_index, arrays, make_record)


class GapSink(ZarrSink):
    """The second chunk fails, but only once the third is committed: a committed chunk after a gap."""

    def write_chunk(self, chunk_index, arrays, make_record):
        if chunk_index == 1:
            deadline = time.monotonic() + 30
            while not (self._location.local / "commits" / "chunk_000000000002").exists():
                assert time.monotonic() < deadline, "the third chunk never came"
                time.sleep(0.01)
            raise OSError(28, "No space left on device (test)")
        super().write_chunk(chunk_index, arrays, make_record)


class ChunkFolderCheckingSink(ZarrSink):
    """Fails a chunk whose arrays' shared chunk folders (zarr's ``c/``) are not there before it is written:
    two writer threads must not race to make them."""

    def write_chunk(self, chunk_index, arrays, make_record):
        from engine.format.chunks import local_chunk_folder

        missing = [key for key in arrays if not local_chunk_folder(self._arrays[key]).is_dir()]
        if missing:
            raise AssertionError(f"chunk {chunk_index}: no chunk folder yet for {missing}")
        super().write_chunk(chunk_index, arrays, make_record)
