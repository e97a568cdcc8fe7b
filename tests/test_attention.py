"""Attention backends against independent references: naive (scores materialised) and torch's
SDPA, in outputs and in the gradients of q, k and v."""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnlm.attention import BACKENDS, check_backend, get_backend, masks, naive, sdpa, tiled
from attnlm.config import build_config
from attnlm.errors import AttnlmError, ConfigError, InputError
from attnlm.positional import alibi_slopes

B, H = 2, 3


def qkv(tq, tk, d=32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, t, d, generator=gen) for t in (tq, tk, tk))
    grad_out = torch.randn(B, H, tq, d, generator=gen)
    return q, k, v, grad_out


def run(attend, q, k, v, grad_out, **kwargs):
    """The output and the gradients of q, k and v for a backward pass from grad_out."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, scale=q.size(-1) ** -0.5, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_agree(got, want, tol=1e-5):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


# (Tq, Tk): training (Tq == Tk) and prefill or cached decoding (Tq < Tk).
LENGTHS = [(1, 1), (7, 7), (64, 64), (100, 100), (300, 300), (1, 300), (7, 100), (64, 300),
           (100, 300)]
BLOCKS = [(16, 16), (32, 64), (7, 13), (None, None)]  # None: the device's default


@pytest.mark.parametrize("tq,tk", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_naive(tq, tk, causal):
    q, k, v, g = qkv(tq, tk)
    assert_agree(run(sdpa.attend, q, k, v, g, causal=causal),
                 run(naive.attend, q, k, v, g, causal=causal))


@pytest.mark.parametrize("tq,tk", LENGTHS)
@pytest.mark.parametrize("block_q,block_k,causal", [(*b, True) for b in BLOCKS]
                         + [(16, 16, False), (None, None, False)])
def test_tiled_matches_naive_and_sdpa(tq, tk, block_q, block_k, causal):
    q, k, v, g = qkv(tq, tk)
    got = run(tiled.attend, q, k, v, g, causal=causal, block_q=block_q, block_k=block_k)
    assert_agree(got, run(naive.attend, q, k, v, g, causal=causal))
    assert_agree(got, run(sdpa.attend, q, k, v, g, causal=causal))


# ALiBi: naive adds the (H, Tq, Tk) bias to its scores, sdpa takes it as a mask, tiled computes it
# inside each tile (so tiles at every offset from the diagonal are exercised).
@pytest.mark.parametrize("tq,tk", LENGTHS)
@pytest.mark.parametrize("block_q,block_k,causal",
                         [(16, 16, True), (7, 13, True), (None, None, True), (16, 32, False)])
def test_alibi_tiled_and_sdpa_match_naive(tq, tk, block_q, block_k, causal):
    q, k, v, g = qkv(tq, tk)
    slopes = alibi_slopes(H)
    want = run(naive.attend, q, k, v, g, causal=causal, alibi_slopes=slopes)
    assert_agree(run(tiled.attend, q, k, v, g, causal=causal, alibi_slopes=slopes,
                     block_q=block_q, block_k=block_k), want)
    assert_agree(run(sdpa.attend, q, k, v, g, causal=causal, alibi_slopes=slopes), want)
    if tk > 1:  # the check can fail: without the bias the outputs differ
        unbiased = run(naive.attend, q, k, v, g, causal=causal)[0]
        assert not torch.allclose(unbiased, want[0], atol=1e-3)


class TileShapes(TorchDispatchMode):
    """The shapes of the score tiles (the outputs of the products of queries and keys) made
    under it."""

    def __init__(self, queries):
        super().__init__()
        self.queries, self.shapes = queries, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket == torch.ops.aten.bmm and args[0].size(-1) > self.queries:
            self.shapes.add(tuple(out.shape[1:]))  # a row of queries with its extra column
        return out


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 40), (False, 0)])
def test_tiled_backward_cuts_its_own_blocks_and_agrees_with_naive(monkeypatch, causal, window):
    """Without blocks given, the backward takes BACKWARD_BLOCKS where it has them, the forward
    DEFAULT_BLOCKS; the backward recomputes the forward's probabilities in its own tiles."""
    monkeypatch.setitem(tiled.DEFAULT_BLOCKS, "cpu", {torch.float32: (16, 8)})
    monkeypatch.setitem(tiled.BACKWARD_BLOCKS, "cpu", {torch.float32: (24, 40)})
    q, k, v, g = qkv(70, 100)
    options = dict(causal=causal, window=window, alibi_slopes=alibi_slopes(H))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with TileShapes(q.size(-1)) as forward:
        out = tiled.attend(*leaves, scale=q.size(-1) ** -0.5, **options)
    with TileShapes(q.size(-1)) as backward:
        grads = torch.autograd.grad(out, leaves, g)
    for seen, (rows, cols) in ((forward.shapes, (16, 8)), (backward.shapes, (24, 40))):
        assert (rows, cols) in seen
        assert max(r for r, _ in seen) == rows
    assert max(c for _, c in backward.shapes) == 40
    assert_agree((out, *grads), run(naive.attend, q, k, v, g, **options))


