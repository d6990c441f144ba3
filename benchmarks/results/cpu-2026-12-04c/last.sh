# Quiet runs at 98de448 (the hooks gained a root forward hook and a device check): rounds of the passive
# bare-model capture, the dispatch-bound proxy with the zarr sink and with the null sink.
set -u
R=${1:-benchmarks/results/cpu-2026-12-04c}  # where the outputs go (later sessions re-run it into their own folder)
SMALL="--model gpt2 --config n_layer=4 n_embd=256 n_head=4 n_positions=128 --layers 2 --batch-size 32 --seq-len 128 --num-batches 4 --repeats 5 --sink zarr"
PROXY="--model gpt2 --config n_layer=12 n_embd=64 n_head=4 n_positions=64 --layers 6 --batch-size 1 --seq-len 32 --num-batches 200 --repeats 5"
for i in 1 2 3; do
  python benchmarks/overhead.py $SMALL --bare-model --json $R/last_passive_bare_$i.json > $R/last_passive_bare_$i.txt 2>&1
  OMP_NUM_THREADS=1 python benchmarks/overhead.py $PROXY --sink zarr --json $R/last_proxy_zarr_$i.json > $R/last_proxy_zarr_$i.txt 2>&1
  OMP_NUM_THREADS=1 python benchmarks/overhead.py $PROXY --sink null --json $R/last_proxy_null_$i.json > $R/last_proxy_null_$i.txt 2>&1
  echo "round $i done $(date +%T)"
done
