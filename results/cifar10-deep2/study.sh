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
# that code is taken from git and each run of plan.txt finished in this folder is marked done there,
# so `run` goes on with the rest.
HERE=$(cd "$(dirname "$0")" && pwd)
STUDY=${STUDY:-$HOME/srvit-study2}
FROZEN=0e60aaf63c5d18340693a5fd1d06fb3e67dff0df
STUDY=$STUDY STUDY_OUT=$HERE STUDY_FROZEN=$FROZEN exec bash "$HERE/../cifar10-deep/study.sh" "$@"
