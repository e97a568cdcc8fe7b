#!/usr/bin/env bash
# Everything the CUDA path has to show, in one call on a machine with an NVIDIA GPU (about 6
# minutes on an H200, plus the variants' kernels to compile): the CUDA tests, the Triton kernels'
# attention variants against naive, the attention benchmark (triton and tiled against sdpa's
# flash kernel, forward and forward+backward, bfloat16, T = 1024..16384, head dims 64 and 128),
# triton's time with a sliding window and with grouped-query heads, and a training-throughput
# figure per backend. Results go to one folder as JSON (and the test
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

# The Triton kernels' variants (grouped-query heads, sliding window, soft cap, relative bias, ALiBi)
# against naive in float32, compiled: every case compiles kernels of its own, hence its own limit.
timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_triton_variants.py 2>&1 \
    | tee "$out/tests-variants.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# triton forward+backward, bfloat16, B=1, H=8, head dim 64: window 256 against full causal at
# T = 8192 (about T/(2·window) = 16x less work), and n_kv_head = 8, 2, 1 at T = 4096.
timeout 120 $py - > "$out/triton-variants.jsonl" <<'PY' || status=1
import sys
import torch
from triton.testing import do_bench
sys.path.insert(0, "benchmarks")
from common import emit
from attnlm.attention.triton_kernel import attend

def ms(t, n_kv_head=8, window=0):
    q = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, n_kv_head, t, 64, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in "kv")
    grad = torch.randn_like(q)
    def step():
        out = attend(q, k, v, causal=True, scale=0.125, window=window)
        torch.autograd.grad(out, (q, k, v), grad)
    return round(do_bench(step, return_mode="median"), 3)

full, windowed = ms(8192), ms(8192, window=256)
emit(benchmark="triton-window", T=8192, window=256, mode="forward+backward", ms_full=full,
     ms_window=windowed, speedup=round(full / windowed, 2))
emit(benchmark="triton-grouped-query", T=4096, mode="forward+backward",
     ms_by_n_kv_head={n: ms(4096, n_kv_head=n) for n in (8, 2, 1)})
PY

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
tail -n +1 "$out"/attention-*.jsonl "$out"/triton-variants.jsonl "$out"/train-*.json \
    | grep -E 'goal|tokens_per_s|benchmark": "triton-' | cut -c1-400
exit $status
