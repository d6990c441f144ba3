set -u
PROXY="--model gpt2 --config n_layer=12 n_embd=64 n_head=4 n_positions=64 --layers 6 --batch-size 1 --seq-len 32 --num-batches 200 --repeats 5 --sink zarr"
BARE="--model gpt2 --config n_layer=4 n_embd=256 n_head=4 n_positions=128 --layers 2 --batch-size 32 --seq-len 128 --num-batches 4 --repeats 5 --sink zarr --bare-model"
for round in 1 2; do
  for tree in before after; do
    dir=/work/wt/slow; [ $tree = after ] && dir=/work/main
    (cd $dir && OMP_NUM_THREADS=1 python benchmarks/overhead.py $PROXY --json /tmp/gate/proxy_${tree}_$round.json > /tmp/gate/proxy_${tree}_$round.txt 2>&1)
    (cd $dir && python benchmarks/overhead.py $BARE --json /tmp/gate/bare_${tree}_$round.json > /tmp/gate/bare_${tree}_$round.txt 2>&1)
  done
done
echo done > /tmp/gate/DONE
