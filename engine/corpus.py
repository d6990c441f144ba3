"""Corpora for capture jobs: documents from .txt / .jsonl / a saved HF dataset, tokenized into rows.

A row is one input sequence: by default one document (truncated to ``seq_len``), or with ``pack`` a full
window of ``seq_len`` tokens cut from the concatenated documents. Rows come in a deterministic order, so a
resumed job skips exactly ``resume_sequences`` of them. Each token carries its document id (0-based index of
the document in the input) and its character span in that document starting at its first non-whitespace character (byte-level BPE
tokens include the space before a word); ``end == start`` for special tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

import torch

from .errors import ConfigError


@dataclasses.dataclass
class Row:
    ids: list[int]
    doc_id: list[int]
    char_start: list[int]
    char_end: list[int]


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` file (blank-line separated paragraphs when the file has blank lines, else one
    per line), a ``.jsonl`` file (``text_field`` of each record), or a folder saved by ``datasets``."""
    path = Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{path} is a folder: reading a saved Hugging Face dataset needs "
                              "`pip install datasets`") from None
        for record in datasets.load_from_disk(str(path)):
            yield record[text_field]
        return
    if not path.is_file():
        raise ConfigError(f"no corpus at {path}: pass a .txt or .jsonl file or a saved dataset folder")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise ConfigError(f"{path}:{number} has no field {text_field!r}: pass --text-field")
                    yield record[text_field]
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if any(not line.strip() for line in lines[:-1]):
        yield from (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
    else:
        yield from (line for line in lines if line.strip())


def _first_visible(text: str, start: int, end: int) -> int:
    """The token's first non-whitespace character (byte-level BPE tokens carry their leading space)."""
    stripped = len(text[start:end]) - len(text[start:end].lstrip())
    return start + stripped if start + stripped < end else start


def _tokenize(tokenizer, text: str, doc_id: int, max_length: int | None) -> Row:
    encoded = tokenizer(text, return_offsets_mapping=True, truncation=max_length is not None,
                        max_length=max_length)
    starts = [_first_visible(text, int(a), int(b)) for a, b in encoded["offset_mapping"]]
    ends = [int(b) for _, b in encoded["offset_mapping"]]
    return Row(list(encoded["input_ids"]), [doc_id] * len(starts), starts, ends)


def rows(documents: Iterator[str], tokenizer, seq_len: int, pack: bool) -> Iterator[Row]:
    """Rows in a deterministic order (see module docstring)."""
    if not pack:
        for doc_id, text in enumerate(documents):
            row = _tokenize(tokenizer, text, doc_id, seq_len)
            if row.ids:
                yield row
        return
    fields = [f.name for f in dataclasses.fields(Row)]
    window = Row([], [], [], [])
    for doc_id, text in enumerate(documents):
        row = _tokenize(tokenizer, text, doc_id, None)
        for name in fields:
            getattr(window, name).extend(getattr(row, name))
        cut = 0  # emit full windows by offset, trim once per document: linear in document length
        while len(window.ids) - cut >= seq_len:
            yield Row(*(getattr(window, name)[cut:cut + seq_len] for name in fields))
            cut += seq_len
        window = Row(*(getattr(window, name)[cut:] for name in fields))
    if window.ids:
        yield window


def shares(lengths: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous, token-balanced shares of rows for ``parts`` processes: share r is rows [start, stop).

    Deterministic (a function of the row lengths only), so every rank computes the same split, and a
    resumed run the same one again. Share r starts at the first row beginning at or after r/parts of the
    tokens; a share may be empty when there are fewer rows than processes.
    """
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += length
    cuts = [bisect.bisect_left(starts, total * r // parts) if r else 0 for r in range(parts)] + [len(lengths)]
    return list(zip(cuts[:-1], cuts[1:]))


def collate(batch: list[Row], pad_id: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Right-padded model inputs and the per-token annotations of a list of rows."""
    width = max(len(row.ids) for row in batch)

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    inputs = {"input_ids": pad([r.ids for r in batch], pad_id),
              "attention_mask": pad([[1] * len(r.ids) for r in batch], 0)}
    annotations = {"doc_id": pad([r.doc_id for r in batch], -1),
                   "char_start": pad([r.char_start for r in batch], -1),
                   "char_end": pad([r.char_end for r in batch], -1)}
    return inputs, annotations
