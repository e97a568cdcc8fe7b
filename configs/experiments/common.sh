# Shared by the experiment scripts (source it; not run on its own): the small character model
# they all train on builtin:pydoc, one CPU thread a run, and the steps around it.
#
# Settings from the environment: ITERS (steps, default 600), LAYERS, EMBD, HEADS, BLOCK, BATCH,
# JOBS (runs at a time, default 1) and ATTNLM (the command to run, e.g. ".venv/bin/attnlm").
set -euo pipefail

attnlm=${ATTNLM:-attnlm}
iters=${ITERS:-600}
jobs=${JOBS:-1}
# naive: the one backend that runs every knob the experiments turn (additive scoring among them)
model=(--set data.source=builtin:pydoc --set model.attention=naive
       --set model.n_layer="${LAYERS:-2}" --set model.n_embd="${EMBD:-64}"
       --set model.n_head="${HEADS:-4}" --set model.block_size="${BLOCK:-64}" --set train.threads=1)
training=(--set train.batch_size="${BATCH:-16}" --set train.max_iters="$iters"
          --set train.eval_interval=$(( iters >= 4 ? iters / 4 : 1 )) --set train.warmup_iters=20)

train_eval() {  # DIR OVERRIDES...: train a run into DIR, evaluate it (attention report) into DIR/eval.json
    local dir=$1
    shift
    $attnlm train --quiet --out "$dir" "${model[@]}" "${training[@]}" "$@" > /dev/null
    $attnlm eval "$dir" --threads 1 --attention --json > "$dir/eval.json"
    echo "done: $dir" >&2
}

pids=()
spawn() {  # COMMAND...: run in the background, at most JOBS at a time
    "$@" &
    pids+=("$!")
    if (( ${#pids[@]} >= jobs )); then  # wait for the oldest before starting another
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
}

wait_all() {
    for pid in "${pids[@]}"; do
        wait "$pid"
    done
    pids=()
}

inspect_each() {  # KEY VALUES...: the depth diagnostic at initialisation for each value of KEY
    local key=$1 value
    shift
    for value in "$@"; do
        echo "== $key=$value at initialisation"
        $attnlm inspect "${model[@]}" --set "$key=$value" --iterations 20 \
            | tee "$out/inspect-$value.txt"
    done
}

train_each() {  # KEY NAME VALUES...: a run OUT/NAME-VALUE for each value of KEY, JOBS at a time
    local key=$1 name=$2 value
    shift 2
    for value in "$@"; do
        spawn train_eval "$out/$name-$value" --set "$key=$value"
    done
    wait_all
}

finish() {  # OUT: one table of the runs under OUT (table.md, table.csv) and their loss curves
    $attnlm gather "$1" --format csv > "$1/table.csv"
    $attnlm gather "$1" --format markdown | tee "$1/table.md"
    $attnlm plot "$1" --out "$1/loss.png"
}
