"""Corpora for capture jobs: where documents come from (``open_corpus``) and how they become input sequences
(``sequences``).

Sources, as the command line's ``--data`` names them:

  FILE.jsonl         one JSON object per line; the document is its ``text_field``
  FILE.parquet       the ``text_field`` column
  FILE (any other)   UTF-8 text: paragraphs separated by blank lines when the file has any, else one document
                     per line
  FOLDER             saved by ``datasets`` (``save_to_disk``; a DatasetDict gives ``split``), or holding
                     ``.parquet`` files (all of them, below it too, in path order)
  GLOB               e.g. ``shards/*.parquet``: the matching files in name order, each read by its suffix
  hf:NAME[:CONFIG]   a Hugging Face dataset's ``split``, streamed (never downloaded whole first) from the Hub;
                     offline (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set, or no connection to the
                     Hub's host within ``HUB_CONNECT_TIMEOUT_S``) from the local hub cache, at once
  None               Python's own documentation: the help topics of ``pydoc_data.topics``, then the docstrings
                     of the standard library's top-level modules (~1.2 MB of English technical prose, a few
                     hundred thousand tokens; it ships with every CPython, so a job runs with no data at hand;
                     it depends on the Python version)

Every source is read record by record in a fixed order; a bad record is an error naming the file and line
(``corpus.jsonl:17: ...``) or record. A document's id is its 0-based index in the source; documents with no
text are skipped (their index still counts).

A sequence (``TokenSequence``) is one input sequence, fed as one row of a batch (a store's row is one token).
Packed (the default of capture jobs, as SAE tools do): each document is preceded by the tokenizer's BOS token
(its EOS token when it has no BOS) and the token stream is cut into full windows of ``seq_len`` tokens (only
the last sequence may be shorter). Unpacked: one document per sequence, tokenized as the tokenizer does by
default (its own special tokens) and truncated to ``seq_len``; ``TokenSequence.dropped`` counts what the cut
removed. Sequences come in a deterministic order, so a resumed job skips exactly ``resume_sequences`` of
them.

Each token carries its document id and its character span in that document, starting at its first
non-whitespace character (byte-level BPE tokens include the space before a word); ``end == start`` for
special tokens. ``ANNOTATIONS`` names these per-token values and their stored dtypes.

Memory stays bounded for any document length: the tokenizer is called on pieces of at most ``PIECE_CHARS``
characters, each cut before a whitespace character (an unpacked sequence's first piece is at most
``HEAD_CHARS_PER_TOKEN * seq_len`` characters when that is longer). Documents shorter than a piece are
tokenized whole; in longer ones a token at a cut may differ from whole-document tokenization.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import dataclasses
import functools
import glob
import json
import logging
import os
import re
import socket
import sysconfig
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from engine.errors import ConfigError, CorpusError

if TYPE_CHECKING:
    import torch

HUB_PREFIX = "hf:"
PIECE_CHARS = 1 << 16
HEAD_CHARS_PER_TOKEN = 16
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-line signatures, not prose
# The per-token annotations of a capture job (``CaptureConfig.annotations``): each token's document id and
# character span, the fields of ``TokenSequence`` beside its ids.
ANNOTATIONS = {"doc_id": "int64", "char_start": "int32", "char_end": "int32"}
HUB_CONNECT_TIMEOUT_S = 2.5
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "ON", "YES", "TRUE")  # the values huggingface_hub reads as true
_HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec")  # their retries log a line per attempt
_DATASET_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "owner/name"
_BATCH_RECORDS = 1024
_TOKEN_FIELDS = ("ids", *ANNOTATIONS)
_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclasses.dataclass
class TokenSequence:
    """One input sequence: token ids and, per token, its document id and character span.

    ``dropped``: tokens of this sequence's document cut off by ``seq_len`` (unpacked sequences; 0 when
    packed).
    """

    ids: list[int]
    doc_id: list[int]
    char_start: list[int]
    char_end: list[int]
    dropped: int = 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents from one source; every ``documents()`` call reads them again, in the same order.

    Attributes:
        description: what the source is, for a job's output.
        streamed: a Hugging Face dataset read as a stream: its length is unknown until read to the end, so a
            job does not count it before capturing.
    """

    description: str
    streamed: bool
    read: Callable[[], Iterator[str]] = dataclasses.field(repr=False)

    def documents(self) -> Iterator[str]:
        """The documents' texts, in order (a fresh pass)."""
        return self.read()


