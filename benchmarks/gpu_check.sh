#!/usr/bin/env bash
# Everything the CUDA path has to show, in one call on a machine with an NVIDIA GPU (about 6
# minutes on an H200): the CUDA tests, the attention benchmark (triton and tiled against sdpa's
# flash kernel, forward and forward+backward, bfloat16, T = 1024..16384, head dims 64 and 128)
# and a training-throughput figure per backend. Results go to one folder as JSON (and the test
# log); nothing is installed: it runs the tree it is in with the machine's python3 (torch and
# triton there), e.g.
#     bash benchmarks/gpu_check.sh bench-results/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

$py - > "$out/machine.json" <<'PY'
import json, platform, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version()}))
PY

# The CUDA tests, and the attention and generation tests, which run Triton compiled on the GPU.
timeout 240 $py -m pytest -q -p no:cacheprovider -m "cuda or not slow" tests/test_cuda.py \
    tests/test_attention.py tests/test_generate.py 2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

for d in 64 128; do
  timeout 120 $py benchmarks/attention.py --device cuda --dtype bfloat16 --head-dim "$d" \
      --lengths 1024,2048,4096,8192,16384 --backends sdpa,tiled,triton --reps 5 --no-memory \
      > "$out/attention-d$d.jsonl" || status=1
done

# Training throughput: a 6-layer, width-384 model, block 1024, bfloat16, on the built-in corpus.
for backend in sdpa triton tiled; do
  timeout 90 $py -m attnlm train --quiet --json --out "$out/run-$backend" \
      --set model.n_layer=6 --set model.n_head=6 --set model.n_embd=384 \
      --set model.block_size=1024 --set model.attention=$backend --set train.batch_size=32 \
      --set train.max_iters=120 --set train.eval_interval=120 --set train.eval_iters=4 \
      --set train.device=cuda --set train.dtype=bfloat16 > "$out/train-$backend.json" || status=1
  rm -rf "$out/run-$backend"
done
tail -n +1 "$out"/attention-*.jsonl "$out"/train-*.json | grep -E 'goal|tokens_per_s' | cut -c1-400
exit $status