def test_alibi_with_steep_slopes_masks_far_keys_in_tiled_as_in_naive():
    # Slopes of 4: far keys get biases of several hundred, exercising the online softmax's
    # rescaling with large negative scores.
    q, k, v, g = qkv(100, 100)
    slopes = torch.tensor([4.0, 1.0, 0.01])
    assert_agree(run(tiled.attend, q, k, v, g, causal=True, alibi_slopes=slopes, block_q=16,
                     block_k=16),
                 run(naive.attend, q, k, v, g, causal=True, alibi_slopes=slopes))


@pytest.mark.parametrize("direction", ["growing", "falling"])
def test_tiled_rescales_when_the_maximum_grows(direction):
    # Large scores growing along the keys one way or the other: tiled takes key blocks from the
    # diagonal leftwards, so with falling scores the first block sets each row's maximum, and
    # with growing ones later blocks raise it far above, beyond what lazy rescaling may keep,
    # and must be redone and rescaled (an error there shows in every output).
    q, k, v, g = qkv(96, 96)
    gain = torch.linspace(0.5, 4.0, 96) if direction == "falling" else torch.linspace(4.0, 0.5, 96)
    k = k * gain.view(1, 1, 96, 1)
    got = run(tiled.attend, q * 4, k, v, g, causal=True, block_q=32, block_k=16)
    assert_agree(got, run(naive.attend, q * 4, k, v, g, causal=True), tol=1e-4)


def test_tiled_redoes_tiles_whose_scores_rise_far_above_the_maximum():
    # Negative ALiBi slopes: each key block further left scores 16·4 = 64 higher (in natural
    # units) than the one before, so every block overflows the lazy rescaling's limit.
    q, k, v, g = qkv(100, 100)
    slopes = torch.tensor([-4.0, -1.0, 0.01])
    assert_agree(run(tiled.attend, q, k, v, g, causal=True, alibi_slopes=slopes, block_q=16,
                     block_k=16),
                 run(naive.attend, q, k, v, g, causal=True, alibi_slopes=slopes), tol=1e-4)


def test_tiled_takes_strided_inputs_as_the_model_gives_them():
    # The model's q, k and v are (B, T, H, D) tensors viewed as (B, H, T, D).
    q, k, v, g = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(50, 50))
    assert not q.is_contiguous()
    assert_agree(run(tiled.attend, q, k, v, g, causal=True, block_q=16, block_k=16),
                 run(naive.attend, q, k, v, g, causal=True))


@pytest.mark.parametrize("block_q,block_k", [(None, None), (16, 16), (16, 8)])
def test_tiled_bfloat16_returns_bfloat16_as_close_to_float32_as_naive(block_q, block_k):
    q, k, v, g = qkv(100, 100)
    low = run(tiled.attend, *(t.bfloat16() for t in (q, k, v, g)), causal=True, block_q=block_q,
              block_k=block_k)
    assert all(t.dtype == torch.bfloat16 for t in low)
    naive_low = run(naive.attend, *(t.bfloat16() for t in (q, k, v, g)), causal=True)
    reference = run(naive.attend, q, k, v, g, causal=True)
    for got, naive_got, want in zip(low, naive_low, reference):
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
        # no further from float32 than naive's bfloat16 scores and probabilities are
        assert (got.float() - want).abs().mean() <= 1.5 * (naive_got.float() - want).abs().mean()


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 24)])
@pytest.mark.parametrize("tq,window", [(100, 0), (40, 0), (40, 30)])
def test_tiled_bfloat16_agrees_with_naive_with_keys_before_the_queries_and_a_window(
        tq, window, block_q, block_k):
    """bfloat16 keys and values are cut into contiguous pieces on the grid of the forward's key
    tiles; with queries after a prefix of keys, a window, or a query block that is no multiple
    of the key block, some tiles lie across pieces or in part of one."""
    q, k, v, g = qkv(tq, 100)
    options = dict(causal=True, window=window)
    low = run(tiled.attend, *(t.bfloat16() for t in (q, k, v, g)), block_q=block_q,
              block_k=block_k, **options)
    naive_low = run(naive.attend, *(t.bfloat16() for t in (q, k, v, g)), **options)
    reference = run(naive.attend, q, k, v, g, **options)
    for got, naive_got, want in zip(low, naive_low, reference):
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
        assert (got.float() - want).abs().mean() <= 1.5 * (naive_got.float() - want).abs().mean()


