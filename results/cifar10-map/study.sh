#!/usr/bin/env bash
# Where recursion pays: the depth curve mapped over the stack's depth L (1, 2, 3, 6 shared blocks),
# the loop scale (each looped residual branch times 1/R: --loop-scale fixed, or learned from 1/R),
# sharing and the learning rate, in the deep2 recipe (width 64, 4 heads, patch 8, CIFAR-10, 15 epochs,
# batch 128, AdamW lr 1e-3). Same machinery as results/cifar10-deep (frozen code, two workers,
# resumable runs); the plan is plan.txt, one seed of every cell first.
#
#   bash results/cifar10-map/study.sh run [path/to/cifar10]      # every run of plan.txt not yet done
#   bash results/cifar10-map/study.sh collect [path/to/cifar10]  # logs, metrics, soft weights, tables
#
# Checkpoints and the frozen code live in $STUDY (default ~/srvit-map), outside the repository.
# Every run uses the code of commit $FROZEN; where $STUDY is new (another machine), that code is
# taken from git and each run of plan.txt already finished in this folder is marked done there.
HERE=$(cd "$(dirname "$0")" && pwd)
STUDY=${STUDY:-$HOME/srvit-map}
FROZEN=f0c77560487a29c721e474409bb2ee3f48869b69
STUDY=$STUDY STUDY_OUT=$HERE STUDY_FROZEN=$FROZEN exec bash "$HERE/../cifar10-deep/study.sh" "$@"
