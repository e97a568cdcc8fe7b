"""Model FLOPs per token, the measured matmul peak and its cache, and what a run reports."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlm import utilisation
from attnlm.config import build_config
from attnlm.model import GPT
from attnlm.train import StepClock, resume_config, train
from tests.helpers import text_file, tiny_config, train_curve


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_flops_per_token_is_nanogpts_estimate(pos):
    cfg = build_config(overrides=["model.n_layer=2", "model.n_head=2", "model.n_embd=8",
                                  "model.block_size=4", f"model.pos={pos}", "model.bias=false"])
    model = GPT(cfg.model, 10)
    # By hand, no biases: per layer two LayerNorm gains (8 each), qkv 8x24, proj 8x8, fc 8x32,
    # proj 32x8; the final norm's gain, the tied 10x8 embedding. The learned 4x8 position
    # table is looked up, not multiplied: left out.
    n = 2 * (8 + 8 + 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8) + 8 + 10 * 8
    assert utilisation.flops_per_token(model) == 6 * n + 12 * 2 * 2 * 4 * 4


def test_measure_peak_is_two_n_cubed_over_the_fastest_product(monkeypatch):
    ticks = iter([0.0, 9.0, 10.0, 12.0, 20.0, 21.0, 30.0, 34.0])  # warm-up 9 s, then 2, 1, 4
    monkeypatch.setattr(utilisation.time, "perf_counter", lambda: next(ticks))
    assert utilisation.measure_peak(torch.device("cpu"), torch.float32, size=4) == 2 * 4**3 / 1.0


def test_measuring_the_peak_leaves_the_global_generator_alone():
    # A run measures the peak after seeding: drawing from torch's generator there would make its
    # dropout depend on whether the peak was already in the cache.
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    utilisation.measure_peak(torch.device("cpu"), torch.float32, size=8, repeats=1)
    assert torch.equal(torch.rand(4), want)


def test_the_peak_is_measured_once_per_dtype_and_threads_then_read(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(utilisation, "measure_peak",
                        lambda device, dtype: measured.append(dtype) or 1e12 * (len(measured)))
    cpu = torch.device("cpu")
    assert utilisation.matmul_peak(cpu, "bfloat16", tmp_path) == 1e12
    assert utilisation.matmul_peak(cpu, "bfloat16", tmp_path) == 1e12
    assert utilisation.matmul_peak(cpu, "float32", tmp_path) == 2e12
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert utilisation.matmul_peak(cpu, "float32", tmp_path) == 3e12
    finally:
        torch.set_num_threads(threads)
    assert measured == [torch.bfloat16, torch.float32, torch.float32]
    (tmp_path / utilisation.PEAK_FILE).write_text("[damaged")
    assert utilisation.matmul_peak(cpu, "float32", tmp_path) == 4e12  # measured again, not used
    assert list(json.loads((tmp_path / utilisation.PEAK_FILE).read_text()).values()) == [4e12]


def test_the_highest_peak_measured_becomes_the_cached_one(tmp_path, monkeypatch):
    monkeypatch.setattr(utilisation, "measure_peak", lambda device, dtype: 1e12)
    cpu = torch.device("cpu")
    assert utilisation.highest_peak(cpu, "bfloat16", 0.5e12, tmp_path) == 0.5e12  # nothing cached
    assert utilisation.highest_peak(cpu, "bfloat16", 2e12, tmp_path) == 2e12
    assert utilisation.highest_peak(cpu, "bfloat16", 0.7e12, tmp_path) == 2e12  # a slow moment's
    assert utilisation.matmul_peak(cpu, "bfloat16", tmp_path) == 2e12  # what runs now divide by
    assert utilisation.matmul_peak(cpu, "float32", tmp_path) == 1e12  # another dtype: its own


def test_the_first_step_is_kept_out_of_the_throughput():
    clock = StepClock(tokens_per_step=100)
    clock.add(5.0)  # compilation, say
    assert clock.tokens_per_s() == 100 / 5.0  # nothing else to go by yet
    clock.add(1.0)
    clock.add(3.0)
    assert clock.tokens_per_s() == 2 * 100 / 4.0 and clock.seconds == 9.0


def test_timed_steps_take_the_fastest_step_and_the_higher_peak():
    # Five steps of 100 tokens, slowed by other work but one; peaks 2e4 before, 4e4 after (a
    # slow moment while measuring the first). 10 FLOPs a token.
    figures = utilisation.timed_steps([2.0, 1.0, 2.5, 6.0, 2.0], 100, 10, (2e4, 4e4))
    assert figures["tokens_per_s"] == 100 / 1.0 and figures["model_flops"] == 1000.0
    assert figures["tokens_per_s_median"] == 100 / 2.0
    assert figures["tokens_per_s_mean"] == pytest.approx(100 / 2.7)
    assert figures["of_peak"] == 1000 / 4e4 and figures["of_peak_median"] == 500 / 4e4
    assert figures["of_peak_mean"] == pytest.approx(100 / 2.7 * 10 / 4e4)
    assert figures["peak_flops"] == 4e4 and figures["peak_spread"] == 0.5 and figures["disturbed"]
    # min, quartiles (exclusive method: the (n + 1)·p-th of the sorted 1, 2, 2, 2.5, 6), max
    assert figures["step_s"] == [1.0, 1.5, 2.0, 4.25, 6.0]
    one = utilisation.timed_steps([2.0], 100, 10, (1e3,))
    assert one["step_s"] == [2.0] * 5 and one["peak_spread"] == 0 and not one["disturbed"]
    # Within 15% (the median step 10% slower than the fastest, the peaks 10% apart): trusted.
    quiet = utilisation.timed_steps([1.0, 1.1, 1.1], 100, 10, (0.9e4, 1e4))
    assert not quiet["disturbed"]
    assert utilisation.timed_steps([1.0, 1.2, 1.2], 100, 10, (1e4, 1e4))["disturbed"]


def test_the_metrics_log_holds_each_steps_seconds(tmp_path):
    source = text_file(tmp_path)
    cfg = tiny_config(source, "train.max_iters=4", "train.log_interval=1")
    summary = train(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_s"] for r in rows if "loss" in r]
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert sum(seconds) == pytest.approx(summary["train_time_s"])
    # tokens/s leave the first step out: the other three's
    assert summary["tokens_per_s"] == pytest.approx(
        3 * summary["sequences_per_step"] * cfg.model.block_size / sum(seconds[1:]))


def test_a_run_reports_its_share_of_the_peak_and_its_wall_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(utilisation, "measure_peak", lambda device, dtype: 1e9)
    monkeypatch.setenv("ATTNLM_CACHE", str(tmp_path / "cache"))  # no figure measured before
    source = text_file(tmp_path)
    summary = train(tiny_config(source, "train.max_iters=4", "train.eval_interval=2"),
                    tmp_path / "run")
    assert "of this device's measured float32 matmul peak (0.001 TFLOP/s)" in capsys.readouterr().err
    assert summary["matmul_peak_flops"] == 1e9 and summary["peak_dtype"] == "float32"
    assert summary["utilisation"] == pytest.approx(
        summary["tokens_per_s"] * summary["model_flops_per_token"] / 1e9)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and 0 < times[-1] <= summary["wall_s"]
    # A resumed run's clock goes on from where the run stopped.
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=6"])
    train(cfg, tmp_path / "run", resume=True, quiet=True)
    later = [json.loads(line)["time_s"] for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert later[:len(times)] == times and later == sorted(later) and len(train_curve(tmp_path / "run")) == 6



STEPS = """
import resource, sys, torch
from attnlm.config import build_config
from attnlm.model import GPT
from attnlm.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
cfg = build_config(overrides=["model.n_layer=1", "model.n_head=4", "model.n_embd=64", "model.block_size=256",
                              "model.attention=naive"])
model, x = GPT(cfg.model, 65), torch.randint(0, 65, (64, 256))
faults = []
for _ in range(10):  # scores of 64 MiB, activations of 16 MiB: made, freed and made again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, x)[1].backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults[-6:])
"""


def step_faults(mode):
    """(whether memory was kept, page faults of each of the last 6 of 10 steps)."""
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent)
    kept, *faults = done.stdout.split()
    return kept, [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_steps_reuse_freed_memory_without_page_faults():
    """glibc's default maps each block over 32 MiB afresh and unmaps it when freed: every step
    faults its attention scores in again page by page. Kept, steps after the first few fault
    next to nothing: against the default allocator's steps in the same test."""
    kept, faults = step_faults("keep")
    if kept != "True":
        pytest.skip("this C library keeps its own malloc thresholds")
    _, default = step_faults("default")
    # By default each step faults at least the scores' 64 MiB in again (16,384 pages; fewer only
    # where transparent huge pages are always on). Kept, a block is mapped again now and then,
    # when the kernel reclaims memory left cold between steps (DAMON's reclaim on some virtual
    # machines: 1 to 3 blocks of 64 MiB in 6 steps there, against 50,000-78,000 pages every step).
    assert sum(faults) * 4 <= sum(default), (faults, default)