@pytest.mark.parametrize("size,phase", [(4, 0), (4, 3), (4, 7), (5, 1), (None, 3)])
def test_blocks_give_every_range_as_the_tensor_holds_it(size, phase):
    x = torch.arange(2 * 13 * 3).view(2, 13, 3)
    blocks = tiled.Blocks(x, 1, size, phase)
    for j0 in range(13):
        for j1 in range(j0 + 1, 14):
            assert torch.equal(blocks(j0, j1), x[:, j0:j1])


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the operands of every matmul run under it."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype,matmul_dtype", [(torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float32),
                                                (torch.float32, torch.float32)])
def test_tiled_forward_multiplies_bfloat16_in_bfloat16_and_the_rest_in_float32(dtype,
                                                                               matmul_dtype):
    """bfloat16 inputs reach the forward's matmuls as they are (the CPU's bfloat16 matrix units
    do them several times faster than float32); float16 and float32 in float32."""
    q, k, v, _ = qkv(64, 64)
    with torch.no_grad(), MatmulDtypes() as seen:
        out = tiled.attend(*(t.to(dtype) for t in (q, k, v)), causal=True, scale=0.2, block_q=16,
                           block_k=16)
    assert seen.dtypes == {matmul_dtype}
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype,matmul_dtype", [(torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.float32)])
def test_tiled_backward_multiplies_in_the_forwards_dtype(dtype, matmul_dtype):
    """The backward's matmuls take bfloat16 inputs as they are too, summing the products into
    float32 gradients."""
    q, k, v, g = (t.to(dtype).requires_grad_() for t in qkv(64, 64))
    out = tiled.attend(q, k, v, causal=True, scale=0.2, block_q=16, block_k=16)
    with MatmulDtypes() as seen:
        grads = torch.autograd.grad(out, (q, k, v), g)
    assert seen.dtypes == {matmul_dtype}
    assert all(grad.dtype == dtype for grad in grads)


def test_tiled_saves_memory_linear_in_length():
    """Autograd keeps only q, k, v, the output and each row's maximum and sum: nothing of size
    Tq x Tk."""
    t, d = 256, 16

    def saved_elements(attend, **blocks):
        q, k, v, _ = qkv(t, t, d)
        q.requires_grad_()
        sizes = []

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            attend(q, k, v, causal=True, scale=0.25, **blocks)
        return sum(sizes)

    linear = B * H * t * (4 * d + 2)  # q, k, v, out and two statistics per row
    assert saved_elements(tiled.attend, block_q=32, block_k=32) == linear
    slopes = alibi_slopes(H)
    assert saved_elements(tiled.attend, block_q=32, block_k=32, alibi_slopes=slopes) == linear
    # The check can fail: naive keeps the (T x T) probabilities.
    assert saved_elements(naive.attend) > 2 * linear


def test_tiled_refuses_dropout():
    q, k, v, _ = qkv(8, 8)
    with pytest.raises(ValueError, match="dropout"):
        tiled.attend(q, k, v, causal=True, scale=1.0, dropout_p=0.1)


@pytest.mark.parametrize("name", ["tiled", "triton"])
def test_config_rejects_attention_dropout_for_backends_without_it(name):
    with pytest.raises(ConfigError, match="does not support attention dropout"):
        build_config(overrides=[f"model.attention={name}", "model.attn_dropout=0.1"])
    assert build_config(overrides=[f"model.attention={name}"]).model.attention == name


def test_check_backend_refuses_triton_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    with pytest.raises(InputError, match="needs a CUDA device"):
        check_backend("triton", torch.device("cpu"))
    check_backend("triton", torch.device("cuda"))
    for name in ("naive", "sdpa", "tiled"):
        check_backend(name, torch.device("cpu"))