@dataclasses.dataclass
class SequenceCounts:
    """Running totals over sequences: how many, their tokens, and (unpacked) documents cut and tokens
    dropped."""

    sequences: int = 0
    tokens: int = 0
    cut_documents: int = 0
    dropped_tokens: int = 0

    def add(self, sequence: TokenSequence) -> None:
        self.sequences += 1
        self.tokens += len(sequence.ids)
        self.cut_documents += sequence.dropped > 0
        self.dropped_tokens += sequence.dropped


# ---- sources -------------------------------------------------------------------------------------------


def open_corpus(data: str | os.PathLike | None, text_field: str = "text", split: str = "train") -> Corpus:
    """The corpus a ``--data`` argument names (see the module docstring), checked: the path exists and is
    readable, a dataset has ``split``, a table has ``text_field``. Reading it later checks every record.

    Raises:
        CorpusError: the source is missing, unreadable or of an unknown kind; the message says what to pass.
    """
    if data is None:
        return _python_docs()
    text = os.fspath(data)
    if text.startswith(HUB_PREFIX):
        return _hub_dataset(text[len(HUB_PREFIX):], split, text_field)
    if any(char in text for char in "*?["):  # a glob
        files = sorted(Path(name) for name in glob.glob(os.path.expanduser(text)))
        if not files:
            raise CorpusError(f"no file matches {text}")
        return _files(files, text_field, f"{len(files)} files matching {text}")
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder(path, text_field, split)
    if not path.exists():
        hint = f"; for a Hugging Face dataset write --data {HUB_PREFIX}{text}" if _hub_like(text) else ""
        raise CorpusError(f"no corpus at {path}: pass a .txt, .jsonl or .parquet file, a folder, a glob or "
                          f"{HUB_PREFIX}NAME{hint}")
    return _files([path], text_field, str(path))


def _hub_like(text: str) -> bool:
    """Whether a missing path could be meant as a Hub dataset: ``name`` or ``owner/name``, no file suffix."""
    return bool(_DATASET_ID.match(text)) and not Path(text).suffix


def _files(paths: list[Path], text_field: str, description: str) -> Corpus:
    for path in paths:
        _check_readable(path)
        if path.suffix == ".parquet":
            _parquet_file(path, text_field)
    return Corpus(description, False,
                  lambda: (doc for path in paths for doc in _file_documents(path, text_field)))


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise CorpusError(f"{path} is not a file: pass files, a folder or a glob of them")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror}") from None


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if path.suffix == ".parquet":
        return _parquet_documents(path, text_field)
    return _text_documents(path)


def _folder(path: Path, text_field: str, split: str) -> Corpus:
    if any((path / name).is_file() for name in _DATASET_FILES):
        return _saved_dataset(path, text_field, split)
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise CorpusError(f"{path} is a folder with neither a dataset saved by datasets (save_to_disk) nor "
                          ".parquet files: pass a file, a glob, or such a folder")
    return _files(files, text_field, f"{len(files)} .parquet files under {path}")


def _text_value(value: Any, text_field: str, where: str) -> str:
    if value is None:
        raise CorpusError(f"{where}: field {text_field!r} is null: remove the record or give it text")
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(value).__name__}, not text: pass "
                          "--text-field naming a text field")
    return value


def _decoded_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(``file:line``, line) of a UTF-8 text file, one line in memory at a time."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                  f"{error.start + 1}): convert the file to UTF-8") from None
            if "\0" in line:
                raise CorpusError(f"{where}: NUL bytes: this looks like a binary file, not text")
            yield where, line


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for where, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{where}: not valid JSON ({error.msg} at column {error.colno}): fix or remove "
                              "the line") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object with a "
                              f"{text_field!r} field")
        if text_field not in record:
            raise CorpusError(f"{where}: no field {text_field!r} (fields: {', '.join(record)}): pass "
                              "--text-field")
        yield _text_value(record[text_field], text_field, where)


def _has_paragraphs(path: Path) -> bool:
    """Whether a blank line separates two lines with text."""
    seen_text = blank_after_text = False
    for _, line in _decoded_lines(path):
        if not line.strip():
            blank_after_text = seen_text
        elif blank_after_text:
            return True
        else:
            seen_text = True
    return False


