# Interleaved writer A/B: BEFORE_TREE = a worktree at daf1521 (syncfs on a synced descriptor), HEAD_TREE =
# main at 7918951 (syncfs on a witness opened before the writes). Run from /tmp.
set -u
R=/tmp/wab_out; mkdir -p $R
cd /tmp
for i in 1 2 3; do
  for v in B H; do
    if [ $v = B ]; then D=$BEFORE_TREE; else D=$HEAD_TREE; fi
    env -u PYTHONPATH PYTHONPATH=$D python $D/benchmarks/writer.py --total-mb 2048 --repeats 1 --durable on --output-dir /work/wab_tmp --json $R/writer_${v}_$i.json > $R/writer_${v}_$i.txt 2>&1
  done
  echo "round $i $(date +%T)"
done
echo done
