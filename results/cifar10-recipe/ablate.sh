#!/usr/bin/env bash
# The small-images recipe's ablation: R=1, 6 blocks of width 64, 4 heads, patch 8 on 32 px CIFAR-10
# (17 tokens), batch 128, AdamW lr 1e-3, weight decay 0.05, label smoothing 0.1, random crop (4 px)
# + flip, 5 epochs. Each run changes the init, the crop's padding and the lr schedule one at a time
# from the old recipe (timm init, zero padding, DeiT's one-epoch-late schedule), then all together.
# One CPU thread per run, two runs at once.
#
#   bash results/cifar10-recipe/ablate.sh run [path/to/cifar10]      # every run of the list not yet done
#   bash results/cifar10-recipe/ablate.sh collect                      # logs, metrics and table.md
#
# Checkpoints live in $RECIPE (default ~/srvit-recipe), outside the repository; the runs use a
# frozen copy of train.py and srvit.py ($RECIPE/code), so editing the tree meanwhile is safe.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RECIPE=${RECIPE:-$HOME/srvit-recipe}
PART=${1:-run}
DATA=${2:-$ROOT/data/cifar10}     # CIFAR-10 JPEGs: train/<class>/, test/<class>/
OUT=$ROOT/results/cifar10-recipe
mkdir -p "$RECIPE/runs"
if [ ! -f "$RECIPE/code/train.py" ]; then
  mkdir -p "$RECIPE/code" && cp "$ROOT/train.py" "$ROOT/srvit.py" "$RECIPE/code/"
  (cd "$ROOT" && git rev-parse HEAD) > "$RECIPE/code/COMMIT"
fi
COMMON="--data cifar10 --embed-dim 64 --num-layers 6 --num-heads 4 --patch-size 8 --batch-size 128 --lr 1e-3 \
  --depth 1 --epochs 5 --workers 0 --log-interval 100"
OLD="--init timm --pad-mode zeros --schedule deit"
RUNS=(   # name, then the flags
  "old-s0       $OLD --seed 0"
  "init-s0      --init torch --pad-mode zeros --schedule deit --seed 0"
  "reflect-s0   --init timm --pad-mode reflect --schedule deit --seed 0"
  "cosine-s0    --init timm --pad-mode zeros --schedule cosine --seed 0"
  "init+reflect-s0 --init torch --pad-mode reflect --schedule deit --seed 0"
  "new-s0       --init torch --pad-mode reflect --schedule cosine --seed 0"
  "old-s1       $OLD --seed 1"
  "new-s1       --init torch --pad-mode reflect --schedule cosine --seed 1"
  "init+reflect-s1 --init torch --pad-mode reflect --schedule deit --seed 1"
)
run() {  # run NAME FLAGS...
  local name=$1; shift
  echo "python train.py $COMMON $* --data-path <cifar10> --out-dir <dir>/$name" > "$OUT/$name.cmd"
  OMP_NUM_THREADS=1 python "$RECIPE/code/train.py" $COMMON "$@" --data-path "$DATA" --out-dir "$RECIPE/runs/$name" \
    >> "$RECIPE/runs/$name.log" 2>&1
}
worker() {   # take the first run that is neither done nor claimed by the other worker; repeat
  for line in "${RUNS[@]}"; do
    read -r name flags <<< "$line"
    grep -q '"epoch": 5,' "$RECIPE/runs/$name/metrics.jsonl" 2>/dev/null && continue
    mkdir -p "$RECIPE/claims"; mkdir "$RECIPE/claims/$name" 2>/dev/null || continue
    echo "$(date +%H:%M) worker $1: $name"
    run "$name" $flags || echo "$(date +%H:%M) worker $1: $name FAILED, see $RECIPE/runs/$name.log"
  done
}
collect() {
  for d in "$RECIPE"/runs/*/; do
    name=$(basename "$d"); mkdir -p "$OUT/$name"
    cp "$d/metrics.jsonl" "$OUT/$name/" 2>/dev/null; cp "$RECIPE/runs/$name.log" "$OUT/$name.log" 2>/dev/null
    sed -i "s#$RECIPE/runs#<dir>#g; s#$DATA#<cifar10>#g; s#\"data_path\": \"[^\"]*\"#\"data_path\": \"<cifar10>\"#g; s#data cifar10 from [^:]*:#data cifar10 from <cifar10>:#g" "$OUT/$name.log" "$OUT/$name/metrics.jsonl" 2>/dev/null   # no machine paths
  done
  python "$OUT/table.py" > "$OUT/table.md"
}
case $PART in
  run) rm -rf "$RECIPE/claims"; worker 1 & worker 2 & wait ;;
  collect) collect ;;
  *) echo "usage: ablate.sh run|collect [cifar10 folder]" >&2; exit 2 ;;
esac
