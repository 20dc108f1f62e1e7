#!/usr/bin/env bash
# The deep-regime study (README "Results: the deep regime"): 6 shared blocks of width 64, 4 heads,
# patch 8 on 32 px CIFAR-10 (17 tokens), R=4, so 24 block applications, the effective depth of a
# 24-block ViT. Every run has the same budget: 15 epochs, batch 128, AdamW lr 1e-3 (1 warm-up
# epoch, cosine to 1e-5), weight decay 0.05, label smoothing 0.1, random crop (4 px) + flip, no
# drop path, the in-memory loader. One CPU thread per run, two chains at once.
#
#   bash results/cifar10-deep/study.sh round1 [path/to/cifar10]   # mixers x seeds, R=1, unshared ViT
#   bash results/cifar10-deep/study.sh collect [path/to/cifar10]  # logs, metrics, soft weights, table
# (A second round, chosen from what round 1 shows, is added here when round 1 is done.)
#
# Checkpoints live in $STUDY (default ~/srvit-study), outside the repository, so a study spread
# over several sessions resumes each run where it stopped (re-run the same part). The runs use
# a frozen copy of train.py and srvit.py ($STUDY/code), so editing the tree mid-study is safe.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STUDY=${STUDY:-$HOME/srvit-study}
PART=${1:-round1}
DATA=${2:-$ROOT/../shared/data/cifar10}
OUT=$ROOT/results/cifar10-deep
mkdir -p "$STUDY/runs"
if [ ! -f "$STUDY/code/train.py" ]; then
  mkdir -p "$STUDY/code" && cp "$ROOT/train.py" "$ROOT/srvit.py" "$STUDY/code/"
  (cd "$ROOT" && git rev-parse HEAD) > "$STUDY/code/COMMIT"
fi
COMMON="--data cifar10 --embed-dim 64 --num-layers 6 --num-heads 4 --patch-size 8 --batch-size 128 --lr 1e-3 \
  --epochs 15 --workers 0 --log-interval 100"
run() {  # run NAME FLAGS...
  local name=$1; shift
  echo "python train.py $COMMON $* --data-path <cifar10> --out-dir <dir>/$name    # code: commit $(cat "$STUDY/code/COMMIT")" > "$OUT/$name.cmd"
  OMP_NUM_THREADS=1 python "$STUDY/code/train.py" $COMMON "$@" --data-path "$DATA" --out-dir "$STUDY/runs/$name" \
    >> "$STUDY/runs/$name.log" 2>&1
}
chain_a() {
  run R4-soft-s0 --depth 4 --mixer soft --seed 0
  run R4-mean-s0 --depth 4 --mixer mean --seed 0
  run R4-soft-s1 --depth 4 --mixer soft --seed 1
  run R4-mean-s1 --depth 4 --mixer mean --seed 1
  run R4-soft-s2 --depth 4 --mixer soft --seed 2
  run R4-mean-s2 --depth 4 --mixer mean --seed 2
}
chain_b() {
  run R4-last-s0 --depth 4 --mixer last --seed 0
  run R1-s0 --depth 1 --seed 0
  run R4-last-s1 --depth 4 --mixer last --seed 1
  run R1-s1 --depth 1 --seed 1
  run R4-last-s2 --depth 4 --mixer last --seed 2
  run R1-s2 --depth 1 --seed 2
  run ViT24-s0 --depth 1 --num-layers 24 --seed 0     # the unshared ViT of the same block FLOPs
}
collect() {   # logs and metrics (not checkpoints) into the repository; the soft mixers' weights; the table
  for d in "$STUDY"/runs/*/; do
    name=$(basename "$d")
    mkdir -p "$OUT/$name"
    cp "$d/metrics.jsonl" "$OUT/$name/" 2>/dev/null
    cp "$STUDY/runs/$name.log" "$OUT/$name.log" 2>/dev/null
    if [[ $name == R4-soft* ]] && [ -f "$d/last.pt" ] && [ ! -f "$OUT/$name-eval.json" ] && \
       python -c "import torch,sys; c=torch.load(sys.argv[1],weights_only=True); sys.exit(c['epoch']<c['args']['epochs'])" "$d/last.pt"; then
      OMP_NUM_THREADS=1 python "$ROOT/eval.py" --checkpoint "$d/last.pt" --data-path "$DATA" --workers 0 \
        --json "$OUT/$name-eval.json" > "$OUT/$name-eval.md"
    fi
  done
  python "$ROOT/eval.py" --curve "$OUT"/*/ --plot "$ROOT/assets/curve-deep.png" --json "$OUT/curve.json" > "$OUT/curve.md"
}
case $PART in
  round1) chain_a & chain_b & wait ;;
  collect) collect ;;
  *) echo "usage: bash results/cifar10-deep/study.sh round1|collect [path/to/cifar10]"; exit 2 ;;
esac