def _text_documents(path: Path) -> Iterator[str]:
    if not _has_paragraphs(path):
        yield from (line.rstrip("\r\n") for _, line in _decoded_lines(path) if line.strip())
        return
    paragraph: list[str] = []
    for _, line in _decoded_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).strip()
            paragraph = []
    if paragraph:
        yield "".join(paragraph).strip()


def _parquet_file(path: Path, text_field: str):
    try:
        import pyarrow.parquet
    except ImportError:
        raise CorpusError(f"reading {path} needs pyarrow: pip install 'actcap-engine[data]'") from None
    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise CorpusError(f"{path}: not a readable parquet file ({error})") from None
    if text_field not in table.schema_arrow.names:
        raise CorpusError(f"{path} has no column {text_field!r} (columns: "
                          f"{', '.join(table.schema_arrow.names)}): pass --text-field")
    return table


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The column's values, one record batch in memory at a time."""
    index = 0
    batches = _parquet_file(path, text_field).iter_batches(batch_size=_BATCH_RECORDS, columns=[text_field])
    for batch in batches:
        for value in batch.column(0).to_pylist():
            yield _text_value(value, text_field, f"{path} record {index}")
            index += 1


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{what} needs the datasets library: pip install 'actcap-engine[data]'") from None
    return datasets


def _saved_dataset(path: Path, text_field: str, split: str) -> Corpus:
    datasets = _import_datasets(f"reading the saved dataset {path}")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise CorpusError(f"{path} has the splits {', '.join(loaded)}, not {split!r}: pass --split")
        loaded = loaded[split]
    dataset = _text_column(loaded, text_field, str(path))
    return Corpus(f"the dataset saved at {path} ({dataset.num_rows:,} records)", False,
                  lambda: _dataset_documents(dataset, text_field, str(path)))


def _text_column(dataset, text_field: str, where: str):
    """The dataset reduced to its text column (checked here when its columns are known before reading)."""
    if dataset.column_names is None:
        return dataset
    if text_field not in dataset.column_names:
        raise CorpusError(f"{where} has no column {text_field!r} (columns: "
                          f"{', '.join(dataset.column_names)}): pass --text-field")
    return dataset.select_columns([text_field])


def _dataset_documents(dataset, text_field: str, where: str) -> Iterator[str]:
    index = 0
    for batch in dataset.iter(batch_size=_BATCH_RECORDS):
        if text_field not in batch:
            raise CorpusError(f"{where} record {index}: no field {text_field!r} (fields: "
                              f"{', '.join(batch)}): pass --text-field")
        for value in batch[text_field]:
            yield _text_value(value, text_field, f"{where} record {index}")
            index += 1


def _hub_dataset(spec: str, split: str, text_field: str) -> Corpus:
    name, _, config = spec.partition(":")
    if not name:
        raise CorpusError(f"{HUB_PREFIX} needs a dataset name: --data {HUB_PREFIX}NAME[:CONFIG], e.g. "
                          f"{HUB_PREFIX}NeelNanda/pile-10k")
    datasets = _import_datasets(f"--data {HUB_PREFIX}{spec}")
    where = f"{HUB_PREFIX}{spec} (split {split})"
    with _quiet_hub_logs():
        dataset = _open_hub_stream(datasets, name, config, split, where)
    dataset = _text_column(dataset, text_field, where)
    return Corpus(f"the Hugging Face dataset {where}", True,
                  lambda: _dataset_documents(dataset, text_field, where))


def _open_hub_stream(datasets, name: str, config: str, split: str, where: str):
    """The dataset streamed from the Hub, or, offline, from the local hub cache (which may have it)."""
    if not _hub_offline():
        try:
            return _stream(datasets, name, config, split, where)
        except ConnectionError:  # the host answered the connection check, not the requests
            pass
    return _stream(datasets, _hub_cache_snapshot(name, where), config, split, where)


