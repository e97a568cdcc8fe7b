"""Generation speed: plain torch against torch.compile'd steps, KV-cached against uncached.

The model is the issue's reference shape: 6 layers, 6 heads, width 384, vocabulary 65, block 1024,
batch 1, float32, greedy; 1000 new tokens from a 16-token prompt, on 1 thread and on all of them.
Prints JSON lines: one per run with tokens/s and percentiles of the time per token (the first
token's includes the prompt's prefill), then one summary per thread count from the fastest run
of each kind, with ratios measured in the same process: cached / uncached, compiled / plain
and, with --hf, attnlm / transformers' GPT-2 of the same shape (needs transformers:
pip install -e '.[bench]', a benchmark-only extra).

Each run and summary line carries split_products: per dtype, whether the plain model's cached
steps split their weight products on this machine (the choice generate measures; see
attnlm.decode_products).

"compiled" is the model under torch.compile as `attnlm generate --compile` runs it
(attnlm.runtime.compiled: inductor, dynamic shapes, one graph for every cache length). Its compile
time is reported apart (compile_s: the first, warm-up generation, which compiles the prefill and
the step) and is never inside tokens/s; break_even_tokens is how many tokens a generation needs
before compiling has paid for itself.

--dtype float32,bfloat16 also times the plain model cast to bfloat16 ("plain-bfloat16": weights,
activations and KV cache), with its speed over float32's (plain_bfloat16_over_plain_cached).

--kv-heads 6,2,1 instead times the plain cached path of a model with each number of key/value
heads (grouped-query attention; 6 is multi-head, 1 multi-query), one JSON line each with the KV
cache's bytes per token (every layer's keys and values of one position) and tokens/s, in each
--dtype.

On a shared machine, run it alone: flock -x /tmp/bench.lock python benchmarks/generate.py
"""

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

import torch  # noqa: E402

from attnlm.config import ModelConfig  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.sampling import Controls, compiled, generate, step_products  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=1024)
VOCAB = 65
WARM_UP = 32  # tokens generated once before timing: allocator, lazy initialisation, compiling


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


def attnlm_times(model, prompt, new_tokens, use_cache, split_products=True):
    """Seconds from one yielded token to the next, as a user streaming the output would see."""
    times, tick = [], time.perf_counter()
    for _ in generate(model, prompt, new_tokens, Controls(temperature=0), use_cache=use_cache,
                      split_products=split_products):
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


def split_chosen(model):
    """Whether a cached step of the plain model splits its products here (the choice generate
    made in the warm-up; see attnlm.decode_products)."""
    with torch.inference_mode():
        return bool(step_products(model, 1).forwards)


def runners(args, models, prompt):
    """impl -> run(use_cache, new_tokens) -> the times per token; models: dtype -> model."""
    timed = {"plain": models["float32"]}
    if args.compile:
        # Compile afresh for each thread count, in memory and on disk (inductor keeps compiled
        # code in a cache directory): the compile time is a first run's.
        torch._dynamo.reset()
        empty = tempfile.mkdtemp(prefix="attnlm-bench-inductor-")
        atexit.register(shutil.rmtree, empty, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = empty
        timed["compiled"] = compiled(models["float32"], dynamic=True)  # as generate --compile
    timed.update({f"plain-{dtype}": model for dtype, model in models.items() if dtype != "float32"})
    found = {impl: lambda use_cache, n, m=m, split=impl != "compiled":
             attnlm_times(m, prompt, n, use_cache, split)  # as generate --compile: never split
             for impl, m in timed.items()}
    if args.hf:
        reference = hf_model()
        found["hf-gpt2"] = lambda use_cache, n: hf_times(reference, prompt, n, use_cache)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", default="1,all", help="comma-separated counts; all = every core")
    parser.add_argument("--paths", default="cached,uncached", help="cached, uncached or both")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="time the plain model alone")
    parser.add_argument("--hf", action="store_true", help="also time transformers' GPT-2")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per implementation and path; the fastest is summarised")
    parser.add_argument("--kv-heads", help="comma-separated n_kv_head values to time instead")
    parser.add_argument("--dtype", default="float32",
                        help="comma-separated: float32 (always timed) and/or bfloat16")
    args = parser.parse_args()
    args.dtype = args.dtype.split(",")
    if not set(args.dtype) <= {"float32", "bfloat16"}:
        parser.error(f"--dtype takes float32 and bfloat16, not {args.dtype}")
    if args.kv_heads:
        return kv_head_runs(args)

    models = {dtype: model_of(ModelConfig(**SHAPE, attention=args.attention), dtype)
              for dtype in ["float32"] + [d for d in args.dtype if d != "float32"]}
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens))
    base = {"bench": "generate", **SHAPE, "vocab": VOCAB, "batch": 1,
            "attention": args.attention, "prompt_tokens": args.prompt_tokens}
    paths = args.paths.split(",")
    for threads in args.threads.split(","):
        torch.set_num_threads(os.cpu_count() if threads == "all" else int(threads))
        base.update(machine())
        timed = runners(args, models, prompt)
        best, compile_s = {}, {}  # (impl, path) -> the fastest run's figures; its warm-up seconds
        for path in paths:
            use_cache = path == "cached"
            for impl, run in timed.items():
                tick = time.perf_counter()
                run(use_cache, WARM_UP)
                compile_s[impl, path] = time.perf_counter() - tick
            base["split_products"] = {dtype: split_chosen(model) for dtype, model in models.items()}
            # Runs of the implementations alternate, so that a neighbour's load falls on all.
            for _ in range(args.repeats):  # both paths alike: their ratio compares fastest runs
                for impl, run in timed.items():
                    cpu = time.process_time()
                    times = run(use_cache, args.new_tokens)
                    result = summary(times, time.process_time() - cpu)
                    dtype = impl.partition("-")[2] if impl.startswith("plain-") else "float32"
                    print(json.dumps({**base, "impl": impl, "dtype": dtype, "path": path,
                                      **result}), flush=True)
                    if result["tokens_per_s"] > best.get((impl, path), {}).get("tokens_per_s", 0):
                        best[impl, path] = result
        print(json.dumps({**base, "summary": "fastest run of each",
                          **ratios(best, compile_s)}), flush=True)


