"""The Triton kernels' attention variants against naive: grouped-query and multi-query heads, the
sliding window, the soft cap, the learned relative bias and ALiBi, in outputs and in the gradients
of q, k, v and the relative table. Without CUDA the kernels run in Triton's interpreter (conftest),
a few hundred times slower than compiled: the sizes are small, the blocks 16 or 32."""

import importlib.util

import pytest
import torch

from attnlm.attention import naive
from attnlm.attention.masks import relative_buckets
from attnlm.positional import alibi_slopes

if importlib.util.find_spec("triton") is None:
    pytest.skip("the optional triton package is not installed", allow_module_level=True)

from attnlm.attention import triton_kernel  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BUCKETS = 8


def inputs(tq, tk, n_head, n_kv_head, d):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, n_head, tq, d, generator=gen)
    k, v = (torch.randn(2, n_kv_head, tk, d, generator=gen) for _ in "kv")
    grad_out = torch.randn(2, n_head, tq, d, generator=gen)
    table = torch.randn(n_head, NUM_BUCKETS, generator=gen)
    return [t.to(DEVICE) for t in (q, k, v, grad_out, table)]


def run(attend, q, k, v, grad_out, table=None, **options):
    """The output and the gradients of q, k, v (and of the relative table, given one)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table) if t is not None]
    if table is not None:
        # A map from distance to bucket longer than Tk, as a model's is (L >= Tk).
        buckets = relative_buckets(k.size(-2) + 5, NUM_BUCKETS, 20, device=DEVICE)
        options["relative"] = (leaves[3], buckets)
    out = attend(*leaves[:3], scale=q.size(-1) ** -0.5, **options)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def assert_agree(got, want):
    assert len(got) == len(want)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# (Tq, Tk, n_head, n_kv_head, head dim, query block, key block, options); Tq < Tk is a prefill
# after cached tokens, 33, 50, 70 and 90 are ragged against the blocks, a head dim of 24 pads to 32.
# Windows of 31 and 18 against blocks of 16 put a phase's edge on the first row or key of a block,
# where being one out would show.
CASES = {
    "grouped": (40, 40, 4, 2, 16, 16, 16, dict(causal=True)),
    "grouped-ragged-prefill": (33, 70, 4, 2, 24, 16, 32, dict(causal=True)),
    "multi-query": (40, 40, 4, 1, 16, 16, 16, dict(causal=True)),
    "multi-query-bidirectional": (7, 50, 4, 1, 16, 16, 16, dict(causal=False)),
    "window": (70, 70, 2, 2, 16, 16, 16, dict(causal=True, window=31)),
    "window-inside-a-block": (70, 70, 2, 2, 16, 16, 16, dict(causal=True, window=5)),
    "window-ragged-prefill": (33, 90, 2, 2, 24, 16, 32, dict(causal=True, window=24)),
    "softcap": (40, 40, 2, 2, 16, 16, 16, dict(causal=True, softcap=1.5)),
    "relative": (40, 50, 2, 2, 16, 16, 16, dict(causal=True, relative=True)),
    "softcap-relative-bidirectional": (40, 50, 2, 2, 16, 16, 32,
                                       dict(causal=False, softcap=1.5, relative=True)),
    "alibi-window": (50, 50, 2, 2, 16, 16, 16, dict(causal=True, window=18, alibi=True)),
    "all-together": (33, 70, 4, 1, 16, 16, 16,
                     dict(causal=True, window=16, softcap=2.0, relative=True, alibi=True)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_variant_matches_naive(case):
    tq, tk, n_head, n_kv_head, d, block_q, block_k, options = case
    options = dict(options)
    q, k, v, grad_out, table = inputs(tq, tk, n_head, n_kv_head, d)
    if not options.pop("relative", False):
        table = None
    if options.pop("alibi", False):
        options["alibi_slopes"] = alibi_slopes(n_head).to(DEVICE)
    got = run(triton_kernel.attend, q, k, v, grad_out, table, block_q=block_q, block_k=block_k,
              **options)
    assert_agree(got, run(naive.attend, q, k, v, grad_out, table, **options))


def test_triton_window_never_reads_blocks_outside_it():
    """Blocks wholly outside every row's window are skipped, not masked: NaN there (which a mask
    would let through as 0·NaN) leaves the rows that cannot see them exact. Window 8, blocks of 16:
    query rows from 32 on never see key block 0, and key block 0 is seen by no row from 23 on."""
    q, k, v, grad_out, _ = inputs(64, 64, 2, 2, 16)
    options = dict(causal=True, window=8)
    want = run(naive.attend, q, k, v, grad_out, **options)

    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :16], poisoned_v[:, :, :16] = float("nan"), float("nan")
    out, dq, _, _ = run(triton_kernel.attend, q, poisoned_k, poisoned_v, grad_out, block_q=16,
                        block_k=16, **options)
    torch.testing.assert_close(out[:, :, 32:], want[0][:, :, 32:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq[:, :, 32:], want[1][:, :, 32:], atol=1e-5, rtol=1e-5)

    poisoned_q, poisoned_grad = q.clone(), grad_out.clone()
    poisoned_q[:, :, 48:], poisoned_grad[:, :, 48:] = float("nan"), float("nan")
    _, _, dk, dv = run(triton_kernel.attend, poisoned_q, k, v, poisoned_grad, block_q=16,
                       block_k=16, **options)
    torch.testing.assert_close(dk[:, :, :16], want[2][:, :, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv[:, :, :16], want[3][:, :, :16], atol=1e-5, rtol=1e-5)
