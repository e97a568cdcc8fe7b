#!/usr/bin/env bash
# Claim 4, residual scaling in a deep stack: with the attention and MLP branches multiplied by
# a factor before they join the residual stream, each block's Jacobian stays near norm 1 at
# initialisation, so a deep stack neither explodes nor vanishes. For each of SCALES, a LAYERS
# (default 12) deep model: the depth diagnostic at initialisation (attnlm inspect: per block,
# growth of the residual stream, gradient norms, Jacobian norm), then a run trained; one table
# of val losses and the loss curves.
#
#   bash configs/experiments/residual.sh [OUT]        # OUT defaults to runs/claims/residual
LAYERS=${LAYERS:-12}
source "$(dirname "$0")/common.sh"

out=${1:-runs/claims/residual}
scales=${SCALES:-0.25 1 4}
mkdir -p "$out"
for s in $scales; do
    echo "== residual_scale=$s at initialisation"
    $attnlm inspect "${model[@]}" --set model.residual_scale="$s" --iterations 20 \
        | tee "$out/inspect-$s.txt"
done
for s in $scales; do
    spawn train_eval "$out/scale-$s" --set model.residual_scale="$s"
done
wait_all
finish "$out"
