"""Stores that cannot be silently damaged (issue 13): checksums and sizes in commit records, checked reads,
gap detection on complete stores, corrupt metadata named, resumes that cut back before damage, the records as
types, and format version 1 stores still read.

Each damage is tried through every reader: ``open_store``, ``ActivationDataset`` and ``inspect``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from engine import (
    ActivationDataset,
    CaptureConfig,
    CaptureEngine,
    StoreCorruptError,
    StoreFormatError,
    open_store,
)
from engine.cli.main import main as cli_main
from engine.format.layout import CommitRecord, Manifest, commit_record_key
from engine.format.location import Location
from engine.store.lifecycle import continue_store
from engine.store.resume import find_resume_point

from helpers import assert_statistics_match, ragged_batch, served_rows, tiny_model

ROOT = Path(__file__).resolve().parent.parent
KEY = "layer_0/residual"
SEQUENCES = [ragged_batch(1, 9, seed=seed) for seed in range(6)]  # one 9-token sequence per forward
V1_STORE = Path(__file__).resolve().parent / "data" / "format_v1_store"


def capture(path, sequences=SEQUENCES, **options):
    """A tiny store, one sequence per forward (so a resumed store holds exactly the rows of a whole run);
    a resume feeds from ``resume_sequences``."""
    model = tiny_model("gpt2")
    cfg = CaptureConfig(path, layer_indices=[0], chunk_tokens=8, **options)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        for batch in sequences[cap.resume_sequences:]:
            model(**batch)
    return cap


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Complete stores of the same run, uncompressed (written as plain files) and zstd (through zarr)."""
    root = tmp_path_factory.mktemp("pristine")
    for compressor in (None, "zstd"):
        capture(root / f"{compressor}.zarr", compressor=compressor)
    return root


@pytest.fixture(params=[None, "zstd"])
def store(request, pristine, tmp_path):
    """A fresh copy of a pristine store (7 chunks: 6 of 8 rows, 1 of 6) to damage."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(pristine / f"{request.param}.zarr", copy)
    return copy


def chunk_file(store: Path, key: str, index: int) -> Path:
    folder = store / key / "c" / str(index)
    return folder if key.startswith("tokens/") else folder / "0"  # 1-D token arrays have one chunk per row


def read_all(path, **options):
    """Every row through the two readers that return data."""
    open_store(path, **options)[KEY][:]
    return list(ActivationDataset(path, KEY, batch_size=5, shuffle=False, exclude=(), **options))


def inspect(capsys, *args) -> tuple[int, str]:
    code = cli_main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- chunks: missing, short, overwritten -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_missing_or_short_chunk_is_never_read(store, damage, capsys):
    """Before: a deleted chunk read back as zeros (inspect exit 0); a truncated one failed with 'cannot
    reshape'."""
    path = chunk_file(store, KEY, 2)
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 2") as error:
        open_store(store)[KEY][:]
    assert str(path) in str(error.value)
    open_store(store)[KEY][:16]  # chunks 0 and 1 still read
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 2"):
        list(ActivationDataset(store, KEY, batch_size=5, shuffle=False))
    with pytest.raises(StoreCorruptError) as error:
        open_store(store, verify=True)
    assert error.value.problems == (error.value.problems[0],) and "chunk 2" in error.value.problems[0]
    code, report = inspect(capsys, store)
    assert code == 1 and f"{KEY} chunk 2" in report and str(store) in report


def test_a_chunk_overwritten_with_same_size_garbage_fails_verification(store, capsys):
    """Before: read without complaint (no checksums). Now: sizes match, so plain reads go on (checksums are on
    demand), and every verifying reader refuses it."""
    path = chunk_file(store, KEY, 3)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    assert inspect(capsys, store)[0] == 0
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 3 .*(CRC32C|decoded)"):
        open_store(store, verify=True)
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 3"):
        list(ActivationDataset(store, KEY, batch_size=5, shuffle=False, verify=True))
    code, report = inspect(capsys, store, "--verify")
    assert code == 1 and f"{KEY} chunk 3" in report


def test_every_bad_chunk_is_listed(store, capsys):
    chunk_file(store, KEY, 1).unlink()
    chunk_file(store, "tokens/flags", 4).unlink()
    with pytest.raises(StoreCorruptError) as error:
        open_store(store, verify=True)
    named = sorted(line.split(" (")[0] for line in error.value.problems)
    assert named == [f"{KEY} chunk 1", "tokens/flags chunk 4"]
    code, report = inspect(capsys, store, "--verify")
    assert code == 1 and "2 committed chunk(s)" in report


