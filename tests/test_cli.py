"""The capture command line end to end: a local model folder with a real (offline-trained) fast tokenizer,
a jsonl corpus, then inspect, align and the reader. Option checks run in process (``engine.cli.main``) with
model loading forbidden; subprocesses only where the real command line matters (environment, pipes, which
modules a mistake imports)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from engine import ActivationDataset, CaptureConfig, CaptureEngine, open_store
from engine.cli.corpus import Corpus
from engine.errors import CorpusError, StorePathError

from helpers import documents, tiny_model


def run_main(*argv) -> tuple[int, str, str]:
    """``engine.cli.main`` in this process: (exit status, stdout, stderr)."""
    from engine.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def cli(*argv) -> str:
    """The output of a command that must succeed."""
    code, out, err = run_main(*argv)
    assert code == 0, err
    return out


def capture(model_dir, data, out, *extra) -> str:
    data_args = [] if data is None else ["--data", data]
    return cli("capture", "--model", model_dir, *data_args, "--out", out, "--layers", 1, "--seq-len", 24,
               "--batch-size", 4, "--chunk-tokens", 32, "--no-progress", *extra)


def test_capture_inspect_align_read(model_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "s.zarr"
    printed = capture(model_dir, corpus, out, "--no-pack")  # one document per row: rows are easy to predict
    assert "expected store size" in printed and "[capture] done" in printed
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = documents(30)
    store = open_store(out)
    expected = [tokenizer(t, truncation=True, max_length=24)["input_ids"] for t in texts]
    np.testing.assert_array_equal(store["tokens/input_ids"][:], np.concatenate(expected))
    doc_id, start, end = (store[k][:] for k in ("tokens/doc_id", "tokens/char_start", "tokens/char_end"))
    np.testing.assert_array_equal(doc_id, np.concatenate([[i] * len(e) for i, e in enumerate(expected)]))
    for row in range(0, store.num_tokens, 7):  # each token's span spells the token
        piece = texts[doc_id[row]][start[row]:end[row]]
        token = tokenizer.convert_ids_to_tokens(int(store["tokens/input_ids"][row]))
        assert piece == ("" if token == "<s>" else token)

    report = cli("inspect", out)
    for text in ("status     complete", "layer_1/residual", "layer_1/mlp_hidden", "blocks.1.hook_resid_post",
                 "norm_scale", f"{store.num_tokens:,} committed"):
        assert text in report

    spans = tmp_path / "a.align.jsonl"
    first = texts[0]
    cut = first.index(" ", 10)
    spans.write_text(json.dumps({"doc_id": 0, "spans": [[0, cut, "step1"], [cut, len(first), "step2"]]})
                     + "\n" + json.dumps({"doc_id": 2, "spans": [[0, 5, "step1"]]}) + "\n")
    assert "labelled with 2 labels" in cli("align", out, spans)
    labels = open_store(out)["tokens/label"][:]
    real = end > start
    assert set(labels[(doc_id == 0) & real]) == {0, 1} and labels[(doc_id == 0) & ~real][0] == -1
    assert np.all(labels[(doc_id == 0) & real & (start < cut)] == 0)
    assert np.all(labels[(doc_id == 0) & real & (start >= cut)] == 1)
    assert np.all(labels[doc_id == 1] == -1) and np.all(labels[(doc_id == 2) & (start >= 5)] == -1)

    rows = torch.cat(list(ActivationDataset(out, "layer_1/residual", batch_size=16, exclude=("bos",))))
    assert rows.shape == (int((store["tokens/flags"][:] & 1 == 0).sum()), 64)


def test_a_gpt2_folder_with_a_pad_token_id(model_dir, corpus, tmp_path):
    """Issue 32: its points and widths are measured on the meta device, where transformers' check for pad
    tokens in the ids (made when the config has a pad_token_id) cannot read values. Before: a raw
    traceback, "Tensor.item() cannot be called on meta tensors", from ``models --points`` and ``capture``."""
    import shutil

    folder = tmp_path / "gpt2"
    tiny_model("gpt2", pad_token_id=0).save_pretrained(folder)
    for name in os.listdir(model_dir):  # its tokenizer: any fast tokenizer with ids below the model's vocab
        if "token" in name:
            shutil.copy(model_dir / name, folder / name)
    assert re.search(r"^0 +residual +64 ", cli("models", "--points", folder), re.MULTILINE)
    capture(folder, corpus, tmp_path / "s.zarr", "--max-tokens", 100)
    assert open_store(tmp_path / "s.zarr").status == "complete"


def test_early_stop_stores_what_the_full_forward_stores(model_dir, corpus, tmp_path):
    capture(model_dir, corpus, tmp_path / "early.zarr")
    capture(model_dir, corpus, tmp_path / "full.zarr", "--no-early-stop")
    early, full = open_store(tmp_path / "early.zarr"), open_store(tmp_path / "full.zarr")
    for key in ("layer_1/residual", "layer_1/mlp_hidden", "tokens/input_ids"):
        np.testing.assert_array_equal(early[key][:], full[key][:])


def test_max_tokens_pack_and_resume(model_dir, corpus, tmp_path):
    whole = tmp_path / "whole.zarr"
    capture(model_dir, corpus, whole, "--pack")
    packed = open_store(whole)
    assert packed["tokens/position"][:].max() == 23 and packed.num_tokens > 0
    split = tmp_path / "split.zarr"
    capture(model_dir, corpus, split, "--pack", "--max-tokens", 100)
    assert open_store(split).num_tokens <= 100
    spans = tmp_path / "a.align.jsonl"
    spans.write_text(json.dumps({"doc_id": 0, "spans": [[0, 10, "x"]]}) + "\n")
    cli("align", split, spans)
    assert "tokens/label" in open_store(split).keys()
    assert "resuming after" in capture(model_dir, corpus, split, "--pack", "--resume")
    assert "tokens/label" not in open_store(split).keys(), "a stale label array is dropped on resume"
    for key in ("tokens/input_ids", "tokens/sequence", "tokens/doc_id", "layer_1/residual"):
        np.testing.assert_array_equal(open_store(split)[key][:], packed[key][:])


def forbid_model_loading(monkeypatch) -> None:
    """From now on, loading the model's weights fails the test."""
    import engine.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(engine.models.loading, "load_model", refuse)


