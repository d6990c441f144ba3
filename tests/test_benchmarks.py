"""Benchmark harness logic: gate verdicts, exit codes, JSON fields. No timing asserts."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_targets  # noqa: E402
import overhead  # noqa: E402
import storage_encodings  # noqa: E402
import training  # noqa: E402
import writer  # noqa: E402
from helpers import assert_png, documents, hide_matplotlib  # noqa: E402

TINY = ["--model", "gpt2", "--config", "n_layer=2", "n_embd=64", "n_head=4", "vocab_size=256",
        "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--num-batches", "1", "--min-round-s", "0",
        "--repeats", "1", "--chunk-tokens", "8"]
REQUIRED = ["baseline_tokens_per_s", "hooked_tokens_per_s", "overhead_percent", "steady_overhead_percent",
            "peak_gpu_memory_gb", "host_rss_delta_mb", "stall_seconds", "queue_high_water", "gate_passed"]


def result(**overrides):
    base = {"device_type": "cpu", "overhead_percent": 4.0, "hooked_tokens_per_s": 500.0,
            "gpu_memory_overhead_gb": None, "gpu_total_memory_gb": None}
    return {**base, **overrides}


def test_gate_on_cpu_reports_but_does_not_gate_tokens_per_s():
    checks = overhead.evaluate_gate(result())
    assert checks["tokens_per_s"] == {**checks["tokens_per_s"], "passed": False, "gated": False}
    assert checks["overhead_percent"]["passed"] and "gpu_memory_overhead_gb" not in checks


def test_gate_fails_on_overhead_and_gpu_memory():
    assert not overhead.evaluate_gate(result(overhead_percent=55.0))["overhead_percent"]["passed"]
    gpu = overhead.evaluate_gate(result(device_type="cuda", hooked_tokens_per_s=5e5,
                                        gpu_memory_overhead_gb=9.0, gpu_total_memory_gb=80.0))
    assert gpu["tokens_per_s"]["gated"] and gpu["tokens_per_s"]["passed"]
    assert gpu["gpu_memory_overhead_gb"]["passed"] is False  # 9 GB > 10% of 80 GB


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("sink", ["zarr", "null"])
def test_overhead_writes_json_and_exit_code_follows_gate(sink, tmp_path):
    out = tmp_path / "o.json"
    proc = run_script("overhead.py", *TINY, "--sink", sink, "--json", str(out))
    data = json.loads(out.read_text())
    assert all(field in data for field in REQUIRED)
    assert data["peak_gpu_memory_gb"] is None and data["random_weights"] is True
    assert proc.returncode == (0 if data["gate_passed"] else 1), proc.stdout + proc.stderr
    for section in ("[validate]", "[baseline]", "[hooks]", "[memory]", "[result]", "[gate]"):
        assert section in proc.stdout
    assert "reported, not gated" in proc.stdout and "tokens_per_s" in proc.stdout
    assert not any("FAIL" in line for line in proc.stdout.splitlines() if "not gated" in line)
    if sink == "zarr":
        assert data["tokens_written"] == (1 + 1) * 2 * 16  # hooked warm-up + one hooked round, all committed
    assert data["baseline_thread_cpu_us_per_batch"] > 0 and data["hooked_thread_cpu_us_per_batch"] > 0
    assert data["hooks_thread_cpu_us_per_batch"] == pytest.approx(
        data["hooked_thread_cpu_us_per_batch"] - data["baseline_thread_cpu_us_per_batch"])


def read_csv(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def test_overhead_plot_draws_every_forward_and_flush(tmp_path):
    out, picture = tmp_path / "o.json", tmp_path / "latency.png"
    proc = run_script("overhead.py", *TINY, "--sink", "null", "--num-batches", "3", "--repeats", "2",
                      "--json", str(out), "--plot", str(picture))
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert_png(picture)
    table = read_csv(picture.with_suffix(".csv"))
    latency = np.array(table["latency_ms"], dtype=float) / 1e3
    kinds, rounds = np.array(table["kind"]), np.array(table["round"], dtype=int)
    n = data["batches_per_round"]
    assert [int((kinds == kind).sum()) for kind in ("unhooked", "hooked", "flush")] == [2 * n, 2 * n, 2]
    assert [entry["kind"] for entry in data["rounds"]] == ["unhooked", "hooked", "hooked", "unhooked"]  # ABBA
    # the plotted forwards add up to each round as the gate timed it; the flush is the rest of the round
    steady = {"unhooked": data["baseline_round_s"], "hooked": data["hooked_steady_round_s"]}
    for index, entry in enumerate(data["rounds"]):
        forwards = latency[(rounds == index) & (kinds == entry["kind"])]
        assert len(forwards) == n and (forwards > 0).all()
        assert forwards.sum() <= steady[entry["kind"]][index // 2] + 1e-9
    flushes = latency[kinds == "flush"]
    np.testing.assert_allclose(flushes, np.subtract(data["hooked_round_s"], data["hooked_steady_round_s"]),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("script, args", [("overhead.py", TINY), ("reader.py", ["--rows", "64"])])
def test_plot_without_matplotlib_is_one_line_before_any_work(script, args, tmp_path):
    picture = tmp_path / "never.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--plot", str(picture)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=hide_matplotlib(tmp_path / "hide"))
    assert done.returncode == 2 and done.stdout == "" and not picture.exists()
    assert done.stderr.count("\n") == 1 and 'pip install "actcap-engine[plot]"' in done.stderr, done.stderr


def test_overhead_exit_status_is_1_when_the_gate_fails():
    failing = run_script("overhead.py", *TINY, "--sink", "null", "--max-overhead", "-1000")
    assert failing.returncode == 1 and "[gate] FAILED" in failing.stdout


def test_overhead_job_mode_against_a_truncated_forward(tmp_path):
    out = tmp_path / "o.json"
    proc = run_script("overhead.py", *TINY, "--bare-model", "--early-stop", "--baseline", "truncated",
                      "--json", str(out))
    data = json.loads(out.read_text())
    assert proc.returncode in (0, 1) and data["baseline"] == "truncated" and data["bare_model"]
    assert data["tokens_written"] == (1 + 1) * 2 * 16


def test_backpressure_loses_nothing(tmp_path):
    out = tmp_path / "bp.json"
    proc = run_script("backpressure.py", "--dims", "16", "32", "--num-batches", "12", "--chunk-tokens", "64",
                      "--produce-mb-s", "20", "--sink-mb-s", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["rows_lost"] == 0 and data["values_ok"] and data["stall_seconds"] > 0


def test_writer_benchmark_reports_ratio(tmp_path):
    out = tmp_path / "w.json"
    proc = run_script("writer.py", "--dims", "32", "64", "--total-mb", "4", "--repeats", "1",
                      "--chunk-tokens", "512", "--batch-size", "2", "--seq-len", "128", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["durable_ratio_median"] > 0 and data["scratch_ratio_median"] > 0
    assert len(data["durable_ratios"]) == len(data["scratch_ratios"]) == 1
    assert data["durable_ratio_to_raw_durable_median"] > 0 and len(data["raw_durable_mb_per_s"]) == 1
    assert data["crc32c_seconds_per_gb"] > 0 and 0 < data["durable_crc32c_share"] < 1
    # the writer process's CPU is counted only once close() has waited for it to exit
    assert data["durable_writer_cpu_s_per_gb"] > 0 and data["scratch_capture_cpu_s_per_gb"] > 0
    assert 0 < data["durable_cores_busy"] <= os.cpu_count() * 1.05
    # steady state leaves out the warm-up chunks (one per writer thread and two more: the writer process's
    # start, its first chunk and its chunk buffers' first use; CPU milliseconds below)
    mb, steady_mb = data["mb_per_run"], data["steady_mb_per_run"]
    assert data["warm_chunks"] == 2 + 2 and data["warm_up_mb"] == 4 * 512 * 2 * (32 + 64) / 1e6
    assert steady_mb == pytest.approx(mb - data["warm_up_mb"])
    assert data["steady_needs_mb"] == 1, "9 batches of 2 x 128 tokens x 192 bytes: 0.44 MB, rounded up"
    for kind in ("durable", "scratch"):
        cpu = {process: (data[f"{kind}_steady_{process}_cpu_s_per_gb"] * steady_mb,
                         data[f"{kind}_{process}_cpu_s_per_gb"] * mb) for process in ("capture", "writer")}
        assert 0 <= cpu["capture"][0] <= cpu["capture"][1] + 1e-6  # read at the same instant: at most equal
        assert 0 <= cpu["writer"][0] < cpu["writer"][1] - 100  # an interpreter and its imports: ~1 s here


READER_TINY = ["--rows", "8192", "--dim", "8", "--chunk-tokens", "512", "--batch-size", "256"]


def test_reader_benchmark_reports_throughput_mixing_and_memory(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script("reader.py", *READER_TINY, "--seq-len", "64", "16", "--repeats", "2", "--json",
                      str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert [run["seq_len"] for run in data["runs"]] == [64, 16] and not data["cold"]
    assert data["old_buffer_mb"] == 5 * 512 * 8 * 2 / 1e6
    for run in data["runs"]:
        assert len(run["ratios"]) == len(run["cpu_ratios"]) == 2 and run["ratio_median"] > 0
        assert run["peak_anonymous_mb"] >= 0 and run["rows"] == 8192
        # the default window holds the whole store: batches mix like uniform random ones
        assert 0.9 < run["mixing"]["mixing"] <= 1.1
    assert "[reader] mixing" in proc.stdout and "peak anonymous memory" in proc.stdout


def test_writer_and_reader_benchmarks_run_an_8_bit_store(tmp_path):
    """--dtype int8: the pipeline's rows are decoded for its spot check, the reader decodes each batch."""
    out = tmp_path / "w.json"
    proc = run_script("writer.py", "--dims", "32", "--total-mb", "2", "--repeats", "1", "--durable", "on",
                      "--chunk-tokens", "512", "--batch-size", "2", "--seq-len", "128", "--dtype", "int8",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["dtype"] == "int8"
    out = tmp_path / "r.json"
    proc = run_script("reader.py", *READER_TINY, "--seq-len", "64", "--repeats", "1", "--dtype", "int8",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["rows"] == 8192 and run["dataset_mb_per_s"][0] > 0 and 0.9 < run["mixing"]["mixing"] <= 1.1
    proc = run_script("reader.py", *READER_TINY, "--dtype", "int8", "--cold")
    assert proc.returncode == 2 and "leave them out with --dtype" in proc.stderr


def test_reader_benchmark_cold_and_s3(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script("reader.py", *READER_TINY, "--seq-len", "64", "--repeats", "1", "--cold", "--s3",
                      "--window-bytes", "16384", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert data["cold"] and run["raw_mb_per_s"][0] > 0 and run["ratio_median"] > 0
    # windows of one chunk (512 rows x 24 bytes of the two arrays read) and the rows carried: 16 sequences
    mixing = run["mixing"]
    assert mixing["distinct_sequences_per_batch"] <= 16 < mixing["uniform_distinct_sequences_per_batch"]
    s3 = run["s3"]  # read into memory: buffer_chunks (4) chunks of 8 sequences per window, and the carry
    assert s3["mb_per_s"] > 0 and s3["distinct_sequences_per_batch"] <= 40 and s3["mixing"] < 0.5


def test_reader_plot_sweeps_windows_from_one_chunk_to_the_store(tmp_path):
    out, picture = tmp_path / "r.json", tmp_path / "windows.png"
    proc = run_script("reader.py", *READER_TINY, "--seq-len", "64", "--repeats", "1", "--json", str(out),
                      "--plot", str(picture))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_png(picture)
    run = json.loads(out.read_text())["runs"][0]
    table = {name: np.array(column, dtype=float)
             for name, column in read_csv(picture.with_suffix(".csv")).items()}
    chunk = 512 * (8 * 2 + 8)  # a chunk of the two arrays the mixing pass reads
    np.testing.assert_array_equal(table["chunks_per_window"], [1, 2, 4, 8, 16])  # 8192 rows: 16 chunks
    np.testing.assert_array_equal(table["window_bytes"], table["chunks_per_window"] * chunk)
    for column in ("mixing", "distinct_sequences_per_batch", "mb_per_s_median"):
        np.testing.assert_allclose(table[column], [point[column] for point in run["sweep"]])
    # a window of one chunk (8 sequences of 64) and the rows it carries over: at most two chunks' sequences
    assert table["distinct_sequences_per_batch"][0] <= 2 * 512 / 64
    # a window holding the whole store shuffles exactly as the default (4 GiB) one
    assert table["mixing"][-1] == pytest.approx(run["mixing"]["mixing"], rel=1e-12)
    assert table["mixing"][0] < 0.5 < table["mixing"][-1]
    assert (table["mb_per_s_min"] <= table["mb_per_s_median"]).all() and (table["mb_per_s_min"] > 0).all()


def test_training_benchmark_trains_both_arms_reports_and_reuses_its_stores(model_dir, tmp_path, capsys):
    """A tiny random-weight llama (the conftest's model folder) instead of SmolLM2, a few steps per arm; in
    this process (its captures run the command line's code in it too), which spares four interpreters."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents(400)))
    tiny = ["--model", str(model_dir), "--layer", "1", "--seq-len", "64", "--data", str(corpus),
            "--chunk-tokens", "256", "--train-tokens", "2048", "--eval-tokens", "512", "--d-sae", "128",
            "--k", "8", "--batch-size", "64", "--steps", "6", "--store-dir", str(tmp_path / "stores")]
    out = tmp_path / "t.json"
    assert training.main([*tiny, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/training.py --model") and data["git_commit"]
    assert data["exclude"] == "dataset default" and data["storage_dtype"] == "float16"
    assert 0 < data["train_rows"] <= 2048 and 0 < data["eval_rows"] <= 512 and data["steps"] == 6
    for arm in data["arms"].values():
        assert 0 < arm["fvu"] and 0 < arm["l0"] <= 8 and 0 <= arm["dead_latents"] <= 128
        assert arm["steps"] == 6 and arm["rows_trained"] == 6 * 64 and arm["tokens_per_s"] > 0
    assert set(data["ratios"]) == {"fvu", "l0", "tokens_per_s"}
    assert "[target]" in printed and all(f"\n{arm} " in printed for arm in ("dataset", "uniform"))
    # the old exclusion and normalization from the rows, on the stores captured above
    old = ["--exclude", "bos", "first", "--normalization", "rows"]
    assert training.main([*tiny, *old, "--json", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    data = json.loads(out.read_text())
    assert data["exclude"] == ["bos", "first"] and data["normalization"]["source"].startswith("the rows")



def test_storage_encodings_benchmark_trains_every_encoding_and_judges_it_on_float32_rows(model_dir, tmp_path,
                                                                                         capsys):
    """Each encoding's decoded rows against the float32 ones, and an SAE trained on them: the tiny llama of
    the training benchmark's test, a few steps per arm, in this process."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents(400)))
    tiny = ["--model", str(model_dir), "--layer", "1", "--seq-len", "64", "--data", str(corpus),
            "--chunk-tokens", "256", "--train-tokens", "2048", "--eval-tokens", "512", "--d-sae", "128",
            "--k", "8", "--batch-size", "64", "--steps", "4", "--encode-repeats", "2", "--block-rows", "300",
            "--store-dir", str(tmp_path / "stores")]
    out = tmp_path / "e.json"
    assert storage_encodings.main([*tiny, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/storage_encodings.py --model") and data["git_commit"]
    assert data["storage_dtype"] == "float32" and "-float32-" in data["stores"]["train"]
    assert data["normalization"]["same_for_every_arm"] and data["encode_batch_shape"] == [8, 64, 64]
    arms = data["arms"]
    assert list(arms) == ["float32", "float16", "bfloat16", "int8", "float8_e4m3"]
    assert [arms[name]["bytes_per_token"] for name in arms] == [256, 128, 128, 68, 68]  # 64 wide, + the scale
    assert arms["int8"]["bytes_vs_float16"] == 68 / 128 and arms["float16"]["fvu_vs_float16"] == 1
    errors = {name: arm["relative_rms_error"] for name, arm in arms.items()}
    assert errors["float32"] == 0 and 0 < errors["float16"] < errors["bfloat16"] < errors["float8_e4m3"]
    assert 0 < errors["int8"] < 0.05 and arms["float32"]["header_relative_rms_error"] is None
    for name in ("int8", "float8_e4m3"):  # the decode of the slot rows is the rows encode_rows measured
        assert arms[name]["header_relative_rms_error"] == pytest.approx(errors[name], rel=1e-3)
    for arm in arms.values():
        assert 0 < arm["fvu"] and 0 < arm["l0"] <= 8 and 0 <= arm["dead_latents"] <= 128
        assert arm["steps"] == 4 and arm["rows_trained"] == 4 * 64
        assert arm["encode_ms_per_batch"]["median"] > 0 and arm["encode_ms_per_batch"]["repeats"] == 2
        assert arm["rows_left_out_non_finite"] == 0 and arm["rows_decoded_non_finite"] == 0
    # the same rows, order and start in every arm: float32 and float16 rows train nearly the same SAE
    assert arms["float32"]["fvu"] == pytest.approx(arms["float16"]["fvu"], rel=0.01)
    # at 64 wide the row's scale costs 4/64 of the codes: 0.53 of float16's bytes, over the target's 0.52
    assert not data["target"]["met"] and data["target"]["best"] in ("int8", "float8_e4m3")
    assert f"[target] {data['target']['line']}" in printed and "NOT met (best: " in printed
    assert all(f"\n{name} " in printed for name in arms)
    # two encodings, normalized from the float32 rows, on the stores captured above
    assert storage_encodings.main([*tiny, "--encodings", "float16", "int8", "--normalization", "rows",
                                   "--json", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    data = json.loads(out.read_text())
    assert list(data["arms"]) == ["float16", "int8"] and "the rows" in data["normalization"]["source"]
    with pytest.raises(SystemExit):  # every ratio is to float16's
        storage_encodings.parse_args(["--encodings", "int8"])


def test_storage_encodings_target_needs_fvu_dead_latents_and_bytes_together():
    def arm(fvu, dead, bytes_per_token):
        return {"fvu_vs_float16": fvu, "dead_vs_float16": dead, "bytes_vs_float16": bytes_per_token,
                "dead_latents": dead, "fvu": fvu}

    reference = arm(1.0, 0, 1.0)
    met = storage_encodings.verdict({"float16": reference, "int8": arm(1.009, 0, 0.5035),
                                     "float8_e4m3": arm(1.002, 1, 0.5035)})
    assert met["met"] and met["meeting"] == ["int8"] and met["best"] == "int8"
    assert ": met (best: int8: FVU 1.0090x" in met["line"]
    for fvu, dead, size in ((1.011, 0, 0.5), (1.0, 1, 0.5), (1.0, 0, 0.53)):
        missed = storage_encodings.verdict({"float16": reference, "int8": arm(fvu, dead, size)})
        assert not missed["met"] and missed["best"] == "int8" and "NOT met" in missed["line"]
    assert not storage_encodings.verdict({"float16": reference})["met"]

def test_the_gpu_check_passes_only_arguments_the_benchmarks_accept():
    """gpu_check.sh runs once on a lent GPU with minutes of device time: a refused argument would waste it."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    common = shlex.split(re.search(r"benchmarks/overhead\.py (.*?) --json", text).group(1))
    gates = [shlex.split(line)[2:] for line in text.splitlines() if line.startswith("gate ")]
    assert len(gates) >= 8 and any("--early-stop" in args for args in gates)
    for args in gates:
        overhead.parse_args(common + args)  # argparse exits on an argument it refuses
    writer.parse_args(shlex.split(re.search(r"benchmarks/writer\.py (.*?) --json", text).group(1)))


def test_the_gpu_check_fails_when_a_step_fails_and_runs_every_step(tmp_path):
    """A step that fails is remembered, the next ones still run (one lent GPU call gathers everything), and
    the script's exit status says so: here every python3 step fails (a stand-in python3 that only answers
    the check for carried wheels)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\ncase "$2" in "import zarr, numcodecs, crc32c") exit 0;; '
                                     'esac\necho "stand-in python3 $*"; exit 3\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'no GPU here (test)'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out)},
                          timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = re.search(r"FAILED: (.*)", done.stdout).group(1)
    assert failed.startswith("versions gpu_tests gate b4_null") and failed.endswith("targets"), failed
    assert (out / "gpu.log").read_text().count("stand-in python3") == 12


def test_overhead_on_cuda_without_cuda_fails_instead_of_measuring_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_script("overhead.py", *TINY, "--device", "cuda", "--json", str(tmp_path / "o.json"))
    assert done.returncode != 0 and "never falls back to the CPU" in done.stderr, done.stderr
    assert not (tmp_path / "o.json").exists()


def _gpu_run(folder: Path, name: str, overhead: float, memory_gb: float = 0.5, mb_per_s: float = 1000.0):
    (folder / f"{name}.json").write_text(json.dumps({
        "overhead_percent": overhead, "steady_overhead_percent": overhead, "ratio_spread": [0.99, 1.01],
        "gpu_memory_overhead_gb": memory_gb, "gpu_total_memory_gb": 80.0, "hooked_mb_per_s": mb_per_s}))


def test_gpu_targets_say_pass_or_fail_per_target(tmp_path):
    _gpu_run(tmp_path, "b4_null", 4.0)
    _gpu_run(tmp_path, "b4_zarr", 11.0)  # fails: > 10%
    _gpu_run(tmp_path, "b32_zarr", 2.0, memory_gb=2.0, mb_per_s=1900.0)  # 2 GiB of 80: fails memory
    (tmp_path / "raw_disk.json").write_text(json.dumps({"raw_durable_mb_per_s": [2000.0, 1800.0]}))
    verdicts = {v.target.split(" ", 1)[0] + (" memory" if "memory" in v.target else ""): v.passed
                for v in gpu_targets.verdicts(tmp_path)}
    assert verdicts == {"b4_null": True, "b4_zarr": False, "b32_zarr": True, "b4_null memory": True,
                        "b4_zarr memory": True, "b32_zarr memory": False}
    assert gpu_targets.main([str(tmp_path)]) == 1
    (tmp_path / "b32_zarr.json").unlink()  # a missing run fails its target
    assert not next(v for v in gpu_targets.verdicts(tmp_path) if v.target.startswith("b32_zarr store")).passed
