#!/usr/bin/env bash
# The deep2 study's extra round (round2.txt): SoftMoR with a per-step scale on each block
# application's update, h <- h + g_i (f(h) - h), g = 1 at the start (--step-scale; beyond our reading
# of the paper). Chosen from what the study's soft routers show: in blocks 2-6 they put 0.5-0.8 of
# their weight on step 1, yet running steps 2, 3 and 4 still adds 12.9, 4.4 and 1.2 points (the
# anytime table). A shared block makes an update of the same size at every step; a learned scale per
# step lets the later steps refine with smaller updates instead of being weighted down by the router.
# Same model, budget and machinery as study.sh; only the code differs (it has the flag), so the
# runs write into this folder beside the others and `collect` updates summary.md and curve.md.
#
#   bash results/cifar10-deep2/round2.sh run [path/to/cifar10]
#   bash results/cifar10-deep2/round2.sh collect [path/to/cifar10]
#
# Checkpoints and the frozen code live in $STUDY (default ~/srvit-study2-round2). Every run used the
# code of commit $FROZEN; where $STUDY is new, that code is taken from git and each run of
# round2.txt already finished in this folder is marked done.
HERE=$(cd "$(dirname "$0")" && pwd)
STUDY=${STUDY:-$HOME/srvit-study2-round2}
FROZEN=c6a9c87d77d2980e37a0acde445261e075c43567
STUDY=$STUDY STUDY_OUT=$HERE STUDY_PLAN=$HERE/round2.txt STUDY_FROZEN=$FROZEN exec bash "$HERE/../cifar10-deep/study.sh" "$@"