def model_of(cfg, dtype):
    """The benchmark's model of cfg in dtype (a name), the same weights for every dtype."""
    torch.manual_seed(0)
    return GPT(cfg, VOCAB).to(getattr(torch, dtype)).eval()


def kv_head_runs(args):
    """Per n_kv_head: the cache's bytes per token and the fastest cached run's tokens/s."""
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens))
    for threads, dtype in ((t, d) for t in args.threads.split(",") for d in args.dtype):
        torch.set_num_threads(os.cpu_count() if threads == "all" else int(threads))
        for kv_heads in map(int, args.kv_heads.split(",")):
            cfg = ModelConfig(**SHAPE, n_kv_head=kv_heads, attention=args.attention)
            model = model_of(cfg, dtype)
            cache = model.new_cache(1, SHAPE["block_size"])
            attnlm_times(model, prompt, WARM_UP, True)
            runs = []
            for _ in range(args.repeats):
                cpu = time.process_time()
                times = attnlm_times(model, prompt, args.new_tokens, True)
                runs.append(summary(times, time.process_time() - cpu))
            best = max(runs, key=lambda r: r["tokens_per_s"])
            print(json.dumps({"bench": "generate-kv-heads", **SHAPE, "n_kv_head": kv_heads,
                              "dtype": dtype, "attention": args.attention, **machine(),
                              "kv_bytes_per_token": cache.nbytes // SHAPE["block_size"],
                              **best}), flush=True)


def ratios(best, compile_s):
    speed = {key: result["tokens_per_s"] for key, result in best.items()}
    out = {f"{impl}_{path}_tokens_per_s": v for (impl, path), v in speed.items()}
    for (impl, path), result in best.items():
        out[f"{impl}_{path}_p90_over_p10"] = result["p90_over_p10"]
        if path == "cached" and (impl, "uncached") in speed:
            out[f"{impl}_cached_over_uncached"] = round(speed[impl, path] / speed[impl, "uncached"], 2)
    for path in ("cached", "uncached"):
        if ("compiled", path) not in speed:
            continue
        plain, compiled = speed["plain", path], speed["compiled", path]
        out[f"compiled_over_plain_{path}"] = round(compiled / plain, 2)
        # compile_s as the warm-up's extra time over the plain warm-up's
        extra = compile_s["compiled", path] - compile_s["plain", path]
        out[f"compile_s_{path}"] = round(extra, 1)
        gain = 1 / plain - 1 / compiled  # seconds saved per token
        out[f"break_even_tokens_{path}"] = round(extra / gain) if gain > 0 else None
    for (impl, path), value in speed.items():
        if impl.startswith("plain-"):
            out[f"{impl.replace('-', '_')}_over_plain_{path}"] = round(value / speed["plain", path], 2)
    if ("hf-gpt2", "cached") in speed:
        for impl in ("plain", "compiled"):
            if (impl, "cached") in speed:
                out[f"{impl}_over_hf_cached"] = round(speed[impl, "cached"] / speed["hf-gpt2", "cached"], 2)
    return out


if __name__ == "__main__":
    main()
