cd /work/main
PROXY="--model gpt2 --config n_layer=12 n_embd=64 n_head=4 n_positions=64 --layers 6 --batch-size 1 --seq-len 32 --num-batches 200 --repeats 5 --sink zarr"
BARE="--model gpt2 --config n_layer=4 n_embd=256 n_head=4 n_positions=128 --layers 2 --batch-size 32 --seq-len 128 --num-batches 4 --repeats 5 --sink zarr --bare-model"
for r in 1 2; do
  OMP_NUM_THREADS=1 python benchmarks/overhead.py $PROXY --json /tmp/final/proxy_$r.json > /tmp/final/proxy_$r.txt 2>&1
  python benchmarks/overhead.py $BARE --json /tmp/final/bare_$r.json > /tmp/final/bare_$r.txt 2>&1
  python benchmarks/writer.py --total-mb 512 --repeats 1 --durable on --json /tmp/final/writer_$r.json > /tmp/final/writer_$r.txt 2>&1
done
python benchmarks/reader.py --rows 200000 --repeats 3 --json /tmp/final/reader.json > /tmp/final/reader.txt 2>&1
python benchmarks/training.py --store-dir /root/.cache/actcap/bench-training --train-tokens 131072 --eval-tokens 16384 --json /tmp/final/training.json > /tmp/final/training.txt 2>&1
echo done > /tmp/final/DONE