def test_a_clean_store_verifies(store, capsys):
    assert open_store(store, verify=True).check(checksums=True) == []
    assert sum(len(batch) for batch in read_all(store, verify=True)) == 54
    code, report = inspect(capsys, store, "--verify")
    assert code == 0 and "sizes and CRC32C checksums of every committed chunk ok" in report


# A reader in a process of its own: a chunk file that blocks it must fail the test, not hang the test run.
READ_ALL = """import sys
from engine import ActivationDataset, StoreCorruptError, StoreFormatError
try:
    list(ActivationDataset(sys.argv[1], sys.argv[2], batch_size=5))
except StoreCorruptError as error:
    print(error)
    sys.exit(3)
except StoreFormatError as error:
    print(error)
    sys.exit(4)
"""


@pytest.mark.parametrize("key", [KEY, "tokens/flags"])  # mapped (or zarr's), and read for the default exclude
@pytest.mark.parametrize("kind", ["a FIFO", "a symbolic link"])
def test_a_chunk_file_that_is_not_a_regular_file_is_refused(store, tmp_path, key, kind):
    """Before: a FIFO hung the reader in open() for ever; a symbolic link was followed outside the store.
    A FIFO is a damaged chunk; a link is a store laid out wrongly, refused by name."""
    path = chunk_file(store, key, 2)
    outside = tmp_path / "outside"
    shutil.move(path, outside)
    if kind == "a FIFO":
        os.mkfifo(path)
    else:
        path.symlink_to(outside)  # the chunk's own bytes: only where they are is wrong
    done = subprocess.run([sys.executable, "-c", READ_ALL, str(store), KEY], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    if kind == "a FIFO":
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"{key} chunk 2 ({path}): a FIFO where the chunk file should be" in done.stdout
    else:
        assert done.returncode == 4, done.stdout + done.stderr
        assert f"{path} is a symbolic link" in done.stdout


def test_rows_of_a_damaged_chunk_are_never_served(store):
    """Shuffled, windows of two chunks: the batches before the error hold only rows of good chunks."""
    rows = open_store(store)[KEY][:]
    good = {row.tobytes() for row in np.delete(rows, np.s_[24:32], axis=0)}  # chunk 3: rows 24..31
    path = chunk_file(store, KEY, 3)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    data = ActivationDataset(store, KEY, batch_size=3, exclude=(), verify=True, buffer_chunks=2,
                             window_bytes=2 * 8 * 64 * 2, dtype=torch.float16)
    served = []
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 3"):
        for batch in data:
            served += [row.tobytes() for row in batch.numpy()]
    assert served and set(served) <= good


def test_mapped_and_read_chunks_serve_the_same_rows(pristine):
    """The uncompressed store's chunks are mapped, the zstd one's read into memory: one design, the same
    rows each epoch, each with its tokens."""
    for epoch in range(2):
        mapped = served_rows(pristine / "None.zarr", KEY, epoch, batch_size=4, buffer_chunks=2)
        assert len(mapped) == 48 and mapped == served_rows(pristine / "zstd.zarr", KEY, epoch, batch_size=4,
                                                           buffer_chunks=2)


# ---- commit records: deleted, wrong, corrupt ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "shortened"])
def test_a_lost_commit_record_never_shortens_a_complete_store(store, damage, capsys):
    """Before: a deleted record (or one that no longer follows the one before) silently cut the store."""
    record = store / commit_record_key(3)
    if damage == "deleted":
        record.unlink()
    else:
        doc = json.loads(record.read_text())
        doc["attributes"].update(row_stop=doc["attributes"]["row_start"] + 4, token_count=4)
        for key, shape in doc["attributes"]["shape"].items():
            shape[0] = 4
        record.write_text(json.dumps(doc))
    for read in (lambda: open_store(store), lambda: ActivationDataset(store, KEY)):
        with pytest.raises(StoreCorruptError, match="says 54 committed tokens.* cover (24|28).*chunk_0+[34]"):
            read()
    code, report = inspect(capsys, store)
    assert code == 1 and "54 committed tokens" in report


def test_a_commit_record_of_another_chunk_is_refused(store, capsys):
    (store / commit_record_key(3)).write_bytes((store / commit_record_key(2)).read_bytes())
    expected = "chunk_000000000003/zarr.json: the commit record of chunk 3 says chunk 2.*expected chunk 3"
    for read in (lambda: open_store(store), lambda: ActivationDataset(store, KEY)):
        with pytest.raises(StoreFormatError, match=expected):
            read()
    code, report = inspect(capsys, store)
    assert code == 2 and "chunk_000000000003/zarr.json" in report


def _set_manifest_fields(store: Path, **fields) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["manifest"].update(fields)
    (store / "zarr.json").write_text(json.dumps(doc))


def _break_manifest_field(store: Path) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["manifest"]["committed_tokens"] = "many"
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("where, damage, expected", [
    (commit_record_key(1), b"{not json", "the commit record of chunk 1 .*not JSON"),
    (f"{KEY}/zarr.json", b"\x00garbage", f"the zarr array metadata of {KEY}"),
    ("zarr.json", b"[1, 2", "expected a zarr v3 group document \\(a capture store's root\\)"),
    ("zarr.json", None, "the manifest has committed_tokens='many'; expected int"),
])
def test_corrupt_metadata_raises_store_format_error_naming_the_file(store, where, damage, expected, capsys):
    """Before: a bare JSONDecodeError naming no file."""
    if damage is None:
        _break_manifest_field(store)
    else:
        (store / where).write_bytes(damage)
    for read in (lambda: open_store(store), lambda: ActivationDataset(store, KEY)):
        with pytest.raises(StoreFormatError, match=expected) as error:
            read()
        assert str(store / where) in str(error.value) and "The fix:" in str(error.value)
    code, report = inspect(capsys, store)
    assert code == 2 and report.startswith("error: ") and str(store / where) in report


def test_resume_refuses_a_store_whose_manifest_is_damaged(store):
    _break_manifest_field(store)
    with pytest.raises(StoreFormatError, match="committed_tokens"):
        capture(store, resume=True)


# ---- resume: verify what is kept, cut back before damage ---------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted chunk", "garbage chunk", "corrupt record"])
def test_resume_cuts_back_before_a_damaged_chunk_and_captures_it_again(store, damage, pristine):
    """Before: a resume over a deleted chunk finished 'complete' with zeros in it."""
    if damage == "deleted chunk":
        chunk_file(store, KEY, 3).unlink()
    elif damage == "garbage chunk":
        path = chunk_file(store, "layer_0/mlp_hidden", 3)
        path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    else:
        (store / commit_record_key(3)).write_text("{")
    compressor = json.loads((store / "zarr.json").read_text())["attributes"]["manifest"]["compressor"]
    with pytest.warns(RuntimeWarning, match="damaged committed chunks"):
        cap = capture(store, resume=True, compressor=compressor)
    assert cap.resume_sequences == 2  # sequences 0-1 end at row 18 of chunk 2: the last end before chunk 3
    resumed = open_store(store, verify=True)
    reference = open_store(pristine / f"{compressor}.zarr")
    for key in reference.keys():
        np.testing.assert_array_equal(resumed[key][:], reference[key][:], err_msg=key)
    entry = resumed.manifest.resumes[-1]
    assert entry["rows"] == 18 and entry["status_before"] == "complete"
    assert "chunk 3" in entry["damaged_chunks"][0]
    for key in ("layer_0/residual", "layer_0/mlp_hidden"):
        assert_statistics_match(store, key, resumed[key].shape[1])


@pytest.mark.parametrize("damage", [None, "deleted chunk", "deleted flags chunk", "garbage chunk", "crash"])
def test_the_resume_point_shown_is_the_one_a_resume_takes(store, damage):
    """One decision (engine.store.resume.scan_committed): inspect and the command line's check before a job
    read it from the flags alone, a resume verifies every chunk of every array. They agree unless the damage
    is in another array's chunk or only a checksum shows it; then the resume continues earlier, never
    later."""
    if damage == "deleted chunk":
        chunk_file(store, KEY, 3).unlink()
    elif damage == "deleted flags chunk":
        chunk_file(store, "tokens/flags", 3).unlink()
    elif damage == "garbage chunk":
        path = chunk_file(store, "layer_0/mlp_hidden", 3)
        path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    elif damage == "crash":  # the run died after chunk 4: nothing says complete, and sequence 5 is cut
        _set_manifest_fields(store, status="open")
        for index in (5, 6):
            shutil.rmtree(store / commit_record_key(index).rsplit("/", 1)[0])
    part = open_store(store).parts[0]
    shown = find_resume_point(part.group, part.chunks, part.manifest)
    compressor = part.manifest.compressor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "damaged committed chunks": tested above
        taken = capture(store, resume=True, compressor=compressor).resume_sequences
    expected = {None: (6, 6), "deleted chunk": (6, 2), "deleted flags chunk": (2, 2), "garbage chunk": (6, 2),
                "crash": (4, 4)}[damage]
    assert (shown.sequences, taken) == expected


def test_a_resume_drops_every_record_from_the_cut_on_damaged_ones_too(store):
    for index in (3, 5):
        (store / commit_record_key(index)).write_text("{")
    with pytest.warns(RuntimeWarning, match="commits/chunk_000000000003/zarr.json.*not JSON"):
        point = continue_store(Location.of(store), started="now", writer={"since": "now"})
    assert (point.rows, point.sequences, point.committed_rows) == (18, 2, 24)
    assert sorted(path.parent.name for path in (store / "commits").glob("chunk_*/zarr.json")) == [
        "chunk_000000000000", "chunk_000000000001"]
    assert open_store(store).status == "open" and open_store(store).num_tokens == 16


def test_resume_of_a_crashed_store_keeps_exact_statistics(tmp_path, pristine):
    """The statistics of the kept chunks come from the resume's verifying read (the writer process does not
    read them again) and stay exact: a crashed run (status open, its last commit record missing), resumed,
    equals the uninterrupted one."""
    path = tmp_path / "s.zarr"
    shutil.copytree(pristine / "None.zarr", path)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["manifest"].update(status="open", statistics={})
    (path / "zarr.json").write_text(json.dumps(doc))
    (path / commit_record_key(6)).unlink()
    assert capture(path, resume=True).resume_sequences == 5  # the 6th sequence ends in the uncommitted chunk
    resumed, reference = open_store(path, verify=True), open_store(pristine / "None.zarr")
    np.testing.assert_array_equal(resumed[KEY][:], reference[KEY][:])
    for key in (KEY, "layer_0/mlp_hidden"):
        assert_statistics_match(path, key, resumed[key].shape[1])
        assert resumed.manifest.statistics[key]["count"] == reference.manifest.statistics[key]["count"]


# ---- records as types; format version 1 --------------------------------------------------------------------


def test_records_round_trip_through_json(pristine):
    store = open_store(pristine / "None.zarr")
    assert Manifest.from_json(store.manifest.to_json(), "x") == store.manifest
    assert store.manifest.format_version == 2 and store.manifest.writers
    for record in store.chunks:
        assert CommitRecord.from_json(record.to_json(), "x", record.chunk_index, 8, 2) == record
        assert set(record.files) == {*record.dims, *store.manifest.token_arrays}
    with pytest.raises(StoreFormatError, match="x: the manifest has no field 'chunk_tokens'"):
        Manifest.from_json({k: v for k, v in store.manifest.to_json().items() if k != "chunk_tokens"}, "x")
    newer = {**store.manifest.to_json(), "format_version": 4}
    with pytest.raises(StoreFormatError, match="format version 4; this engine reads up to 3: upgrade"):
        Manifest.from_json(newer, "x")
    no_files = {key: value for key, value in store.chunks[0].to_json().items() if key != "files"}
    with pytest.raises(StoreFormatError, match="has no field 'files'"):
        CommitRecord.from_json(no_files, "x", 0, 8, 2)


def test_a_format_version_1_store_still_reads(tmp_path, capsys):
    """tests/data/format_v1_store was written by actcap-engine 0.2.0 (format version 1: records without
    checksums): 15 rows of layer_0/residual in chunks of 8."""
    raw = zarr.open_group(str(V1_STORE), mode="r")
    store = open_store(V1_STORE)
    assert store.manifest.format_version == 1 and store.num_tokens == 15 and store.unverifiable_chunks == 2
    np.testing.assert_array_equal(store[KEY][:], raw[KEY][:15])
    batches = ActivationDataset(V1_STORE, KEY, batch_size=4, shuffle=False, exclude=(), verify=True)
    np.testing.assert_array_equal(torch.cat(list(batches)).numpy(), raw[KEY][:15].astype(np.float32))
    with pytest.warns(RuntimeWarning, match="format version 1, without checksums"):
        open_store(V1_STORE, verify=True)
    code, report = inspect(capsys, V1_STORE, "--verify")
    assert code == 0 and "2 chunks written in format version 1 have no checksums" in report
    copy = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, copy)
    path = chunk_file(copy, KEY, 1)
    path.write_bytes(path.read_bytes()[:100])  # a version 1 chunk's length is checked (its presence is not)
    with pytest.raises(StoreCorruptError, match=f"{KEY} chunk 1 .*100 bytes"):
        open_store(copy)[KEY][:]