def _hub_offline() -> bool:
    """Whether to skip the Hub and read the local hub cache at once: offline mode is on (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE), or the Hub's host does not answer within ``HUB_CONNECT_TIMEOUT_S`` (datasets would
    retry for half a minute before giving up)."""
    if any(os.environ.get(name, "").strip().upper() in _TRUE for name in _OFFLINE_VARIABLES):
        return True
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):  # a direct connection proves nothing there
        return False
    return not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def hub_reachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``endpoint`` (a URL; its scheme's port unless it names one)
    opens within ``timeout`` seconds."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Keep the Hub clients' warnings (one line per retried request) off the terminal: a hub dataset that
    cannot be read ends in one error line of our own."""
    loggers = [logging.getLogger(name) for name in _HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _stream(datasets, path: str, config: str, split: str, where: str):
    try:
        return datasets.load_dataset(path, config or None, split=split, streaming=True)
    except (FileNotFoundError, ValueError) as error:  # no such dataset, config or split
        raise CorpusError(f"{where}: {error}") from None


def _hub_cache_snapshot(name: str, where: str) -> str:
    """The folder of a dataset repository's cached snapshot (``$HF_HOME/hub``), read without the network."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        raise CorpusError(f"{where}: the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) "
                          f"and the local hub cache {constants.HF_HUB_CACHE} has no copy: run once with "
                          "network access, or pass a local file or folder") from None


def _python_docs() -> Corpus:
    texts = _python_doc_texts()
    if not texts:
        raise CorpusError("no --data given, and this Python ships neither pydoc_data nor standard-library "
                          "sources to use as a default corpus: pass --data")
    megabytes = sum(map(len, texts)) / 1e6
    return Corpus(f"Python's own documentation ({len(texts):,} documents, {megabytes:.1f} MB: the help "
                  "topics of pydoc_data.topics and the standard library's docstrings)", False,
                  lambda: iter(texts))


@functools.lru_cache(maxsize=1)
def _python_doc_texts() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave it out
        topics = {}
    texts = [topics[key] for key in sorted(topics)]
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.extend(docstrings(source))
    return tuple(texts)


def docstrings(source: Path) -> list[str]:
    """Module, class and function docstrings of one Python file with at least ``MIN_DOCSTRING_CHARS``
    characters (the default corpus's documents; ``benchmarks/training.py`` adds those of the standard
    library's packages). A file that cannot be read or parsed gives none."""
    try:
        tree = ast.parse(source.read_bytes())
    except (OSError, SyntaxError, ValueError):  # a file this Python cannot parse adds no documents
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [text for text in found if text and len(text) >= MIN_DOCSTRING_CHARS]


# ---- sequences -----------------------------------------------------------------------------------------


def _pieces(text: str, size: int, start: int = 0) -> Iterator[tuple[int, str]]:
    """(offset, piece) covering ``text[start:]``, each piece at most ``size`` characters, cut before its last
    space or newline (a word keeps its leading space, as byte-level BPE tokens do), or at ``size`` when it has
    none."""
    while len(text) - start > size:
        stop = start + size
        cut = max(text.rfind(" ", start + 1, stop), text.rfind("\n", start + 1, stop))
        stop = cut if cut > start else stop
        yield start, text[start:stop]
        start = stop
    yield start, text[start:]


def _first_visible(text: str, start: int, end: int) -> int:
    """The token's first non-whitespace character (byte-level BPE tokens carry their leading space)."""
    stripped = len(text[start:end]) - len(text[start:end].lstrip())
    return start + stripped if start + stripped < end else start


def _encode(tokenizer, piece: str, offset: int, doc_id: int, **options) -> TokenSequence:
    """One tokenizer call on a piece of a document that starts at character ``offset``."""
    encoded = tokenizer(piece, return_offsets_mapping=True, **options)
    spans = encoded["offset_mapping"]
    return TokenSequence(list(encoded["input_ids"]), [doc_id] * len(spans),
               [offset + _first_visible(piece, int(a), int(b)) for a, b in spans],
               [offset + int(b) for _, b in spans])


def _count_tokens(tokenizer, text: str, start: int) -> int:
    return sum(len(tokenizer(piece, add_special_tokens=False)["input_ids"])
               for _, piece in _pieces(text, PIECE_CHARS, start))


