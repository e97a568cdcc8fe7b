#!/usr/bin/env bash
# Everything the CUDA path has to show, in one call of at most 8.5 minutes (each step has its own
# limit, with room for Triton's compiles: about 20 s for every dtype and head dim the tests use,
# compiled for sm_90a on a CPU) on a machine with an NVIDIA GPU:
#   tests.log           the CUDA tests (tests/test_cuda.py: Triton against SDPA in each precision
#                       and, in half precision, with every option against naive; training with
#                       every backend; cached generation; the float16 GradScaler), and two CPU
#                       processes under torchrun on a machine that has a GPU (DDP and FSDP2)
#   attention.jsonl     triton and tiled against sdpa's flash kernel, bfloat16, forward and
#                       forward+backward, T = 1024, 4096 and 16384, head dims 64 and 128
#   triton-variants.jsonl  triton with window 256 against full causal at T = 8192, and with
#                       n_kv_head = 8, 2, 1 at T = 4096 (forward+backward, bfloat16)
#   train.jsonl         a training-throughput line per backend (6 layers, width 384, block 1024,
#                       bfloat16), with the GPU's measured matmul peak and the utilisation
#   machine.json        the GPU, torch, CUDA and Python
# Nothing is installed: it runs the tree it is in with the machine's python3 (torch and triton
# there). The Triton kernels' option variants in float32 (tests/test_triton_variants.py) and the
# interpreted tests run on the CPU in `make test`. Usage:
#     bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
: > "$out/attention.jsonl"; : > "$out/train.jsonl"  # appended to below; a rerun starts afresh
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

$py - > "$out/machine.json" <<'PY'
import json, platform, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version()}))
PY

timeout 270 $py -m pytest -q -p no:cacheprovider -m "cuda or not slow" tests/test_cuda.py \
    "tests/test_distributed.py::test_two_processes_train_as_one_with_twice_the_accumulation" \
    2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

timeout 45 $py - > "$out/triton-variants.jsonl" <<'PY' || status=1
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
  timeout 45 $py benchmarks/attention.py --device cuda --dtype bfloat16 --head-dim "$d" \
      --lengths 1024,4096,16384 --backends sdpa,tiled,triton --reps 3 --no-memory \
      >> "$out/attention.jsonl" || status=1
done

for backend in sdpa triton tiled; do
  timeout 35 $py -m attnlm train --quiet --json --out "$out/run-$backend" \
      --set model.n_layer=6 --set model.n_head=6 --set model.n_embd=384 \
      --set model.block_size=1024 --set model.attention=$backend --set train.batch_size=32 \
      --set train.max_iters=60 --set train.eval_interval=60 --set train.eval_iters=4 \
      --set train.device=cuda --set train.dtype=bfloat16 >> "$out/train.jsonl" || status=1
  rm -rf "$out/run-$backend"
done
tail -n +1 "$out"/attention.jsonl "$out"/triton-variants.jsonl "$out"/train.jsonl \
    | grep -E 'goal|tokens_per_s|benchmark": "triton-' | cut -c1-400
exit $status
