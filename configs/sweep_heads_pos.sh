#!/usr/bin/env bash
# A sweep: attention heads x positional scheme, small character models on builtin:pydoc.
# Each run trains into its own directory with one CPU thread, is evaluated into eval.json, and
# the sweep ends with one table of all runs (also saved as table.md and table.csv).
#
#   bash configs/sweep_heads_pos.sh [OUT]           # OUT defaults to runs/sweep_heads_pos
#   JOBS=2 bash configs/sweep_heads_pos.sh          # two runs at a time (one thread each)
#
# Settings come from the environment: HEADS, POS (space-separated lists), ITERS, LAYERS, EMBD,
# BLOCK, BATCH, JOBS, and ATTNLM (the command to run, e.g. ".venv/bin/attnlm").
# At the defaults, 15 runs of 400 steps, about 17 s a run on one core of an AMD EPYC (some 4
# minutes in all).
set -euo pipefail

out=${1:-runs/sweep_heads_pos}
attnlm=${ATTNLM:-attnlm}
heads_list=${HEADS:-1 2 4}
pos_list=${POS:-learned sinusoidal rope alibi none}
jobs=${JOBS:-1}
iters=${ITERS:-400}
every=$(( iters >= 4 ? iters / 4 : 1 ))  # four val evaluations per run

one_run() {  # train and evaluate one point of the grid
    local dir=$out/heads-$1_pos-$2
    $attnlm train --quiet --out "$dir" \
        --set data.source=builtin:pydoc --set model.n_head="$1" --set model.pos="$2" \
        --set model.n_layer="${LAYERS:-2}" --set model.n_embd="${EMBD:-64}" \
        --set model.block_size="${BLOCK:-64}" --set train.batch_size="${BATCH:-16}" \
        --set train.max_iters="$iters" --set train.eval_interval="$every" \
        --set train.warmup_iters=20 --set train.threads=1 > /dev/null
    $attnlm eval "$dir" --threads 1 --json > "$dir/eval.json"
    echo "done: $dir" >&2
}

mkdir -p "$out"
pids=()
for heads in $heads_list; do
    for pos in $pos_list; do
        one_run "$heads" "$pos" &
        pids+=("$!")
        if (( ${#pids[@]} >= jobs )); then  # wait for the oldest run before starting another
            wait "${pids[0]}"
            pids=("${pids[@]:1}")
        fi
    done
done
for pid in "${pids[@]}"; do
    wait "$pid"
done

$attnlm gather "$out" --format csv > "$out/table.csv"
$attnlm gather "$out" --format markdown | tee "$out/table.md"