def test_a_resumed_format_version_1_store_mixes_old_and_new_records(tmp_path):
    copy = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, copy)
    model = tiny_model("gpt2")
    cfg = CaptureConfig(copy, layer_indices=[0], capture_mlp_hidden=False, chunk_tokens=8, resume=True)
    batch = ragged_batch(2, 9, seed=7)
    with CaptureEngine(model, cfg), torch.no_grad():
        model(**batch)
    store = open_store(copy)
    assert store.manifest.format_version == 1 and store.num_tokens == 15 + int(batch["attention_mask"].sum())
    assert not store.chunks[0].files and all(record.files for record in store.chunks[1:])
    assert store.check(checksums=True) == []


# ---- a store reads only its own regular files (issue 32) ---------------------------------------------------


def _resume(store: Path):
    """A resume with the store's own compressor, read from its manifest (the store may be unreadable)."""
    manifest = json.loads((store / "zarr.json").read_text())["attributes"]["manifest"]
    return capture(store, resume=True, compressor=manifest["compressor"])


def _returns(read, fifo: Path):
    """What ``read()`` returns or raises; a reader still blocked on the FIFO after a minute is let go (a
    writer opens and closes it) and the test fails: a hang guard, not a timing."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(read())
        except BaseException as error:
            outcome.append(error)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail(f"{read} waited on the FIFO {fifo}")
    return outcome[0]


def test_a_fifo_in_place_of_a_chunk_is_named_and_never_waited_on(store, capsys):
    """Before: every verifying reader, and the dataset even without verify, opened the FIFO and waited for a
    writer forever."""
    path = chunk_file(store, KEY, 2)
    path.unlink()
    os.mkfifo(path)
    readers = {"open_store": lambda: open_store(store)[KEY][:],
               "open_store(verify=True)": lambda: open_store(store, verify=True),
               "ActivationDataset": lambda: read_all(store),
               "ActivationDataset(verify=True)": lambda: read_all(store, verify=True)}
    for name, read in readers.items():
        error = _returns(read, path)
        assert isinstance(error, StoreCorruptError), (name, error)
        assert f"{KEY} chunk 2 ({path}): a FIFO where the chunk file should be" in str(error), (name, error)
    code, report = _returns(lambda: inspect(capsys, store, "--verify"), path)
    assert code == 1 and f"{KEY} chunk 2 ({path}): a FIFO where the chunk file should be" in report, report


def test_a_manifest_cannot_send_readers_to_another_store(pristine, tmp_path, capsys):
    """Before: a crafted part path ``../victim.zarr`` made every reader return the victim's rows."""
    victim, crafted = tmp_path / "victim.zarr", tmp_path / "crafted.zarr"
    shutil.copytree(pristine / "None.zarr", victim)
    doc = json.loads((victim / "zarr.json").read_text())
    manifest = doc["attributes"]["manifest"]
    manifest.update(world_size=1, parts=[{"path": "../victim.zarr", "status": "complete",
                                          "committed_tokens": manifest["committed_tokens"]}])
    crafted.mkdir()
    (crafted / "zarr.json").write_text(json.dumps(doc))
    expected = "lists part 0 at '../victim.zarr'; expected 'parts/rank_00000'"
    for read in (lambda: open_store(crafted), lambda: open_store(crafted, verify=True),
                 lambda: read_all(crafted)):
        with pytest.raises(StoreFormatError, match=expected):
            read()
    code, report = inspect(capsys, crafted, "--verify")
    assert code == 2 and expected in report


