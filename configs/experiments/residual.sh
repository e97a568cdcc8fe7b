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
inspect_each model.residual_scale $scales
train_each model.residual_scale scale $scales
finish "$out"
