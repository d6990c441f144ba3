#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with a CUDA GPU. Installs carried wheels when zarr,
# numcodecs or crc32c is missing (.whl/, made by benchmarks/fetch_gpu_wheels.sh; see benchmarks/README.md),
# records the card and versions, runs the `gpu` tests, then the gate for gpt2 shapes (4x512 and 32x512;
# steady-state rounds of at least 2 s) with the null and zarr sinks, four writer threads and one, early stop
# against a forward truncated after the hooked layer,
# and a raw sequential write of chunk-sized files to the same disk (what the zarr sink can reach at all);
# last, PASS or FAIL per target (benchmarks/gpu_targets.py). Every step runs even when one before failed (a
# lent GPU's minutes are few: one call gathers everything), and the script exits 1 when any step or target
# failed, 0 when all passed. Every run names --device cuda: without CUDA it fails, it never measures the CPU.
# Output (at most 12 files): $OUT/gpu.log, COMMANDS.md (the commit) and one JSON per run; default
# OUT=benchmarks/results/gpu-<date>.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
if ! python3 -c "import zarr, numcodecs, crc32c" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$TMPDIR/site" .whl/*.whl || exit 1
  export PYTHONPATH="$TMPDIR/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
log="$OUT/gpu.log"
# results, not code: the folder says what made it (a copy of the tree without .git says so)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git history on this machine)")
printf '# %s\n\nMade by `bash benchmarks/gpu_check.sh` at commit %s, %s. Every step'"'"'s command is in gpu.log\n(the lines that start with ===); targets: benchmarks/gpu_targets.py.\n' \
  "$(basename "$OUT")" "$commit" "$(date -u +%FT%TZ)" > "$OUT/COMMANDS.md"
failed=()
step() {  # name, then the command; its output goes to the log; a failure is remembered, not fatal
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    echo "=== $name FAILED (exit status $status)" | tee -a "$log"
    failed+=("$name")
  fi
}
{ date -u; nvidia-smi; nproc; } 2>&1 | tee -a "$log"
step versions python3 -c "import torch, transformers, zarr, numpy, sys; assert torch.cuda.is_available(), 'no CUDA device'; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__, 'numpy', numpy.__version__, 'card', torch.cuda.get_device_name(0))"
step gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
gate() {  # name, then overhead.py arguments
  local name=$1; shift
  step "gate $name" python3 benchmarks/overhead.py --model gpt2 --weights random --device cuda \
    --num-batches 20 --min-round-s 2 --repeats 5 --pinned-slots 8 --json "$OUT/$name.json" "$@"
}
gate b4_null  --batch-size 4  --seq-len 512 --sink null --num-writers 4
gate b4_zarr  --batch-size 4  --seq-len 512 --sink zarr --num-writers 4
gate b4_zarr_w1 --batch-size 4 --seq-len 512 --sink zarr --num-writers 1
gate b32_null --batch-size 32 --seq-len 512 --sink null --num-writers 4
gate b32_zarr --batch-size 32 --seq-len 512 --sink zarr --num-writers 4
gate b32_zarr_w1 --batch-size 32 --seq-len 512 --sink zarr --num-writers 1
gate b32_zarr_early --batch-size 32 --seq-len 512 --sink zarr --num-writers 4 --early-stop
gate b32_zarr_early_vs_truncated --batch-size 32 --seq-len 512 --sink zarr --num-writers 4 --early-stop \
  --baseline truncated
step "raw sequential write of chunk-sized files (gpt2 residual + mlp_hidden rows, float16)" \
  python3 benchmarks/writer.py --raw-only --total-mb 8192 --repeats 2 --json "$OUT/raw_disk.json"
step targets python3 benchmarks/gpu_targets.py "$OUT"
echo "results in $OUT" | tee -a "$log"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$log"
  exit 1
fi
