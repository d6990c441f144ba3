"""The writer process's view of the capturing process's slots: shared-memory buffers mapped by name (their
names and layout: ``engine.writer.protocol.SlotLayout``)."""

from __future__ import annotations

import mmap
import os

import numpy as np

from engine.format.encoding import scale_key
from engine.writer.protocol import (
    TOKEN_DTYPE,
    TOKENS_BUFFER,
    BatchInfo,
    WriterSpec,
    annotation_buffer,
    error_norms_key,
    point_buffer,
)


class SlotMemory:
    """The capturing process's slot buffers, mapped here. Thread safety: ``map`` from the main thread;
    ``views`` of a slot from the writer thread that holds it."""

    def __init__(self, spec: WriterSpec):
        self._encoding = spec.encoding
        self._layout = spec.slot_layout
        self._point_dtype = spec.slot_dtype
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def map(self, slot: int, name: str, nbytes: int, fd: int) -> None:
        try:
            self._maps[(slot, name)] = np.frombuffer(mmap.mmap(fd, nbytes), dtype=np.uint8)
        finally:
            os.close(fd)

    def _typed(self, slot: int, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        return self._maps[(slot, name)][: count * dtype.itemsize].view(dtype).reshape(shape)

    def token_views(self, slot: int, batch: BatchInfo) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(ids, mask) as (batch, seq) int64, None where the batch had none."""
        tokens = self._typed(slot, TOKENS_BUFFER, TOKEN_DTYPE, (2, batch.batch_size, batch.seq_len))
        return (tokens[0] if batch.has_ids else None), (tokens[1] if batch.has_mask else None)

    def annotation_view(self, slot: int, name: str, batch: BatchInfo) -> np.ndarray:
        return self._typed(slot, annotation_buffer(name), TOKEN_DTYPE, (batch.batch_size * batch.seq_len,))

    def point_rows(self, slot: int, key: str, dim: int, batch: BatchInfo) -> dict[str, np.ndarray]:
        """The batch's rows of one point, by the chunk buffer each goes to: the array's rows, or an 8-bit
        encoded point's codes, scales and error sums (``engine.format.encoding``)."""
        rows = self._typed(slot, point_buffer(key), self._point_dtype,
                           (batch.batch_size * batch.seq_len, self._layout.row_width(dim)))
        if self._encoding is None:
            return {key: rows}
        codes, scales, sums = self._encoding.split_slot_rows(rows, dim)
        return {key: codes, scale_key(key): scales, error_norms_key(key): sums}