def sequences(documents: Iterator[str], tokenizer, seq_len: int, pack: bool) -> Iterator[TokenSequence]:
    """Input sequences in a deterministic order (see the module docstring).

    Raises:
        ConfigError: ``seq_len`` is not a positive int (raised here, not when the sequences are read).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}: it is the number of tokens per "
                          "sequence")
    build = _packed_sequences if pack else _document_sequences
    return build(documents, tokenizer, seq_len)


def _document_sequences(documents: Iterator[str], tokenizer, seq_len: int) -> Iterator[TokenSequence]:
    """One sequence per document: its head tokenized with truncation; the rest of a cut document is
    counted."""
    head_chars = max(PIECE_CHARS, HEAD_CHARS_PER_TOKEN * seq_len)
    for doc_id, text in enumerate(documents):
        if not text or text.isspace():  # no copy of a long document
            continue
        _, head = next(_pieces(text, head_chars))
        sequence = _encode(tokenizer, head, 0, doc_id)
        if len(sequence.ids) > seq_len or len(head) < len(text):
            whole = len(sequence.ids)
            sequence = _encode(tokenizer, head, 0, doc_id, truncation=True, max_length=seq_len)
            sequence.dropped = whole - len(sequence.ids) + (_count_tokens(tokenizer, text, len(head))
                                                            if len(head) < len(text) else 0)
        yield sequence


class _Window:
    """Packed tokens waiting to fill sequences; holds less than one sequence plus one piece."""

    def __init__(self):
        self.lists = {name: [] for name in _TOKEN_FIELDS}

    def extend(self, sequence: TokenSequence) -> None:
        for name in _TOKEN_FIELDS:
            self.lists[name].extend(getattr(sequence, name))

    def full_sequences(self, seq_len: int) -> Iterator[TokenSequence]:
        """Every full window of ``seq_len`` tokens, removed from the front (one trim: linear time)."""
        cut = 0
        while len(self.lists["ids"]) - cut >= seq_len:
            yield TokenSequence(**{name: values[cut:cut + seq_len] for name, values in self.lists.items()})
            cut += seq_len
        self.lists = {name: values[cut:] for name, values in self.lists.items()}

    def rest(self) -> TokenSequence | None:
        return TokenSequence(**self.lists) if self.lists["ids"] else None


def _packed_sequences(documents: Iterator[str], tokenizer, seq_len: int) -> Iterator[TokenSequence]:
    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    window = _Window()
    for doc_id, text in enumerate(documents):
        if not text or text.isspace():  # no copy of a long document
            continue
        if separator is not None:  # a special token: it covers no character (end == start)
            window.extend(TokenSequence([separator], [doc_id], [0], [0]))
        for offset, piece in _pieces(text, PIECE_CHARS):
            window.extend(_encode(tokenizer, piece, offset, doc_id, add_special_tokens=False))
            yield from window.full_sequences(seq_len)
    last = window.rest()
    if last is not None:
        yield last


def take_tokens(sequences: Iterator[TokenSequence], max_tokens: int | None) -> Iterator[TokenSequence]:
    """Sequences until the next one would bring the total past ``max_tokens`` (None: every sequence)."""
    taken = 0
    for sequence in sequences:
        if max_tokens is not None and taken + len(sequence.ids) > max_tokens:
            return
        taken += len(sequence.ids)
        yield sequence


def shares(lengths: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous, token-balanced shares of sequences for ``parts`` processes: share r is sequences
    [start, stop).

    Deterministic (a function of the sequence lengths only), so every rank computes the same split, and a
    resumed run the same one again. Share r starts at the first sequence beginning at or after r/parts of the
    tokens; a share may be empty when there are fewer sequences than processes.
    """
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += length
    cuts = [bisect.bisect_left(starts, total * r // parts) if r else 0 for r in range(parts)] + [len(lengths)]
    return list(zip(cuts[:-1], cuts[1:]))


def collate(batch: list[TokenSequence],
            pad_id: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Right-padded model inputs and the per-token annotations (``ANNOTATIONS``) of a list of sequences (a
    batch's rows)."""
    import torch  # here: the corpus checks of a capture job run before torch is imported

    width = max(len(sequence.ids) for sequence in batch)

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    inputs = {"input_ids": pad([r.ids for r in batch], pad_id),
              "attention_mask": pad([[1] * len(r.ids) for r in batch], 0)}
    annotations = {name: pad([getattr(r, name) for r in batch], -1) for name in ANNOTATIONS}
    return inputs, annotations
