"""The C decode kernels against torch: F.linear in float64, and SDPA with ALiBi's bias written out
by hand. Skipped where no C compiler builds them; the fallback to torch is tested everywhere."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from attnlm import native


@pytest.fixture
def lib():
    built = native.library()
    if built is None:
        pytest.skip("no C compiler here: the kernels are not built")
    return built


@pytest.fixture
def torch_only(monkeypatch):
    """native's F.linear fails the test: whatever runs, ran in the C kernel."""
    def fail(*args):
        raise AssertionError("fell back to torch")
    monkeypatch.setattr(native, "F", types.SimpleNamespace(linear=fail))


@pytest.fixture
def rebuild():
    """A library() that looks again, and forgets afterwards what it found."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def reference_linear(x, weight, bias):
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).float()


@pytest.mark.parametrize("n_in,n_out", [(5, 7), (64, 33), (384, 1152)])
@pytest.mark.parametrize("rows", [1, 3, native.MAX_ROWS])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_a_float64_product(lib, torch_only, n_in, n_out, rows, with_bias):
    g = torch.Generator().manual_seed(rows * n_in)
    weight = torch.randn(n_out, n_in, generator=g)
    bias = torch.randn(n_out, generator=g) if with_bias else None
    x = torch.randn(1, rows, n_in, generator=g)
    with torch.no_grad():
        out = native.linear(x, weight, bias)
    assert out.shape == (1, rows, n_out)
    torch.testing.assert_close(out, reference_linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_reads_strided_inputs_and_biases(lib, torch_only):
    weight = torch.randn(300, 4)
    x = torch.randn(4, 2).T  # (2, 4), not contiguous
    for bias in torch.randn(600)[::2], torch.randn(1).expand(300):  # a copy is made for the call
        with torch.no_grad():
            torch.testing.assert_close(native.linear(x, weight, bias), reference_linear(x, weight, bias))


@pytest.mark.parametrize("case", ["many rows", "autograd", "float64", "transposed weight", "autocast"])
def test_linear_leaves_to_torch_what_the_kernel_does_not_fit(lib, monkeypatch, case):
    calls = []
    monkeypatch.setattr(native, "F", types.SimpleNamespace(
        linear=lambda *args: calls.append(args) or F.linear(*args)))
    weight = torch.randn(8, 5, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "transposed weight":
        weight = torch.randn(5, 8).T
    weight.requires_grad_(case == "autograd")
    x = torch.randn(native.MAX_ROWS + 1 if case == "many rows" else 1, 5, dtype=weight.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = native.linear(x, weight)
        expected = F.linear(x, weight)
    assert len(calls) == 1 and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected)
    if case == "autograd":
        out.sum().backward()
        torch.testing.assert_close(weight.grad, x.sum(0).expand(8, 5))


def cache_views(batch, heads, t, d, generator):
    """Keys and values as a decode step sees them: the filled part of (B, H, L, D) buffers."""
    shape = (batch, heads, t + 7, d)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return keys.narrow(2, 0, t), values.narrow(2, 0, t)


@pytest.mark.parametrize("t", [1, 5, 100])
@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("alibi", [False, True])
def test_attend_one_equals_sdpa(lib, t, d, alibi):
    batch, heads = 2, 3
    g = torch.Generator().manual_seed(t * d)
    k, v = cache_views(batch, heads, t, d, g)
    q = torch.randn(batch, 1, heads, d, generator=g).transpose(1, 2)  # (B, H, 1, D), strided
    slopes = torch.tensor([0.5, 0.25, 0.125]) if alibi else None
    bias = torch.zeros(heads, 1, t)
    if alibi:  # the newest key is at distance 0, the oldest at t - 1
        bias = -slopes.view(heads, 1, 1) * torch.arange(t - 1, -1, -1).float()
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        out = native.attend_one(q, k, v, scale, slopes)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["two queries", "strided keys", "autograd"])
def test_attend_one_declines_what_it_does_not_fit(lib, case):
    g = torch.Generator().manual_seed(0)
    k, v = cache_views(1, 2, 6, 4, g)
    q = torch.randn(1, 2, 2 if case == "two queries" else 1, 4, requires_grad=case == "autograd")
    if case == "strided keys":
        k, v = k.transpose(2, 3).contiguous().transpose(2, 3), v.transpose(2, 3).contiguous().transpose(2, 3)
    assert native.attend_one(q, k, v, 0.5) is None


@pytest.mark.parametrize("why", ["no compiler", "turned off"])
def test_without_the_kernels_everything_runs_on_torch(rebuild, monkeypatch, tmp_path, why):
    monkeypatch.setenv("ATTNLM_CACHE", str(tmp_path))  # nothing built there before
    if why == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    else:
        monkeypatch.setenv("ATTNLM_NATIVE", "0")
    assert native.library() is None
    x, weight = torch.randn(1, 5), torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(native.linear(x, weight), F.linear(x, weight))
        assert native.attend_one(torch.randn(1, 1, 1, 4), *cache_views(1, 1, 3, 4, None), 0.5) is None
    assert not any(tmp_path.rglob("*.so"))
