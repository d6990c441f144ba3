#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with a CUDA GPU. Installs carried zarr wheels when zarr
# is missing (see README "GPU"), records the card and versions, runs the `gpu` tests, then the gate for
# gpt2 shapes (4x512 and 32x512) with the null and zarr sinks and with early stop.
# Output (at most 8 files): $OUT/gpu.log and one JSON per gate run; default OUT=benchmarks/results/gpu-<date>.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
if ! python3 -c "import zarr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$TMPDIR/site" .whl/*.whl || exit 1
  export PYTHONPATH="$TMPDIR/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
log="$OUT/gpu.log"
{
  date -u
  nvidia-smi
  python3 -c "import torch, transformers, zarr, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__, 'numpy', numpy.__version__, 'card', torch.cuda.get_device_name(0))"
  nproc
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
} 2>&1 | tee "$log"
gate() {  # name, then overhead.py arguments
  local name=$1; shift
  echo "=== gate $name: $*" | tee -a "$log"
  python3 benchmarks/overhead.py --model gpt2 --weights random --num-batches 20 --repeats 5 \
    --num-writers 4 --pinned-slots 8 --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$log"
}
gate b4_null  --batch-size 4  --seq-len 512 --sink null
gate b4_zarr  --batch-size 4  --seq-len 512 --sink zarr
gate b32_null --batch-size 32 --seq-len 512 --sink null
gate b32_zarr --batch-size 32 --seq-len 512 --sink zarr
gate b32_zarr_early --batch-size 32 --seq-len 512 --sink zarr --early-stop
gate b32_resid_zarr --batch-size 32 --seq-len 512 --sink zarr --hooks residual
gate b32_zarr_nostats --batch-size 32 --seq-len 512 --sink zarr --no-statistics
echo "results in $OUT" | tee -a "$log"