def test_check_backend_refuses_triton_when_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install 'attnlm\\[triton\\]'"):
        check_backend("triton", torch.device("cuda"))


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_registered_backend_computes_attention_as_torch_does(name):
    """Each name the config accepts reaches a working backend: output and gradients against
    torch's own SDPA, with the causal mask of a prefill (Tq < Tk) built here by hand."""
    backend = BACKENDS[name]
    if backend.package and importlib.util.find_spec(backend.package) is None:
        pytest.skip(f"the optional {backend.package} package is not installed")
    device = torch.device("cuda" if backend.cuda_only and torch.cuda.is_available() else "cpu")
    check_backend(name, device)  # on the CPU, triton runs in its interpreter (conftest)
    build_config(overrides=[f"model.attention={name}"])
    q, k, v, g = (t.to(device) for t in qkv(7, 20, d=16))
    seen = torch.ones(7, 20, dtype=torch.bool, device=device).tril(20 - 7)

    def reference(q, k, v, *, causal, scale):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)

    assert_agree(run(get_backend(name), q, k, v, g, causal=True), run(reference, q, k, v, g, causal=True))


# Triton: compiled on CUDA; elsewhere the interpreter runs the same kernels in NumPy, a few hundred
# times slower, so the sizes here are small (and blocks of 16, tl.dot's smallest).
@pytest.fixture(scope="module")
def triton_kernel():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the optional triton package is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: interpreted (conftest)
    from attnlm.attention import triton_kernel

    return triton_kernel, device


# (Tq, Tk, head dim, query block, key block, causal); a head dim of 24 pads to a block of 32.
TRITON_CASES = [(1, 1, 16, 16, 16, True), (7, 7, 16, 16, 16, True), (64, 64, 32, 16, 32, True),
                (64, 64, 32, 32, 16, True), (100, 100, 16, 32, 32, True),
                (50, 50, 16, 16, 16, False), (1, 100, 16, 16, 16, True),
                (7, 70, 16, 32, 16, True), (33, 70, 24, 16, 32, True), (33, 70, 24, 16, 16, False)]


@pytest.mark.parametrize("tq,tk,d,block_q,block_k,causal", TRITON_CASES)
def test_triton_matches_naive(triton_kernel, tq, tk, d, block_q, block_k, causal):
    kernel, device = triton_kernel
    q, k, v, g = (t.to(device) for t in qkv(tq, tk, d))
    got = run(kernel.attend, q, k, v, g, causal=causal, block_q=block_q, block_k=block_k)
    assert_agree(got, run(naive.attend, q, k, v, g, causal=causal))


@pytest.mark.parametrize("tq,tk,d,block_q,block_k,causal", [
    (64, 64, 32, 16, 32, True), (100, 100, 16, 32, 32, True), (7, 70, 16, 32, 16, True),
    (33, 70, 24, 16, 32, True), (33, 70, 24, 16, 16, False)])
def test_triton_with_alibi_matches_naive(triton_kernel, tq, tk, d, block_q, block_k, causal):
    kernel, device = triton_kernel
    q, k, v, g = (t.to(device) for t in qkv(tq, tk, d))
    slopes = alibi_slopes(H).to(device)
    got = run(kernel.attend, q, k, v, g, causal=causal, alibi_slopes=slopes, block_q=block_q,
              block_k=block_k)
    assert_agree(got, run(naive.attend, q, k, v, g, causal=causal, alibi_slopes=slopes))


@pytest.mark.parametrize("causal", [True, False])
def test_triton_in_float16_matches_naive_in_float32(triton_kernel, causal):
    """Half precision through the kernels' 16-bit paths (operands in float16, sums in float32),
    against naive in float32 on the same rounded inputs."""
    kernel, device = triton_kernel
    q, k, v, g = (t.to(device).half() for t in qkv(33, 70, 16))
    got = run(kernel.attend, q, k, v, g, causal=causal, block_q=16, block_k=32)
    assert all(t.dtype == torch.float16 for t in got)
    want = run(naive.attend, q.float(), k.float(), v.float(), g.float(), causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-3, name


def test_triton_takes_keys_and_values_in_another_dtype(triton_kernel):
    """A kernel's products take operands of one dtype: keys and values in float16 beside float32
    queries are computed in float32, as naive computes them, their gradients in their own."""
    kernel, device = triton_kernel
    q, k, v, g = (t.to(device) for t in qkv(33, 33, 16))
    k, v = k.half(), v.half()
    got = run(kernel.attend, q, k, v, g, causal=True, block_q=16, block_k=16)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.float16, torch.float16]
    want = run(naive.attend, q, k.float(), v.float(), g, causal=True)
    assert_agree([t.float() for t in got], [*want[:2], *(t.half().float() for t in want[2:])])


