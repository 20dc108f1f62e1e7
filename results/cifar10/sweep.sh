#!/usr/bin/env bash
# The CPU depth curve on CIFAR-10 (README "Results"). Two chains of runs at once, one CPU
# thread each, on the 2-core development machine: about 80 minutes.
#   bash results/cifar10/sweep.sh [path/to/cifar10]
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CODE=${CODE:-$ROOT}     # where train.py is (a frozen copy, so editing the tree mid-sweep is safe)
cd "$ROOT"
DATA=${1:-../shared/data/cifar10}
OUT=results/cifar10
COMMON="--data cifar10 --data-path $DATA --embed-dim 128 --num-layers 1 --num-heads 4 --patch-size 8 \
  --batch-size 128 --lr 1e-3 --epochs 8 --workers 0 --log-interval 100"
run() {  # run NAME FLAGS...
  local name=$1; shift
  echo "python train.py $COMMON $* --out-dir $OUT/$name" > "$OUT/$name.cmd"
  OMP_NUM_THREADS=1 python "$CODE/train.py" $COMMON "$@" --out-dir "$OUT/$name" > "$OUT/$name.log" 2>&1
}
chain_a() {
  run R1-s0 --depth 1 --seed 0
  run R4-soft-s0 --depth 4 --mixer soft --seed 0
  run R4-last-s0 --depth 4 --mixer last --seed 0
  run R4-mean-s0 --depth 4 --mixer mean --seed 0
  run R2-soft-s0 --depth 2 --mixer soft --seed 0
  run R2-last-s0 --depth 2 --mixer last --seed 0
  run R2-mean-s0 --depth 2 --mixer mean --seed 0
}
chain_b() {
  run R1-s1 --depth 1 --seed 1
  run R4-soft-s1 --depth 4 --mixer soft --seed 1
  run R4-last-s1 --depth 4 --mixer last --seed 1
  run R3-soft-s0 --depth 3 --mixer soft --seed 0
  run R3-last-s0 --depth 3 --mixer last --seed 0
  run R3-mean-s0 --depth 3 --mixer mean --seed 0
}
chain_a & chain_b & wait
echo "sweep done"
