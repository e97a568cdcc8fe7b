"""Generation speed: KV-cached against uncached decoding, tokens/s and per-token time.

The model is the issue's reference shape: 6 layers, 6 heads, width 384, vocabulary 65, block 1024,
batch 1, float32, greedy; 1000 new tokens from a 16-token prompt, on 1 thread and on all of them.
Prints JSON lines: one per run with tokens/s and percentiles of the time per token (the first
token's includes the prompt's prefill), then one summary per thread count from the fastest run
of each kind: the cached / uncached speed-up, attnlm with its C decode kernels (attnlm.native) /
attnlm with torch's alone and, with --hf, attnlm / transformers. With --hf
(needs transformers: pip install -e '.[bench]', a benchmark-only extra), Hugging Face's GPT-2 of
the same shape is timed in the same process as the reference.

On a shared machine, run it alone: flock /tmp/bench.lock python benchmarks/generate.py
"""

import argparse
import json
import os
import platform
import time

import torch

from attnlm import native
from attnlm.config import ModelConfig
from attnlm.model import GPT
from attnlm.sampling import Controls, generate

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=1024)
VOCAB = 65


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}


def summary(times, cpu_seconds):
    """tokens/s over the whole run and the spread of the time per token. cpu_per_wall is the
    process's CPU time over wall time: well under the thread count means the machine was shared
    and the figures are too low."""
    ordered = sorted(times)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"tokens": len(times), "seconds": round(sum(times), 3),
            "cpu_per_wall": round(cpu_seconds / sum(times), 2),
            "tokens_per_s": round(len(times) / sum(times), 2),
            "p10_ms": round(at(0.1) * 1e3, 3), "p50_ms": round(at(0.5) * 1e3, 3),
            "p90_ms": round(at(0.9) * 1e3, 3), "p90_over_p10": round(at(0.9) / at(0.1), 3)}


def without_native(run):
    """run, with attnlm.native's kernels off while it runs."""
    def wrapped(*args):
        os.environ["ATTNLM_NATIVE"] = "0"
        native.library.cache_clear()
        try:
            return run(*args)
        finally:
            del os.environ["ATTNLM_NATIVE"]
            native.library.cache_clear()
    return wrapped


def attnlm_times(model, prompt, new_tokens, use_cache):
    """Seconds from one yielded token to the next, as a user streaming the output would see."""
    times, tick = [], time.perf_counter()
    for _ in generate(model, prompt, new_tokens, Controls(temperature=0), use_cache=use_cache):
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    return times


def hf_times(model, prompt, new_tokens, use_cache):
    """The same for transformers' generate(), timed per step through a logits processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = [time.perf_counter()]

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   use_cache=use_cache, pad_token_id=0, logits_processor=LogitsProcessorList([Clock()]))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SHAPE["block_size"], n_embd=SHAPE["n_embd"],
                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], bos_token_id=None,
                     eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", default="1,all", help="comma-separated counts; all = every core")
    parser.add_argument("--paths", default="cached,uncached", help="cached, uncached or both")
    parser.add_argument("--hf", action="store_true", help="also time transformers' GPT-2")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--repeats", type=int, default=3,
                        help="cached runs per implementation; the fastest is summarised")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPE, attention=args.attention), VOCAB).eval()
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens))
    runners = {"attnlm": lambda use_cache, n: attnlm_times(model, prompt, n, use_cache)}
    built = native.library() is not None
    if built:
        runners["attnlm-torch"] = without_native(runners["attnlm"])
    if args.hf:
        reference = hf_model()
        runners["hf-gpt2"] = lambda use_cache, n: hf_times(reference, prompt, n, use_cache)
    base = {"bench": "generate", **machine(), **SHAPE, "vocab": VOCAB, "batch": 1, "dtype": "float32",
            "attention": args.attention, "native_kernels": built,
            "prompt_tokens": args.prompt_tokens}
    paths = args.paths.split(",")
    for threads in args.threads.split(","):
        threads = os.cpu_count() if threads == "all" else int(threads)
        torch.set_num_threads(threads)
        best = {}  # (impl, path) -> the fastest run's figures
        for path in paths:
            use_cache = path == "cached"
            # Uncached steps read whole windows: too many rows for the C kernels, and slow.
            timed = {impl: run for impl, run in runners.items()
                     if use_cache or impl != "attnlm-torch"}
            for impl, run in timed.items():
                run(use_cache, 32)  # warm-up: allocator, lazy initialisation
            # Runs of the implementations alternate, so that a neighbour's load falls on both.
            for _ in range(args.repeats if use_cache else 1):
                for impl, run in timed.items():
                    cpu = time.process_time()
                    times = run(use_cache, args.new_tokens)
                    result = summary(times, time.process_time() - cpu)
                    print(json.dumps({**base, "impl": impl, "threads": threads, "path": path,
                                      **result}), flush=True)
                    if result["tokens_per_s"] > best.get((impl, path), {}).get("tokens_per_s", 0):
                        best[impl, path] = result
        speed = {key: result["tokens_per_s"] for key, result in best.items()}
        ratios = {}
        for impl in runners:
            if (impl, "cached") in speed and (impl, "uncached") in speed:
                ratios[f"{impl}_cached_over_uncached"] = speed[impl, "cached"] / speed[impl, "uncached"]
        for other, name in (("attnlm-torch", "native_over_torch"), ("hf-gpt2", "attnlm_over_hf")):
            if (other, "cached") in speed:
                ratios[f"{name}_cached"] = speed["attnlm", "cached"] / speed[other, "cached"]
        print(json.dumps({**base, "threads": threads, "summary": "fastest run of each",
                          **{f"{impl}_{path}_tokens_per_s": v for (impl, path), v in speed.items()},
                          "attnlm_cached_p90_over_p10": best.get(("attnlm", "cached"), {}).get("p90_over_p10"),
                          **{k: round(v, 2) for k, v in ratios.items()}}), flush=True)

if __name__ == "__main__":
    main()
