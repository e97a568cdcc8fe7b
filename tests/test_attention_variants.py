"""The attention variants (grouped-query, sliding window, soft-capping, ALiBi, the learned relative
bias) in sdpa and tiled against naive, the reference that defines them: outputs and the gradients
of q, k, v and the relative table. Also what tiled must not do: repeat keys for grouped-query
attention, or compute tiles outside a window."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attnlm import choices
from attnlm.attention import BACKENDS, naive, sdpa, tiled
from attnlm.attention.masks import relative_buckets
from attnlm.positional import alibi_slopes

B, H, D = 2, 4, 16
BUCKETS = 8


def inputs(tq, tk, kv_heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, grad_out = (torch.randn(B, H, tq, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, kv_heads, tk, D, generator=gen) for _ in range(2))
    table = torch.randn(H, BUCKETS, generator=gen)
    return q, k, v, table, grad_out


def run(attend, q, k, v, table, grad_out, *, relative=False, alibi=False, **options):
    """The output and the gradients of q, k, v (and of the relative table if it is used)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    q, k, v, table = leaves
    if relative:
        options["relative"] = (table, relative_buckets(k.size(-2), BUCKETS, 20))
    if alibi:
        options["alibi_slopes"] = alibi_slopes(H)
    out = attend(q, k, v, scale=D**-0.5, **options)
    wrt = leaves if relative else leaves[:3]
    return (out, *torch.autograd.grad(out, wrt, grad_out))


def assert_agree(got, want, tol=1e-5):
    assert len(got) == len(want)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def blocked(block_q, block_k):
    def attend(*args, **options):
        return tiled.attend(*args, block_q=block_q, block_k=block_k, **options)
    return attend


VARIANTS = {
    "plain": {},
    "window 1": dict(window=1),
    "window 5": dict(window=5),
    "window longer than T": dict(window=100),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi=True),
    "relative": dict(relative=True),
    "softcap, alibi": dict(softcap=5.0, alibi=True),
    "window, softcap, relative": dict(window=9, softcap=5.0, relative=True),
    "window, alibi, relative": dict(window=9, alibi=True, relative=True),
}
# (Tq, Tk) and tiled's blocks: blocks dividing T or not, a query block longer than the key block
# (a row's first tile can then lie wholly left of its window), Tq < Tk (prefill) and Tq == 1
# (a cached decoding step, which tiled computes as one row).
SHAPES = [(37, 37, 16, 16), (20, 53, 7, 13), (64, 64, 32, 8), (1, 37, None, None)]
CASES = [(variant, causal) for variant, options in VARIANTS.items()
         for causal in (True, False) if causal or "window" not in options]


@pytest.mark.parametrize("tq,tk,block_q,block_k", SHAPES)
@pytest.mark.parametrize("kv_heads", [H, H // 2, 1])
@pytest.mark.parametrize("variant,causal", CASES)
def test_sdpa_and_tiled_match_naive(variant, causal, kv_heads, tq, tk, block_q, block_k):
    options = dict(VARIANTS[variant], causal=causal)
    data = inputs(tq, tk, kv_heads)
    want = run(naive.attend, *data, **options)
    assert_agree(run(sdpa.attend, *data, **options), want)
    assert_agree(run(blocked(block_q, block_k), *data, **options), want)


def test_every_variant_changes_the_output():
    """The comparisons above can fail: each option changes naive's output, but a window longer
    than every distance, which is full causal attention."""
    data = inputs(37, 37, H // 2)
    plain = run(naive.attend, *data, causal=True)[0]
    for variant, options in VARIANTS.items():
        changed = run(naive.attend, *data, **dict(options, causal=True))[0]
        same = variant in ("plain", "window longer than T")
        assert torch.allclose(changed, plain, atol=1e-3) == same, variant


@pytest.mark.parametrize("attend", [sdpa.attend, blocked(16, 8), tiled.attend],
                         ids=["sdpa", "tiled", "tiled decode"])
def test_window_of_one_returns_each_positions_value(attend):
    """Hand-derived: a query that sees only its own key gives that key's value (of its key/value
    head) whatever the scores, so no score, no query and no key gets a gradient."""
    tq = 1 if attend is tiled.attend else 30
    q, k, v, table, grad_out = inputs(tq, 30, kv_heads=2)
    got = run(attend, q, k, v, table, grad_out, causal=True, window=1, softcap=5.0,
              alibi=True, relative=True)
    out, dq, dk, dv, dtable = got
    torch.testing.assert_close(out, v[:, :, -tq:].repeat_interleave(2, dim=1))
    for grad in (dq, dk, dtable):
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-4, rtol=0)
    # dV of key head 0 at position j sums the output gradients of query heads 0 and 1 there.
    torch.testing.assert_close(dv[:, 0, -tq:], grad_out[:, 0] + grad_out[:, 1])


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("kv_heads", [H // 2, 1])
def test_tiled_grouped_query_never_repeats_keys(kv_heads):
    """Neither the forward nor the backward makes any tensor as large as keys repeated for every
    query head (B·H·Tk·D), and autograd keeps the keys and values at their own size."""
    tq, tk = 8, 96  # few queries: q and dq are much smaller than repeated keys
    q, k, v, table, grad_out = inputs(tq, tk, kv_heads)
    repeated = B * H * tk * D

    def largest(attend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        saved = []
        with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(
                lambda x: saved.append(x.numel()) or x, lambda x: x):
            out = attend(*leaves, causal=True, scale=0.25)
            torch.autograd.grad(out, leaves, grad_out)
        return mode.largest, saved

    biggest, saved = largest(blocked(16, 16))
    assert biggest < repeated
    # q, k, v, the output and each row's maximum and sum, each at its own size
    assert sorted(saved) == sorted([q.numel(), k.numel(), v.numel(), q.numel(), B * H * tq,
                                    B * H * tq])
    assert largest(naive.attend)[0] >= repeated  # the check can fail: naive repeats them


def tiled_flops(t, window):
    q, k, v, _, grad_out = inputs(t, t, kv_heads=2)
    q.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        out = tiled.attend(q, k, v, causal=True, scale=0.25, window=window, block_q=16,
                           block_k=16)
        out.backward(grad_out)
    return counter.get_total_flops()


def test_tiled_window_work_grows_linearly_in_length():
    """Key blocks wholly outside every row's window are skipped, forward and backward: with a
    window of 16, doubling T doubles the matmul work, where full attention quadruples it."""
    windowed = [tiled_flops(t, 16) for t in (128, 256)]
    full = [tiled_flops(t, 0) for t in (128, 256)]
    assert windowed[1] / windowed[0] == pytest.approx(2, rel=0.1)
    assert full[1] / full[0] == pytest.approx(4, rel=0.1)
    assert windowed[1] < full[1] / 4


@pytest.mark.parametrize("attend", [sdpa.attend, tiled.attend], ids=["sdpa", "tiled"])
def test_additive_scores_are_refused_by_name(attend):
    q, k, v, _, _ = inputs(8, 8, H)
    with pytest.raises(ValueError, match="additive scores need the naive backend"):
        attend(q, k, v, causal=True, scale=1.0, additive=torch.ones(H, D))


def test_backend_capabilities_agree_with_the_config_choices():
    assert {n for n, b in BACKENDS.items() if b.dropout} == set(choices.DROPOUT_BACKENDS)
    assert {n for n, b in BACKENDS.items() if b.additive} == set(choices.ADDITIVE_BACKENDS)
