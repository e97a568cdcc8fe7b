"""The C decode kernels (attnlm.native) against torch, one thread, in memory bandwidth.

linear: the 24 matrix-vector products of a decode step of the generation benchmark's model
(6 layers, width 384), torch's F.linear against native.linear, in GB/s of weights read, beside a
plain sum over the same matrices (what the memory gives one core). attention: one query per head
(6 heads of 64) against T cached keys and values, torch's SDPA against native.attend_one, warm
(the cache just read) and cold (64 MB read in between, as a decode step's weights do). Prints
JSON lines; the ratio is native over torch, measured in the same run.
"""

import math
import time

import torch
import torch.nn.functional as F

from attnlm import native
from common import emit

WIDTH, LAYERS, HEADS = 384, 6, 6
SHAPES = [(3 * WIDTH, WIDTH), (WIDTH, WIDTH), (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)] * LAYERS


def best_seconds(run, repeats=30, between=None):
    times = []
    for _ in range(repeats):
        if between:
            between()
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return min(times)


def linear():
    weights = [torch.randn(shape) for shape in SHAPES]
    inputs = {n: torch.randn(1, 1, n) for n in (WIDTH, 4 * WIDTH)}
    gigabytes = sum(w.numel() * 4 for w in weights) / 1e9
    kinds = {
        "torch": lambda: [F.linear(inputs[w.size(1)], w) for w in weights],
        "native": lambda: [native.linear(inputs[w.size(1)], w) for w in weights],
        "sum": lambda: [w.sum() for w in weights],
    }
    speed = {kind: gigabytes / best_seconds(run) for kind, run in kinds.items()}
    emit(bench="native_linear", matrices=len(weights), megabytes=round(gigabytes * 1e3, 1),
         **{f"{kind}_gb_per_s": round(s, 1) for kind, s in speed.items()},
         native_over_torch=round(speed["native"] / speed["torch"], 2))


def attention():
    evict = torch.randn(16 * 2**20)  # 64 MB: more than the CPU's caches hold
    for t in (128, 512, 1024):
        k, v = torch.randn(2, 1, HEADS, t, 64).unbind(0)
        q = torch.randn(1, HEADS, 1, 64)
        scale = 1 / math.sqrt(64)
        gigabytes = 2 * k.numel() * 4 / 1e9
        kinds = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
                 "native": lambda: native.attend_one(q, k, v, scale)}
        for cache in ("warm", "cold"):
            between = evict.sum if cache == "cold" else None
            speed = {kind: gigabytes / best_seconds(run, between=between)
                     for kind, run in kinds.items()}
            emit(bench="native_attention", keys=t, cache=cache,
                 **{f"{kind}_gb_per_s": round(s, 1) for kind, s in speed.items()},
                 native_over_torch=round(speed["native"] / speed["torch"], 2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if native.library() is None:
        emit(bench="native", skipped="the C kernels are not built here (no C compiler, or "
                                      "ATTNLM_NATIVE=0)")
    else:
        with torch.no_grad():
            linear()
            attention()
