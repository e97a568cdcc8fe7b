#!/usr/bin/env bash
# Claim 3, additive (Bahdanau) scoring: w . tanh(q + k) is more expressive and more costly than
# the dot product. Trains both, one after the other (the table's tokens/s is a timing: run it
# alone, e.g. under `flock -x /tmp/bench.lock`), on the naive backend, the only one that runs
# additive scoring; the table compares val loss and tokens/s.
#
#   bash configs/experiments/additive.sh [OUT]        # OUT defaults to runs/claims/additive
source "$(dirname "$0")/common.sh"

out=${1:-runs/claims/additive}
mkdir -p "$out"
jobs=1  # one run at a time: tokens/s is a timing
train_each model.score score dot additive
finish "$out"