@pytest.fixture
def model_must_not_load(monkeypatch):
    forbid_model_loading(monkeypatch)


def assert_one_line_error(code: int, err: str, expected: str):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err


@pytest.mark.parametrize("options, expected", [
    (["--seq-len", 0], "argument --seq-len: must be a positive integer, got 0"),
    (["--seq-len", -1], "argument --seq-len: must be a positive integer, got -1"),
    (["--batch-size", 0], "argument --batch-size: must be a positive integer, got 0"),
    (["--batch-size", -1], "argument --batch-size: must be a positive integer, got -1"),
    (["--chunk-tokens", 0], "argument --chunk-tokens: must be a positive integer"),
    (["--max-tokens", 0], "argument --max-tokens: must be a positive integer"),
    (["--seq-len", "x"], "argument --seq-len: 'x' is not an integer"),
    (["--seq-len", 129], "--seq-len 129 exceeds the model's 128 positions: pass --seq-len 128 or less"),
    (["--layers", 3], "layer 3 is out of range: this model has 3 layers"),
    (["--layers", -1], "--layers: -1 is not a layer index: give indices 0..N-1"),
    (["--hooks", "--layers", 1], "no hook point selected"),
    (["--extra-modules", "q=model.layers.0.nope"], "no module at path 'model.layers.0.nope'"),
    (["--extra-modules", "q"], "write name=module.path"),
    (["--extra-modules", "q=lm_head", "q=model.norm"], "--extra-modules names q more than once"),
    (["--resume"], "--resume: there is no capture store at"),
    (["--resume", "--overwrite"], "--resume: there is no capture store at"),
    (["--resume-or-start", "--overwrite"], "not allowed with argument"),
    (["--max-tokens", 5], "--max-tokens 5 is less than the first row's 24 tokens"),
    (["--outlier-norm-ratio", "x"], "expected a number above 1 or 'none', got 'x'"),
    (["--outlier-norm-ratio", 0.5], "outlier_norm_ratio must be a finite number above 1"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--batch-size", 10 ** 9], "lower --pinned-slots, --batch-size or --seq-len"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(model_dir, corpus, tmp_path,
                                                             model_must_not_load, options, expected):
    code, out, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out",
                              tmp_path / "s.zarr", "--layers", 1, "--seq-len", 24, "--no-progress", *options)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("missing.jsonl", None, "no corpus at"),
    ("bad.jsonl", b'{"text": "the cat"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("null.jsonl", b'{"text": "the cat"}\n{"text": null}\n', "null.jsonl:2: field 'text' is null"),
    ("latin1.txt", "the caf\u00e9\n".encode("latin-1"), "latin1.txt:1: not UTF-8 text"),
    ("binary.bin", bytes(range(256)) * 4, "binary.bin:1: NUL bytes: this looks like a binary file"),
])
def test_bad_corpora_fail_in_one_line_before_the_model_loads(model_dir, tmp_path, model_must_not_load,
                                                            name, content, expected):
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content)
    options = ["capture", "--model", model_dir, "--data", data, "--out", tmp_path / "s.zarr", "--seq-len", 24]
    assert_one_line_error(*run_main(*options)[::2], expected)
    with pytest.raises(CorpusError, match=re.escape(expected)):  # --debug: the error itself, with traceback
        run_main(*options, "--debug")


