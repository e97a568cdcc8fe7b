#!/usr/bin/env bash
# Claim 5, head diversity: many heads are a committee of experts only if they differ. Trains
# with the penalty train.head_diversity (its weight: the mean cosine similarity of a layer's
# heads' outputs, added to the training loss) at each of WEIGHTS; the table gives val loss
# and eval's head similarity (1 - Jensen-Shannon divergence between the heads' attention
# weights on the first window of the val text, mean over layers and pairs of heads).
#
#   bash configs/experiments/diversity.sh [OUT]       # OUT defaults to runs/claims/diversity
source "$(dirname "$0")/common.sh"

out=${1:-runs/claims/diversity}
mkdir -p "$out"
train_each train.head_diversity head_diversity ${WEIGHTS:-0 0.1 1}
finish "$out"
