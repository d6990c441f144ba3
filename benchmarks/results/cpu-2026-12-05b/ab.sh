# Interleaved A/B of the bare passive capture and the zarr proxy: BEFORE_TREE = a worktree at daf1521,
# HEAD_TREE = main at ac459fe; run from /tmp so that each imports its own engine.
set -u
R=/tmp/ab_out; mkdir -p $R
SMALL="--model gpt2 --config n_layer=4 n_embd=256 n_head=4 n_positions=128 --layers 2 --batch-size 32 --seq-len 128 --num-batches 4 --repeats 5 --sink zarr --bare-model"
PROXY="--model gpt2 --config n_layer=12 n_embd=64 n_head=4 n_positions=64 --layers 6 --batch-size 1 --seq-len 32 --num-batches 200 --repeats 5 --sink zarr"
cd /tmp
for i in 1 2 3; do
  for v in B H; do
    if [ $v = B ]; then D=$BEFORE_TREE; else D=$HEAD_TREE; fi
    env -u PYTHONPATH PYTHONPATH=$D python $D/benchmarks/overhead.py $SMALL --json $R/bare_${v}_$i.json > $R/bare_${v}_$i.txt 2>&1
    env -u PYTHONPATH PYTHONPATH=$D OMP_NUM_THREADS=1 python $D/benchmarks/overhead.py $PROXY --json $R/proxy_${v}_$i.json > $R/proxy_${v}_$i.txt 2>&1
  done
  echo "round $i $(date +%T)"
done
echo done
