"""The CUDA path, where a GPU is at hand (skipped elsewhere): the Triton kernels compiled for the
device against SDPA in each precision, and with every option in half precision against naive
(Triton's interpreter, which the CPU tests use, cannot run bfloat16), training with every
backend under bfloat16 autocast, cached against uncached generation, and exact resume with
float16's GradScaler.
benchmarks/gpu_check.sh runs these with the CUDA benchmarks in one call."""

import importlib.util

import pytest
import torch

from attnlm import checkpoint
from attnlm.attention import BACKENDS, naive, sdpa
from attnlm.attention.masks import relative_buckets
from attnlm.config import ModelConfig
from attnlm.model import GPT
from attnlm.positional import alibi_slopes
from attnlm.sampling import Controls, generate
from attnlm.train import train
from tests.helpers import spread, text_file, tiny_config, train_curve

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # tf32 for fp32


@pytest.fixture(scope="module")
def triton_attend():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the optional triton package is not installed")
    from attnlm.attention import triton_kernel

    return triton_kernel.attend


def forward_backward(attend, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, causal=True, scale=q.size(-1) ** -0.5, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t, d", [(1, 64), (200, 64), (1024, 64), (333, 128), (2048, 128)])
def test_triton_matches_sdpa_forward_and_backward(triton_attend, dtype, t, d):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, t, d, device="cuda", dtype=dtype, generator=gen)
                     for _ in range(4))
    got = forward_backward(triton_attend, q, k, v, grad)
    want = forward_backward(sdpa.attend, q, k, v, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        scale = w.float().abs().max().item()
        err = (g.float() - w.float()).abs().max().item()
        assert err <= TOLERANCE[dtype] * max(scale, 1.0), (name, err, scale)


def assert_close_to(got, want, dtype):
    """Each tensor's error relative to its norm (the table's gradient sums thousands of rounded
    terms, so its largest entry's error is not a fair test): tiled's bfloat16 on the CPU, the
    same inputs, came within 0.015 (the table's), 0.008 at most elsewhere."""
    for name, g, w in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        err = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert err <= TOLERANCE[dtype], (name, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_with_every_option_in_half_precision_matches_naive(triton_attend, dtype):
    """Grouped-query heads, a window, the soft cap, ALiBi and the relative bias at once, over
    lengths that cross the default blocks raggedly (a prefill after cached keys)."""
    gen = torch.Generator("cuda").manual_seed(0)
    q, grad = (torch.randn(2, 4, 300, 64, device="cuda", generator=gen) for _ in "qg")
    k, v = (torch.randn(2, 2, 333, 64, device="cuda", generator=gen) for _ in "kv")
    table = torch.randn(4, 8, device="cuda", generator=gen)
    buckets = relative_buckets(340, 8, 64, device="cuda")
    slopes = alibi_slopes(4).cuda()

    def run(attend, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = attend(*leaves[:3], causal=True, scale=0.125, window=100, softcap=20.0,
                     alibi_slopes=slopes, relative=(leaves[3], buckets))
        return (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))

    got = run(triton_attend, [t.to(dtype) for t in (q, k, v)] + [table])
    assert [t.dtype for t in got[:4]] == [dtype] * 4
    # The reference in float32 from the same rounded inputs.
    assert_close_to(got, run(naive.attend, [t.to(dtype).float() for t in (q, k, v)] + [table]),
                    dtype)


def curve(run):
    return [loss for _, loss in train_curve(run)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_training_with_each_backend_under_bfloat16(tmp_path, backend):
    """With QK-norm (whose RMS norm CUDA's autocast runs in float32) and a block of 128 tokens,
    longer than the kernels' tiles."""
    source = text_file(tmp_path)
    for name in ("sdpa", backend):
        if not (tmp_path / name).exists():
            train(tiny_config(source, f"model.attention={name}", "train.device=cuda",
                              "train.dtype=bfloat16", "train.max_iters=60",
                              "model.block_size=128", "model.n_embd=64", "model.qk_norm=true"),
                  tmp_path / name, quiet=True)
    got, want = curve(tmp_path / backend), curve(tmp_path / "sdpa")
    assert got[-1] < 0.7 * got[0]  # it learns
    assert got == pytest.approx(want, rel=0.05, abs=0.05)  # and as sdpa does, within bf16 noise


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_cached_generation_equals_uncached(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, attention=backend)
    model = spread(GPT(cfg, 97)).cuda().eval()
    prompt = torch.randint(97, (3, 5), device="cuda")

    def run(use_cache):
        steps = generate(model, prompt, 80, Controls(temperature=0.0), use_cache=use_cache)
        return torch.stack(list(steps), dim=1)

    assert torch.equal(run(True), run(False))


def test_exact_resume_with_the_float16_grad_scaler(tmp_path, monkeypatch):
    # The scale grows every 2 steps here (every 2,000 by default): at the cut it is far from its
    # initial value, so a resume that did not restore it would scale the loss otherwise.
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scaler(*a, growth_interval=2, **k))
    source = text_file(tmp_path)
    common = ["train.device=cuda", "train.dtype=float16", "train.lr_decay_iters=20",
              "model.dropout=0.1"]
    train(tiny_config(source, *common), tmp_path / "full", quiet=True)
    train(tiny_config(source, *common, "train.max_iters=10"), tmp_path / "cut", quiet=True)
    fresh = scaler("cuda", growth_interval=2).state_dict()
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["scaler"] != fresh
    train(tiny_config(source, *common), tmp_path / "cut", resume=True, quiet=True)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    saved = [checkpoint.load(tmp_path / run / "checkpoint.pt")["scaler"] for run in ("cut", "full")]
    assert saved[0] == saved[1]
