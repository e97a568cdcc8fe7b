"""How close training comes to the machine's limit: the 6-layer, 6-head, width-384, block-256
model (nanoGPT's Shakespeare size) trained by `attnlm.train` in each of several settings, its
model FLOPs per token (nanoGPT's estimate) times tokens/s over this machine's bf16
matrix-multiply peak, which this run measures itself (torch.mm 4096^3 on the run's threads).

The machine may be shared (virtual machines on one host: the same run has read 2x apart minutes
apart, and nothing shows in top). Each step does the same work and others' work only ever adds
time, so each setting's figure compares the least disturbed measurements of each kind (as
Python's timeit takes the fastest run):
- --steps steps are timed one by one (each step's seconds from the training log) after two
  untimed ones (first allocations); tokens/s from the fastest. A slow stretch has to cover
  every step to move it (the median would move with half of them: it did, 2x, in one run);
- the peak is measured just before and just after the steps, the fastest of three products
  each time, and the highest kept of those two and of the highest known on this CPU model,
  thread count and torch version (attnlm's cache, which a higher one raises): a peak read while
  others slowed the machine down would inflate the share.
The median and mean steps' figures (of_bfloat16_peak_median, _mean), the five-number summary of
the step times (step_s: min, quartiles, max) and both peaks (peak_spread) come with it, so a
disturbed run shows itself ("disturbed": the peaks, or the median and fastest steps, more than
15% apart): run it again.
A setting takes 40 s to 2 min on two cores of a current Xeon; run it alone on the machine.

Prints one JSON line per setting; the goal is of_bfloat16_peak >= 0.5. Then where the time of
one step of the fastest setting goes (torch.profiler): the share of the step in matrix products,
their own TFLOP/s against the peak, and the other operations that take most.
    flock -x /tmp/bench.lock python benchmarks/utilisation.py [--data FILE] [--threads N]
        [--batch-size B] [--steps N] [--only NAME ...]
"""

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from attnlm import run, utilisation  # noqa: E402
from attnlm.config import build_config  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.optim import make_optimizer  # noqa: E402
from attnlm.runtime import autocast, compiled, set_threads  # noqa: E402
from attnlm.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2  # untimed: the allocator's first requests, one-off set-up
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}  # the profiler counts their FLOPs
COPY_WRAPPERS = {"aten::to", "aten::_to_copy", "aten::clone", "aten::reshape", "aten::contiguous"}
MODEL_BLOCK = 256
MODEL = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", f"model.block_size={MODEL_BLOCK}",
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
        f"train.batch_size={args.batch_size}", f"train.max_iters={WARMUP_STEPS + args.steps}",
        "train.log_interval=1", "train.eval_interval=100000", "train.eval_iters=1",
        "train.warmup_iters=0"])


def measure(name, args):
    """The setting trained for its steps between two measurements of the bf16 peak: the
    figures of utilisation.timed_steps, the run's summary, and the peaks (before, after, and
    the highest known on this CPU, thread count and torch version, which the higher of the two
    may raise)."""
    cpu = torch.device("cpu")
    before = utilisation.measure_peak(cpu, torch.bfloat16)
    with tempfile.TemporaryDirectory() as out:
        summary = train(config(name, args), out, quiet=True)
        seconds = [r["step_s"] for r in run.read_metrics(out) if "step_s" in r][WARMUP_STEPS:]
    after = utilisation.measure_peak(cpu, torch.bfloat16)
    peaks = before, after, utilisation.highest_peak(cpu, "bfloat16", max(before, after))
    tokens_per_step = summary["sequences_per_step"] * MODEL_BLOCK
    return utilisation.timed_steps(seconds, tokens_per_step, summary["model_flops_per_token"],
                                   peaks), summary, peaks


def product_role(event, tokens):
    """Which products an event is: attention's (batched), the weights' gradients (a reduction over
    every token of the step), or the layers' (the forward's and the gradients of their inputs)."""
    if event.name in ("aten::bmm", "aten::baddbmm"):
        return "attention"
    first = event.input_shapes[event.name == "aten::addmm"]  # addmm's first is the bias
    return "weight_gradients" if first[-1] == tokens else "layers"


