#!/usr/bin/env bash
# The deep-regime study again, in the small-images recipe as it is now (fan-in scaled init, reflect
# padding, cosine to the floor; results/cifar10-recipe): the same model (6 shared blocks of width 64,
# 4 heads, patch 8, R=4: effective depth 24), the same budget (15 epochs, batch 128, AdamW lr 1e-3)
# and the same machinery as results/cifar10-deep (frozen code, two workers, resumable runs, the
# paired-by-seed summary). Only the plan, the folders and the code's commit differ.
#
#   bash results/cifar10-deep2/study.sh run [path/to/cifar10]      # every run of plan.txt not yet done
#   bash results/cifar10-deep2/study.sh collect [path/to/cifar10]  # logs, metrics, soft weights, summary.md
#
# Checkpoints and the frozen code live in $STUDY (default ~/srvit-study2), outside the repository.
# Every run used train.py and srvit.py as of commit $FROZEN. Where $STUDY is new (another machine),
# that code is taken from git and each run finished in this folder is marked done there, so `run`
# goes on with the rest of plan.txt.
HERE=$(cd "$(dirname "$0")" && pwd)
STUDY=${STUDY:-$HOME/srvit-study2}
FROZEN=0e60aaf63c5d18340693a5fd1d06fb3e67dff0df
if [ ! -f "$STUDY/code/train.py" ]; then
  mkdir -p "$STUDY/code" "$STUDY/runs"
  for f in train.py srvit.py; do
    git -C "$HERE" show "$FROZEN:$f" > "$STUDY/code/$f" || { rm -rf "$STUDY/code"; echo "cannot read commit $FROZEN (a full clone has it)"; exit 2; }
  done
  echo "$FROZEN" > "$STUDY/code/COMMIT"
  for m in "$HERE"/*/metrics.jsonl; do
    r=$(basename "$(dirname "$m")")
    if grep -q '"epoch": 15,' "$m" && [ ! -e "$STUDY/runs/$r" ]; then   # finished: all 15 epochs
      mkdir -p "$STUDY/runs/$r" && cp "$m" "$STUDY/runs/$r/" && cp "$HERE/$r.log" "$STUDY/runs/$r.log"
    fi
  done
fi
STUDY=$STUDY STUDY_OUT=$HERE exec bash "$HERE/../cifar10-deep/study.sh" "$@"
