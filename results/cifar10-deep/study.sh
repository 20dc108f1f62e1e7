#!/usr/bin/env bash
# The deep-regime study (README "Results: the deep regime"): 6 shared blocks of width 64, 4 heads,
# patch 8 on 32 px CIFAR-10 (17 tokens), R=4, so 24 block applications, the effective depth of a
# 24-block ViT. Every run has the same budget: 15 epochs, batch 128, AdamW lr 1e-3 (1 warm-up
# epoch, cosine to 1e-5), weight decay 0.05, label smoothing 0.1, random crop (4 px) + flip, no
# drop path, the in-memory loader. One CPU thread per run, two runs at once.
#
#   bash results/cifar10-deep/study.sh run [path/to/cifar10]      # every run of the plan not yet done
#   bash results/cifar10-deep/study.sh collect [path/to/cifar10]  # logs, metrics, soft weights, summary.md
# Two workers (one CPU thread each) take the runs of the plan ($STUDY_PLAN, default plan.txt) in
# order; a run counts as done when its metrics.jsonl holds the last epoch, so re-running `run`
# resumes the unfinished ones.
#
# Checkpoints live in $STUDY (default ~/srvit-study), outside the repository, so a study spread
# over several invocations resumes each run where it stopped (re-run the same part). The runs use
# a frozen copy of the training code ($STUDY/code), so editing the tree mid-study is safe: the tree's
# own, or with $STUDY_FROZEN set, that commit's, taken from git. Where $STUDY is new (another
# machine), each run of the plan already finished in $OUT is then marked done there.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STUDY=${STUDY:-$HOME/srvit-study}
PART=${1:-run}
DATA=${2:-$ROOT/data/cifar10}     # CIFAR-10 JPEGs: train/<class>/, test/<class>/
OUT=${STUDY_OUT:-$ROOT/results/cifar10-deep}         # the study's folder: plan.txt, logs, metrics, tables
PLAN=${STUDY_PLAN:-$OUT/plan.txt}                     # the runs: name, then the flags added to $COMMON
TAG=${OUT##*/cifar10-}                                  # deep, deep2: the plots' names
L2_OUT=$ROOT/results/cifar10-L2
FROZEN=${STUDY_FROZEN:-}                                # a commit whose code every run uses
CODE="train.py srvit.py loaders.py runtime.py plumbing.py"   # train.py and what it imports (older: plumbing.py)
mkdir -p "$STUDY/runs"
EPOCHS=15
COMMON="--data cifar10 --embed-dim 64 --num-layers 6 --num-heads 4 --patch-size 8 --batch-size 128 --lr 1e-3 \
  --epochs $EPOCHS --workers 0 --log-interval 100"
freeze_code() {   # $STUDY/code: the code the runs use, and its commit; on a new $STUDY, the plan's finished runs
  if [ -f "$STUDY/code/train.py" ]; then
    if [ -f "$OUT/frozen.patch" ] && ! grep -q frozen.patch "$STUDY/code/COMMIT"; then   # frozen before the patch
      echo "warning: $STUDY/code predates $OUT/frozen.patch: patch -p1 -d $STUDY/code < $OUT/frozen.patch"
    fi
    return
  fi
  mkdir -p "$STUDY/code"
  if [ -z "$FROZEN" ]; then
    for f in $CODE; do [ -f "$ROOT/$f" ] && cp "$ROOT/$f" "$STUDY/code/"; done
    (cd "$ROOT" && git rev-parse HEAD) > "$STUDY/code/COMMIT"
    return
  fi
  git -C "$ROOT" cat-file -e "$FROZEN^{commit}" 2>/dev/null || { rm -rf "$STUDY/code"; echo "cannot read commit $FROZEN (a full clone has it)"; exit 2; }
  for f in $CODE; do
    git -C "$ROOT" cat-file -e "$FROZEN:$f" 2>/dev/null && git -C "$ROOT" show "$FROZEN:$f" > "$STUDY/code/$f"
  done
  echo "$FROZEN" > "$STUDY/code/COMMIT"
  if [ -f "$OUT/frozen.patch" ]; then   # fixes to the frozen code that change no number (the patch says which)
    patch -s -p1 -d "$STUDY/code" < "$OUT/frozen.patch" || { rm -rf "$STUDY/code"; echo "cannot apply $OUT/frozen.patch"; exit 2; }
    echo "$FROZEN + ${OUT#"$ROOT"/}/frozen.patch" > "$STUDY/code/COMMIT"
  fi
  local n f
  while read -r n f; do
    [[ -z $n || $n == \#* ]] && continue
    if done_run_in "$OUT" "$n" "${f%%#*}" && [ ! -e "$STUDY/runs/$n" ]; then
      mkdir -p "$STUDY/runs/$n" && cp "$OUT/$n/metrics.jsonl" "$STUDY/runs/$n/" && cp "$OUT/$n.log" "$STUDY/runs/$n.log"
    fi
  done < "$PLAN"
}
dest_of() {   # dest_of NAME: where a run's log and metrics go in the repository
  if [[ $1 == L2-* && $TAG == deep ]]; then echo "$L2_OUT"; else echo "$OUT"; fi   # deep: the shallow sweep's runs
}
run() {  # run NAME FLAGS...
  local name=$1; shift
  local dest; dest=$(dest_of "$name"); mkdir -p "$dest"
  echo "python train.py $COMMON $* --data-path <cifar10> --out-dir <dir>/$name    # code: commit $(cat "$STUDY/code/COMMIT")" > "$dest/$name.cmd"
  OMP_NUM_THREADS=1 python "$STUDY/code/train.py" $COMMON "$@" --data-path "$DATA" --out-dir "$STUDY/runs/$name" \
    >> "$STUDY/runs/$name.log" 2>&1
}
done_run_in() {   # done_run_in DIR NAME FLAGS: DIR/NAME's metrics hold the last epoch's row (--epochs in FLAGS wins)
  local epochs=$EPOCHS; [[ $3 =~ --epochs\ ([0-9]+) ]] && epochs=${BASH_REMATCH[1]}
  grep -q "\"epoch\": $epochs," "$1/$2/metrics.jsonl" 2>/dev/null
}
done_run() { done_run_in "$STUDY/runs" "$@"; }   # done_run NAME FLAGS: finished in $STUDY
worker() {   # take the first run of the plan that is neither done nor taken by the other worker; repeat
  local name flags
  while true; do
    name=""
    while read -r n f; do
      [[ -z $n || $n == \#* ]] && continue
      f=${f%%#*}                                          # a comment after the flags
      done_run "$n" "$f" && continue
      mkdir "$STUDY/claims/$n" 2>/dev/null || continue   # mkdir is atomic: one worker gets each run
      name=$n; flags=$f; break
    done < "$PLAN"
    [ -z "$name" ] && return
    echo "$(date +%H:%M) worker $1: $name"
    run "$name" $flags || { local rc=$?
      echo "$(date +%H:%M) worker $1: $name FAILED (exit $rc), see $STUDY/runs/$name.log; skipped until the next \`run\`"; }
  done
}
collect() {   # logs and metrics (not checkpoints) into the repository; the soft mixers' weights; the tables
  local name dest
  for d in "$STUDY"/runs/*/; do
    name=$(basename "$d")
    dest=$(dest_of "$name")
    mkdir -p "$dest/$name"
    cp "$d/metrics.jsonl" "$dest/$name/" 2>/dev/null
    cp "$STUDY/runs/$name.log" "$dest/$name.log" 2>/dev/null
    sed -i "s#$STUDY/runs#<dir>#g; s#$DATA#<cifar10>#g; s#\"data_path\": \"[^\"]*\"#\"data_path\": \"<cifar10>\"#g; s#data cifar10 from [^:]*:#data cifar10 from <cifar10>:#g" "$dest/$name.log" "$dest/$name/metrics.jsonl" 2>/dev/null   # no machine paths
    if [[ $name == *R4-soft* ]] && [ -f "$d/last.pt" ] && [ ! -f "$dest/$name-eval.json" ] && \
       python -c "import torch,sys; c=torch.load(sys.argv[1],weights_only=True); sys.exit(c['epoch']<c['args']['epochs'])" "$d/last.pt"; then
      OMP_NUM_THREADS=1 python "$ROOT/eval.py" --checkpoint "$d/last.pt" --data-path "$DATA" --workers 0 --steps all \
        --json "$dest/$name-eval.json" | grep -v '^wrote ' > "$dest/$name-eval.md"
      sed -i "s#$STUDY/runs#<dir>#g; s#$DATA#<cifar10>#g" "$dest/$name-eval.json" "$dest/$name-eval.md"   # no machine paths
    fi
  done
  python "$ROOT/eval.py" --curve "$OUT"/*/ --plot "$ROOT/assets/curve-$TAG.png" --json "$OUT/curve.json" | grep -v '^wrote ' > "$OUT/curve.md"
  python "$ROOT/results/cifar10-deep/summarize.py" --runs "$OUT" > "$OUT/summary.md"
  python "$ROOT/results/cifar10-deep/summarize.py" --runs "$OUT" --plot "$ROOT/assets/epochs-$TAG.png"
  if [[ $TAG == deep && -d $L2_OUT ]]; then
    python "$ROOT/eval.py" --curve "$L2_OUT"/*/ --json "$L2_OUT/curve.json" | grep -v '^wrote ' > "$L2_OUT/curve.md"
  fi
}
freeze_code
case $PART in
  run) exec 9> "$STUDY/study.lock"
       flock -n 9 || { echo "another study.sh run is going (lock: $STUDY/study.lock)"; exit 2; }
       rm -rf "$STUDY/claims"; mkdir -p "$STUDY/claims"
       worker 1 & worker 2 & wait ;;
  collect) collect ;;
  *) echo "usage: bash results/cifar10-deep/study.sh run|collect [path/to/cifar10]"; exit 2 ;;
esac
