"""How close a run comes to the machine's limit: the model's FLOPs per token (nanoGPT's
estimate), the device's measured matrix-multiply peak (cached), and their ratio to tokens/s."""

import json
import platform
import statistics
import time

import torch

from attnlm.files import atomic_write
from attnlm.runtime import DTYPES
from attnlm.token_cache import cache_dir

PEAK_SIZE = 4096  # square matrices: large enough for the device's best kernel, small enough to be quick
PEAK_FILE = "matmul_peak.json"
# Part of each cached peak's key: peaks measured before the product wrote into a ready output
# counted its page faults, read low, and must not be reused; so did a GPU's timed from one product.
PEAK_METHOD = "mm-into-ready-output-100-on-gpu"
DISTURBED = 0.15  # how far two measurements of the same work may differ before a run is doubted


def flops_per_token(model):
    """Training FLOPs per token as nanoGPT estimates them (PaLM appendix B): 6·N for the forward
    and backward products with the weights, plus 12·L·H·Q·T for attention's scores and weighted
    sum over a full block of T positions (H heads of Q dimensions, L layers). N counts every
    parameter but the learned position table, which is looked up, not multiplied; the tied token
    embedding counts once, as the output head's matrix."""
    c = model.cfg
    table = model.pos_emb.parameters() if model.pos_emb is not None else ()
    n = model.num_params() - sum(p.numel() for p in table)
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


def cpuinfo(field):
    """The first CPU's `field` in /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def cpu_name():
    """The CPU model as the kernel names it (Linux), else what Python's platform module knows."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def measure_peak(device, dtype, size=PEAK_SIZE, repeats=3):
    """FLOP/s of the fastest of `repeats` timings of size x size x size products (after one to
    warm up), into one output made beforehand: the matrix units' figure, whatever the allocator
    does. A GPU makes such a product in under a millisecond, short beside the clock's and the
    synchronisation's overhead, and its clocks rise only under load: on a GPU each timing is of
    100 products (the first timing, untimed, warms it up)."""
    numbers = torch.Generator(device).manual_seed(0)  # not the global one: training's seeds stay
    a, b, out = (torch.randn(size, size, device=device, generator=numbers).to(dtype) for _ in range(3))
    calls = 100 if device.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, (time.perf_counter() - tick) / calls)
    return 2 * size**3 / best


def matmul_peak(device, dtype_name, directory=None):
    """The device's measured matrix-multiply FLOP/s in dtype_name on this process's threads,
    measured once per device model, thread count, dtype and torch version and then read from
    the cache (a figure measured on another CPU means nothing here)."""
    path, key = peak_entry(device, dtype_name, directory)
    known = read_peaks(path)
    if key not in known:
        known[key] = measure_peak(device, DTYPES[dtype_name])
        write_peaks(path, known)
    return known[key]


def highest_peak(device, dtype_name, measured, directory=None):
    """The higher of a peak just measured and the cached one, which it becomes: a peak read
    while other work slowed the machine is low, never high, so the highest seen is the
    machine's (and later runs' utilisation is measured against it)."""
    path, key = peak_entry(device, dtype_name, directory)
    known = read_peaks(path)
    if measured > known.get(key, 0):
        known[key] = measured
        write_peaks(path, known)
    return known[key]


def peak_entry(device, dtype_name, directory):
    """The cache file and the key of the peak of device in dtype_name on this process's threads."""
    key = "|".join([device_name(device), device.type, str(torch.get_num_threads()), dtype_name,
                    torch.__version__, PEAK_METHOD])
    return (directory or cache_dir()) / PEAK_FILE, key


def read_peaks(path):
    """The cached peaks, each a positive number; a damaged cache counts as empty."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {key: peak for key, peak in known.items() if isinstance(peak, (int, float)) and peak > 0}


def write_peaks(path, known):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(known, indent=1))
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else


def fraction(tokens_per_s, flops, peak, processes=1):
    """The share of the matmul peak of `processes` such devices the run's model FLOPs take."""
    return tokens_per_s * flops / (peak * processes) if tokens_per_s and peak else None


def timed_steps(step_seconds, tokens_per_step, flops, peaks):
    """What timed training steps reached on a machine shared with other work. Every step does
    the same work, and others' work only ever adds time to a step or to a peak measurement, so
    the least disturbed of each says most about the machine (the rule of Python's timeit): the
    fastest step against the highest of the peaks (measured before and after the steps, say),
    each peak itself the fastest of its products. The median and mean steps' figures come with
    it, and the five-number summary of the step times (step_s): how disturbed the run was;
    peak_spread says how far the lowest peak fell short of the highest. disturbed: the peaks or
    the median and fastest steps differ by more than DISTURBED (a quiet machine repeats itself
    to a few percent): the figures are not to be trusted, run again."""
    fastest, median, mean = min(step_seconds), statistics.median(step_seconds), statistics.fmean(step_seconds)
    quartiles = statistics.quantiles(step_seconds, n=4) if len(step_seconds) > 1 else [median] * 3
    peak = max(peaks)
    rates = {"": tokens_per_step / fastest, "_median": tokens_per_step / median,
             "_mean": tokens_per_step / mean}
    return {
        **{f"tokens_per_s{name}": rate for name, rate in rates.items()},
        **{f"of_peak{name}": fraction(rate, flops, peak) for name, rate in rates.items()},
        "model_flops": rates[""] * flops,
        "step_s": [fastest, *quartiles, max(step_seconds)],
        "peak_flops": peak, "peak_spread": 1 - min(peaks) / peak,
        "disturbed": 1 - min(peaks) / peak > DISTURBED or 1 - fastest / median > DISTURBED,
    }


def describe(tokens_per_s, flops, peak, dtype_name, processes=1):
    """One log line's worth: model TFLOP/s and their share of the measured peak."""
    share = fraction(tokens_per_s, flops, peak, processes)
    where = "this device's" if processes == 1 else f"{processes} processes'"
    return (f"{tokens_per_s * flops / 1e12:.3g} model TFLOP/s"
            + (f" = {share:.0%} of {where} measured {dtype_name} matmul peak "
               f"({peak * processes / 1e12:.3g} TFLOP/s)" if share else ""))
