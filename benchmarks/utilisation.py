"""How close training comes to the machine's limit: the 6-layer, 6-head, width-384, block-256
model (nanoGPT's Shakespeare size) trained for a few steps by `attnlm.train` in each of several
settings, its model FLOPs per token (nanoGPT's estimate) times tokens/s over this machine's bf16
matrix-multiply peak, which this run measures itself (torch.mm 4096^3 on the run's threads).

Prints one JSON line per setting and the peak; the goal is at least 0.5 of the bf16 peak. Then
where the time of one step of the fastest setting goes (torch.profiler): the share of the step in
matrix products, their own TFLOP/s against the peak, and the other operations that take most.
Alone on a machine: flock -x /tmp/bench.lock python benchmarks/utilisation.py [--data FILE]
    [--threads N] [--batch-size B] [--only NAME ...]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from attnlm import utilisation  # noqa: E402
from attnlm.config import build_config  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.optim import make_optimizer  # noqa: E402
from attnlm.runtime import autocast, compiled, set_threads  # noqa: E402
from attnlm.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}  # the profiler counts their FLOPs
MODEL = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256",
         "model.dropout=0.0", "model.pos=learned", "tokenizer.kind=chars"]
SETTINGS = {
    "sdpa_float32": ["model.attention=sdpa", "train.dtype=float32"],
    "naive_bfloat16": ["model.attention=naive", "train.dtype=bfloat16"],
    "sdpa_bfloat16": ["model.attention=sdpa", "train.dtype=bfloat16"],
    "naive_bfloat16_compiled": ["model.attention=naive", "train.dtype=bfloat16", "train.compile=true"],
    "sdpa_bfloat16_compiled": ["model.attention=sdpa", "train.dtype=bfloat16", "train.compile=true"],
}


def config(name, args):
    return build_config(overrides=[
        *MODEL, *SETTINGS[name], f"data.source={args.data}", f"train.threads={args.threads}",
        f"train.batch_size={args.batch_size}", f"train.max_iters={args.steps}",
        "train.eval_interval=100000", "train.eval_iters=1", "train.warmup_iters=0"])


def profile_step(cfg, peak, vocab_size=65):
    """One training step of cfg's model on random tokens (after two to warm up) under
    torch.profiler: the share of its time in matrix products, their TFLOP/s and share of the peak,
    and the five other operations that take most (share of the step)."""
    t, m = cfg.train, cfg.model
    model = GPT(m, vocab_size)
    forward = compiled(model) if t.compile else model
    optimizer = make_optimizer(model, t)
    x, y = (torch.randint(vocab_size, (t.batch_size, m.block_size)) for _ in range(2))

    def step():
        with autocast(torch.device("cpu"), t.dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    with torch.profiler.profile(with_flops=True) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = [e for e in events if e.key in PRODUCTS]
    product_s = sum(e.self_cpu_time_total for e in products) / 1e6
    flops = sum(e.flops for e in products)
    others = sorted((e for e in events if e.key not in PRODUCTS), key=lambda e: -e.self_cpu_time_total)
    return {"step_s": round(total / 1e6, 3), "matrix_products_share": round(product_s * 1e6 / total, 3),
            "matrix_products_tflops": round(flops / product_s / 1e12, 3),
            "matrix_products_of_peak": round(flops / product_s / peak, 3),
            "other_shares": {e.key: round(e.self_cpu_time_total / total, 3) for e in others[:5]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="the first (warm-up) is not counted")
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    args = parser.parse_args()
    if not os.path.exists(args.data):
        emit(benchmark="utilisation", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    set_threads(args.threads)
    peak = utilisation.measure_peak(torch.device("cpu"), torch.bfloat16)
    emit(benchmark="utilisation_peak", bfloat16_matmul_tflops=round(peak / 1e12, 3))
    shares = {}
    for name in args.only:
        with tempfile.TemporaryDirectory() as out:
            summary = train(config(name, args), out, quiet=True)
        flops = summary["model_flops_per_token"] * summary["tokens_per_s"]
        shares[name] = flops / peak
        emit(benchmark="utilisation", setting=name, batch_size=args.batch_size,
             tokens_per_s=round(summary["tokens_per_s"]), model_tflops=round(flops / 1e12, 3),
             of_bfloat16_peak=round(flops / peak, 3), compile_s=summary["compile_s"],
             model_flops_per_token=summary["model_flops_per_token"], steps_timed=args.steps - 1)
    best = max(shares, key=shares.get)
    emit(benchmark="utilisation_profile", setting=best, of_bfloat16_peak=round(shares[best], 3),
         **profile_step(config(best, args), peak))


if __name__ == "__main__":
    main()
