#!/usr/bin/env bash
# The CPU depth curve on CIFAR-10 (README "Results"). Chains of runs at once, one CPU thread
# each, on the 2-core development machine. The runs in results/cifar10 used train.py and
# srvit.py of commit e0e430b (R4-soft-lastinit-s0: of the commit that added --router-init);
# later commits changed how the mixer sums the steps, not what it computes.
#   bash results/cifar10/sweep.sh main  [path/to/cifar10]   # the depth curve: two chains, ~90 min
#   bash results/cifar10/sweep.sh extra [path/to/cifar10]   # drop path, and stack vs block at L=2
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CODE=${CODE:-$ROOT}     # where train.py is (a frozen copy, so editing the tree mid-sweep is safe)
cd "$ROOT"
PART=${1:-main}
DATA=${2:-$ROOT/data/cifar10}     # CIFAR-10 JPEGs: train/<class>/, test/<class>/
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
  # run R2-mean-s0 --depth 2 --mixer mean --seed 0    (planned, cut for time)
}
chain_b() {
  run R1-s1 --depth 1 --seed 1
  run R4-soft-s1 --depth 4 --mixer soft --seed 1
  run R4-last-s1 --depth 4 --mixer last --seed 1
  run R3-soft-s0 --depth 3 --mixer soft --seed 0
  run R3-last-s0 --depth 3 --mixer last --seed 0
  # run R3-mean-s0 --depth 3 --mixer mean --seed 0    (planned, cut for time)
}
chain_c() {  # (a run of "last" with drop path 0.1 was planned here and cut for time)
  run R4-soft-dp0.1-s0 --depth 4 --mixer soft --drop-path 0.1 --seed 0
}
chain_d() {  # two shared blocks, so that re-applying the stack differs from re-applying each block
  run L2-R1-s0 --depth 1 --num-layers 2 --seed 0
  run L2-R4-soft-block-s0 --depth 4 --mixer soft --share block --num-layers 2 --seed 0
  run L2-R4-soft-stack-s0 --depth 4 --mixer soft --share stack --num-layers 2 --seed 0
}
chain_e() {  # the router initialised near plain recursion (0.9 on the last step) instead of uniform
  run R4-soft-lastinit-s0 --depth 4 --mixer soft --router-init last --seed 0
}
case $PART in
  main) chain_a & chain_b & wait ;;
  extra) chain_c & chain_d & chain_e & wait ;;
  *) echo "usage: bash results/cifar10/sweep.sh main|extra [path/to/cifar10]"; exit 2 ;;
esac
echo "sweep done"
