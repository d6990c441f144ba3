set -u
DIMS30=$(python -c "print(' '.join(['576']*30))")
for round in 1 2; do
  for tree in before after; do
    dir=/work/wt/slow; [ $tree = after ] && dir=/work/main
    (cd $dir && python benchmarks/writer.py --total-mb 512 --repeats 1 --durable on --json /tmp/wab/default_${tree}_$round.json > /tmp/wab/default_${tree}_$round.txt 2>&1)
    (cd $dir && python benchmarks/writer.py --dims $DIMS30 --total-mb 512 --repeats 1 --durable on --json /tmp/wab/alllayer_${tree}_$round.json > /tmp/wab/alllayer_${tree}_$round.txt 2>&1)
  done
done
echo done > /tmp/wab/DONE
