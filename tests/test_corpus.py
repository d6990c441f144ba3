"""Corpus sources and input sequences, in process (no model): every source reads the same documents, bad
records name their file and line, packing joins documents with the tokenizer's separator, long documents are
tokenized in bounded pieces."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.cli.corpus import (
    PIECE_CHARS,
    _first_visible,
    hub_reachable,
    open_corpus,
    sequences,
    take_tokens,
)
from engine.errors import ConfigError, CorpusError

from helpers import documents

TEXTS = documents(30)
NOBODY = 65534


def documents_of(data, **options) -> list[str]:
    return list(open_corpus(data, **options).documents())


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_parquet_folders_globs_and_saved_datasets_read_the_jsonl_documents(corpus, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    for number, (start, stop) in enumerate(((0, 18), (18, 30))):
        pq.write_table(pa.table({"id": list(range(start, stop)), "body": TEXTS[start:stop]}),
                       shards / f"part-{number}.parquet")
    (tmp_path / "saved").mkdir()
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "saved" / "one")
    splits = {"train": datasets.Dataset.from_dict({"text": TEXTS}),
              "test": datasets.Dataset.from_dict({"text": TEXTS[:2]})}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")

    assert documents_of(corpus) == TEXTS
    assert documents_of(shards / "part-0.parquet", text_field="body") == TEXTS[:18]
    assert documents_of(shards, text_field="body") == TEXTS
    assert documents_of(str(shards / "part-*.parquet"), text_field="body") == TEXTS
    assert documents_of(tmp_path / "saved" / "one") == TEXTS
    assert documents_of(tmp_path / "dict") == TEXTS
    assert documents_of(tmp_path / "dict", split="test") == TEXTS[:2]
    with pytest.raises(CorpusError, match="has the splits train, test, not 'validation': pass --split"):
        open_corpus(tmp_path / "dict", split="validation")
    with pytest.raises(CorpusError, match="has no column 'text' .*columns: id, body.*--text-field"):
        open_corpus(shards)


def test_text_files_are_paragraphs_or_lines(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("first para\nstill first\n  \nsecond para\n\n\nthird\n")
    assert documents_of(text) == ["first para\nstill first", "second para", "third"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\nthree\n\n")
    assert documents_of(lines) == ["one", "two", "three"]
    # byte-level BPE offsets include the space before a word: the stored start is the word's first letter
    assert _first_visible("The capital Paris", 11, 17) == 12 and _first_visible("a  ", 1, 3) == 1


def write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b",\n', r"bad.jsonl:2: not valid JSON \(.*\): fix or remove"),
    ("null.jsonl", b'{"text": "a"}\n\n{"text": null}\n', r"null.jsonl:3: field 'text' is null"),
    ("list.jsonl", b'["a"]\n', r"list.jsonl:1: a JSON list, not an object"),
    ("field.jsonl", b'{"body": "a"}\n', r"field.jsonl:1: no field 'text' \(fields: body\): pass --text"),
    ("number.jsonl", b'{"text": 3}\n', r"number.jsonl:1: field 'text' is int, not text"),
    ("latin1.txt", "caf\u00e9\n".encode() + "na\u00efve\n".encode("latin-1"), r"latin1.txt:2: not UTF-8"),
    ("binary.txt", b"ELF\x00\x01\x02\x00\n", r"binary.txt:1: NUL bytes: this looks like a binary file"),
])
def test_bad_records_name_their_file_and_line(tmp_path, name, content, message):
    with pytest.raises(CorpusError, match=message):
        documents_of(write(tmp_path / name, content))


def test_bad_sources_say_what_to_pass(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(CorpusError, match="no corpus at .*missing.jsonl"):
        open_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="write --data hf:wikitext"):
        open_corpus("wikitext")
    with pytest.raises(CorpusError, match="no file matches"):
        open_corpus(str(tmp_path / "*.parquet"))
    with pytest.raises(CorpusError, match="neither a dataset saved by datasets .* nor .parquet files"):
        open_corpus(tmp_path)
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        open_corpus(write(tmp_path / "fake.parquet", b"not parquet"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(CorpusError, match=r"null.parquet record 1: field 'text' is null"):
        documents_of(tmp_path / "null.parquet")


@contextlib.contextmanager
def _as_an_ordinary_user():
    """Root reads any file: as root, check permissions with the effective user ``nobody`` meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_file_is_named():
    folder = Path(tempfile.mkdtemp(prefix="actcap-unreadable-"))  # under /tmp: every user may look inside
    try:
        folder.chmod(0o755)
        unreadable = write(folder / "secret.txt", b"text\n")
        unreadable.chmod(0)
        with _as_an_ordinary_user():
            assert not os.access(unreadable, os.R_OK, effective_ids=True)
            with pytest.raises(CorpusError, match="cannot read .*secret.txt: Permission denied"):
                open_corpus(unreadable)
    finally:
        shutil.rmtree(folder)


def test_python_docs_are_the_default_corpus():
    corpus = open_corpus(None)
    texts = list(corpus.documents())
    assert "pydoc_data.topics" in corpus.description and not corpus.streamed
    assert len(texts) > 500 and sum(map(len, texts)) > 1_000_000, "a few hundred thousand tokens"
    assert texts == list(corpus.documents()), "the same documents on every pass (resume relies on it)"


