#!/usr/bin/env bash
# Claim 2, learned relative position bias: a per-head bias b(i - j) on the scores (T5's buckets)
# makes attention shift-equivariant. Trains pos=relative beside learned, sinusoidal and no
# positions; the table compares their val loss; then each run reads the val text with every
# window moved OFFSET positions later (attnlm eval --offset): a model that knows only distances
# scores the same loss there, one with absolute positions does not (learned ones refuse).
#
#   bash configs/experiments/relative.sh [OUT]        # OUT defaults to runs/claims/relative
source "$(dirname "$0")/common.sh"

out=${1:-runs/claims/relative}
offset=${OFFSET:-64}
mkdir -p "$out"
train_each model.pos pos ${POS:-relative learned sinusoidal none}
finish "$out"
for run in "$out"/pos-*; do
    echo "== $run, windows at positions 0.. and $offset.."
    $attnlm eval "$run" --threads 1
    $attnlm eval "$run" --threads 1 --offset "$offset" || true  # learned positions refuse: shown
done
