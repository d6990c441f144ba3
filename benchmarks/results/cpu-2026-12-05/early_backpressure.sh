#!/usr/bin/env bash
# Early stop against a forward truncated after the hooked layer (3 runs), then the backpressure benchmark,
# at the HEAD named in each output's first line. Quiet 2-core VM; run from the repository root.
set -u
D=benchmarks/results/cpu-2026-12-05
for i in 1 2 3; do
  { git rev-parse --short HEAD; python benchmarks/overhead.py --model gpt2 --config n_layer=4 n_embd=256 n_head=4 \
      n_positions=128 --layers 2 --batch-size 32 --seq-len 128 --num-batches 4 --repeats 5 --sink zarr \
      --early-stop --baseline truncated --json $D/early_$i.json; } > $D/early_$i.txt 2>&1
done
{ git rev-parse --short HEAD; python benchmarks/backpressure.py --json $D/backpressure.json; } > $D/backpressure.txt 2>&1