def test_a_streamed_corpus_needs_max_tokens_under_torchrun(model_dir, tmp_path, monkeypatch,
                                                          model_must_not_load):
    import engine.cli.capture

    stream = Corpus("hf:a/stream", True, lambda: iter([]))
    monkeypatch.setattr(engine.cli.capture, "open_corpus", lambda *args: stream)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_main("capture", "--model", model_dir, "--data", "hf:a/stream", "--out",
                              tmp_path / "s.zarr", "--layers", 1)
    assert_one_line_error(code, err, "has no known length to share among 2 processes: pass --max-tokens")


def test_packing_is_the_default_and_throughput_counts_stored_tokens(model_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    printed = capture(model_dir, corpus, tmp_path / "s.zarr")
    assert "rows packed into 24-token windows" in printed
    store = open_store(tmp_path / "s.zarr")
    sequence, ids = store["tokens/sequence"][:], store["tokens/input_ids"][:]
    lengths = np.bincount(sequence)
    assert set(lengths[:-1]) == {24} and 0 < lengths[-1] <= 24, "full windows; only the last may be shorter"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = [token for text in documents(30)
                for token in [1] + tokenizer(text, add_special_tokens=False)["input_ids"]]
    np.testing.assert_array_equal(ids, expected)
    doc_id = store["tokens/doc_id"][:]
    np.testing.assert_array_equal(np.flatnonzero(np.diff(doc_id)) + 1, np.flatnonzero(ids == 1)[1:])
    done = re.search(r"done: ([\d,]+) tokens stored by this run in .* \(([\d,]+) tokens/s stored", printed)
    assert int(done.group(1).replace(",", "")) == store.num_tokens == len(expected)


def test_no_pack_reports_what_the_cut_dropped(model_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    printed = capture(model_dir, corpus, tmp_path / "s.zarr", "--no-pack")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(text)["input_ids"]) for text in documents(30)]
    cut, dropped = sum(n > 24 for n in lengths), sum(max(n - 24, 0) for n in lengths)
    assert cut, "the corpus has documents longer than 24 tokens"
    total = sum(lengths)
    assert (f"{cut} of 30 documents were cut at --seq-len 24, "
            f"dropping {dropped:,} of {total:,} tokens") in printed
    assert open_store(tmp_path / "s.zarr").num_tokens == sum(lengths) - dropped