def test_triton_refuses_more_sequences_x_heads_than_a_cuda_grid_holds(triton_kernel):
    kernel, device = triton_kernel
    q = torch.zeros(2, kernel.MAX_GRID_Y // 2 + 1, 1, 16, device=device)
    with pytest.raises(InputError, match="at most 65,535 sequences x heads"):
        kernel.attend(q, q, q, causal=True, scale=0.25)


def test_triton_names_a_gpu_too_small_for_its_tiles(triton_kernel, monkeypatch):
    from triton.runtime.errors import OutOfResources

    kernel, device = triton_kernel

    class TooLarge:  # a kernel whose tiles need more shared memory than the GPU has
        def __getitem__(self, grid):
            def launch(*args, **flags):
                raise OutOfResources(262144, 232448, "shared memory")
            return launch

    monkeypatch.setattr(kernel, "_fwd_kernel", TooLarge())
    q = torch.zeros(1, 2, 8, 16, device=device)
    with pytest.raises(AttnlmError, match="head dim 16 in torch.float32 do not fit this GPU .*"
                                          "Required: 262144.*use model.attention=tiled or sdpa"):
        kernel.attend(q, q, q, causal=True, scale=0.25)


def separate_passes(q, k, v, **options):
    """The scores as naive computed them before they became one product: the product, then the
    scale, each bias and the mask in passes of their own; softmax; times v."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * options["scale"]
    tq, tk = s.shape[-2:]
    if options.get("alibi_slopes") is not None:
        s = s + masks.alibi_bias(options["alibi_slopes"], tq, tk, options["causal"]).to(s.dtype)
    if options.get("relative") is not None:
        s = s + masks.relative_bias(options["relative"], tq, tk, options["causal"]).to(s.dtype)
    if options["causal"]:
        s = s.masked_fill(~masks.visible(tq, tk, True, options.get("window", 0)), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("options", [
    {"causal": True}, {"causal": False}, {"causal": True, "window": 5}, {"causal": True, "kv": 1},
    {"causal": True, "alibi": True}, {"causal": False, "alibi": True}, {"causal": True, "relative": True}])
def test_naive_scores_in_one_product_match_separate_passes(options):
    """Scale, biases and mask added inside the product: outputs and gradients (the relative
    table's too) as before in float32; under bfloat16 autocast about as far from float32's."""
    q, k, v, g = qkv(37, 37, d=16)
    options = dict(options)
    if options.pop("kv", None):
        k, v = k[:, :1], v[:, :1]
    if options.pop("alibi", None):
        options["alibi_slopes"] = alibi_slopes(H)
    table = torch.randn(H, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if options.pop("relative", None):
        options["relative"] = (table, masks.relative_buckets(37, 8, 20))

    def results(attend, dtype):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = attend(*inputs, scale=0.25, **options)
        inputs += [table] if "relative" in options else []
        return [t.float() for t in (out, *torch.autograd.grad(out, inputs, g.to(out.dtype)))]

    exact = results(separate_passes, torch.float32)
    for got, want in zip(results(naive.attend, torch.float32), exact):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    before = results(separate_passes, torch.bfloat16)
    for got, old, want in zip(results(naive.attend, torch.bfloat16), before, exact):
        # rounded at other places: about as far from float32 (bfloat16 keeps 8 bits: 0.4%)
        assert (got - want).abs().max() <= 2 * (old - want).abs().max() + 0.01 * want.abs().max()


def test_naive_scales_and_masks_inside_the_product():
    """No pass of its own over the (B, H, T, T) scores for the scale or the causal mask."""
    q, k, v, _ = qkv(64, 64)
    with torch.profiler.profile(record_shapes=True) as prof:
        naive.attend(q, k, v, causal=True, scale=0.125)
    events = prof.key_averages(group_by_input_shape=True)
    passes = {event.key for event in events if [B, H, 64, 64] in event.input_shapes}
    assert "aten::softmax" in passes and "aten::baddbmm" in {event.key for event in events}
    assert not passes & {"aten::mul", "aten::div", "aten::masked_fill", "aten::add", "aten::where"}