OTHER_SEQUENCES = [ragged_batch(1, 9, seed=100 + seed) for seed in range(6)]  # another run's rows, same sizes


@pytest.mark.parametrize("linked", ["chunk file", "array folder"])
def test_a_store_never_reads_through_a_symbolic_link(linked, store, tmp_path, capsys):
    """A chunk file or an array folder replaced by a link to another store's (same sizes, other rows).
    Before: read without complaint, the other store's rows returned as this one's; a resume would have
    written through the link into the other store."""
    other = tmp_path / "other.zarr"
    capture(other, OTHER_SEQUENCES, compressor=open_store(store).manifest.compressor)
    if linked == "chunk file":
        link = chunk_file(store, KEY, 2)
        link.unlink()
        link.symlink_to(chunk_file(other, KEY, 2))
    else:
        link = store / KEY
        shutil.rmtree(link)
        link.symlink_to(other / KEY, target_is_directory=True)
    expected = f"{link} is a symbolic link: a store reads only its own files"
    for read in (lambda: open_store(store)[KEY][:], lambda: open_store(store, verify=True),
                 lambda: read_all(store), lambda: _resume(store)):
        with pytest.raises(StoreFormatError, match=expected):
            read()
    code, report = inspect(capsys, store, "--verify")
    assert code == 2 and str(link) in report and open_store(other, verify=True).status == "complete"