def allocated_bytes(folder) -> int:
    paths = [folder, *(os.path.join(root, name) for root, dirs, files in os.walk(folder)
                       for name in dirs + files)]
    return sum(os.lstat(path).st_blocks * 512 for path in paths)


def test_size_estimate_is_what_inspect_finds_on_disk(model_dir, corpus, tmp_path):
    out = tmp_path / "s.zarr"
    # 480 tokens = 10 chunks of 48 exactly (this branch still writes a last partial chunk at full size)
    printed = capture(model_dir, corpus, out, "--chunk-tokens", 48, "--max-tokens", 480)
    expected = int(re.search(r"expected store size .* on disk \(([\d,]+) bytes", printed)[1].replace(",", ""))
    code, report, _ = run_main("inspect", out)
    on_disk = int(re.search(r"on disk .*\(([\d,]+) bytes allocated\)", report)[1].replace(",", ""))
    assert on_disk == allocated_bytes(out), "inspect counts allocated blocks, as du does"
    assert abs(expected - on_disk) <= 0.05 * on_disk, (expected, on_disk)


def test_extra_modules_and_no_canonical_points(model_dir, corpus, tmp_path):
    printed = capture(model_dir, corpus, tmp_path / "s.zarr", "--hooks", "--extra-modules",
                                 "q=model.layers.0.self_attn.q_proj", "norm=model.norm", "--max-tokens", 96)
    assert "['extra/q', 'extra/norm']" in printed
    store = open_store(tmp_path / "s.zarr")
    assert [key for key in store.keys() if not key.startswith("tokens/")] == ["extra/q", "extra/norm"]
    assert store["extra/q"].shape == (96, 64) and store["extra/norm"].shape == (96, 64)


def test_allow_download_reaches_model_and_tokenizer_loading(model_dir, corpus, tmp_path, monkeypatch):
    """Ctrl-C while the model loads ends the command with one line and status 130 (no traceback)."""
    import engine.models.loading

    seen = {}
    load_tokenizer = engine.models.loading.load_tokenizer

    def tokenizer_spy(name, allow_download=False):
        seen["tokenizer"] = allow_download
        return load_tokenizer(name, allow_download=False)

    def model_spy(*args, allow_download=False, **kwargs):
        seen["model"] = allow_download
        raise KeyboardInterrupt  # stop here: nothing more to see

    monkeypatch.setattr(engine.models.loading, "load_tokenizer", tokenizer_spy)
    monkeypatch.setattr(engine.models.loading, "load_model", model_spy)
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", tmp_path / "s.zarr",
                            "--layers", 1, "--seq-len", 24, "--allow-download")
    assert seen == {"tokenizer": True, "model": True}
    assert (code, err) == (130, "interrupted\n")


def test_resume_or_start_starts_then_resumes(model_dir, corpus, tmp_path):
    out = tmp_path / "s.zarr"
    first = capture(model_dir, corpus, out, "--resume-or-start", "--max-tokens", 240)
    assert "resuming" not in first and open_store(out).num_tokens == 240
    again = capture(model_dir, corpus, out, "--resume-or-start")
    assert "resuming after 10 sequences (240 tokens)" in again
    whole = capture(model_dir, corpus, tmp_path / "whole.zarr")
    np.testing.assert_array_equal(open_store(out)["tokens/input_ids"][:],
                                  open_store(tmp_path / "whole.zarr")["tokens/input_ids"][:])
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 1,
                            "--seq-len", 24)
    assert_one_line_error(code, err, "a capture store already exists at")
    assert "done" in whole


def test_without_data_the_job_captures_python_docs_and_says_so(model_dir, tmp_path):
    printed = capture(model_dir, None, tmp_path / "s.zarr", "--max-tokens", 240)
    assert "no --data given: capturing Python's own documentation" in printed
    assert open_store(tmp_path / "s.zarr").num_tokens == 240


