#!/usr/bin/env bash
# The benchmarks' pictures of 2026-12-07: the reader's window sweep and the gate's per-forward latency on the
# dispatch-bound proxy. Run from the repository root: bash benchmarks/results/cpu-2026-12-07-plots/plots.sh
set -euo pipefail
out=benchmarks/results/cpu-2026-12-07-plots
git rev-parse --short HEAD > "$out/commit.txt"
python benchmarks/reader.py --seq-len 128 512 --repeats 3 --json "$out/reader_windows.json" \
    --plot "$out/reader_windows.png" > "$out/reader_windows.txt" 2>&1
OMP_NUM_THREADS=1 python benchmarks/overhead.py --model gpt2 --config n_layer=12 n_embd=64 n_head=4 \
    n_positions=64 --layers 6 --batch-size 1 --seq-len 32 --num-batches 200 --repeats 5 --sink zarr \
    --json "$out/overhead_proxy.json" --plot "$out/overhead_proxy.png" > "$out/overhead_proxy.txt" 2>&1 || true