@pytest.mark.parametrize("seq_len", [0, -1])
def test_sequences_refuse_a_non_positive_length(tokenizer, seq_len):
    with pytest.raises(ConfigError, match="seq_len must be a positive int"):
        next(sequences(iter(TEXTS), tokenizer, seq_len, pack=True))  # the old code yielded empty ones forever


def test_packing_puts_the_separator_before_each_document_and_fills_every_window(tokenizer):
    packed = list(sequences(iter(TEXTS), tokenizer, 24, pack=True))
    assert all(len(seq.ids) == 24 for seq in packed[:-1]) and 0 < len(packed[-1].ids) <= 24
    stream = [token for seq in packed for token in seq.ids]
    expected = [token for text in TEXTS for token in [tokenizer.bos_token_id]
                + tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert stream == expected
    doc_id = [d for seq in packed for d in seq.doc_id]
    starts = [s for seq in packed for s in seq.char_start]
    ends = [e for seq in packed for e in seq.char_end]
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(stream)):
        assert doc_id[i] == (doc_id[i - 1] + (token == "<s>") if i else 0)
        assert TEXTS[doc_id[i]][starts[i]:ends[i]] == ("" if token == "<s>" else token)
    assert [len(seq.ids) for seq in take_tokens(iter(packed), 100)] == [24] * 4


def test_unpacked_sequences_are_truncated_documents_and_count_what_was_cut(tokenizer):
    unpacked = list(sequences(iter(TEXTS), tokenizer, 24, pack=False))
    truncated = [tokenizer(text, truncation=True, max_length=24)["input_ids"] for text in TEXTS]
    assert [seq.ids for seq in unpacked] == truncated
    assert [seq.dropped for seq in unpacked] == [max(len(tokenizer(t)["input_ids"]) - 24, 0) for t in TEXTS]
    assert any(seq.dropped for seq in unpacked)


class SpyTokenizer:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **options):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **options)


def test_long_documents_are_tokenized_in_bounded_pieces(tokenizer):
    text = " ".join(TEXTS * (6 * PIECE_CHARS // len(" ".join(TEXTS))))
    assert len(text) > 5 * PIECE_CHARS
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spy = SpyTokenizer(tokenizer)
    packed = list(sequences(iter([text]), spy, 512, pack=True))
    assert spy.longest <= PIECE_CHARS
    assert [t for seq in packed for t in seq.ids] == [tokenizer.bos_token_id] + whole["input_ids"]
    assert [e for seq in packed for e in seq.char_end][1:] == [int(b) for _, b in whole["offset_mapping"]]

    spy = SpyTokenizer(tokenizer)
    (seq,) = sequences(iter([text]), spy, 512, pack=False)
    assert spy.longest <= PIECE_CHARS
    assert seq.ids == tokenizer(text, truncation=True, max_length=512)["input_ids"]
    assert seq.dropped == len(whole["input_ids"]) + 1 - 512


@pytest.mark.slow
def test_a_50_mb_document_captures_in_bounded_memory(model_dir, tmp_path):
    """The issue's case: 64 tokens of a 50 MB single-line document took 8.8 GB (tokenized whole, twice)."""
    big = tmp_path / "big.txt"
    big.write_text(" ".join(["the cat sat on the mat"] * (50_000_000 // 23)) + "\n")
    script = ("import resource, sys; from engine.cli.main import main; code = main(sys.argv[1:]); "
              "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "capture", "--model", model_dir, "--data", big,
                           "--out", tmp_path / "s.zarr", "--layers", "1", "--seq-len", "32", "--max-tokens",
                           "64", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "64 tokens in 2 rows" in done.stdout
    peak_gb = int(done.stdout.split("maxrss_kb")[1]) / 1e6
    assert peak_gb < 1.5, f"peak memory {peak_gb:.2f} GB"


@pytest.mark.parametrize("data, hinted", [("nosuch.txt", False), ("shards/nosuch.parquet", False),
                                          ("wikitext", True), ("NeelNanda/pile-10k", True)])
def test_a_missing_path_suggests_hf_only_for_a_dataset_like_name(tmp_path, monkeypatch, data, hinted):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match=f"no corpus at {data}") as error:
        open_corpus(data)
    assert (f"for a Hugging Face dataset write --data hf:{data}" in str(error.value)) == hinted


def test_the_hub_check_tells_a_listening_host_from_a_refusing_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert hub_reachable(endpoint)
    assert not hub_reachable(endpoint), "nothing listens there now: refused"


def test_behind_a_proxy_the_hub_is_not_judged_by_a_direct_connection(monkeypatch):
    """A direct TCP connection fails behind an HTTPS proxy while datasets would reach the Hub through it:
    the check is skipped there (and a plain-http endpoint is probed on port 80)."""
    from engine.cli import corpus

    def refuse(*args, **kwargs):
        raise AssertionError("probed the Hub directly")

    for name in (*corpus._OFFLINE_VARIABLES, *corpus._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(corpus, "hub_reachable", refuse)
    assert not corpus._hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert corpus._hub_offline(), "offline mode still wins"


def test_the_hub_check_takes_the_port_of_the_endpoints_scheme(monkeypatch):
    tried = []

    def connect(address, timeout):
        tried.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", connect)
    hub_reachable("http://hub.example")
    hub_reachable("https://hub.example")
    hub_reachable("https://hub.example:8443")
    assert tried == [("hub.example", 80), ("hub.example", 443), ("hub.example", 8443)]