def copy_source(event):
    """The operation a copy was made for: its first caller that is not a conversion or a reshape
    (a backward function for a gradient's: ToCopyBackward0 is the gradient of a cast)."""
    caller = event.cpu_parent
    while caller is not None and caller.name in COPY_WRAPPERS:
        caller = caller.cpu_parent
    return "(none)" if caller is None else caller.name.split(": ")[-1]


def profile_step(cfg, peak, vocab_size=65):
    """One training step of cfg's model on random tokens (after three to warm up) under
    torch.profiler: the share of its time in matrix products, their TFLOP/s and share of the peak,
    the same for each kind of product (product_role), the five other operations that take most
    (share of the step), and what the copies (autocast's casts among them) were made for."""
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

    for _ in range(3):  # the allocator's first requests fault memory in for two steps or so
        step()
    with torch.profiler.profile(with_flops=True, record_shapes=True) as prof:
        step()
    events = prof.events()
    total = sum(e.self_cpu_time_total for e in events)
    products, others, copies = {}, Counter(), Counter()
    for e in events:
        if e.name in PRODUCTS:
            kind = products.setdefault(product_role(e, x.numel()), [0.0, 0])
            kind[0], kind[1] = kind[0] + e.self_cpu_time_total / 1e6, kind[1] + e.flops
        else:
            others[e.name] += e.self_cpu_time_total
        if e.name == "aten::copy_":
            copies[copy_source(e)] += e.self_cpu_time_total

    def figures(seconds, flops):
        return {"share": round(seconds * 1e6 / total, 3), "tflops": round(flops / seconds / 1e12, 3),
                "of_peak": round(flops / seconds / peak, 3)}

    product_s, flops = (sum(kind[i] for kind in products.values()) for i in (0, 1))
    every = figures(product_s, flops)
    return {"step_s": round(total / 1e6, 3), "matrix_products_share": every["share"],
            "matrix_products_tflops": every["tflops"], "matrix_products_of_peak": every["of_peak"],
            "products": {role: figures(*kind) for role, kind in sorted(products.items())},
            "other_shares": {name: round(us / total, 3) for name, us in others.most_common(5)},
            "copies_by_source": {name: round(us / total, 3) for name, us in copies.most_common(5)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help=f"timed steps (after {WARMUP_STEPS} untimed)")
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    args = parser.parse_args()
    if not os.path.exists(args.data):
        emit(benchmark="utilisation", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    set_threads(args.threads)
    shares = {}
    for name in args.only:
        figures, summary, peaks = measure(name, args)
        shares[name] = figures
        emit(benchmark="utilisation", setting=name, batch_size=args.batch_size,
             tokens_per_s=round(figures["tokens_per_s"]),
             model_tflops=round(figures["model_flops"] / 1e12, 3),
             of_bfloat16_peak=round(figures["of_peak"], 3),
             bfloat16_peak_tflops=round(figures["peak_flops"] / 1e12, 3),
             tokens_per_s_median=round(figures["tokens_per_s_median"]),
             of_bfloat16_peak_median=round(figures["of_peak_median"], 3),
             tokens_per_s_mean=round(figures["tokens_per_s_mean"]),
             of_bfloat16_peak_mean=round(figures["of_peak_mean"], 3),
             step_s=[round(t, 3) for t in figures["step_s"]], steps_timed=args.steps,
             peaks_before_after_highest_tflops=[round(p / 1e12, 3) for p in peaks],
             peak_spread=round(figures["peak_spread"], 3), disturbed=figures["disturbed"],
             compile_s=summary["compile_s"],
             model_flops_per_token=summary["model_flops_per_token"])
    best = max(shares, key=lambda name: shares[name]["of_peak"])
    emit(benchmark="utilisation_profile", setting=best, of_bfloat16_peak=round(shares[best]["of_peak"], 3),
         **profile_step(config(best, args), shares[best]["peak_flops"]))


if __name__ == "__main__":
    main()