@pytest.mark.slow
def test_a_hugging_face_dataset_streams_from_the_hub_cache_offline(model_dir, corpus, tmp_path):
    """hf:NAME with HF_HUB_OFFLINE=1 reads the local hub cache (laid out as huggingface_hub writes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "hf" / "hub" / "datasets--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pq.write_table(pa.table({"text": documents(30)}),
                   repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def command(data, out):
        return [sys.executable, "-m", "engine", "capture", "--model", str(model_dir), "--data", data, "--out",
                str(out), "--layers", "1", "--seq-len", "24", "--batch-size", "4", "--chunk-tokens", "32",
                "--no-progress"]

    done = subprocess.run(command("hf:someone/tiny", tmp_path / "hub.zarr"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "the Hugging Face dataset hf:someone/tiny (split train)" in done.stdout
    capture(model_dir, corpus, tmp_path / "local.zarr")
    for key in ("tokens/input_ids", "tokens/doc_id", "layer_1/residual"):
        np.testing.assert_array_equal(open_store(tmp_path / "hub.zarr")[key][:],
                                      open_store(tmp_path / "local.zarr")[key][:])
    missing = subprocess.run(command("hf:someone/absent", tmp_path / "absent.zarr"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert_one_line_error(missing.returncode, missing.stderr, "hf:someone/absent (split train): the Hugging "
                          "Face Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and the local hub cache")


@pytest.mark.parametrize("command", [["models"], ["inspect", "STORE"]])
def test_printing_commands_survive_a_closed_pipe(model_dir, corpus, tmp_path, command):
    """``python -m engine inspect STORE | head``: the reader leaves early; no BrokenPipeError traceback."""
    if "STORE" in command:
        capture(model_dir, corpus, tmp_path / "s.zarr", "--max-tokens", 96)
        command = ["inspect", str(tmp_path / "s.zarr")]
    proc = subprocess.Popen([sys.executable, "-m", "engine", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command prints (it is still importing)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


def files_of(folder) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


@pytest.mark.parametrize("status", ["complete", "open"])
def test_a_resume_that_cannot_fit_is_refused_before_the_store_is_touched(model_dir, corpus, tmp_path,
                                                                         monkeypatch, status):
    """``--resume --max-tokens`` below what the store holds (a complete store, or a killed one) used to repair
    the store, then stop and mark it; now nothing is loaded or changed."""
    out = tmp_path / "s.zarr"
    capture(model_dir, corpus, out, "--max-tokens", 400)
    if status == "open":  # as a kill -9 leaves it: the manifest says open, the commit records say how far
        manifest = json.loads((out / "zarr.json").read_text())
        manifest["attributes"]["manifest"]["status"] = "open"
        (out / "zarr.json").write_text(json.dumps(manifest))
    before, held = files_of(tmp_path), open_store(out).manifest["sequences"]
    forbid_model_loading(monkeypatch)
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 1,
                            "--seq-len", 24, "--batch-size", 4, "--chunk-tokens", 32, "--no-progress",
                            "--resume", "--max-tokens", 100)
    assert_one_line_error(code, err, f"--resume: it holds {held} sequences but this job has only")
    assert files_of(tmp_path) == before, "the store, its lock file and the folder are exactly as they were"


def test_a_store_being_written_is_refused_before_the_model_loads(model_dir, corpus, tmp_path,
                                                                 model_must_not_load):
    from engine.format.location import Location
    from engine.store.lock import acquire

    out = tmp_path / "s.zarr"
    out.mkdir()
    held = acquire(Location.of(out))  # another writer: a lock on another open file shuts this process out too
    try:
        for flag in ("--overwrite", "--resume-or-start"):
            code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", out,
                                    "--layers", 1, "--seq-len", 24, "--no-progress", flag)
            assert_one_line_error(code, err, f"is being written by pid {os.getpid()} on ")
    finally:
        held.release()
    assert os.listdir(tmp_path) == ["s.zarr"] and not os.listdir(out), "the lock file went with its holder"


# A command line in a fresh interpreter, then which heavy modules it imported (printed last on stdout).
NO_TORCH_SCRIPT = """import sys
from engine.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(sorted({"torch", "transformers"} & set(sys.modules)))
sys.exit(code)
"""


def run_fresh(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, *map(str, argv)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("argv", [["--help"], ["capture", "--help"]])
def test_help_answers_without_importing_torch(argv):
    done = run_fresh(*argv)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m engine" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]", "torch or transformers was imported"


@pytest.mark.parametrize("options, expected", [
    (["--data", "DIR/nosuch.jsonl"], "no corpus at"),
    (["--layers", -1], "--layers: -1 is not a layer index: give indices 0..N-1"),
    (["--out", "/proc/acts.zarr"], "cannot write under /proc"),
    (["--out", "DIR/s.zarr/zarr.json/acts.zarr"], "is a file, not a folder"),
    (["--resume"], "--resume: there is no capture store at"),
    (["--out", "DIR"], "a capture store already exists at"),
    (["--resume-or-start", "--overwrite"], "not allowed with argument --resume-or-start"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_mistakes_in_the_arguments_or_files_are_reported_before_torch_is_imported(model_dir, corpus, tmp_path,
                                                                                  options, expected):
    store = tmp_path / "s.zarr"
    capture(model_dir, corpus, store, "--max-tokens", 96)  # DIR: a store in the way
    options = [str(store) if option == "DIR" else str(option).replace("DIR/", f"{tmp_path}/")
               for option in options]
    argv = ["capture", "--model", model_dir, "--data", corpus, "--out", tmp_path / "new.zarr", "--layers", 1]
    done = run_fresh(*argv, *options)
    assert_one_line_error(done.returncode, done.stderr, expected)
    assert done.stdout.splitlines()[-1] == "[]", "torch or transformers was imported"


@pytest.mark.parametrize("out", ["/proc/acts.zarr", "/sys/kernel/acts.zarr"])
def test_an_out_where_nothing_can_be_created_is_one_line_before_the_model_loads(model_dir, corpus, out,
                                                                                model_must_not_load):
    """Before: a 35-line traceback from the lock file, after the model had loaded (root passes os.access
    there: only creating something tells)."""
    if not os.path.isdir(os.path.dirname(out)):
        pytest.skip(f"{os.path.dirname(out)} does not exist here")
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 1)
    assert_one_line_error(code, err, f"cannot write under {os.path.dirname(out)} (")
    assert "put the store in a folder you can write" in err


def test_an_engine_refuses_a_store_where_nothing_can_be_created(tmp_path):
    """The same decision for the Python API (engine.store.lifecycle.check_location), before any hook."""
    if not os.path.isdir("/proc"):
        pytest.skip("/proc does not exist here")
    model = tiny_model("gpt2")
    with pytest.raises(StorePathError, match="cannot write under /proc .*put the store in a folder you can"):
        CaptureEngine(model, CaptureConfig("/proc/acts.zarr", layer_indices=[0]))
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_capture_help_shows_every_default_and_examples():
    from engine.cli.main import build_parser

    commands = next(action for action in build_parser()._actions if action.dest == "command")
    parser = commands.choices["capture"]
    assert all(action.help for action in parser._actions), "every option says what it does"
    text = " ".join(parser.format_help().split())  # unwrapped
    for default in ("tokens per row (default: 512)", "rows per forward pass (default: 8)",
                    "rows per chunk and per commit (default: 8192)", "(default: required)",
                    "(default: residual mlp_hidden)", "(default: float16)", "(default: 10.0)"):
        assert default in text
    assert "examples: python -m engine capture --model" in text


def ctrl_c_on_forward(model, number: int):
    """The model, made to raise KeyboardInterrupt (as Ctrl-C does) when its forward is called the
    ``number``-th time."""
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt, with_kwargs=True)
    return model


def test_ctrl_c_prints_how_to_resume_and_that_command_resumes_after_overwrite(model_dir, corpus, tmp_path,
                                                                               monkeypatch):
    """The hint after Ctrl-C is literally true: the first command (with --overwrite) plus --resume continues
    the store; the API's UserWarning (CaptureConfig, resume_sequences) is not shown; the resumed plan shows
    what is left."""
    import engine.models.loading

    load_model = engine.models.loading.load_model
    monkeypatch.setattr(engine.models.loading, "load_model",
                        lambda *args, **kwargs: ctrl_c_on_forward(load_model(*args, **kwargs), 5))
    argv = ["capture", "--model", model_dir, "--data", corpus, "--out", tmp_path / "s.zarr", "--layers", 1,
            "--seq-len", 24, "--batch-size", 4, "--chunk-tokens", 32, "--no-progress", "--overwrite"]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        code, _, err = run_main(*argv)
    assert code == 130
    last = err.splitlines()[-1]  # after transformers' own "Loading weights" bar
    assert "interrupted" in last and "run the same command with --resume" in last, err
    assert "CaptureConfig" not in err and "Traceback" not in err, err
    assert not [w for w in shown if "resume" in str(w.message)], [str(w.message) for w in shown]

    monkeypatch.setattr(engine.models.loading, "load_model", load_model)
    resumed = cli(*argv, "--resume")
    left = re.search(r"resuming: ([\d,]+) tokens in ([\d,]+) rows left to capture", resumed)
    capture(model_dir, corpus, tmp_path / "whole.zarr")
    whole = open_store(tmp_path / "whole.zarr")
    stored = open_store(tmp_path / "s.zarr")
    assert left and int(left[1].replace(",", "")) < whole.num_tokens, resumed
    for key in ("tokens/input_ids", "tokens/sequence", "layer_1/residual"):
        np.testing.assert_array_equal(stored[key][:], whole[key][:])


def test_a_resume_with_other_options_is_refused_before_the_weights_load(model_dir, corpus, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "s.zarr"
    capture(model_dir, corpus, out, "--max-tokens", 96)
    before = files_of(tmp_path)
    forbid_model_loading(monkeypatch)
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", out, "--layers", 2,
                            "--seq-len", 24, "--chunk-tokens", 32, "--resume")
    assert_one_line_error(code, err, f"--resume: {out} was captured with other options (layers: the store "
                          "has [1], this run has [2]")
    assert "--overwrite without --resume" in err
    assert files_of(tmp_path) == before


def test_resuming_a_complete_store_says_nothing_was_left_without_loading_the_model(model_dir, corpus,
                                                                                    tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    capture(model_dir, corpus, out)
    before, store = files_of(tmp_path), open_store(out)
    forbid_model_loading(monkeypatch)
    printed = capture(model_dir, corpus, out, "--resume")
    assert (f"done: {out} already held all {store.manifest.sequences} sequences of this job "
            f"({store.num_tokens:,} tokens): nothing was captured") in printed
    assert "tokens stored by this run" not in printed
    assert files_of(tmp_path) == before


def test_the_progress_bar_shows_staged_bytes_from_the_first_batch(model_dir, corpus, tmp_path):
    code, _, err = run_main("capture", "--model", model_dir, "--data", corpus, "--out", tmp_path / "s.zarr",
                            "--layers", 1, "--seq-len", 24, "--batch-size", 4, "--chunk-tokens", 4096)
    assert code == 0, err
    first = re.search(r"([\d.,]+) (kB|MB|GB) staged, ([\d.,]+) (kB|MB|GB) committed", err)
    assert first and float(first[1]) > 0, err  # one chunk of 4096 rows commits only at the end


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("offline", ["HF_DATASETS_OFFLINE", "unreachable hub"])
def test_hf_data_offline_fails_at_once_in_one_line(model_dir, tmp_path, offline):
    """Offline mode (HF_DATASETS_OFFLINE alone is honoured) or a hub that does not answer the connection
    check: the local hub cache is read at once, and nothing retries or logs (before, an unreachable hub took
    27 s and 11 lines of retries before this line)."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    if offline == "HF_DATASETS_OFFLINE":
        env["HF_DATASETS_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    done = run_fresh("capture", "--model", model_dir, "--data", "hf:someone/absent", "--out",
                     tmp_path / "s.zarr", "--layers", 1, env=env)
    assert_one_line_error(done.returncode, done.stderr, "hf:someone/absent (split train): the Hugging Face "
                          "Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and the local hub cache")