# ---- array metadata checked against the manifest and the commit records (issue 32) -------------------------


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _set_shape(rows: int | None = None, width: int | None = None, chunk_rows: int | None = None):
    def edit(doc: dict) -> None:
        shape, chunks = doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"]
        shape[0] = shape[0] if rows is None else rows
        shape[1] = chunks[1] = shape[1] if width is None else width
        chunks[0] = chunks[0] if chunk_rows is None else chunk_rows
    return edit


def _drop_from_record(doc: dict) -> None:
    record = doc["attributes"]
    record["keys"].remove(KEY)
    for field in ("shape", "stats", "files"):
        del record[field][KEY]


@pytest.mark.parametrize("damage, expected", [
    ("rows", "10 rows, fewer than the 54 committed"),
    ("dtype", "data type int16, the manifest and commit records say float16"),
    ("width", r"row shape \(32,\), the manifest and commit records say \(64,\)"),
    ("huge width", r"row shape \(1099511627776,\)"),
    ("huge chunks", r"chunk shape \(1099511627776, 64\), the manifest and commit records say \(8, 64\)"),
    ("deleted", "missing, but 7 commit records list it"),
    ("record drops the array",
     r"commit record of chunk 2 \(.*chunk_000000000002/zarr.json\) lists the activation arrays "
     r"\['layer_0/mlp_hidden'\]"),
])
def test_array_metadata_is_checked_against_the_manifest_and_the_records(damage, expected, store, capsys):
    """Before: the array's zarr.json was trusted: a shape of 10 rows made ``len()`` and ``[:]`` disagree, an
    int16 dtype returned int16 values, width 32 served garbage rows, huge sizes raised MemoryError, a deleted
    zarr.json made the array vanish, and a record without the array (its chunk deleted) served zeros even
    with verify, while ``inspect --verify`` crashed with a KeyError."""
    document = store / KEY / "zarr.json"
    if damage == "deleted":
        document.unlink()
    elif damage == "record drops the array":
        _edit_json(store / commit_record_key(2), _drop_from_record)
        chunk_file(store, KEY, 2).unlink()
    else:
        edits = {"rows": _set_shape(rows=10), "width": _set_shape(width=32),
                 "huge width": _set_shape(width=2 ** 40), "huge chunks": _set_shape(chunk_rows=2 ** 40),
                 "dtype": lambda doc: doc.update(data_type="int16")}
        _edit_json(document, edits[damage])
    for read in (lambda: open_store(store), lambda: open_store(store, verify=True), lambda: read_all(store),
                 lambda: _resume(store)):
        with pytest.raises(StoreCorruptError, match=expected) as error:
            read()
        assert KEY in str(error.value) and "The fix: restore the named zarr.json" in str(error.value)
    code, report = inspect(capsys, store, "--verify")
    assert code == 1 and KEY in report and re.search(expected, report), report
    # the resume was refused before it changed anything
    assert json.loads((store / "zarr.json").read_text())["attributes"]["manifest"]["status"] == "complete"
