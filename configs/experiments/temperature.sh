#!/usr/bin/env bash
# Claim 1, softmax temperature: scores divided by sqrt(head_dim) keep the softmax at a healthy
# temperature; training works best in between, and gradients vanish at both extremes.
# Scores here are divided by attn_temperature x sqrt(head_dim), for each of TEMPS. For each:
# the gradient reaching the query and key weights at initialisation (attnlm inspect), a run
# trained and evaluated, and the same gradient in the trained model on its val text; one table
# (val loss, attention entropy) and the loss curves.
#
#   bash configs/experiments/temperature.sh [OUT]     # OUT defaults to runs/claims/temperature
#   JOBS=2 TEMPS="0.1 1 10" bash configs/experiments/temperature.sh
source "$(dirname "$0")/common.sh"

out=${1:-runs/claims/temperature}
temps=${TEMPS:-0.01 0.1 1 10 100}
mkdir -p "$out"
inspect_each model.attn_temperature $temps
train_each model.attn_temperature temperature $temps
finish "$out"
for t in $temps; do
    echo "== attn_temperature=$t trained"
    $attnlm inspect "$out/temperature-$t" --threads 1 --iterations 20 \
        | tee "$out/inspect-trained-$t.txt"
done
